"""The round loop against an in-process grid: sampling, failures, aggregation, records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_federation
from flwr.app import Context, Error, Message, MessageType, RecordDict

from fedmm.federation import clientapp

pytestmark = pytest.mark.usefixtures("flower_task_identity")


class InProcessGrid:
    """Delivers each message to the ClientApp handler of its node, in this process."""

    def __init__(
        self, n: int, failing: set[int] = frozenset(), sites: dict | None = None,
        errors_as_replies: bool = False,
    ) -> None:  # fmt: skip
        """``sites``: each node's site settings (default: none but its partition).
        ``errors_as_replies``: a ClientApp exception becomes an error reply with the short
        reason the registered ClientApp handlers send (``clientapp.short_error``), as Flower
        makes it (default: it propagates, so a test sees it)."""
        self.errors_as_replies = errors_as_replies
        self.contexts = {
            100 + i: Context(
                run_id=1,
                node_id=100 + i,
                state=RecordDict(),
                run_config={},
                node_config={"partition-id": i, "num-partitions": n, **(sites or {}).get(i, {})},
            )  # fmt: skip
            for i in range(n)
        }
        self.failing = failing
        self.sent: list[tuple[int, str, int]] = []

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            kind = msg.metadata.message_type
            rnd = int(msg.content["config"]["round"])
            self.sent.append((node, kind, rnd))
            if node in self.failing and kind == MessageType.TRAIN:
                replies.append(Message(Error(code=0, reason="simulated crash"), reply_to=msg))
                continue
            try:
                replies.append(clientapp.dispatch(msg, self.contexts[node]))
            except Exception as exc:
                if not self.errors_as_replies:
                    raise
                reason = clientapp.short_error(exc)
                replies.append(Message(Error(code=2, reason=reason), reply_to=msg))
        return replies


def test_round_loop_samples_counts_failures_and_records(tiny_cfg):
    cfg = tiny_cfg.with_overrides({"method": "feddat", "fed.fraction": 0.5, "fed.rounds": 2})
    grid = InProcessGrid(3, failing={101})
    record = run_federation(grid, cfg)
    trained = [(n, r) for n, k, r in grid.sent if k == MessageType.TRAIN]
    evaluated = [(n, r) for n, k, r in grid.sent if k == MessageType.EVALUATE]
    assert [len([t for t in trained if t[1] == r]) for r in (1, 2)] == [2, 2]  # ceil(0.5 * 3)
    assert len(evaluated) == 6  # every node evaluates every round
    assert any(n == 101 for n, _ in trained)  # the crashing node was sampled at least once
    for h in record["history"]:
        sampled_failing = sum(1 for n, r in trained if r == h["round"] and n == 101)
        assert h["failures"] == sampled_failing
        assert len(h["train"]) == h["sampled"] - h["failures"]
        assert set(h["clients"]) == {"0-original", "1-inverted", "2-blurred"}
    saved = json.loads((Path(cfg.out_dir) / "results.json").read_text())
    assert saved["runs"][0]["history"] == json.loads(json.dumps(record["history"]))


def test_global_state_is_kept_when_too_few_clients_reply(tiny_cfg):
    cfg = tiny_cfg.with_overrides({"method": "fedavg", "fed.rounds": 1, "fed.min_clients": 3})
    grid = InProcessGrid(3, failing={100})
    record = run_federation(grid, cfg)
    assert record["history"][0]["failures"] == 1 and len(record["history"][0]["train"]) == 2
    assert record["history"][0]["skipped"] == "2 valid replies < fed.min_clients=3"
