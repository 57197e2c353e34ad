"""A site's audit log (issue 31, part 5): every message received and everything sent, in a
hash chain that ``fedmm site audit`` verifies.

* a 2-round federation through the ClientApp as Flower calls it: each site's log holds one
  received and one sent entry per message addressed to it, and each sent entry's tensors,
  payload hash and metrics are those of the reply that left;
* an edited, removed or reordered line is named by ``fedmm site audit`` (exit 1);
* appends from two processes keep one chain; a torn last line stops the site.
"""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest
from conftest import run_federation
from flwr.app import Error, Message
from test_serverapp import InProcessGrid

from fedmm import cli
from fedmm.federation import audit, clientapp, consent, messages
from fedmm.federation.site import SiteSettings

pytestmark = pytest.mark.usefixtures("flower_task_identity")


class ClientAppGrid(InProcessGrid):
    """Each message through the registered ClientApp handlers (``as_site``), as Flower calls
    them; a ``SiteError`` becomes an error reply with its text.  Keeps every reply."""

    def __init__(self, n: int, sites: dict) -> None:
        super().__init__(n, sites=sites)
        self.app = clientapp.make_client_app()
        self.replies: dict[int, list[Message]] = {node: [] for node in self.contexts}

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            self.sent.append((node, msg.metadata.message_type, int(msg.content["config"]["round"])))
            try:
                reply = self.app(message=msg, context=self.contexts[node])
            except clientapp.SiteError as exc:
                reply = Message(Error(code=2, reason=str(exc)), reply_to=msg)
            self.replies[node].append(reply)
            replies.append(reply)
        return replies


@pytest.fixture()
def federation(tiny_cfg, tmp_path, monkeypatch):
    """A 2-round FedAvg over three site directories through the ClientApp: ``(grid, settings,
    cfg)``."""
    from fedmm.data import load_benchmark
    from fedmm.data.site_split import write_sites
    from fedmm.engine import prepare, rehearsal_sites

    monkeypatch.setenv("FEDMM_FAB_ID", "fedmm/fedmm")
    monkeypatch.setenv("FEDMM_FAB_HASH", "ab" * 32)
    monkeypatch.setenv("FEDMM_APP_HASH", "cd" * 32)
    root = tmp_path / "sites"
    write_sites(load_benchmark(tiny_cfg), root)
    cfg = prepare(tiny_cfg.with_overrides({"method": "fedavg", "fed.rounds": 2,
                                           "data.benchmark": "sites",
                                           "data.data_dir": str(root)}))  # fmt: skip
    settings = rehearsal_sites(cfg)
    grid = ClientAppGrid(3, settings)
    run_federation(grid, cfg)
    return grid, settings, cfg


def log_of(settings: dict) -> Path:
    return consent.site_root(SiteSettings.from_node_config(settings)) / audit.AUDIT_FILE


def test_every_message_of_a_federation_is_audited_at_its_site(federation):
    grid, settings, _ = federation
    kinds = ("query", "train", "evaluate")
    for k, node in enumerate(grid.contexts):
        entries, problem = audit.verify(log_of(settings[k]))
        assert problem is None
        sent_here = [(kind, rnd) for n, kind, rnd in grid.sent if n == node]
        assert len(entries) == 2 * len(sent_here) == 2 * (1 + 2 + 2)  # query, 2 x (train, eval)
        assert [e["seq"] for e in entries] == list(range(len(entries)))
        for (kind, rnd), got, sent, reply in zip(sent_here, entries[::2], entries[1::2],
                                                 grid.replies[node], strict=True):  # fmt: skip
            assert got["kind"] == "received" and sent["kind"] == "sent"
            assert (got["message"], got["round"], got["run"]) == (kind, rnd, sent["run"])
            assert got["message"] in kinds and len(got["experiment-sha256"]) == 64
            assert got["app"] == {"fab-id": "fedmm/fedmm", "fab-hash": "ab" * 32,
                                  "app-hash": "cd" * 32}  # fmt: skip
            assert sent["reply"] == "ok" and not reply.has_error()
            arrays = {f"{name}/{key}": rec[key].numpy() for name, rec in reply.content.items()
                      if name == messages.UPDATE for key in rec.keys()}  # fmt: skip
            assert sent["payload-sha256"] == audit.payload_sha256(arrays)
            assert sent["tensors"] == {k: [str(a.dtype), list(a.shape)]
                                       for k, a in sorted(arrays.items())}  # fmt: skip
            assert bool(arrays) == (kind == "train")
            metrics = reply.content[messages.METRICS]
            assert sent["metrics"] == {f"metrics/{k}": metrics[k] for k in metrics.keys()}
            if kind == "query":
                assert sent["records"]["site/name"] == reply.content[messages.SITE]["name"]


def test_an_error_is_audited_with_its_reason_and_the_logs_reference(federation, caplog):
    import logging

    grid, settings, cfg = federation
    (node, k) = next(iter(grid.contexts)), 0
    data_dir = Path(settings[k]["data-dir"])
    (data_dir / "train.jsonl").write_text("{not json\n")
    from fedmm import runtime

    runtime._RUNTIMES.clear()  # a fresh process: the site reads its files again
    content = messages.server_message({}, cfg, 0, schema_sha=_sha(cfg))
    with caplog.at_level(logging.ERROR, logger="fedmm.federation.clientapp"):
        with pytest.raises(clientapp.SiteError) as raised:
            grid.app(message=Message(content, node, "query"), context=grid.contexts[node])
    last = audit.verify(log_of(settings[k]))[0][-1]
    assert last["reply"] == "error" and last["reason"] == str(raised.value)
    assert (
        str(raised.value)
        == f"ValueError: failed at the site (details in the site's log, ref {last['ref']})"
    )
    assert any(last["ref"] in r.getMessage() and r.exc_info for r in caplog.records)


