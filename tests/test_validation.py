"""Hostile or broken training replies are rejected before aggregation, logged and counted."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from conftest import bound_method, run_federation
from flwr.app import Message, MessageType, MetricRecord, RecordDict
from test_serverapp import InProcessGrid

from fedmm.federation import messages, validation
from fedmm.runtime import get_runtime

pytestmark = pytest.mark.usefixtures("flower_task_identity")

FROZEN_KEY = "text.encoder.layer.0.attention.self.query.weight"


def honest_upload(cfg):
    method = bound_method(cfg)
    model = get_runtime(cfg).model
    arrays = method.init_global(model)
    return arrays, validation.UploadSpec.from_model(method, model, cfg)


# Each case turns an honest (arrays, metrics) into a broken one; the reason must name the fault.
def _nan(a, m):
    k = next(iter(a))
    a[k] = a[k].copy()
    a[k].flat[0] = np.nan
    return a, m


def _inf(a, m):
    k = sorted(a)[-1]
    a[k] = np.full_like(a[k], np.inf)
    return a, m


def _shape(a, m):
    k = next(iter(a))
    a[k] = np.zeros((*a[k].shape, 2), np.float32)
    return a, m


def _extra(a, m):
    a[FROZEN_KEY] = np.zeros((8, 8), np.float32)  # an attempt to overwrite the frozen backbone
    return a, m


def _extra_prefixed(a, m):
    a["adapter.global_adapter/../text.encoder.layer.0.weight"] = np.zeros(3, np.float32)
    return a, m


def _missing(a, m):
    a.pop(next(iter(a)))
    return a, m


def _dtype(a, m):
    k = next(iter(a))
    a[k] = a[k].astype(np.float64)
    return a, m


def _negative(a, m):
    return a, m | {"num-examples": -5.0}


def _zero(a, m):
    return a, m | {"num-examples": 0.0}


def _enormous(a, m):
    return a, m | {"num-examples": 1e12}


def _fractional(a, m):
    return a, m | {"num-examples": 10.5}


def _bad_index(a, m):
    return a, m | {"client-index": 7.0}


def _nan_metric(a, m):
    return a, m | {"loss": float("nan")}


CASES = {
    "nan": (_nan, "non-finite"),
    "inf": (_inf, "non-finite"),
    "wrong shape": (_shape, "shape"),
    "frozen backbone key": (_extra, "unexpected keys"),
    "smuggled key": (_extra_prefixed, "unexpected keys"),
    "missing key": (_missing, "missing keys"),
    "float64": (_dtype, "dtype"),
    "negative count": (_negative, "num-examples"),
    "zero count": (_zero, "num-examples"),
    "enormous count": (_enormous, "num-examples"),
    "fractional count": (_fractional, "num-examples"),
    "client index": (_bad_index, "client-index"),
    "nan metric": (_nan_metric, "finite"),
}


def test_honest_reply_passes(tiny_cfg):
    arrays, spec = honest_upload(tiny_cfg)
    assert validation.check_reply(arrays, {"client-index": 1, "num-examples": 40}, spec, set()) == 1


@pytest.mark.parametrize("case", list(CASES))
def test_each_violation_is_rejected_with_its_reason(tiny_cfg, case):
    arrays, spec = honest_upload(tiny_cfg)
    broken, metrics = CASES[case][0](dict(arrays), {"client-index": 0.0, "num-examples": 40.0})
    with pytest.raises(validation.InvalidReply, match=CASES[case][1]):
        validation.check_reply(broken, metrics, spec, set())


def test_size_limit_and_duplicate_client(tiny_cfg):
    arrays, spec = honest_upload(tiny_cfg)
    honest = messages.to_record(arrays).count_bytes()
    validation.check_size(honest, spec)
    huge = messages.to_record({"x": np.zeros(2_000_000, np.float32)}).count_bytes()
    with pytest.raises(validation.InvalidReply, match="exceeds"):
        validation.check_size(huge, spec)
    seen: set[int] = set()
    validation.check_reply(arrays, {"client-index": 2, "num-examples": 40}, spec, seen)
    with pytest.raises(validation.InvalidReply, match="second reply"):
        validation.check_reply(arrays, {"client-index": 2, "num-examples": 40}, spec, seen)
    cfg = tiny_cfg.with_overrides({"validate.max_examples": 10})
    spec10 = validation.UploadSpec.from_model(bound_method(cfg), get_runtime(cfg).model, cfg)
    with pytest.raises(validation.InvalidReply, match="max_examples=10"):
        validation.check_reply(arrays, {"client-index": 0, "num-examples": 40}, spec10, set())


class TamperingGrid(InProcessGrid):
    """Node ``bad`` answers training with a tampered reply: ``tamper(arrays, metrics)``."""

    def __init__(self, n, bad, tamper):
        super().__init__(n)
        self.bad, self.tamper = bad, tamper

    def send_and_receive(self, msgs, *, timeout=None):
        replies = []
        for msg in msgs:
            reply = super().send_and_receive([msg], timeout=timeout)[0]
            if (
                msg.metadata.dst_node_id == self.bad
                and msg.metadata.message_type == MessageType.TRAIN
            ):
                arrays = messages.from_record(reply.content[messages.UPDATE])
                metrics = dict(reply.content[messages.METRICS])
                arrays, metrics = self.tamper(arrays, metrics)
                content = RecordDict({messages.UPDATE: messages.to_record(arrays),
                                      messages.METRICS: MetricRecord(metrics)})  # fmt: skip
                reply = Message(content, reply_to=msg)
            replies.append(reply)
        return replies


def _huge(a, m):
    a[next(iter(a))] = np.zeros(2_000_000, np.float32)
    return a, m


def _overwrite(a, m):
    return {**_extra(a, m)[0]}, m | {"num-examples": 1e12}


@pytest.mark.parametrize("tamper,reason", [(_nan, "non-finite"), (_overwrite, "unexpected keys"),
                                           (_huge, "exceeds"), (_negative, "num-examples")])  # fmt: skip
def test_round_loop_rejects_logs_and_counts_bad_replies(tiny_cfg, tamper, reason, caplog):
    cfg = tiny_cfg.with_overrides({"method": "fedavg", "fed.rounds": 2, "fed.min_clients": 2})
    grid = TamperingGrid(3, bad=101, tamper=tamper)
    with caplog.at_level(logging.WARNING, logger="fedmm.federation.serverapp"):
        record = run_federation(grid, cfg)
    for h in record["history"]:
        assert len(h["rejected"]) == 1 and h["failures"] == 1 and len(h["train"]) == 2
        rej = h["rejected"][0]
        assert rej["node"] == 101 and reason in rej["reason"]
        assert all(np.isfinite(acc) for views in h["clients"].values() for acc in views.values())
    # the node's client is known from its honest evaluation replies: named from round 2 on
    assert record["history"][1]["rejected"][0]["client"] == "1-inverted"
    assert "rejected the reply of node 101" in caplog.text
    saved = json.loads((Path(cfg.out_dir) / "results.json").read_text())["runs"][0]
    assert (
        saved["history"][0]["rejected"][0]["reason"]
        == record["history"][0]["rejected"][0]["reason"]
    )


def test_rejected_reply_is_never_aggregated(tiny_cfg):
    """With the hostile node rejected, the global model equals a run where it simply failed."""
    cfg = tiny_cfg.with_overrides({"method": "fedavg", "fed.rounds": 1})
    tampered = run_federation(TamperingGrid(3, 101, _nan), cfg)
    failed = run_federation(InProcessGrid(3, failing={101}), cfg.with_overrides(
        {"out_dir": cfg.out_dir + "-failed"}))  # fmt: skip

    # the hostile client trained locally (its own personal view differs); the shared one does not
    def global_view(r):
        return {c: v["shared"] for c, v in r["history"][0]["clients"].items()}

    assert global_view(tampered) == global_view(failed)


def test_evaluation_metrics_are_checked_too(tiny_cfg):
    _, spec = honest_upload(tiny_cfg)
    assert validation.check_eval_metrics({"client-index": 1, "acc.global": 0.5}, spec) == (
        1, {"global": 0.5},
    )  # fmt: skip
    for bad in ({"client-index": float("nan")}, {"client-index": 3}, {},
                {"client-index": 0, "acc.global": float("nan")},
                {"client-index": 0, "acc.global": 7.0}):  # fmt: skip
        with pytest.raises(validation.InvalidReply):
            validation.check_eval_metrics(bad, spec)


def test_a_node_speaks_only_for_its_own_client_and_sent_keys(tiny_cfg):
    arrays, spec = honest_upload(tiny_cfg)
    metrics = {"client-index": 2, "num-examples": 40}
    with pytest.raises(validation.InvalidReply, match="this node is client 1"):
        validation.check_reply(arrays, metrics, spec, set(), expected_index=1)
    first = sorted(arrays)[0]  # a method that sent this client one tensor expects only that back
    with pytest.raises(validation.InvalidReply, match="unexpected keys"):
        validation.check_reply(arrays, metrics, spec, set(), sent_keys={first})
    assert validation.check_reply({first: arrays[first]}, metrics, spec, set(), 2, {first}) == 2
