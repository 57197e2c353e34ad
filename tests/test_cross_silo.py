"""A federation, not a simulation in disguise: sites own their data, settings and privacy.

* a hostile server message (a site's path, device or threads; foreign tensors, wrong shapes,
  non-finite values; another schema; another client's index) is refused and nothing is written;
* the privacy floor of a site wins over the run's request; ε is accounted at the site, which
  stops training once its budget would be exceeded, and the round goes on without it;
* the server reads no data: a run over site directories works with every data loader broken in
  the server's process.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import bound_method, run_federation, server_msg
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from test_serverapp import InProcessGrid

from fedmm.config import ConfigError, experiment_keys
from fedmm.federation import clientapp, messages, privacy
from fedmm.federation.messages import RefusedMessage
from fedmm.federation.site import SiteSettings
from fedmm.runtime import get_runtime

pytestmark = pytest.mark.usefixtures("flower_task_identity")


def context(index: int = 0, **site) -> Context:
    node = {"partition-id": index, "num-partitions": 3, **site}
    return Context(run_id=1, node_id=100 + index, node_config=node, state=RecordDict(),
                   run_config={})  # fmt: skip


def train(cfg, ctx, rnd, global_np, last_trained=0, index=0):
    msg = Message(server_msg(cfg, global_np, rnd, index, last_trained), 100, MessageType.TRAIN)
    return clientapp.handle(msg, ctx, train=True)


def snapshot(root) -> dict:
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def with_experiment(msg: Message, **extra) -> RecordDict:
    content = msg.content
    config = dict(content[messages.CONFIG])
    experiment = json.loads(str(config["experiment"])) | extra
    config["experiment"] = json.dumps(experiment)
    return RecordDict({messages.GLOBAL: content[messages.GLOBAL],
                       messages.CONFIG: ConfigRecord(config)})  # fmt: skip


def test_the_experiment_allowlist_holds_no_site_or_server_setting():
    keys = experiment_keys()
    for key in ("data.data_dir", "cache_dir", "device", "train.threads", "out_dir", "data.schema"):
        assert key not in keys
    assert {"method", "train.lr", "peft.type", "dp.clip_norm", "fed.rounds"} <= keys


def test_hostile_server_messages_are_refused_and_nothing_is_written(tiny_cfg, tmp_path):
    cfg = tiny_cfg.with_overrides({"method": "fedavg"})
    ctx = context(0, **{"dp-clip-norm": 10.0, "dp-noise-multiplier": 0.1})
    global_np = bound_method(cfg).init_global(get_runtime(cfg).model)
    train(cfg, ctx, 1, global_np)  # a valid round: state and privacy ledger exist
    state_root = tmp_path / "xdg-state"
    before, context_before = snapshot(state_root), dict(ctx.state)
    assert any(p.name == "client.pt" for p in before) and any(
        p.parent.name == "privacy" and p.suffix == ".json" for p in before
    )

    good = Message(server_msg(cfg, global_np, 2, 0, last_trained=1), 100, MessageType.TRAIN)
    key = next(iter(global_np))
    hostile = {
        "a site path": with_experiment(good, **{"data.data_dir": "/etc"}),
        "the site's device": with_experiment(good, device="cuda:7"),
        "the site's threads": with_experiment(good, **{"train.threads": 64}),
        "where the site writes": with_experiment(good, cache_dir="/tmp/elsewhere"),
        "an unknown option": with_experiment(good, **{"train.nonsense": 1}),
        "a local model path": with_experiment(good, **{"model.hf_path": "/etc/models"}),
        "a frozen backbone tensor": server_msg(
            cfg, {**global_np, "text/encoder.layer.0.weight": np.zeros((4, 4), np.float32)}, 2,
            0, 1),
        "a wrong shape": server_msg(cfg, {**global_np, key: np.zeros((3,), np.float32)}, 2, 0, 1),
        "a missing tensor": server_msg(
            cfg, {k: v for k, v in global_np.items() if k != key}, 2, 0, 1),
        "NaN": server_msg(cfg, {**global_np, key: np.full_like(global_np[key], np.nan)}, 2, 0, 1),
        "another schema": messages.server_message(global_np, cfg, 2, 0, "0" * 64, 1, "test"),
        "another client's index": server_msg(cfg, global_np, 2, 1, 1),
    }  # fmt: skip
    for what, content in hostile.items():
        with pytest.raises(RefusedMessage):
            clientapp.handle(Message(content, 100, MessageType.TRAIN), ctx, train=True)
        assert snapshot(state_root) == before, what  # byte-identical: nothing written
        assert dict(ctx.state) == context_before, what
    train(cfg, ctx, 2, global_np, last_trained=1)  # the same site still serves honest rounds


def test_unknown_site_setting_is_an_error_naming_the_valid_ones():
    with pytest.raises(ConfigError, match="data_dir.*valid: .*data-dir"):
        SiteSettings.from_node_config({"data_dir": "/srv"})
    with pytest.raises(ConfigError, match="dp-clip-norm"):
        SiteSettings.from_node_config({"dp-noise-multiplier": 1.0})  # noise needs a clip norm


def test_the_site_privacy_floor_wins_over_the_run(tiny_cfg):
    site = SiteSettings(dp_clip_norm=0.05, dp_noise_multiplier=0.5)
    none = tiny_cfg.dp
    assert (site.effective_dp(none).clip_norm, site.effective_dp(none).noise_multiplier) == (
        0.05, 0.5)  # fmt: skip
    loose = tiny_cfg.with_overrides({"dp.clip_norm": 1.0, "dp.noise_multiplier": 0.1}).dp
    assert (site.effective_dp(loose).clip_norm, site.effective_dp(loose).noise_multiplier) == (
        0.05, 0.5)  # fmt: skip
    strict = tiny_cfg.with_overrides({"dp.clip_norm": 0.01, "dp.noise_multiplier": 2.0}).dp
    assert (site.effective_dp(strict).clip_norm, site.effective_dp(strict).noise_multiplier) == (
        0.01, 2.0)  # fmt: skip

    # through the ClientApp: a run that asks for no DP gets the site's floor, and says so
    cfg = tiny_cfg.with_overrides({"method": "fedavg"})
    global_np = bound_method(cfg).init_global(get_runtime(cfg).model)
    reply = train(cfg, context(0, **{"dp-clip-norm": 0.05}), 1, global_np)
    m = reply.content[messages.METRICS]
    assert m["dp-clip-norm"] == 0.05 and m["dp-noise-multiplier"] == 0.0
    update = messages.from_record(reply.content[messages.UPDATE])
    norm = np.sqrt(sum(((update[k] - global_np[k]).astype(np.float64) ** 2).sum() for k in update))
    assert norm <= 0.05 * (1 + 1e-4)


def test_epsilon_is_accounted_at_the_site_and_the_budget_stops_training(tiny_cfg, tmp_path):
    release = privacy.Release("update", 1.0, 1.0)
    one, two = privacy.epsilon([release], 1e-5), privacy.epsilon([release] * 2, 1e-5)
    assert 0 < one < two
    assert privacy.epsilon([privacy.Release("update", 0.0, 1.0)], 1e-5) == float("inf")
    budget = (one + two) / 2  # room for one release, not two
    site = {"dp-clip-norm": 1.0, "dp-noise-multiplier": 1.0, "dp-max-epsilon": budget}
    cfg = tiny_cfg.with_overrides({"method": "fedavg"})
    global_np = bound_method(cfg).init_global(get_runtime(cfg).model)
    ctx = context(0, **site)
    m = train(cfg, ctx, 1, global_np).content[messages.METRICS]
    assert m["dp-epsilon"] == pytest.approx(one)
    before = snapshot(tmp_path / "xdg-state")
    with pytest.raises(privacy.PrivacyBudgetExceeded, match="dp-max-epsilon"):
        train(cfg, ctx, 2, global_np, last_trained=1)
    assert snapshot(tmp_path / "xdg-state") == before  # refused before any work
    with pytest.raises(privacy.PrivacyBudgetExceeded, match="ε = ∞"):  # a budget, but no DP
        train(cfg, context(2, **{"dp-max-epsilon": 10.0}), 1, global_np, index=2)

    # in a federation the round goes on without it, and ε per round is in results.json (a new
    # state-dir: the site's ledger above already holds this data's one release, whatever the run)
    run_cfg = tiny_cfg.with_overrides({"method": "fedavg", "fed.rounds": 2})
    fresh = site | {"state-dir": str(tmp_path / "another-state")}
    grid = InProcessGrid(3, sites={0: fresh}, errors_as_replies=True)
    record = run_federation(grid, run_cfg)
    r1, r2 = record["history"]
    assert r1["train"]["0-original"]["dp-epsilon"] == pytest.approx(one)
    assert "dp-epsilon" not in r1["train"]["1-inverted"]  # no DP at the other sites
    assert "0-original" not in r2["train"] and len(r2["train"]) == 2
    (failed,) = r2["failed"]
    assert failed["client"] == "0-original" and "privacy budget" in failed["reason"]


def test_the_server_never_loads_data(tiny_cfg, tmp_path, monkeypatch):
    """A run over site directories with every data loader broken in the server's process (the
    clients run in Flower's simulation workers, which load their own site only)."""
    from fedmm.data import load_benchmark, sites
    from fedmm.data.site_split import write_sites
    from fedmm.engine import run_method

    cfg = tiny_cfg.with_overrides({"method": "fedavg", "fed.rounds": 1})
    root = tmp_path / "sites"
    write_sites(load_benchmark(cfg), root)
    site_cfg = cfg.with_overrides({"data.benchmark": "sites", "data.data_dir": str(root)})

    def forbidden(*args, **kwargs):
        raise AssertionError("the server process loaded data")

    import fedmm.data
    import fedmm.runtime

    for module, name in ((fedmm.data, "load_benchmark"), (fedmm.runtime, "load_benchmark"),
                         (sites, "load_site"), (sites, "read_site_records")):  # fmt: skip
        monkeypatch.setattr(module, name, forbidden)
    record = run_method(site_cfg)
    assert record["benchmark"] == "fmnist-domain"
    assert set(record["clients"]) == {"0-original", "1-inverted", "2-blurred"}
    assert record["config"]["data.data_dir"] == str(root)  # the operator's; never sent
    assert all(len(h["train"]) == 3 for h in record["history"])
    assert {c: d["num_train"] for c, d in record["data"].items()} == dict.fromkeys(
        record["clients"], 40)  # fmt: skip


