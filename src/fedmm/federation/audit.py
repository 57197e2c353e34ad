"""A site's audit log: every message it received and everything it sent, hash-chained.

One log per site, ``<site root>/audit.jsonl`` (``consent.site_root``: ``<state-dir>/<site>/``),
append-only JSON Lines.  Each line is one entry in canonical form (keys sorted, no spaces,
UTF-8) and holds ``prev``, the SHA-256 of the previous line's bytes (the first line chains from
``GENESIS``), and ``seq``, its 0-based line number.  Editing, removing, inserting or reordering a
line breaks the chain at that line; ``verify`` names the first broken line.  Removing lines *at
the end* leaves a valid shorter chain: ``fedmm site audit`` prints the head (the last line's
hash) so an operator can keep it elsewhere and compare.

Every append takes an exclusive ``fcntl.flock`` on the file (two processes of one site never
interleave or fork the chain), writes one line and ``fsync``s it before the message is handled
(a received entry) or its reply leaves (a sent entry).  A log whose last line is incomplete (a
crash mid-write) is refused: the site stops handling messages until its operator looks.

Entries (``kind``):

* ``received``: ``time`` (UTC, ISO 8601), ``message`` (query | train | evaluate), ``run`` (the
  run id in the message), ``flower-run`` (Flower's run id), ``round``, ``client-index``,
  ``experiment-sha256`` (of the experiment options as canonical JSON), ``app`` (``FEDMM_FAB_ID``
  / ``FEDMM_FAB_HASH`` of the process: which app handled it), ``secagg-stage`` (a secure
  aggregation stage, ``secagg.STAGES``: setup, share-keys, collect-masked-input, unmask);
* ``sent``: the same ``message``/``run``/``round``/``secagg-stage``, ``reply`` ``ok`` or ``error``; for ``ok``:
  ``tensors`` (key -> ``[dtype, shape]``), ``payload-sha256`` (of every array's key, dtype,
  shape and bytes, in key order), ``metrics`` (every value), ``records`` (every config record
  field, e.g. the query's site description); for ``error``: ``reason`` (the text that left) and
  ``ref`` (the reference under which the site's log holds the full error).
"""

from __future__ import annotations

import datetime
import fcntl
import hashlib
import json
import os
from pathlib import Path
from typing import Any

AUDIT_FILE = "audit.jsonl"
GENESIS = hashlib.sha256(b"fedmm audit log v1").hexdigest()


class AuditError(RuntimeError):
    """The audit log cannot be appended to (then no message is handled) or does not verify."""


def canonical(entry: dict) -> bytes:
    """The bytes of one entry as a line (without its newline)."""
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")


def app_identity() -> dict[str, str]:
    """Which app this process runs, as the trusted ClientApp process set it."""
    return {"fab-id": os.environ.get("FEDMM_FAB_ID", ""),
            "fab-hash": os.environ.get("FEDMM_FAB_HASH", ""),
            "app-hash": os.environ.get("FEDMM_APP_HASH", "")}  # fmt: skip


def _last_line(fh) -> bytes:
    """The last line of the open file ``fh`` (with its newline), b"" when empty."""
    end = fh.seek(0, os.SEEK_END)
    if end == 0:
        return b""
    block, chunks, newlines = 4096, [], 0  # read backwards in blocks, joined once: linear
    pos = end
    while pos > 0:
        step = min(block, pos)
        pos -= step
        fh.seek(pos)
        chunk = fh.read(step)
        chunks.append(chunk)
        newlines += chunk.count(b"\n")
        if newlines >= 2:
            break
    data = b"".join(reversed(chunks))
    body = data[:-1] if data.endswith(b"\n") else data
    start = body.rfind(b"\n") + 1
    return data[start:]


