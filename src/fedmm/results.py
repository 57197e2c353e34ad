"""Results: ``results.json`` (every run, every round), ``summary.md`` and ``curves.png``.

Schema of ``<out>/results.json``::

    {"fedmm_version": str,
     "runs": [{"method", "variant", "peft", "benchmark", "seed", "views": [view, ...],
               "view_aliases": {old name: view},
               "trainable_params": int, "config": {flat config},
               "clients": {client id: description},
               "history": [{"round", "seconds", "server_seconds", "bytes_up", "bytes_down",
                            "bytes_eval", "sampled", "failures", "evaluated",
                            "failed" | "rejected" | "eval_failed": [{"node", "client", "reason"}],
                            "clients": {client id: {view: accuracy}},
                            "train": {client id: {"steps", "lr-first", "lr-last", "loss",
                                                  "seconds", "bytes_up", "bytes_down"
                                                  [, "dp-clip-norm", "dp-noise-multiplier",
                                                  "dp-mode" (0 update, 1 record), "dp-delta",
                                                  "dp-epsilon", "dp-sample-rate", "dp-steps";
                                                  fedmm <= 0.2 also "dp-norm", "dp-scale"]}},
                            "eval": {client id: {"seconds" [, "scores-withheld": 1]}}}],
               "privacy": {"dp_clip_norm", "dp_noise_multiplier"},
               "final": {view: mean accuracy over clients in the last evaluated round,
                         old name: the same value, for the names in view_aliases},
               multi-task benchmarks also: "tasks": {client id: task},
               "final_by_task": {task: {view: mean metric over that task's clients}},
               TAP: "replacements": {client id: {"task", "count", "rounds": [...]}}}]}

``failed``: sampled nodes that errored or did not answer within ``fed.round_timeout``;
``rejected``: replies refused by validation (federation/validation.py); ``failures`` counts both.

``bytes_up``/``bytes_down`` of a round: all sampled clients' training messages together; per
client under ``train``.  ``server_seconds``: the method's aggregation step.  ``seconds`` under
``train`` and ``eval``: each client's own time handling the message, so ``seconds`` minus their sum
is the engine's overhead.  Rounds without evaluation (``fed.eval_every``) have empty ``clients``
and ``eval``; ``final`` is the last evaluated round's mean.  A run is identified
by (method, variant, peft, benchmark, seed); writing it again replaces it, so a directory collects
a comparison across several ``fedmm run`` calls.  ``variant``: the name of a configuration of the
method (``variant`` option; ``fedmm bench``'s ablations), "" for its defaults.

Views are named by kind (``methods.base.VIEW_KINDS``: ``shared``, ``shared+head``, ``personal``,
plus a method's extras).  Before fedmm 0.2 they were ``global`` / ``personalized`` / ``dat``,
whose meaning differed between methods (FedDAT's ``global`` had the client's own head): ``load``
renames the views of such an old run by its method's ``view_aliases``, and ``final`` keeps the old
names as aliases of the new ones for one release (gone in 0.3).  Files are written atomically
and durably (``fedmm.files``), results.json after the round's checkpoint.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from fedmm import __version__
from fedmm.config import FedmmConfig
from fedmm.files import atomic_write
from fedmm.runkey import RunKey

log = logging.getLogger(__name__)

KINDS = ("shared", "shared+head", "personal")  # the view kinds (methods.base.VIEW_KINDS)
VIEW_ORDER = (*KINDS, "client", "distilled")


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
    train: dict[str, dict[str, float]] = field(default_factory=dict)  # client -> train stats
    eval: dict[str, dict[str, float]] = field(default_factory=dict)  # client -> eval seconds

    def to_dict(self) -> dict:
        entry = dataclasses.asdict(self)
        for key in ("clients", "train", "eval"):
            entry[key] = dict(sorted(entry[key].items()))
        return entry


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


def with_aliases(means: dict[str, float], aliases: dict[str, str]) -> dict[str, float]:
    """``means`` plus each old view name of ``aliases`` (old -> new) with its new name's value,
    group suffixes included (``global.closed``)."""
    out = dict(means)
    for old, new in aliases.items():
        for key, value in means.items():
            view, dot, suffix = key.partition(".")
            if view == new:
                out[f"{old}{dot}{suffix}"] = value
    return out


def upgrade(run: dict) -> dict:
    """A run stored before fedmm 0.2 (no ``view_aliases``) with its views renamed by kind, by its
    method's ``view_aliases`` (FedDAT's depend on its ``feddat.federate_head``), and the old names
    kept in ``final`` as aliases; a newer run unchanged.  A method fedmm no longer has gets
    ``personalized`` / ``dat`` -> ``personal`` and keeps ``global`` (its kind is unknown: a
    warning says so)."""
    if "view_aliases" in run:
        return run
    from fedmm.methods import METHODS

    cls = METHODS.get(run["method"])
    if cls is None:
        aliases = {"personalized": "personal", "dat": "personal"}
        if "global" in run.get("views", ()):
            log.warning("results: method %r is unknown to this fedmm; its view 'global' keeps "
                        "its old name (shared or shared+head cannot be told)", run["method"])  # fmt: skip
    else:
        aliases = dict(cls.aliases_for(run.get("config", {})))

    def rename(metrics: dict) -> dict:
        out = {}
        for key, value in metrics.items():
            view, dot, suffix = key.partition(".")
            out[f"{aliases.get(view, view)}{dot}{suffix}"] = value
        return out

    run["views"] = list(dict.fromkeys(aliases.get(v, v) for v in run.get("views", ())))
    for entry in run.get("history", ()):
        entry["clients"] = {c: rename(m) for c, m in entry["clients"].items()}
    run["final"] = with_aliases(rename(run.get("final", {})), aliases)
    if "final_by_task" in run:
        run["final_by_task"] = {t: with_aliases(rename(m), aliases)
                                for t, m in run["final_by_task"].items()}  # fmt: skip
    run["view_aliases"] = aliases
    run.setdefault("variant", run.get("config", {}).get("variant", ""))
    return run


def declared_views(run: dict) -> tuple[str, ...]:
    """The views the run's method scores today with the run's options (a report marks ``n/m``
    where an older run did not measure one of them)."""
    from fedmm.methods import METHODS

    cls = METHODS.get(run["method"])
    return cls.views_for(run.get("config", {})) if cls else tuple(run.get("views", ()))


def missing_cell(run: dict, view: str) -> str:
    """What a table shows where ``run`` has no score for ``view`` (group suffixes allowed):
    ``withheld`` the sites kept their scores (DP, ``federation/sitedp.py``); ``n/a`` the run has
    the view but no included client scored it; ``n/m`` the method has it today but the run
    predates it (made before fedmm 0.2); ``—`` the method has no such model."""
    base = view.partition(".")[0]
    if base in run.get("views", ()):
        return "withheld" if withheld_scores(run) else "n/a"
    return "n/m" if base in declared_views(run) else "—"


def withheld_scores(run: dict) -> int:
    """Evaluations whose site withheld its scores (DP on, ``dp-evaluation = "withhold"``)."""
    return sum(
        bool(e.get("scores-withheld"))
        for h in run.get("history", [])
        for e in h.get("eval", {}).values()
    )


def scored_views(run: dict) -> dict[str, float]:
    """``final`` without the alias names: the run's views (and their group suffixes) only."""
    views = set(run.get("views", ()))
    return {k: v for k, v in run["final"].items() if k.partition(".")[0] in views}


