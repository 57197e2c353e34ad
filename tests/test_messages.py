"""What crosses the wire: only trainable tensors and scalar metrics; client state persists."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, Context, Message, MessageType, MetricRecord, RecordDict

from fedmm.federation import clientapp, messages
from fedmm.methods import get_method
from fedmm.methods.base import part_module
from fedmm.runtime import get_runtime

pytestmark = pytest.mark.usefixtures("flower_task_identity")


def make_context(index=0) -> Context:
    return Context(run_id=1, node_id=100 + index, node_config={"partition-id": index, "num-partitions": 3},
                   state=RecordDict(), run_config={})  # fmt: skip


def send(cfg, context, kind, rnd, global_np=None):
    method = get_method(cfg)
    if global_np is None:
        global_np = method.init_global(get_runtime(cfg).model)
    msg = Message(messages.server_message(global_np, cfg, rnd), 100, kind)
    return clientapp.handle(msg, context, train=kind == MessageType.TRAIN), global_np


METHODS = ["fedavg", "fedprox", "fedadam", "ditto", "fedper", "fedpia", "feddat", "local", "tap"]
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
    method = get_method(cfg)
    assert {k.split("/")[0] for k in keys} == set(method.upload_parts())
    model = get_runtime(cfg).model
    expected = {
        f"{part}/{k}"
        for part in method.upload_parts()
        for k in part_module(model, part).state_dict()
    }
    assert keys == expected
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
        "acc.global",
        "acc.personalized",
        "acc.dat",
        "acc.client",
    }
    assert all(0.0 <= m[k] <= 1.0 for k in m.keys() if k.startswith("acc."))


def test_client_state_persists_in_context_and_on_disk(tiny_cfg):
    cfg = tiny_cfg.with_overrides({"method": "feddat"})
    context = make_context(1)
    send(cfg, context, MessageType.TRAIN, 1)
    assert clientapp.STATE_KEY in context.state
    in_context = messages.from_record(context.state[clientapp.STATE_KEY])
    path = clientapp.state_path(cfg, 1)
    on_disk = torch.load(path, weights_only=True)
    assert on_disk["round"] == 1
    assert set(on_disk["state"]) == set(in_context)
    for k, v in on_disk["state"].items():
        assert torch.allclose(v, torch.from_numpy(in_context[k]))

    # a restarted node (empty Context) resumes from disk in round 2 ...
    restored = clientapp.restore_state(make_context(1), cfg, 1, 2)
    assert set(restored) == set(in_context)
    # ... but a new run (round 1) starts clean
    assert clientapp.restore_state(make_context(1), cfg, 1, 1) == {}


def test_node_without_partition_id_gets_a_clear_error(tiny_cfg):
    context = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(RuntimeError, match="partition-id"):
        send(tiny_cfg, context, MessageType.TRAIN, 1)
