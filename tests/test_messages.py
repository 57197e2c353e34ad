"""What crosses the wire: only trainable tensors and scalar metrics; client state persists."""

from __future__ import annotations

import pytest
import torch
from conftest import bound_method, server_msg
from flwr.app import ArrayRecord, Context, Message, MessageType, MetricRecord, RecordDict

from fedmm.federation import clientapp, messages
from fedmm.methods import METHODS as REGISTRY
from fedmm.runtime import get_runtime

pytestmark = pytest.mark.usefixtures("flower_task_identity")


def make_context(index=0) -> Context:
    return Context(run_id=1, node_id=100 + index, node_config={"partition-id": index, "num-partitions": 3},
                   state=RecordDict(), run_config={})  # fmt: skip


def send(cfg, context, kind, rnd, global_np=None, last_trained=0):
    method = bound_method(cfg)
    if global_np is None:
        global_np = method.init_global(get_runtime(cfg).model)
    index = int(context.node_config.get("partition-id", 0))
    msg = Message(server_msg(cfg, global_np, rnd, index, last_trained), 100, kind)
    return clientapp.handle(msg, context, train=kind == MessageType.TRAIN), global_np


METHODS = [name for name, cls in REGISTRY.items() if cls.federated]
OTHER_PEFT = [(m, t) for m in ("fedavg", "feddat") for t in ("lora", "prompt", "bitfit")]


@pytest.mark.parametrize(
    "name,peft_type", [(m, "adapter") for m in METHODS] + OTHER_PEFT + [("fedpia", "lora")]
)
def test_train_reply_holds_only_declared_trainable_tensors_and_scalars(tiny_cfg, name, peft_type):
    cfg = tiny_cfg.with_overrides({"method": name, "peft.type": peft_type})
    reply, _ = send(cfg, make_context(), MessageType.TRAIN, 1)
    content = reply.content
    assert set(content.keys()) == {messages.UPDATE, messages.METRICS}
    assert isinstance(content[messages.UPDATE], ArrayRecord)
    assert isinstance(content[messages.METRICS], MetricRecord)
    assert all(isinstance(v, float | int) for v in content[messages.METRICS].values())
    keys = set(content[messages.UPDATE].keys())
    method = bound_method(cfg)
    model = get_runtime(cfg).model
    assert keys == set(method.upload_spec(model))
    frozen = model.frozen_state_keys()
    assert not any(k.split("/", 1)[1] in frozen or k.startswith(("vision", "text")) for k in keys)
    if name == "feddat":
        assert not any(
            "client_adapter" in k or "frozen_global" in k or k.startswith("head/") for k in keys
        )
    if name == "ditto":
        assert not any("personal_adapter" in k for k in keys)
    if name == "fedper":
        assert not any(k.startswith("head/") for k in keys)
    if name == "local":
        assert keys == set()


def test_evaluate_reply_holds_only_metrics_per_view(tiny_cfg):
    cfg = tiny_cfg.with_overrides({"method": "feddat"})
    context = make_context()
    send(cfg, context, MessageType.TRAIN, 1)
    reply, _ = send(cfg, context, MessageType.EVALUATE, 1)
    assert set(reply.content.keys()) == {messages.METRICS}
    m = reply.content[messages.METRICS]
    assert {k for k in m.keys() if k.startswith("acc.")} == {
        "acc.shared+head",
        "acc.personal",
        "acc.client",
    }
    assert all(0.0 <= m[k] <= 1.0 for k in m.keys() if k.startswith("acc."))


def test_client_state_persists_in_context_and_on_disk(tiny_cfg, tmp_path):
    cfg = tiny_cfg.with_overrides({"method": "feddat"})
    context = make_context(1)
    send(cfg, context, MessageType.TRAIN, 1)
    assert clientapp.STATE_KEY in context.state
    in_context = messages.from_record(context.state[clientapp.STATE_KEY])
    # the whole identity of the run names the file: method, PEFT, benchmark, seed, run id
    (path,) = (tmp_path / "xdg-state" / "fedmm").glob(
        "1-inverted/feddat-adapter-fmnist-domain-seed0-test/client.pt"
    )
    on_disk = torch.load(path, weights_only=True)
    assert on_disk["round"] == 1
    assert set(on_disk["state"]) == set(in_context)
    for k, v in on_disk["state"].items():
        assert torch.allclose(v, torch.from_numpy(in_context[k]))

    # a restarted node (empty Context) resumes from disk in round 2 ...
    restored = clientapp.restore_state(make_context(1), path, cfg, 2, last_trained=1)
    assert set(restored) == set(in_context)
    # ... but a new run (round 1) starts clean
    assert clientapp.restore_state(make_context(1), path, cfg, 1) == {}
    # the run's experiment is pinned once state is kept: a server that switches an option
    # mid-run (FedDAT's head federated from now on, a learning rate of ~0 -- the kept personal
    # head would come back as the upload) is refused; more rounds or another timeout are not
    switched = cfg.with_overrides({"feddat.federate_head": True, "train.lr": 1e-12})
    with pytest.raises(clientapp.RefusedMessage, match="feddat.federate_head, train.lr"):
        clientapp.restore_state(make_context(1), path, switched, 2, last_trained=1)
    extended = cfg.with_overrides({"fed.rounds": cfg.fed.rounds + 5})
    assert set(clientapp.restore_state(make_context(1), path, extended, 2, last_trained=1))
    # and a client whose state of the last aggregated round is gone is a loud error
    path.unlink()
    with pytest.raises(RuntimeError, match="client state of round 1"):
        clientapp.restore_state(make_context(1), path, cfg, 2, last_trained=1)