def mean_views(
    clients: dict[str, dict[str, float]], excluded: Iterable[str] = ()
) -> dict[str, float]:
    """``{view: mean over clients}``.  Clients in ``excluded`` (``run["excluded_clients"]``) and
    values that are not finite numbers (a client scored on nothing) are left out: such a client
    never drags a mean down.  A view nobody scored is absent."""
    skip = set(excluded)
    views: dict[str, list[float]] = {}
    for client, metrics in clients.items():
        if client in skip:
            continue
        for view, acc in metrics.items():
            if isinstance(acc, int | float) and math.isfinite(acc):
                views.setdefault(view, []).append(float(acc))
    return {v: sum(a) / len(a) for v, a in sorted(views.items(), key=lambda kv: view_rank(kv[0]))}


def view_curve(run: dict, view: str) -> list[float | None]:
    """Per ``history`` entry of ``run``: the mean ``view`` score over its included clients, None
    where none scored it (a round without evaluation too)."""
    excluded = run.get("excluded_clients", {})
    return [mean_views(h["clients"], excluded).get(view) for h in run["history"]]


def view_rank(name: str) -> tuple:
    """Sort key of a view (``shared``, ``shared+head``, ``personal``, extras; groups after)."""
    view, _, suffix = name.partition(".")
    known = VIEW_ORDER.index(view) if view in VIEW_ORDER else len(VIEW_ORDER)
    return (bool(suffix), known, view, suffix)