def test_the_feature_cache_is_keyed_by_content_not_by_path(tiny_cfg, tmp_path):
    """A site replaces an image under the same name: the next process computes new features for
    it and reuses the cached ones of every unchanged split."""
    from PIL import Image

    import fedmm.runtime
    from fedmm.data import common, load_benchmark, sites
    from fedmm.data.site_split import write_sites

    root = tmp_path / "sites"
    write_sites(load_benchmark(tiny_cfg), root)
    site = sites.list_sites(root)[0]
    cfg = tiny_cfg.with_overrides({"data.benchmark": "sites", "data.data_dir": str(site)})
    before = get_runtime(cfg).client_split(0, "train").feats.clone()
    features = tmp_path / "xdg-cache" / "fedmm" / "features"
    assert len(list(features.glob("*.pt"))) == 1
    image = site / "images" / "train-00000.png"
    Image.fromarray(255 - np.asarray(Image.open(image))).save(image)
    fedmm.runtime._RUNTIMES.clear()  # a new process: nothing in memory
    common._IMAGES.clear()
    runtime = get_runtime(cfg)
    after = runtime.client_split(0, "train").feats
    assert not np.array_equal(after[0].numpy(), before[0].numpy())
    assert np.array_equal(after[1:].numpy(), before[1:].numpy())
    assert len(list(features.glob("*.pt"))) == 2
    runtime.client_split(0, "test")  # the unchanged test split: one more entry, computed once
    assert len(list(features.glob("*.pt"))) == 3