def test_node_without_partition_id_gets_a_clear_error(tiny_cfg):
    context = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(RuntimeError, match="partition-id"):
        send(tiny_cfg, context, MessageType.TRAIN, 1)


TRAIN_METRICS = {"client-index", "num-examples", "steps", "lr-first", "lr-last", "loss", "seconds",
                 "load-seconds"}  # fmt: skip
DP_METRICS = {"dp-clip-norm", "dp-noise-multiplier", "dp-mode", "dp-delta", "dp-epsilon"}


@pytest.mark.parametrize("name", METHODS)
def test_payload_audit_train_and_evaluate_of_every_method(tiny_cfg, name):
    """Everything that leaves a client, for every method: the declared trainable tensors with the
    model's own shapes (no raw images, token ids, embeddings or backbone weights) and named
    scalar metrics -- in both the train and the evaluate reply."""
    cfg = tiny_cfg.with_overrides({"method": name})
    context = make_context(2)
    model = get_runtime(cfg).model
    train, global_np = send(cfg, context, MessageType.TRAIN, 1)
    method = bound_method(cfg)
    declared = method.upload_spec(model)
    if method.per_client_messages:  # TAP sends (and takes back) each client's own part only
        sent = set(method.global_for_client(global_np, 2))
        declared = {k: v for k, v in declared.items() if k in sent}
    update = messages.from_record(train.content[messages.UPDATE])
    assert {k: v.shape for k, v in update.items()} == declared
    assert all(v.dtype == "float32" for v in update.values())
    metric_names = set(train.content[messages.METRICS].keys())
    # the method's own scalar statistics (``stat.*``: Ditto's and TAP's step counts, ...) aside
    assert {k for k in metric_names if not k.startswith("stat.")} == TRAIN_METRICS
    evaluate, _ = send(cfg, context, MessageType.EVALUATE, 1, global_np)
    assert set(evaluate.content.keys()) == {messages.METRICS}  # no arrays at all
    metric_keys = set(evaluate.content[messages.METRICS].keys())
    accuracies = {k for k in metric_keys if k.startswith("acc.")}
    assert accuracies and accuracies <= {
        f"acc.{v}" for v in method.views
    }  # views not all every round (TAP)
    assert metric_keys - accuracies == {"client-index", "num-examples", "seconds", "load-seconds"}
    # no array in any reply anywhere, other than the declared update
    assert len(train.content.array_records) == 1 and not evaluate.content.array_records
    assert not train.content.config_records and not evaluate.content.config_records


@pytest.mark.parametrize("mode", ["update", "record"])
def test_payload_audit_with_dp_adds_only_its_scalars(tiny_cfg, mode):
    """With DP the exact loss and every stat.* stay home (tests/test_privacy_budget.py); the
    client says what it applied and what it spent."""
    cfg = tiny_cfg.with_overrides(
        {"method": "fedavg", "dp.clip_norm": 0.5, "dp.noise_multiplier": 0.1}
    )
    context = make_context(0)
    context.node_config["dp-mode"] = mode
    train, _ = send(cfg, context, MessageType.TRAIN, 1)
    names = set(train.content[messages.METRICS].keys())
    record = {"dp-sample-rate", "dp-steps"} if mode == "record" else set()
    assert names == (TRAIN_METRICS - {"loss"}) | DP_METRICS | record


def test_a_client_never_sends_an_upload_its_method_did_not_declare(tiny_cfg, monkeypatch):
    from fedmm.methods.fedavg import FedAvg

    real = FedAvg.local_update

    def leaky(self, ctx, received):
        update = real(self, ctx, received)
        update.upload["head/extra"] = torch.zeros(1)
        return update

    monkeypatch.setattr(FedAvg, "local_update", leaky)
    with pytest.raises(RuntimeError, match="declared upload_spec"):
        send(tiny_cfg.with_overrides({"method": "fedavg"}), make_context(), MessageType.TRAIN, 1)