# ---------------------------------------------------------------------- health of a run
def health(run: dict) -> dict:
    """Did the run train and evaluate?  Counted over its whole history:

    * ``sampled``: client-rounds asked to train (centralised: one pooled update per round);
      ``trained``: of those, the valid replies that took at least one step;
    * ``expected``: evaluations asked for; ``evaluated``: those that came back with a score;
      ``withheld``: those a DP site answered without scores (by design: not expected to score);
    * ``rejected`` (refused by validation), ``failed`` (errors, timeouts), ``eval_failed``;
    * ``status``: ``no rounds``, ``trained nothing``, ``evaluated nothing``, ``partial`` (some
      client-rounds or evaluations missing) or ``ok``.

    Clients in ``excluded_clients`` are not held against the run: one with no training rows is
    not expected to train (its reply carries 0 examples and is refused), one with no test rows
    not to score (its scores are left out of every mean either way).
    """
    excluded = run.get("excluded_clients", {})
    no_train = {c for c, why in excluded.items() if "train" in why}
    no_test = {c for c, why in excluded.items() if "test" in why}
    counts = dict.fromkeys(
        ("sampled", "trained", "expected", "evaluated", "withheld", "rejected", "failed",
         "eval_failed"), 0
    )  # fmt: skip
    for h in run.get("history", []):
        train = h.get("train", {})
        rejected = h.get("rejected", [])
        skipped = sum(x.get("client") in no_train for x in rejected)
        skipped += sum(c in no_train for c in train)
        counts["sampled"] += (h.get("sampled") or len(train)) - skipped
        counts["trained"] += sum(
            c not in no_train and t.get("steps", 1) > 0 for c, t in train.items()
        )
        counts["rejected"] += sum(x.get("client") not in no_train for x in rejected)
        counts["failed"] += sum(x.get("client") not in no_train for x in h.get("failed", []))
        eval_failed = h.get("eval_failed", [])
        counts["eval_failed"] += sum(x.get("client") not in no_test for x in eval_failed)
        clients = h.get("clients", {})
        asked_excluded = {c for c in clients if c in no_test}
        asked_excluded |= {x.get("client") for x in eval_failed if x.get("client") in no_test}
        withheld = sum(bool(e.get("scores-withheld")) and c not in no_test
                       for c, e in h.get("eval", {}).items())  # fmt: skip
        counts["withheld"] += withheld
        counts["expected"] += h.get("evaluated", len(clients)) - len(asked_excluded) - withheld
        counts["evaluated"] += sum(
            c not in no_test and any(isinstance(v, int | float) and math.isfinite(v)
                                     for v in m.values())
            for c, m in clients.items()
        )  # fmt: skip
    if not run.get("history"):
        status = "no rounds"
    elif counts["trained"] == 0:
        status = "trained nothing"
    elif counts["evaluated"] == 0 and counts["withheld"] == 0:
        status = "evaluated nothing"
    elif counts["trained"] < counts["sampled"] or counts["evaluated"] < counts["expected"]:
        status = "partial"
    else:
        status = "ok"
    return counts | {"status": status}


