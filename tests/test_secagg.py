"""Secure aggregation, SecAgg+ (issue 25): the server learns the sum of the sites' updates only.

* protocol level (``secagg.SecureRound`` against the sites' own stage functions, no training):
  the unmasked aggregate is the weighted average within the stated quantization bound 2c/Q;
  one site's masked input is uniform mod 2^m whatever its update; a site dropping after its
  masked input, or before it, leaves the survivors' average; too few survivors stop the round;
  a site refuses stages out of order, a lowered threshold, and unmask lists that would reveal
  an input;
* methods: every method that declares it can run under it aggregates the sum exactly as its
  ``aggregate`` does the replies; FedPIA (and TAP, local, centralized) are refused before any
  round;
* the round loop (tiny backbone, in-process grid): a 2-round FedAvg federation under SecAgg+
  matches the plain one (round-1 state within 2c/Q, same accuracies); a dropped site; a skipped
  round recorded with its reason and the global state kept; the site's consent
  (``require-secure-aggregation``, plain training messages refused) and audit log; resume after
  a server crash mid-protocol.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import bound_method, run_federation, server_msg
from flwr.app import ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from scipy import stats
from test_serverapp import InProcessGrid

from fedmm.config import ConfigError, FedmmConfig
from fedmm.federation import checkpoint, clientapp, secagg
from fedmm.federation.consent import NotAccepted
from fedmm.federation.messages import RefusedMessage
from fedmm.methods import METHODS, Reply
from fedmm.runtime import get_runtime
from fedmm.validate import validate_config

pytestmark = pytest.mark.usefixtures("flower_task_identity")
META = {"run-id": "abc", "round": 1}


# ---------------------------------------------------------------------- protocol harness
class Sites:
    """n sites answering the four stages with fixed uploads (no model, no data).  ``drop``:
    node -> the first stage it fails (it answers none from there on).  Keeps every masked
    input the server received (``masked``)."""

    def __init__(self, cfg: FedmmConfig, uploads: dict[int, dict], weights: dict[int, int],
                 global_state: dict, summed=lambda k: False, drop: dict | None = None) -> None:  # fmt: skip
        self.cfg, self.uploads, self.weights, self.global_state = (
            cfg,
            uploads,
            weights,
            global_state,
        )
        self.summed, self.drop = summed, drop or {}
        self.keys = sorted(next(iter(uploads.values())))
        self.contexts = {n: Context(run_id=1, node_id=n, state=RecordDict(), run_config={},
                                    node_config={}) for n in uploads}  # fmt: skip
        self.masked: dict[int, dict] = {}

    def message(self, node, kind, arrays):
        return Message(RecordDict({"config": ConfigRecord({"round": 1})}), node, kind)

    def send(self, msgs):
        replies = []
        for msg in msgs:
            node = msg.metadata.dst_node_id
            stage = msg.content[secagg.SECAGG]["stage"]
            ctx = self.contexts[node]
            if node in self.drop and secagg.STAGES.index(stage) >= secagg.STAGES.index(
                    self.drop[node]):  # fmt: skip
                replies.append(Message(Error(code=0, reason="site went away"), reply_to=msg))
            elif stage == secagg.COLLECT:
                params = secagg.client_collect(msg, ctx, META, self.cfg)
                record, _ = secagg.client_mask(ctx, node, self.uploads[node], self.global_state,
                                               self.keys, self.summed, self.weights[node], params)  # fmt: skip
                self.masked[node] = {k: record[k].numpy() for k in record.keys()}
                content = RecordDict({secagg.MASKED: record, "metrics": MetricRecord({})})
                replies.append(Message(content, reply_to=msg))
            else:
                replies.append(Message(secagg.client_stage(msg, ctx, META, self.cfg), reply_to=msg))
        return replies

    @staticmethod
    def on_reply(stage, out, replies):
        for reply in replies:
            if not reply.has_error():
                yield reply.metadata.src_node_id, reply

    def run(self, seed: int = 0) -> secagg.Outcome:
        params = secagg.Params.for_round(self.cfg, len(self.uploads))
        shapes = [self.uploads[next(iter(self.uploads))][k].shape for k in self.keys]
        round_ = secagg.SecureRound(params, self.keys, shapes, self.summed, seed)
        return round_.run(sorted(self.uploads), self.send, self.message, self.on_reply,
                          self.global_state)  # fmt: skip


def secure_cfg(**fed) -> FedmmConfig:
    overrides = {"fed.secure_aggregation": "secagg+", "fed.clients": 5}
    return FedmmConfig().with_overrides(overrides | {f"fed.{k}": v for k, v in fed.items()})


def random_uploads(n: int, seed: int = 0, scale: float = 0.5):
    rng = np.random.default_rng(seed)
    global_state = {"w": rng.normal(size=(6, 7)).astype(np.float32),
                    "b": rng.normal(size=(7,)).astype(np.float32)}  # fmt: skip
    uploads = {
        100 + i: {k: (v + rng.uniform(-scale, scale, v.shape)).astype(np.float32)
                  for k, v in global_state.items()}
        | {"dc/w": rng.uniform(-scale, scale, (6, 7)).astype(np.float32)}
        for i in range(n)
    }  # fmt: skip
    weights = {node: int(rng.integers(1, 400)) for node in uploads}
    return global_state, uploads, weights


def exact(uploads, weights, nodes, summed=lambda k: False):
    keys = uploads[nodes[0]].keys()
    w = np.array([weights[n] for n in nodes], dtype=np.float64)
    return {k: sum(uploads[n][k].astype(np.float64) for n in nodes) if summed(k)
            else sum(wi * uploads[n][k].astype(np.float64) for wi, n in zip(w, nodes)) / w.sum()
            for k in keys}  # fmt: skip


def max_error(got, want) -> float:
    return max(float(np.abs(got[k] - want[k]).max()) for k in want)


# ---------------------------------------------------------------------- protocol
def test_the_sum_is_the_weighted_average_within_the_stated_bound():
    cfg = secure_cfg(secagg_quantization_bits=12, secagg_modulus_bits=40)
    global_state, uploads, weights = random_uploads(5)
    summed = lambda k: k.startswith("dc/")  # noqa: E731
    out = Sites(cfg, uploads, weights, global_state, summed).run()
    params = secagg.Params.for_round(cfg, 5)
    want = exact(uploads, weights, sorted(uploads), summed)
    assert out.weight == sum(weights.values()) and out.survivors == sorted(uploads)
    means = {k: v for k, v in want.items() if not summed(k)}
    error = max_error({k: out.sums[k] for k in means}, means)
    # the stated bound: a weighted mean is off by < one step 2c/Q (plus float32 rounding)
    assert 0 < error <= params.step + 1e-6, (error, params.step)
    assert error > params.step / 20  # a 12-bit quantization is visible: the bound is not vacuous
    # a sum of S values is off by < S steps
    assert np.abs(out.sums["dc/w"] - want["dc/w"]).max() <= 5 * params.step + 1e-5


def test_a_masked_input_is_uniform_whatever_the_update():
    """The server's view of one site: two very different updates (all at −c, all at +c) give
    masked inputs that are indistinguishable, and uniform on [0, 2^m) -- while the unmasked
    encodings are trivially told apart (the test has the power to see a missing mask)."""
    cfg = secure_cfg(secagg_quantization_bits=8, secagg_modulus_bits=16)
    views = []
    for value in (-1.0, 1.0):
        global_state = {"w": np.zeros((60, 50), np.float32)}
        uploads = {100 + i: {"w": np.full((60, 50), value, np.float32)} for i in range(3)}
        sites = Sites(cfg, uploads, dict.fromkeys(uploads, 1), global_state)
        sites.run()
        views.append(sites.masked[100]["w"].astype(np.float64).ravel())
        params = secagg.Params.for_round(cfg, 3)
    plain = [secagg.encode({"w": np.full((60, 50), v, np.float32)}, {"w": np.zeros((60, 50))},
                           ["w"], lambda k: False, 1, params)[0][0].ravel() for v in (-1.0, 1.0)]  # fmt: skip
    assert stats.ks_2samp(*plain).pvalue < 1e-9  # unmasked: told apart at once
    assert stats.ks_2samp(*views).pvalue > 1e-4  # masked: no difference to see
    for view in views:  # and each is uniform on [0, 2^16)
        assert stats.kstest(view / 2**16, "uniform").pvalue > 1e-4
        assert view.max() < 2**16


def test_a_site_dropping_after_its_masked_input_is_still_unmasked():
    """The survivor's self mask comes back from its neighbours' shares when it never answers
    the unmask stage; its input stays in the sum."""
    cfg = secure_cfg(secagg_quantization_bits=20)
    global_state, uploads, weights = random_uploads(5, seed=1)
    out = Sites(cfg, uploads, weights, global_state, drop={104: secagg.UNMASK}).run()
    assert out.survivors == sorted(uploads) and out.info["unmask"] == 4
    want = exact(uploads, weights, sorted(uploads))
    assert max_error(out.sums, want) <= secagg.Params.for_round(cfg, 5).step + 1e-6


@pytest.mark.parametrize("neighbours", [0, 2])  # SecAgg's complete graph, SecAgg+'s ring
def test_a_site_dropping_before_its_masked_input_leaves_the_survivors_average(neighbours):
    cfg = secure_cfg(secagg_quantization_bits=20, secagg_neighbours=neighbours, clients=7,
                     secagg_threshold=2)  # fmt: skip
    global_state, uploads, weights = random_uploads(7, seed=2)
    out = Sites(cfg, uploads, weights, global_state, drop={103: secagg.COLLECT}).run(seed=5)
    survivors = [n for n in sorted(uploads) if n != 103]
    assert out.survivors == survivors and out.info["dropped"] == 1
    assert out.weight == sum(weights[n] for n in survivors)
    step = secagg.Params.for_round(cfg, 7).step
    assert max_error(out.sums, exact(uploads, weights, survivors)) <= step + 1e-6


def test_too_few_survivors_stop_the_round_with_the_reason():
    cfg = secure_cfg(secagg_threshold=4)
    global_state, uploads, weights = random_uploads(5, seed=3)
    sites = Sites(cfg, uploads, weights, global_state,
                  drop={101: secagg.COLLECT, 102: secagg.COLLECT})  # fmt: skip
    with pytest.raises(secagg.SecAggFailed, match="3 masked inputs arrived, fewer than the thresh"):
        sites.run()


def site_stage(sites: Sites, cfg: FedmmConfig, name: str, **values) -> RecordDict:
    """Site 100 answering one stage message ``name`` with ``values`` in its secagg record."""
    msg = sites.message(100, MessageType.TRAIN, None)
    msg.content[secagg.SECAGG] = ConfigRecord({"stage": name, **values})
    return secagg.client_stage(msg, sites.contexts[100], META, cfg)


def test_a_site_refuses_what_would_reveal_its_input():
    cfg = secure_cfg(secagg_threshold=3)
    global_state, uploads, weights = random_uploads(3, seed=4)
    sites = Sites(cfg, uploads, weights, global_state)
    ctx = sites.contexts[100]

    def stage(name, **values):
        return site_stage(sites, cfg, name, **values)

    offer = secagg.Params.for_round(cfg, 3).to_record()
    with pytest.raises(RefusedMessage, match="differs from the run's fed.secagg options"):
        stage(secagg.SETUP, **(offer | {"threshold": 2}))  # a server lowering t
    with pytest.raises(RefusedMessage, match="out of order"):
        stage(secagg.UNMASK, active=[100, 101, 102], dead=[])  # no keys, no shares yet
    keys = stage(secagg.SETUP, **offer)[secagg.SECAGG]
    with pytest.raises(RefusedMessage, match="out of order"):
        stage(secagg.UNMASK, active=[100, 101, 102], dead=[])  # skipping share-keys
    with pytest.raises(RefusedMessage, match="own public keys"):
        stage(secagg.SHARE_KEYS, **{"100": [keys["pk2"], keys["pk1"]]})
    # a site never sends a share of b_j and of sk_j for the same j
    state = dict(ctx.state[secagg.STATE_KEY]) | {"stage": secagg.COLLECT, "share-nodes": [100, 101, 102],
                                                 "b-shares": [b"x"] * 3, "sk-shares": [b"y"] * 3}  # fmt: skip
    ctx.state[secagg.STATE_KEY] = ConfigRecord(state)
    with pytest.raises(RefusedMessage, match="both as a survivor and as dropped"):
        stage(secagg.UNMASK, active=[100, 101, 102], dead=[101])
    with pytest.raises(RefusedMessage, match="fewer than the threshold"):
        stage(secagg.UNMASK, active=[100, 101], dead=[102])


def test_options_are_checked_together():
    with pytest.raises(ConfigError, match="fed.secagg_neighbours=3 must be even"):
        validate_config(secure_cfg(secagg_neighbours=3))
    with pytest.raises(ConfigError, match="fed.compression=int8"):
        validate_config(secure_cfg(compression="int8"))
    with pytest.raises(ConfigError, match="at least 2 sampled sites"):
        validate_config(secure_cfg(clients=1))
    with pytest.raises(ConfigError, match="exceeds the 5 shares"):
        validate_config(secure_cfg(secagg_threshold=6))
    with pytest.raises(ConfigError, match="would wrap mod 2\\^32"):
        secagg.check_capacity(300, secagg.Params.for_round(secure_cfg(secagg_modulus_bits=32), 5))


# ---------------------------------------------------------------------- methods
@pytest.mark.parametrize("name", sorted(m for m, cls in METHODS.items() if not cls.secagg_refusal))
def test_each_declared_method_aggregates_the_sum_as_it_does_the_replies(tiny_cfg, name):
    """``aggregate_sum`` of what secure aggregation reveals = ``aggregate`` of the replies
    (the declaration ``secagg_refusal = ""`` is a claim; this checks it per method)."""
    cfg = tiny_cfg.with_overrides({"method": name})
    model = get_runtime(cfg).model
    results = []
    for use_sum in (False, True):
        rng = np.random.default_rng(0)  # the same replies for both paths
        method = bound_method(cfg)
        global_state = method.init_global(model)
        shapes = method.upload_spec(model)
        replies = [Reply(k, {key: rng.normal(size=s).astype(np.float32) for key, s in
                             shapes.items()}, int(rng.integers(1, 50))) for k in range(3)]  # fmt: skip
        if not use_sum:
            results.append(method.aggregate(global_state, replies))
            continue
        w = [r.num_examples for r in replies]
        total = {key: sum(r.arrays[key].astype(np.float64) for r in replies)
                 if method.secagg_summed(key) else
                 sum(wi * r.arrays[key].astype(np.float64) for wi, r in zip(w, replies)) / sum(w)
                 for key in shapes}  # fmt: skip
        results.append(method.aggregate_sum(global_state, Reply(-1, total, sum(w))))
    assert results[0].keys() == results[1].keys()
    for key in results[0]:
        np.testing.assert_allclose(results[1][key], results[0][key], rtol=1e-5, atol=1e-6)


def test_supported_methods_are_the_sum_methods():
    supported = {m for m, cls in METHODS.items() if not cls.secagg_refusal}
    assert {"fedavg", "fedprox", "fedadam", "fedyogi", "fedavgm", "scaffold", "ditto", "fedper",
            "feddat"} <= supported  # fmt: skip
    assert not {"fedpia", "tap", "local", "centralized"} & supported


def test_fedpia_is_refused_before_any_round(tiny_cfg):
    cfg = tiny_cfg.with_overrides({"method": "fedpia", "fed.secure_aggregation": "secagg+"})
    with pytest.raises(ConfigError, match="'fedpia' cannot run under.*aligns \\(permutes\\)"):
        validate_config(cfg)
    grid = InProcessGrid(3)
    with pytest.raises(ConfigError, match="fedpia"):
        run_federation(grid, cfg)
    assert grid.sent == []  # not even the query left


# ---------------------------------------------------------------------- the round loop
class StageGrid(InProcessGrid):
    """``InProcessGrid`` whose node ``node`` fails from secure aggregation stage ``stage`` on
    (in rounds ``rounds``); records every (node, stage) delivered."""

    def __init__(self, n, node=None, stage=None, rounds=(1, 2), sites=None):
        super().__init__(n, sites=sites)
        self.node, self.stage, self.rounds, self.stages = node, stage, rounds, []

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            stage = msg.content[secagg.SECAGG]["stage"] if secagg.SECAGG in msg.content else None
            rnd = int(msg.content["config"]["round"])
            node = msg.metadata.dst_node_id
            if (stage and node == self.node and rnd in self.rounds
                    and secagg.STAGES.index(stage) >= secagg.STAGES.index(self.stage)):  # fmt: skip
                replies.append(Message(Error(code=0, reason="simulated crash"), reply_to=msg))
                continue
            self.stages.append((node, stage))
            replies += super().send_and_receive([msg], timeout=timeout)
        return replies


@pytest.fixture()
def states(monkeypatch):
    """Every global state the server checkpoints, by out_dir and round."""
    saved: dict[tuple[str, int], dict] = {}
    save = checkpoint.save

    def keep(cfg, rnd, global_state, *args, **kwargs):
        saved[(cfg.out_dir, rnd)] = {k: np.array(v) for k, v in global_state.items()}
        return save(cfg, rnd, global_state, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save", keep)
    return saved


def test_a_secure_federation_matches_the_plain_one(tiny_cfg, states):
    plain_cfg = tiny_cfg.with_overrides({"out_dir": tiny_cfg.out_dir + "-plain"})
    secure = tiny_cfg.with_overrides({"fed.secure_aggregation": "secagg+"})
    plain_run = run_federation(InProcessGrid(3), plain_cfg)
    grid = StageGrid(3)
    secure_run = run_federation(grid, secure)
    step = secagg.Params.for_round(secure, 3).step
    # round 1 starts from the same state: the aggregates differ by less than 2c/Q
    first = states[(plain_cfg.out_dir, 1)], states[(secure.out_dir, 1)]
    assert 0 < max_error(first[1], first[0]) <= step + 1e-6
    for view, accuracy in plain_run["final"].items():
        assert secure_run["final"][view] == pytest.approx(accuracy, abs=1e-9), view
    assert plain_run["final"]["shared"] > 0.2  # it learned (chance: 0.1)
    for entry in secure_run["history"]:
        assert entry["skipped"] == "" and entry["secagg"]["survivors"] == 3
        assert entry["bytes_up"] > 0 and entry["secagg"]["bytes_up"] > 0
        for stats_ in entry["train"].values():  # nothing per site but its time leaves
            assert set(stats_) <= {"seconds", "load-seconds"}
    assert {s for _, s in grid.stages} >= set(secagg.STAGES)


def test_a_dropped_site_leaves_the_survivors_average(tiny_cfg, states):
    cfg = tiny_cfg.with_overrides({"fed.rounds": 1, "fed.secure_aggregation": "secagg+"})
    run = run_federation(StageGrid(3, node=101, stage=secagg.COLLECT), cfg)
    plain_cfg = tiny_cfg.with_overrides({"fed.rounds": 1, "out_dir": cfg.out_dir + "-plain"})
    run_federation(InProcessGrid(3, failing={101}), plain_cfg)
    entry = run["history"][0]
    assert entry["skipped"] == "" and entry["failures"] == 1
    assert entry["secagg"]["dropped"] == 1 and sorted(entry["train"]) == ["0-original", "2-blurred"]
    assert "secagg collect-masked-input" in entry["failed"][0]["reason"]
    step = secagg.Params.for_round(cfg, 3).step
    assert max_error(states[(cfg.out_dir, 1)], states[(plain_cfg.out_dir, 1)]) <= step + 1e-6


def test_too_few_survivors_skip_the_round_and_keep_the_global_state(tiny_cfg, states):
    cfg = tiny_cfg.with_overrides({"fed.rounds": 1, "fed.secure_aggregation": "secagg+",
                                   "fed.secagg_threshold": 3})  # fmt: skip
    run = run_federation(StageGrid(3, node=102, stage=secagg.COLLECT), cfg)
    entry = run["history"][0]
    assert entry["skipped"].startswith("secure aggregation: 2 masked inputs arrived, fewer than")
    assert entry["train"] == {} and entry["failures"] == 3
    method = bound_method(cfg)
    initial = method.init_global(get_runtime(cfg).model)
    assert max_error(states[(cfg.out_dir, 1)], initial) == 0.0


def test_a_site_requiring_secure_aggregation_refuses_a_run_without_it(tiny_cfg):
    grid = InProcessGrid(3, sites={0: {"require-secure-aggregation": True}})
    with pytest.raises(NotAccepted, match="require-secure-aggregation=true"):
        run_federation(grid, tiny_cfg)
    # and a plain training message is refused in a run with it (the server cannot leave it out)
    cfg = tiny_cfg.with_overrides({"fed.secure_aggregation": "secagg+"})
    arrays = bound_method(cfg).init_global(get_runtime(cfg).model)
    msg = Message(server_msg(cfg, arrays, 1), 100, MessageType.TRAIN)
    with pytest.raises(RefusedMessage, match="plain training message in a run with fed.secure"):
        clientapp.handle(msg, grid.contexts[100], train=True)


def test_the_audit_log_records_every_stage_and_no_per_site_score(tiny_cfg):
    from test_audit import ClientAppGrid

    from fedmm.federation import audit, consent
    from fedmm.federation.site import SiteSettings

    cfg = tiny_cfg.with_overrides({"fed.rounds": 1, "fed.secure_aggregation": "secagg+"})
    sites = {i: {"require-secure-aggregation": True} for i in range(3)}
    run = run_federation(ClientAppGrid(3, sites), cfg)
    assert run["history"][0]["secagg"]["survivors"] == 3
    settings = SiteSettings.from_node_config({"partition-id": 0, **sites[0]})
    entries, problem = audit.verify(consent.site_root(settings) / audit.AUDIT_FILE)
    assert problem is None
    sent = {e["secagg-stage"]: e for e in entries if e["kind"] == "sent" and "secagg-stage" in e}
    assert set(sent) == set(secagg.STAGES) and all(e["reply"] == "ok" for e in sent.values())
    collect = sent[secagg.COLLECT]
    assert {k.split("/", 1)[1] for k in collect["metrics"]} == {"client-index", "seconds",
                                                               "load-seconds"}  # fmt: skip
    assert all(k.startswith("masked/") for k in collect["tensors"])
    assert "train (unmask)" in audit.describe(sent[secagg.UNMASK])  # fedmm site audit shows it


def test_a_server_crash_mid_protocol_restarts_the_round(tiny_cfg):
    from fedmm.engine import prepare

    class Crash(RuntimeError):
        pass

    class CrashingGrid(InProcessGrid):
        def send_and_receive(self, messages, *, timeout=None):
            stage = messages[0].content.get(secagg.SECAGG, {}).get("stage")
            if int(messages[0].content["config"]["round"]) == 2 and stage == secagg.UNMASK:
                raise Crash("server killed after collecting round 2's masked inputs")
            return super().send_and_receive(messages, timeout=timeout)

    cfg = prepare(tiny_cfg.with_overrides({"fed.secure_aggregation": "secagg+"}))
    with pytest.raises(Crash):
        run_federation(CrashingGrid(3), cfg)
    # restarted SuperNodes: fresh Contexts, no protocol state; the round starts at setup again
    run = run_federation(InProcessGrid(3), cfg.with_overrides({"resume": True}))
    assert [h["round"] for h in run["history"]] == [1, 2]
    assert run["history"][1]["secagg"]["survivors"] == 3 and run["history"][1]["skipped"] == ""


def test_site_dp_composes_and_no_dp_diagnostic_leaves(tiny_cfg):
    """A site's DP runs first (its ε spent in its own ledger); under SecAgg+ the reply carries no
    dp-* value, loss or count -- only the masked input and the reply's time."""
    cfg = tiny_cfg.with_overrides({"fed.rounds": 1, "fed.secure_aggregation": "secagg+",
                                   "dp.clip_norm": 1.0, "dp.noise_multiplier": 0.5,
                                   "fed.secagg_clip": 4.0})  # fmt: skip
    run = run_federation(InProcessGrid(3), cfg)
    entry = run["history"][0]
    assert entry["skipped"] == "" and entry["secagg"]["survivors"] == 3
    for stats_ in entry["train"].values():
        assert set(stats_) <= {"seconds", "load-seconds"}
    from fedmm.federation import consent
    from fedmm.federation.site import SiteSettings

    for i in range(3):  # each site spent one release in its own ledger, as without SecAgg+
        root = consent.site_root(SiteSettings.from_node_config({"partition-id": i}))
        ledgers = [p for p in (root / "privacy").glob("*.json") if "." not in p.stem]
        assert len(ledgers) == 1
        releases = json.loads(ledgers[0].read_text())["releases"]
        assert len(releases) == 1 and releases[0]["noise_multiplier"] == 0.5


