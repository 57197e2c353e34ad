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

Views are named by kind (``fedmm.spec.VIEW_KINDS``: ``shared``, ``shared+head``, ``personal``,
plus a method's extras).  Before fedmm 0.2 they were ``global`` / ``personalized`` / ``dat``,
whose meaning differed between methods (FedDAT's ``global`` had the client's own head): ``load``
renames the views of such an old run by its method's ``view_aliases``, and ``final`` keeps the old
names as aliases of the new ones for one release (gone in 0.3).  Files are written atomically
and durably (``fedmm.files``), results.json after the round's checkpoint.

The package, by concern: ``record`` (a run as the round loop builds it), ``views`` (views, means,
old runs' names), ``health``, ``store`` (results.json on disk), ``tables`` (summary.md) and
``curves`` (curves.png, matplotlib).  Their public names are re-exported here: ``results.load``,
``results.summary_table`` and so on are what callers use.
"""

from __future__ import annotations

from fedmm.results.curves import write_curves
from fedmm.results.health import health, health_line, missing_line, sites_scored, unhealthy
from fedmm.results.record import RoundRecord, add_round, attach_notes, is_complete, new_run
from fedmm.results.store import load, save_run, write_reports
from fedmm.results.tables import (
    NOTE_LABELS,
    engine_overhead,
    loader_notes_lines,
    report_views,
    summary_table,
    task_table,
    write_summary,
)
from fedmm.results.views import (
    dataset_name,
    declared_views,
    label,
    mean_views,
    missing_cell,
    run_key,
    scored_views,
    upgrade,
    variant_of,
    view_curve,
    view_rank,
    with_aliases,
    withheld_scores,
)

__all__ = [
    "report_views",
    "NOTE_LABELS",
    "RoundRecord",
    "add_round",
    "attach_notes",
    "dataset_name",
    "declared_views",
    "engine_overhead",
    "health",
    "health_line",
    "is_complete",
    "label",
    "load",
    "loader_notes_lines",
    "mean_views",
    "missing_cell",
    "missing_line",
    "new_run",
    "run_key",
    "save_run",
    "scored_views",
    "sites_scored",
    "summary_table",
    "task_table",
    "unhealthy",
    "upgrade",
    "variant_of",
    "view_curve",
    "view_rank",
    "with_aliases",
    "withheld_scores",
    "write_curves",
    "write_reports",
    "write_summary",
]