def health_line(run: dict) -> str:
    """One line: ``health: 15/15 client-rounds trained, 15/15 evaluations, 0 rejected, 0 failed
    -> ok`` (plus evaluation failures and excluded clients when there are any)."""
    h = health(run)
    line = (
        f"{h['trained']}/{h['sampled']} client-rounds trained, {h['evaluated']}/{h['expected']} "
        f"evaluations, {h['rejected']} rejected, {h['failed']} failed"
    )
    if h["eval_failed"]:
        line += f", {h['eval_failed']} evaluations failed"
    if h["withheld"]:
        line += f", {h['withheld']} evaluations with scores withheld (DP)"
    excluded = run.get("excluded_clients", {})
    if excluded:
        line += "; excluded from every mean (n/a): " + ", ".join(
            f"{c} ({why})" for c, why in sorted(excluded.items())
        )
    return f"health: {line} -> {h['status']}"


def sites_scored(run: dict) -> tuple[int, int]:
    """``(N, K)``: the N of the run's K included clients (``excluded_clients`` left out) whose
    scores make ``final``, i.e. that were scored in the last evaluated round."""
    excluded = run.get("excluded_clients", {})
    included = [c for c in run.get("clients", {}) if c not in excluded]
    evaluated = [h["clients"] for h in run.get("history", []) if h.get("clients")]
    scores = evaluated[-1] if evaluated else {}
    scored = sum(
        any(isinstance(v, int | float) and math.isfinite(v) for v in scores.get(c, {}).values())
        for c in included
    )
    return scored, len(included)


def missing_line(run: dict, max_reason: int = 120) -> str | None:
    """Who is missing in the run's last round and why, from its ``failed``, ``rejected`` and
    ``eval_failed`` entries: ``missing in the last round: 2-blurred (no reply within 90s),
    0-original (evaluation: error: ...)``; None when every site answered."""
    if not run.get("history"):
        return None
    last = run["history"][-1]
    parts = []
    for key, stage in (("failed", ""), ("rejected", "rejected: "), ("eval_failed", "evaluation: ")):
        for x in last.get(key, []):
            who = x.get("client") or f"node {x.get('node')}"
            reason = " ".join(str(x.get("reason", "")).split())
            if len(reason) > max_reason:
                reason = reason[: max_reason - 1] + "…"
            parts.append(f"{who} ({stage}{reason})")
    return "missing in the last round: " + ", ".join(parts) if parts else None


def unhealthy(run: dict, allow_partial: bool = False) -> str | None:
    """Why ``run`` must not count as a finished run (a CLI exits non-zero), or None.

    A run that trained nothing or evaluated nothing is never fine; a ``partial`` one is fine only
    with ``allow_partial``."""
    h = health(run)
    if h["status"] == "ok" or (h["status"] == "partial" and allow_partial):
        return None
    why = h["status"] + ("" if h["status"] != "partial" else
                         " (use --allow-partial to accept partial runs)")  # fmt: skip
    return f"{label(run)} seed {run['seed']} on {run['benchmark']}: {why}; {health_line(run)}"


# ---------------------------------------------------------------------- loader notes
NOTE_LABELS = {
    "records_read": "records read",
    "train_records": "training records kept",
    "test_records": "test records kept",
    "train_questions": "training questions",
    "test_questions": "test questions",
    "missing_images_dropped": "records dropped: image missing",
    "unreadable_images_dropped": "records dropped: image unreadable",
    "normalize_answers": "answer normalisation (strip, collapse spaces, lower-case)",
    "answers_normalised": "answers normalised",
    "normalised": "normalised",
    "test_unk": "test answers unseen in training -> <unk>",
    "unk_index": "<unk> label index",
    "clients_by": "clients by",
    "test_split": "test split",
    "test_images_seen_in_train": "test images also in training",
    "closed_not_yes_no_left_out": "closed questions not yes/no, left out",
}


