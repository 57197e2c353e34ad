"""A stored run's views: their kinds and order, the means over clients, the renaming of runs
made before fedmm 0.2 (``upgrade``) and what a table shows for a view a run did not score."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

from fedmm.runkey import RunKey
from fedmm.spec import METHOD_SPECS, VIEW_ORDER

log = logging.getLogger(__name__)


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
    spec = METHOD_SPECS.get(run["method"])
    if spec is None:
        aliases = {"personalized": "personal", "dat": "personal"}
        if "global" in run.get("views", ()):
            log.warning("results: method %r is unknown to this fedmm; its view 'global' keeps "
                        "its old name (shared or shared+head cannot be told)", run["method"])  # fmt: skip
    else:
        aliases = dict(spec.aliases_for(run.get("config", {})))

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
    spec = METHOD_SPECS.get(run["method"])
    return spec.views_for(run.get("config", {})) if spec else tuple(run.get("views", ()))


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


def run_key(run: dict) -> RunKey:
    """The identity of a stored run (``fedmm.runkey.RunKey``)."""
    return RunKey.of_run(run)


def variant_of(run: dict) -> str:
    return run.get("variant", run.get("config", {}).get("variant", ""))


def dataset_name(run: dict) -> str:
    """The data set a run was made on, as a report or plot title names it: the benchmark
    (``vqa-rad-dirichlet``; for site directories the name in their task schema, which the run
    records as its benchmark), and for the ``jsonl`` benchmark -- any directory of the user's --
    the directory's name (``data.data_dir``'s last part), since "jsonl" names a format, not data."""
    bench = run["benchmark"]
    if bench == "jsonl":
        from pathlib import PurePath

        where = PurePath(str(run.get("config", {}).get("data.data_dir", ""))).name
        return where or "jsonl (data.data_dir not recorded)"
    return bench


def label(run: dict) -> str:
    """The variant's name (``variant``) or ``method``, with ``+peft`` unless the PEFT type is
    the default bottleneck adapter."""
    peft = run.get("peft", "adapter")
    name = variant_of(run) or run["method"]
    return name if peft == "adapter" else f"{name}+{peft}"