def test_fedmm_run_sites_end_to_end_and_per_site_settings(tiny_cfg, tmp_path, capsys):
    """`fedmm split` then `fedmm run --sites`: exit 0, the run recorded under the schema's name;
    a per-site setting given to every simulated site is refused."""
    from fedmm.cli import main

    flat = tiny_cfg.to_flat()
    sets = [x for key in ("model.backbone", "model.image_size", "data.train_per_client",
                          "data.test_per_client") for x in ("--set", f"{key}={flat[key]}")]  # fmt: skip
    root = tmp_path / "sites"
    assert main(["split", "--benchmark", "fmnist-domain", "--clients", "3", "--out", str(root),
                 *sets]) == 0  # fmt: skip
    out = tmp_path / "run"
    common = ["run", "--sites", str(root), "--method", "fedavg", "--rounds", "1", "--out",
              str(out), "--set", "train.local_steps=2", "--set", "progress=false",
              "--set", "model.backbone=tiny", "--set", "model.image_size=32"]  # fmt: skip
    assert main([*common, "--site", "state-dir=/tmp/shared"]) == 2
    assert "each simulated site has its own" in capsys.readouterr().err
    assert main(common) == 0
    (run,) = json.loads((out / "results.json").read_text())["runs"]
    assert run["benchmark"] == "fmnist-domain" and run["health"]["status"] == "ok"