def test_each_stage_is_answered_once_even_by_concurrent_processes(tmp_path):
    """The on-disk claim (``secagg.claim``): a second unmask or collect of the same round -- two
    messages handled at once, each with its own copy of the Flower Context -- is refused, so a
    server never gets both shares of one peer nor two masked inputs under the same masks."""
    stages = (secagg.SETUP, secagg.SHARE_KEYS, secagg.COLLECT, secagg.UNMASK)
    for stage in stages:
        secagg.claim(tmp_path, 100, META, stage)
        if stage != secagg.SETUP:
            with pytest.raises(RefusedMessage, match="already answered it"):
                secagg.claim(tmp_path, 100, META, stage)
    with pytest.raises(RefusedMessage, match="has not answered 'setup'"):
        secagg.claim(tmp_path, 100, META | {"round": 2}, secagg.SHARE_KEYS)
    secagg.claim(tmp_path, 101, META, secagg.SETUP)  # another site: its own claim file
    secagg.claim(tmp_path, 100, META, secagg.SETUP)  # a resumed round restarts at setup
    secagg.claim(tmp_path, 100, META, secagg.SHARE_KEYS)


def test_share_keys_must_list_exactly_the_setups_sites():
    """A server that offers a setup for 3 sampled sites (t = 2) and then sends 4 sites' keys
    would spread 2-of-4 shares: refused."""
    cfg = secure_cfg(secagg_threshold=0, clients=4)
    global_state, uploads, weights = random_uploads(4, seed=5)
    sites = Sites(cfg, uploads, weights, global_state)

    def stage(name, **values):
        return site_stage(sites, cfg, name, **values)

    keys = stage(secagg.SETUP, **secagg.Params.for_round(cfg, 3).to_record())[secagg.SECAGG]
    others = {str(n): stage_keys for n, stage_keys in
              ((n, [b"k1-%d" % n, b"k2-%d" % n]) for n in (101, 102, 103))}  # fmt: skip
    with pytest.raises(RefusedMessage, match="4 sites with keys, not the 3 of the setup"):
        stage(secagg.SHARE_KEYS, **{"100": [keys["pk1"], keys["pk2"]]}, **others)