def append(path: Path, entry: dict) -> dict:
    """Append ``entry`` (with ``seq`` and ``prev`` filled in) to the log at ``path``; locked,
    fsynced.  Returns the entry as written.  ``AuditError`` when the log ends in a torn line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    created = not path.exists()
    with open(path, "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            last = _last_line(fh)
            if last and not last.endswith(b"\n"):
                raise AuditError(
                    f"{path} ends in an incomplete line (a write was cut off); check it with "
                    "`fedmm site audit` before this site handles more messages"
                )
            if last:
                try:
                    seq = int(json.loads(last)["seq"]) + 1
                except (ValueError, KeyError, TypeError):
                    raise AuditError(f"{path}: its last line is not an audit entry; check it "
                                     "with `fedmm site audit`") from None  # fmt: skip
            else:
                seq = 0
            prev = hashlib.sha256(last[:-1]).hexdigest() if last else GENESIS
            written = {**entry, "seq": seq, "prev": prev}
            fh.seek(0, os.SEEK_END)
            fh.write(canonical(written) + b"\n")
            fh.flush()
            os.fsync(fh.fileno())
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
    if created:  # the new file's directory entry must survive a power cut too
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return written


# ---------------------------------------------------------------------- what an entry holds
def experiment_sha256(raw: Any) -> str:
    """SHA-256 of the experiment options as canonical JSON (of the raw text if it is no JSON)."""
    text = str(raw)
    try:
        text = json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))
    except (ValueError, TypeError):
        pass  # a malformed message: its bytes as they came
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


MAX_FIELD = 64  # characters of a message's value kept as is; a longer one is kept as its hash


def received_entry(msg) -> dict:
    """What a message says about itself, read leniently (a malformed message is audited too)."""
    from fedmm.federation.messages import CONFIG

    entry: dict[str, Any] = {
        "kind": "received", "time": now(), "message": str(msg.metadata.message_type),
        "flower-run": int(msg.metadata.run_id), "app": app_identity(),
    }  # fmt: skip
    try:
        config = msg.content[CONFIG]
    except (KeyError, TypeError, ValueError):
        return entry | {"malformed": "no config record"}
    for key, name in (("run-id", "run"), ("round", "round"), ("client-index", "client-index")):
        if key in config:
            value = config[key]
            entry[name] = value if isinstance(value, int | str) else str(value)
            if isinstance(entry[name], str) and len(entry[name]) > MAX_FIELD:  # never a server's
                entry[name] = "sha256:" + hashlib.sha256(entry[name].encode()).hexdigest()  # bulk
    if "experiment" in config:
        entry["experiment-sha256"] = experiment_sha256(config["experiment"])
    try:  # secure aggregation (secagg.py): which stage of the round's protocol
        stage = msg.content["secagg"].get("stage")
    except (KeyError, TypeError, ValueError, AttributeError):
        stage = None
    if stage is not None:
        entry["secagg-stage"] = str(stage)[:MAX_FIELD]
    return entry


def payload_sha256(arrays: dict[str, Any]) -> str:
    """SHA-256 over every array's key, dtype, shape and bytes, in key order."""
    import numpy as np

    h = hashlib.sha256()
    for key in sorted(arrays):
        a = np.ascontiguousarray(arrays[key])
        h.update(json.dumps([key, str(a.dtype), list(a.shape)]).encode() + b"\0")
        h.update(a.tobytes())
    return h.hexdigest()


def sent_entry(received: dict, reply=None, reason: str = "", ref: str = "") -> dict:
    """What left: the reply's tensors, payload hash, metrics and config records, or the error
    reason and its reference."""
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

    entry = {k: received[k] for k in ("message", "run", "round", "flower-run", "secagg-stage")
             if k in received}  # fmt: skip
    entry |= {"kind": "sent", "time": now()}
    if reply is None:
        return entry | {"reply": "error", "reason": reason, "ref": ref}
    arrays, metrics, records = {}, {}, {}
    for name, record in reply.content.items():
        if isinstance(record, ArrayRecord):
            arrays |= {f"{name}/{k}": record[k].numpy() for k in record.keys()}
        elif isinstance(record, MetricRecord):
            metrics |= {f"{name}/{k}": record[k] for k in record.keys()}
        elif isinstance(record, ConfigRecord):
            records |= {f"{name}/{k}": record[k] for k in record.keys()}
    tensors = {k: [str(a.dtype), list(a.shape)] for k, a in sorted(arrays.items())}
    return entry | {
        "reply": "ok", "tensors": tensors, "payload-sha256": payload_sha256(arrays),
        "metrics": _jsonable(metrics), "records": _jsonable(records),
    }  # fmt: skip