def loader_notes_lines(notes: dict) -> list[str]:
    """Human-readable lines for a benchmark's ``notes`` (what the loader read, normalised,
    dropped, mapped to ``<unk>``), in the notes' order; ``[]`` for no notes."""
    lines = []
    for key, value in notes.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items()) or "nothing"
        elif isinstance(value, bool):
            value = "on" if value else "off"
        elif isinstance(value, list):
            value = "[" + ", ".join(map(str, value)) + "]"
        lines.append(f"{NOTE_LABELS.get(key, key.replace('_', ' '))}: {value}")
    return lines


def load(out_dir: str | Path) -> dict:
    path = Path(out_dir) / "results.json"
    if not path.is_file():
        return {"fedmm_version": __version__, "runs": []}
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(
            f"{path} is not valid JSON ({exc}); move it away or pick another --out"
        ) from exc
    data["runs"] = [upgrade(r) for r in data.get("runs", [])]
    return data


def run_key(run: dict) -> RunKey:
    """The identity of a stored run (``fedmm.runkey.RunKey``)."""
    return RunKey.of_run(run)


def variant_of(run: dict) -> str:
    return run.get("variant", run.get("config", {}).get("variant", ""))


def label(run: dict) -> str:
    """The variant's name (``variant``) or ``method``, with ``+peft`` unless the PEFT type is
    the default bottleneck adapter."""
    peft = run.get("peft", "adapter")
    name = variant_of(run) or run["method"]
    return name if peft == "adapter" else f"{name}+{peft}"


def save_run(out_dir: str | Path, run: dict) -> None:
    """Insert or replace ``run`` in ``<out>/results.json`` and refresh summary.md/curves.png."""
    data = load(out_dir)
    data["runs"] = [r for r in data["runs"] if run_key(r) != run_key(run)]
    data["runs"].append(run)
    data["fedmm_version"] = __version__
    atomic_write(Path(out_dir) / "results.json", json.dumps(data, indent=1).encode())
    write_summary(out_dir, data)
    write_curves(out_dir, data)


def _views(runs: list[dict]) -> list[str]:
    seen = {v for r in runs
            for v in (*scored_views(r), *r.get("views", ()), *declared_views(r))}  # fmt: skip
    return sorted(seen, key=view_rank)