def _sha(cfg) -> str:
    from fedmm.data.schema import read_schema

    return read_schema(Path(cfg.data.schema)).sha256()


TAMPERING = {  # how a line is tampered with -> what `fedmm site audit` names
    "edit": "line 5: does not chain from line 4",
    "remove": "line 5: sequence number 5, expected 4",
    "reorder": "line 5: sequence number 5, expected 4",
    "cut": "line 3: not JSON",
}


def tampered(lines: list[bytes], how: str) -> list[bytes]:
    lines = list(lines)
    if how == "edit":  # a metric changed, the line kept canonical
        entry = json.loads(lines[3])
        entry["metrics"]["metrics/num-examples"] = 1.0
        lines[3] = audit.canonical(entry)
    elif how == "remove":
        del lines[4]
    elif how == "reorder":
        lines[4], lines[5] = lines[5], lines[4]
    else:
        lines[2] = lines[2][:-5]
    return lines


def test_fedmm_site_audit_prints_the_log_and_names_the_first_broken_line(federation, capsys):
    _, settings, _ = federation
    path = log_of(settings[0])
    assert cli.main(["site", "audit", str(path.parent)]) == 0
    out = capsys.readouterr().out
    assert "chain intact, 10 entries (5 replies sent)" in out
    assert "train     run " in out and "(Flower run 1) round 2" in out
    assert "-> sent: " in out and "metrics " in out

    lines = path.read_bytes().split(b"\n")[:-1]
    for how, broken in TAMPERING.items():
        copy = path.with_name(f"{how}.jsonl")
        copy.write_bytes(b"\n".join(tampered(lines, how)) + b"\n")
        assert cli.main(["site", "audit", str(copy)]) == 1, how
        assert broken in capsys.readouterr().err, how


def _append_many(path: str, who: int, n: int) -> None:
    for i in range(n):
        audit.append(Path(path), {"kind": "test", "who": who, "i": i})


def test_appends_from_two_processes_keep_one_chain(tmp_path):
    path = tmp_path / "audit.jsonl"
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_append_many, args=(str(path), w, 25)) for w in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    assert [w.exitcode for w in workers] == [0, 0]
    entries, problem = audit.verify(path)
    assert problem is None and len(entries) == 50
    assert entries[0]["prev"] == audit.GENESIS


def test_a_torn_last_line_stops_the_site(tmp_path):
    path = tmp_path / "audit.jsonl"
    audit.append(path, {"kind": "test"})
    with open(path, "ab") as fh:
        fh.write(b'{"kind":"te')
    with pytest.raises(audit.AuditError, match="incomplete line"):
        audit.append(path, {"kind": "test"})
    assert audit.verify(path)[1] == "line 2: incomplete (no newline at the end of the file)"


def test_a_message_that_cannot_be_audited_is_not_handled_and_no_reply_leaves_unaudited(
    tiny_cfg, tmp_path, monkeypatch
):
    from flwr.app import Context, RecordDict

    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")  # the site's state root cannot be made under a file
    ctx = Context(run_id=1, node_id=5, node_config={"partition-id": 0, "state-dir": str(blocked)},
                  state=RecordDict(), run_config={})  # fmt: skip
    msg = Message(messages.server_message({}, tiny_cfg, 0), 5, "query")
    handled = []

    def handler(msg, context):
        handled.append(msg)
        return Message(messages.client_reply(None, {"x": 1.0}), reply_to=msg)

    with pytest.raises(clientapp.SiteError, match=r"^\w+Error: failed at the site \(.*ref \w{8}"):
        clientapp.as_site(handler, msg, ctx)
    assert handled == []

    ctx.node_config["state-dir"] = str(tmp_path / "state")
    real, calls = audit.append, []

    def fail_second(path, entry):
        calls.append(entry["kind"])
        if len(calls) == 2:
            raise OSError(28, "No space left on device", str(path))
        return real(path, entry)

    monkeypatch.setattr(audit, "append", fail_second)
    with pytest.raises(clientapp.SiteError, match="OSError: failed at the site"):
        clientapp.as_site(handler, msg, ctx)  # handled, but its reply is withheld
    assert len(handled) == 1 and calls == ["received", "sent"]


def test_a_servers_long_value_is_audited_as_its_hash(tiny_cfg, flower_task_identity):
    """A megabyte run id must not land in the log as is (found by the hostile-server review:
    each such message added megabytes and made the next append quadratic under the lock)."""
    from flwr.app import MessageType

    content = messages.server_message({}, tiny_cfg, 1, 0, "0" * 64, 0, "r" * 1_000_000)
    entry = audit.received_entry(Message(content, 7, MessageType.TRAIN))
    assert entry["run"] == "sha256:" + __import__("hashlib").sha256(b"r" * 1_000_000).hexdigest()