def _jsonable(values: dict) -> dict:
    out = {}
    for k, v in values.items():
        if isinstance(v, bytes):
            v = v.hex()
        elif isinstance(v, list):
            v = [x.hex() if isinstance(x, bytes) else x for x in v]
        if isinstance(v, float) and v != v:
            v = "nan"
        elif isinstance(v, float) and v in (float("inf"), float("-inf")):
            v = str(v)
        out[k] = v
    return out


# ---------------------------------------------------------------------- reading it back
def verify(path: Path) -> tuple[list[dict], str | None]:
    """``(entries, problem)``: the entries up to the first broken line, and what is wrong there
    (``"line N: ..."``, 1-based) or None when the whole chain holds."""
    data = Path(path).read_bytes()
    entries: list[dict] = []
    prev = GENESIS
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    elif lines:
        return entries, f"line {len(lines)}: incomplete (no newline at the end of the file)"
    for number, line in enumerate(lines, 1):
        try:
            entry = json.loads(line)
        except ValueError:
            return entries, f"line {number}: not JSON (edited or corrupted)"
        if not isinstance(entry, dict) or canonical(entry) != line:
            return entries, f"line {number}: not in canonical form (edited)"
        if entry.get("seq") != number - 1:
            return entries, (f"line {number}: sequence number {entry.get('seq')!r}, expected "
                             f"{number - 1} (a line was removed, inserted or moved)")  # fmt: skip
        if entry.get("prev") != prev:
            return entries, (f"line {number}: does not chain from line {number - 1} (line "
                             f"{number - 1} or this one was edited, or lines were reordered)")  # fmt: skip
        entries.append(entry)
        prev = hashlib.sha256(line).hexdigest()
    return entries, None


def head(path: Path) -> str:
    """SHA-256 of the last line: record it elsewhere to detect lines cut off the end."""
    lines = [x for x in Path(path).read_bytes().split(b"\n") if x]
    return hashlib.sha256(lines[-1]).hexdigest() if lines else GENESIS


def describe(entry: dict) -> str:
    """One readable line: when, which message of which run and round, what came or left."""
    where = (f"run {entry.get('run') or '-'} (Flower run {entry.get('flower-run', '?')}) "
             f"round {entry.get('round', '?')}")  # fmt: skip
    message = str(entry.get("message", "?"))
    if entry.get("secagg-stage"):  # secure aggregation: which stage of the round
        message += f" ({entry['secagg-stage']})"
    what = f"{entry.get('time', '?')}  #{entry.get('seq')}  {message:<8}  {where}"
    if entry.get("kind") == "received":
        app = entry.get("app") or {}
        fab = app.get("fab-id") or "-"
        return (f"{what}  <- received (experiment {str(entry.get('experiment-sha256', '-'))[:12]},"
                f" app {fab})")  # fmt: skip
    if entry.get("reply") == "error":
        return f"{what}  -> error: {entry.get('reason', '')} [ref {entry.get('ref', '')}]"
    tensors = entry.get("tensors", {})
    values = sum(_prod(shape) for _, shape in tensors.values())
    metrics = ", ".join(f"{k.split('/', 1)[-1]}={v}" for k, v in entry.get("metrics", {}).items())
    records = ", ".join(f"{k.split('/', 1)[-1]}={v!r}" for k, v in entry.get("records", {}).items())
    parts = [f"{len(tensors)} tensors ({values} values, sha256 "
             f"{str(entry.get('payload-sha256', ''))[:12]})"]  # fmt: skip
    if metrics:
        parts.append(f"metrics {metrics}")
    if records:
        parts.append(f"records {records}")
    return f"{what}  -> sent: " + "; ".join(parts)


def _prod(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


__all__ = ["AUDIT_FILE", "GENESIS", "AuditError", "append", "describe", "head", "received_entry",
           "sent_entry", "verify"]  # fmt: skip