def summary_table(data: dict) -> str:
    """Markdown: one table per benchmark, methods x views (mean accuracy over clients)."""
    lines = []
    for bench in sorted({r["benchmark"] for r in data["runs"]}):
        runs = [r for r in data["runs"] if r["benchmark"] == bench]
        views = _views(runs)
        lines += [f"### {bench}", ""]
        head = [
            "method",
            "seed",
            "rounds",
            *views,
            "trainable params",
            "s/round",
            "KB up/client/round",
            "KB down/client/round",
        ]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in runs:
            hist = r["history"]
            n = max(1, len(hist))
            cells = [label(r), str(r["seed"]), str(len(hist))]
            scored, expected = sites_scored(r)
            partial = f" ({scored}/{expected})" if scored < expected else ""
            cells += [
                f"{100 * r['final'][v]:.1f}{partial}" if v in r["final"] else missing_cell(r, v)
                for v in views
            ]
            cells += [
                f"{r['trainable_params']:,}",
                f"{sum(h['seconds'] for h in hist) / n:.1f}",
                f"{sum(h['bytes_up'] / max(1, h['sampled']) for h in hist) / n / 1024:.0f}",
                f"{sum(h['bytes_down'] / max(1, h['sampled']) for h in hist) / n / 1024:.0f}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        for r in runs:
            lines.append(f"- {label(r)} seed {r['seed']}: {health_line(r)}")
            if missing := missing_line(r):
                lines.append(f"  {missing}")
        lines.append("")
    lines += task_table(data["runs"])
    if any(withheld_scores(r) for r in data["runs"]):
        lines.append("withheld: sites under differential privacy kept their scores (site setting "
                     "dp-evaluation; README, Reliability: privacy).\n")  # fmt: skip
    lines.append(
        "Accuracy in %, mean over clients after the last round (multi-label tasks: mean AUROC, "
        "see the per-task table); views by kind (README, Views); —: the method has no such "
        "model; n/m: it has, but this run was made before fedmm 0.2 and did not measure it; "
        "n/a: no included client was scored in that view; (N/K): the "
        "mean is over the N of K sites scored in the last evaluated round (the line 'missing in "
        "the last round' under the table says which and why). KB: one "
        "client's training messages per round (tensor payload), averaged over the sampled "
        "clients and rounds. Health: client-rounds that trained / were sampled, evaluations "
        "that came back / were asked for, replies rejected by validation, nodes that failed."
    )
    return "\n".join(lines)


def task_table(runs: list[dict]) -> list[str]:
    """Markdown lines: per multi-task benchmark, methods x (task, view) with the task's metric,
    and TAP's replacement counts."""
    lines = []
    for bench in sorted({r["benchmark"] for r in runs if r.get("final_by_task")}):
        rs = [r for r in runs if r["benchmark"] == bench and r.get("final_by_task")]
        tasks = sorted({t for r in rs for t in r["final_by_task"]})
        views = [v for v in _views(rs) if "." not in v]
        cols = [(t, v) for t in tasks for v in views if any(v in r["final_by_task"].get(t, {})
                                                           for r in rs)]  # fmt: skip
        lines += [f"### {bench}, per task", ""]
        head = ["method", "seed", *(f"{t} {v}" for t, v in cols)]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rs:
            cells = [label(r), str(r["seed"])]
            for t, v in cols:
                score = r["final_by_task"].get(t, {}).get(v)
                cells.append(missing_cell(r, v) if score is None else f"{100 * score:.1f}")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        for r in rs:
            if r.get("replacements"):
                counts = ", ".join(
                    f"{c} ({x['task']}): {x['count']} {x['rounds']}"
                    for c, x in sorted(r["replacements"].items())
                )
                lines += [f"{label(r)} seed {r['seed']} replacements (client: count [rounds]): "
                          f"{counts}", ""]  # fmt: skip
    return lines


def write_summary(out_dir: str | Path, data: dict) -> None:
    from fedmm.generation import predictions_section  # generative runs: what the model said

    text = summary_table(data) + "\n"
    predictions = predictions_section(out_dir)
    atomic_write(Path(out_dir) / "summary.md", (text + (f"\n{predictions}\n" if predictions
                                                         else "")).encode())  # fmt: skip


def write_curves(out_dir: str | Path, data: dict) -> None:
    """Accuracy per round, one line per (method, view); one panel per benchmark."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benches = sorted({r["benchmark"] for r in data["runs"]})
    if not benches:
        return
    fig, axes = plt.subplots(1, len(benches), figsize=(6 * len(benches), 4), squeeze=False)
    styles = {"shared": "-", "shared+head": "-.", "personal": "--", "client": ":"}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, bench in zip(axes[0], benches):
        runs = [r for r in data["runs"] if r["benchmark"] == bench]
        for i, r in enumerate(runs):
            for view in r["views"]:
                xs = [h["round"] for h in r["history"]]
                ys = [float("nan") if y is None else 100 * y for y in view_curve(r, view)]
                ax.plot(xs, ys, linestyle=styles.get(view, (0, (3, 1, 1, 1))), marker="o",
                        color=colors[i % len(colors)],
                        label=f"{label(r)} s{r['seed']} ({view})")  # fmt: skip
        ax.set_title(bench)
        ax.set_xlabel("round")
        ax.set_ylabel("mean client accuracy (%)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    atomic_write(Path(out_dir) / "curves.png", png.getvalue())


def engine_overhead(entry: dict) -> dict[str, float]:
    """One round of ``history``: its wall time, the clients' own seconds (training and evaluation
    replies, summed) and the engine's share ``(wall − Σ client seconds) / wall``."""
    client = sum(t.get("seconds", 0.0) for t in entry.get("train", {}).values())
    client += sum(e.get("seconds", 0.0) for e in entry.get("eval", {}).values())
    wall = float(entry["seconds"])
    return {"wall": wall, "client": client, "overhead": (wall - client) / wall if wall else 0.0}
