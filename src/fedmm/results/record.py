"""A run record as the round loop builds it: ``new_run``, one ``RoundRecord`` per round, ``add_round``."""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass, field

from fedmm.config import FedmmConfig
from fedmm.results.health import health
from fedmm.results.views import mean_views, with_aliases


def new_run(
    cfg: FedmmConfig, benchmark: str, clients: dict[str, str], tasks: dict[str, str] | None,
    views: tuple[str, ...], trainable_params: int, notes: dict | None = None,
    excluded: dict[str, str] | None = None, view_aliases: dict[str, str] | None = None,
) -> dict:  # fmt: skip
    """A run record with no rounds yet: ``clients`` maps each client's name to its description,
    ``tasks`` each client to its task (multi-task schemas; None otherwise).  ``notes``: what the
    data loaders did (a server passes what its sites report).  Clients in ``excluded`` (name ->
    why) are recorded as ``excluded_clients`` and left out of every mean.  ``run_id`` names the
    run's client state at every site; it is kept when the run is resumed.  ``view_aliases``: the
    method's old view names -> its views (kept in ``final`` for one release)."""
    return {
        "method": cfg.method,
        "variant": cfg.variant,
        "peft": cfg.peft.type,
        "benchmark": benchmark,
        "seed": cfg.seed,
        "run_id": uuid.uuid4().hex,
        "views": list(views),
        "view_aliases": dict(view_aliases or {}),
        "trainable_params": trainable_params,
        "config": cfg.to_flat(),
        "clients": dict(sorted(clients.items())),
        **({"tasks": dict(sorted(tasks.items()))} if tasks else {}),
        "loader_notes": _json_safe(notes or {}),
        "excluded_clients": dict(excluded or {}),
        "history": [],
        "final": {},
        "health": {},
    }


def attach_notes(run: dict, notes: dict) -> None:
    """Store (or replace) the data loader's notes in ``run["loader_notes"]``."""
    run["loader_notes"] = _json_safe(notes)


def _json_safe(value):
    """``value`` with numpy scalars/arrays and tuples turned into plain JSON types."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if hasattr(value, "tolist"):  # numpy scalar or array
        return value.tolist()
    return value


@dataclass
class RoundRecord:
    """One round of a run, as the round loop, ``centralized`` and results.json (``history``)
    share it.  Seconds are wall-clock; bytes are tensor bytes on the wire."""

    round: int
    seconds: float = 0.0  # the whole round, wall clock
    server_seconds: float = 0.0  # the server's aggregation
    bytes_up: int = 0  # training replies' tensors, all clients
    bytes_down: int = 0  # training messages' tensors, all sampled clients
    bytes_eval: int = 0  # evaluation messages' tensors
    sampled: int = 0  # clients asked to train
    failures: int = 0  # sampled clients whose reply was not aggregated (failed or rejected)
    failed: list[dict] = field(default_factory=list)  # {node, client, reason}: errors, timeouts
    rejected: list[dict] = field(default_factory=list)  # replies that failed validation
    eval_failed: list[dict] = field(default_factory=list)
    evaluated: int = 0  # clients asked to evaluate
    clients: dict[str, dict[str, float]] = field(default_factory=dict)  # client -> view -> score
    # client -> view -> primary score on its validation split (data.val_frac; early stopping)
    val: dict[str, dict[str, float]] = field(default_factory=dict)
    train: dict[str, dict[str, float]] = field(default_factory=dict)  # client -> train stats
    eval: dict[str, dict[str, float]] = field(default_factory=dict)  # client -> eval seconds
    skipped: str = ""  # why the round kept the global state ("" = it aggregated)
    # secure aggregation (federation/secagg.py): sites per stage, survivors, dropped, the key
    # exchange's bytes beside the tensors'; {} without it
    secagg: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        entry = dataclasses.asdict(self)
        for key in ("clients", "val", "train", "eval"):
            entry[key] = dict(sorted(entry[key].items()))
        return entry


def is_complete(run: dict, rounds: int | None = None) -> bool:
    """Whether a run record has ended: ``rounds`` (default: its config's ``fed.rounds``) rounds
    in its history, or fewer when early stopping ended it (``stopped_early``)."""
    rounds = run.get("config", {}).get("fed.rounds") if rounds is None else rounds
    return bool(run.get("stopped_early")) or (rounds is not None and len(run["history"]) >= rounds)


def add_round(run: dict, record: RoundRecord | dict) -> dict:
    """Append one round to ``run["history"]`` and update ``final``, ``health`` and TAP's
    ``replacements``; returns the round as stored."""
    entry = record.to_dict() if isinstance(record, RoundRecord) else record
    run["history"].append(entry)
    excluded = run.get("excluded_clients", {})
    if entry["clients"] or not run["final"]:  # a round without evaluation keeps the last one
        aliases = run.get("view_aliases", {})
        run["final"] = with_aliases(mean_views(entry["clients"], excluded), aliases)
        if run.get("tasks"):  # the mean over clients mixes metrics; per task it does not
            run["final_by_task"] = {
                task: with_aliases(mean_views(
                    {c: m for c, m in entry["clients"].items() if run["tasks"][c] == task},
                    excluded,
                ), aliases)
                for task in sorted(set(run["tasks"].values()))
            }  # fmt: skip
    run["health"] = health(run)
    history = run["history"]
    clients = sorted({c for h in history for c, t in h["train"].items() if "replaced" in t})
    if clients:  # TAP's replacements: in which rounds the global copy beat the personal model
        run["replacements"] = {
            c: {
                "task": run.get("tasks", {}).get(c, ""),
                "count": sum(bool(h["train"].get(c, {}).get("replaced")) for h in history),
                "rounds": [h["round"] for h in history if h["train"].get(c, {}).get("replaced")],
            }
            for c in clients
        }
    return entry
