"""The comparison at convergence (issue 30, part 3): every method on one budget, run until the curves
flatten, resumably.

The grid (``GRID``, ``METHODS``):

* benchmarks: ``fmnist-domain``; ``vqa-rad-organ`` (VQA-RAD by organ: HEAD / CHEST / ABD, its 3
  fixed clients, the official test split); ``vqa-rad-dirichlet`` with the image-disjoint test split
  (no test image is in any client's training data: ``notes["test_images_seen_in_train"] == 0``)
  and 8 clients (Dirichlet α = 0.5 over images; every client keeps test questions with
  ``data.split_seed = 0``);
* methods: local, centralized, fedavg, fedper, feddat, fedpia, ditto.

Per benchmark (each its own directory ``OUT/<benchmark>/``):

1. **Seed 0, until plateau**: ``fedmm.bench.run_until_plateau`` -- the same budget for every
   method, ``fed.rounds`` = ``--start-rounds`` doubled while any method's curve (any view kind)
   still gains ``PlateauRule.tol`` points over its last ``PlateauRule.frac`` of rounds, up to
   ``--max-rounds``; each budget in ``OUT/<benchmark>/rounds-R/`` (a longer budget is a new run:
   the learning-rate schedule spans the whole budget).
2. **Seeds 1-2 for the leaders**, at the final budget R, in the same ``rounds-R`` directory: for
   each view kind the three best methods by their seed-0 final accuracy in that kind
   (``leaders``), and centralized, the reference every gap is measured against.

Resumable: every cell is a ``fedmm bench`` cell, skipped when ``results.json`` holds it complete
with the same configuration (``fedmm.bench.run_bench``); rerunning the command after an
interruption reruns only the missing cells (a cell cut off mid-run starts again).

Outputs: each ``rounds-R/`` holds ``fedmm bench``'s ``report.md`` (methods x views, closed / open
columns, comparisons, plots) for every cell of the grid; ``OUT/converged.md`` is the table to read:
per benchmark and view kind, each method's final accuracy (mean ± std over its seeds, or (n = 1)),
closed and open questions apart, its gap to centralized's ``shared`` accuracy, and its time to
accuracy (rounds and seconds to first reach the lowest final mean of that view kind among the
methods: a target every method reaches on average by the last round) beside it.
``OUT/converged.json`` holds each benchmark's plateau summary and leaders.

    .venv/bin/python benchmarks/converged_grid.py --out runs/converged [--benchmark NAME,...]
        [--start-rounds 10] [--max-rounds 80] [--set train.threads=1 ...] [--progress | --headline]

``--progress`` runs nothing and writes ``OUT/converged-progress.md`` (``progress``): the complete
cells so far, while the grid runs or between sittings.  ``--headline`` runs nothing and writes
``OUT/converged-headline.md`` (``headline``): the README's tables, per benchmark at the largest
budget where every method's seed 0 is complete.

Long: one cell at 40 rounds takes 25-70 min on vqa-rad-organ (fp32, one thread of a 2-core AVX2
EPYC beside the other lane: docs/results-converged.md).  ``--set`` applies to every cell (e.g.
``model.backbone=tiny`` for a smoke test).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

from fedmm import bench, results
from fedmm.config import FedmmConfig, parse_set
from fedmm.data import FIXED_CLIENTS
from fedmm.files import atomic_write
from fedmm.precision import EMULATED_BF16, emulated_bf16
from fedmm.runtime import resolve_device
from fedmm.spec import KINDS, SHARED
from fedmm.validate import validate_config

METHODS = ("local", "centralized", "fedavg", "fedper", "feddat", "fedpia", "ditto")
REFERENCE = "centralized"  # every gap is to its `shared` accuracy
# benchmark -> its options in this grid.  Every benchmark in fp32, so that the grid advances on any
# CPU of this kind (issue 30: "This issue must deliver on either"): bf16 is 1.7-1.8x the fp32 step
# where it is native (AMX) but 25x slower where it is emulated (AVX2 EPYC).  fmnist-domain and
# vqa-rad-dirichlet began in bf16 on an AMX CPU; those cells are kept as a record
# (docs/results/converged-bf16/, rendered with ``--set train.precision=bf16``); their fp32
# grid runs with ``--start-rounds 40``: the record's 20-round curves were still rising
# (docs/results-converged.md).  Within a benchmark every cell has the same precision.
GRID: dict[str, dict] = {
    "fmnist-domain": {"train.precision": "fp32"},
    "vqa-rad-organ": {"train.precision": "fp32"},
    "vqa-rad-dirichlet": {"data.test_split": "image-disjoint", "fed.clients": 8,
                          "train.precision": "fp32"},
}  # fmt: skip
MORE_SEEDS = (1, 2)
LEADERS = 3
RULE = bench.PlateauRule()  # < 0.5 pt over the last 20 % of rounds


def grid_configs(benchmarks: list[str], overrides: dict) -> dict[str, FedmmConfig]:
    """Each benchmark's configuration: its ``GRID`` options, then ``overrides`` (``--set``),
    validated for every method (``ConfigError`` naming the option otherwise)."""
    cfgs = {}
    for name in benchmarks:
        if name not in GRID:
            raise SystemExit(f"--benchmark {name!r} is not in this grid ({', '.join(GRID)})")
        fixed = {"fed.clients": FIXED_CLIENTS[name]} if name in FIXED_CLIENTS else {}
        cfg = FedmmConfig().with_overrides(
            {**fixed, **GRID[name], **overrides, "data.benchmark": name}
        )
        validate_config(cfg, list(METHODS))
        cfgs[name] = cfg
    return cfgs


def _beyond_defaults(cfg: FedmmConfig) -> dict:
    """``cfg``'s options that differ from fedmm's defaults, less the benchmark and the budget."""
    defaults = FedmmConfig().to_flat()
    return {k: v for k, v in cfg.to_flat().items()
            if k not in ("data.benchmark", "fed.rounds") and v != defaults.get(k)}  # fmt: skip


def _listed(options: dict) -> str:
    return ", ".join(f"`{k}={v}`" for k, v in sorted(options.items()))


def _common_options(cfgs: dict[str, FedmmConfig]) -> str:
    """A sentence naming the options every benchmark's cells share that differ from fedmm's
    defaults (``--set``: ``train.threads=1``...), so that a table says how it was made; a
    benchmark's own ones (``GRID``: its precision...) are in ``_own_options``."""
    flats = [_beyond_defaults(c) for c in cfgs.values()]
    common = {k: v for k, v in flats[0].items() if all(f.get(k) == v for f in flats)}
    if not common:
        return "Every other option at its default."
    return f"Options beyond the defaults, in every cell: {_listed(common)}."


def _own_options(cfg: FedmmConfig, cfgs: dict[str, FedmmConfig]) -> list[str]:
    """Lines naming the options of ``cfg``'s cells beyond the defaults that not every
    benchmark of ``cfgs`` shares (none: no line)."""
    flats = [_beyond_defaults(c) for c in cfgs.values()]
    own = {k: v for k, v in _beyond_defaults(cfg).items()
           if not all(f.get(k) == v for f in flats)}  # fmt: skip
    return [f"This benchmark's cells also: {_listed(own)}.", ""] if own else []


def leaders(runs: list[dict], methods: list[str], k: int = LEADERS) -> list[str]:
    """The methods that get more seeds: for each view kind, the ``k`` best by their seed-0 final
    accuracy in that kind (ties: ``methods`` order), united, plus ``REFERENCE``; in ``methods``
    order."""
    seed0 = {bench._name(r): r for r in runs if r["seed"] == 0}
    chosen = {REFERENCE} & set(methods)
    for kind in KINDS:
        scored = [
            m for m in methods if m != REFERENCE and kind in seed0.get(m, {}).get("final", {})
        ]
        scored.sort(key=lambda m: -seed0[m]["final"][kind])  # stable: ties keep methods' order
        chosen.update(scored[:k])
    return [m for m in methods if m in chosen]


def _time_cell(runs: list[dict], kind: str, goal: float) -> tuple[str, str]:
    hits = [bench.time_to_accuracy(r, kind, goal) for r in runs]
    got = [h for h in hits if h]
    if not got:
        return f"not reached (0/{len(runs)})", "—"
    part = f" ({len(got)}/{len(runs)} seeds)" if len(got) < len(runs) else ""
    return (f"{statistics.fmean(h[0] for h in got):.1f}{part}",
            f"{statistics.fmean(h[1] for h in got):.0f}")  # fmt: skip


def _kind_rows(runs: list[dict], methods: list[str]) -> list[tuple[str, float, list[dict]]]:
    """Per view kind that ``runs`` have (``KINDS`` order): ``(kind, goal, rows)``, ``goal`` the
    kind's time-to-accuracy target (the lowest final mean among its methods, 0-1) and ``rows`` one
    dict per method with that kind (``methods`` order): ``method``, ``seeds``, ``mean`` (0-1),
    ``final`` / ``closed`` / ``open`` (``bench._mean_std`` text: % with ± std or (n = 1); "—" for
    a benchmark without question groups), ``gap`` (points to ``REFERENCE``'s ``shared`` mean,
    text; "—" for the reference itself or without one), ``rounds`` / ``seconds`` (to ``goal``,
    ``_time_cell``)."""
    ref = [r["final"][SHARED] for r in runs if bench._name(r) == REFERENCE and SHARED in r["final"]]
    ref_mean = 100 * statistics.fmean(ref) if ref else None
    out = []
    for kind in KINDS:
        by = {m: [r for r in runs if bench._name(r) == m and kind in r["final"]] for m in methods}
        by = {m: rs for m, rs in by.items() if rs}
        if not by:
            continue
        goal = min(statistics.fmean(r["final"][kind] for r in rs) for rs in by.values())
        rows = []
        for m, rs in by.items():
            mean = statistics.fmean(r["final"][kind] for r in rs)
            closed, open_ = (bench._mean_std([r["final"][f"{kind}.{g}"] for r in rs
                                              if f"{kind}.{g}" in r["final"]])
                             for g in ("closed", "open"))  # fmt: skip
            gap = ("—" if ref_mean is None or (m == REFERENCE and kind == SHARED)
                   else bench._signed_points(100 * mean - ref_mean))  # fmt: skip
            rounds, seconds = _time_cell(rs, kind, goal)
            rows.append({"method": m, "seeds": len(rs), "mean": mean,
                         "final": bench._mean_std([r["final"][kind] for r in rs]),
                         "closed": closed, "open": open_, "gap": gap, "rounds": rounds,
                         "seconds": seconds})  # fmt: skip
        out.append((kind, goal, rows))
    return out


def converged_table(runs: list[dict], methods: list[str]) -> list[str]:
    """Markdown lines for one benchmark's runs: per view kind, method | seeds | final | closed |
    open | gap to centralized's ``shared`` (points) | rounds / seconds to the kind's target."""
    if not runs:
        return []
    rounds = sorted({len(r["history"]) for r in runs})
    lines = [f"### {results.dataset_name(runs[0])} ({'/'.join(map(str, rounds))} rounds)", ""]
    for kind, goal, rows in _kind_rows(runs, methods):
        lines += [f"`{kind}` (time to {100 * goal:.1f} %, the lowest final mean of this kind):",
                  "", "| method | seeds | final | closed | open | Δ vs centralized (pt) | "
                  "rounds to target | s to target |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        lines += [f"| {r['method']} | {r['seeds']} | {r['final']} | {r['closed']} | {r['open']} | "
                  f"{r['gap']} | {r['rounds']} | {r['seconds']} |" for r in rows]  # fmt: skip
        lines.append("")
    return lines


def headline_table(runs: list[dict], methods: list[str]) -> list[str]:
    """Markdown lines of the README's table for one benchmark: a row per method and view kind,
    kinds in ``KINDS`` order and, within a kind, methods by final accuracy (best first), so that the
    table reads as the ranking; all questions, closed and open apart (only where the benchmark has
    those groups), the gap to centralized's ``shared`` (points), and the rounds to the kind's
    target (``_kind_rows``)."""
    kinds = _kind_rows(runs, methods)
    groups = any(r["closed"] != "—" for _, _, rows in kinds for r in rows)
    head = ["view", "method", "seeds", "all questions" if groups else "accuracy"]
    head += ["closed", "open"] if groups else []
    head += ["Δ vs centralized (pt)", "rounds to target (target %)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for kind, goal, rows in kinds:
        for r in sorted(rows, key=lambda r: -r["mean"]):
            cells = [f"`{kind}`", r["method"], str(r["seeds"]), r["final"]]
            cells += [r["closed"], r["open"]] if groups else []
            cells += [r["gap"], f"{r['rounds']} ({100 * goal:.1f})"]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def _grid_cells(name: str, methods: list[str], lead: list[str], more_seeds: tuple[int, ...]):
    """A benchmark's cells at its final budget: seed 0 of every method, ``more_seeds`` of the
    leaders ``lead``."""
    return [(name, m, 0) for m in methods] + [(name, m, s) for s in more_seeds for m in lead]


def run_grid(
    cfgs: dict[str, FedmmConfig], out: Path, methods: Sequence[str] = METHODS,
    more_seeds: tuple[int, ...] = MORE_SEEDS, start_rounds: int = 10, max_rounds: int = 80,
    rule: bench.PlateauRule = RULE, k: int = LEADERS,
) -> dict:  # fmt: skip
    """The grid (module docstring), resumably; writes ``out/converged.md`` and
    ``out/converged.json`` and returns the latter's content."""
    out, methods = Path(out), list(methods)
    summary, lines = {}, ["# The comparison at convergence", ""]
    for name, cfg in cfgs.items():
        where = out / name
        plateau = bench.run_until_plateau([cfg.with_overrides({"fed.rounds": start_rounds})],
                                          methods, [0], where, rule=rule,
                                          max_rounds=max_rounds)  # fmt: skip
        rounds = plateau["final_rounds"]
        sub, final_cfg = where / f"rounds-{rounds}", cfg.with_overrides({"fed.rounds": rounds})
        seed0 = [(name, m, 0) for m in methods]
        lead = leaders(bench._cell_runs(sub, seed0, cfg.peft.type), methods, k)
        ran = bench.run_bench([final_cfg], lead, list(more_seeds), sub)["ran"] if more_seeds else 0
        cells = _grid_cells(name, methods, lead, more_seeds)
        bench.write_outputs(
            sub, cells, cfg.peft.type
        )  # the report of the whole grid, not the leaders'
        summary[name] = {"plateau": plateau, "rounds": rounds, "leaders": lead,
                         "ran_more_seeds": ran, "dir": str(sub.relative_to(out))}  # fmt: skip
        table = converged_table(bench._cell_runs(sub, cells, cfg.peft.type), methods)
        lines += table[:2] + _own_options(cfg, cfgs) + table[2:]
    lines += [
        "Accuracy in %: final-round mean over clients, then mean ± std over seeds ((n = 1): one "
        "seed). Seed 0 for every method; seeds " + ", ".join(map(str, more_seeds)) + " for the "
        f"{k} leading methods of each view kind (by seed 0) and centralized. Δ: the method's mean "
        "minus centralized's `shared` mean, in points. Time to target: rounds and seconds of wall "
        "time until the mean over clients first reaches the target, mean over the seeds that "
        "reach it. Budget: "
        + "; ".join(f"{n} {s['rounds']} rounds" for n, s in summary.items())
        + f" (plateau rule: {rule.describe()}). {_common_options(cfgs)}"
    ]
    atomic_write(out / "converged.md", ("\n".join(lines) + "\n").encode())
    atomic_write(out / "converged.json", json.dumps(summary, indent=1).encode())
    return summary


def _begun(stored: int, rounds: int) -> str:
    if not stored:
        return ""
    return (
        f" (round {stored} of {rounds} stored)"
        if stored < rounds
        else " (stored with other options)"
    )


def _complete(sub: Path, cells: list[tuple], cfg: FedmmConfig) -> list[dict]:
    """The runs of ``cells`` stored in ``sub`` complete and made with ``cfg`` (its budget)."""
    return [r for r in bench._cell_runs(sub, cells, cfg.peft.type)
            if bench._same(r, bench.cell_config(cfg, bench._name(r), r["seed"], sub))]  # fmt: skip


def progress(
    cfgs: dict[str, FedmmConfig], out: Path, methods: Sequence[str] = METHODS,
    more_seeds: tuple[int, ...] = MORE_SEEDS, k: int = LEADERS, max_rounds: int = 80,
) -> list[str]:  # fmt: skip
    """Markdown lines of what a grid that is still running (or was cut off) holds so far, without
    running anything: per benchmark and budget ``rounds-R/`` begun, the complete cells there (made
    with this configuration: ``bench._same``) in ``converged_table``'s form, the cells still
    missing, and, when every seed-0 cell is complete, whether its curves have flattened (``RULE``;
    the seeds of the leaders count only at the final budget: flat, or 2R > ``max_rounds``).  A
    benchmark with no budget begun is listed as not started."""
    out, methods = Path(out), list(methods)
    lines = ["# The comparison at convergence: in progress", "", _common_options(cfgs), ""]
    for name, cfg in cfgs.items():
        budgets = _budgets(out, name)
        own = _own_options(cfg, cfgs)
        if not budgets:
            lines += [f"## {name}: not started", "", *own]
        for rounds in budgets:
            section = _budget_progress(name, cfg, out, rounds, methods, more_seeds, k, max_rounds)
            lines += section[:2] + own + section[2:]  # under its heading
    return lines


def _budget_state(
    name: str, cfg: FedmmConfig, out: Path, rounds: int, methods: list[str],
    more_seeds: tuple[int, ...], k: int, max_rounds: int,
) -> tuple[list[dict], list[tuple], list[str] | None, int | None]:  # fmt: skip
    """A budget begun, ``out/name/rounds-<rounds>``: ``(done, cells, rising, following)`` -- its
    complete runs, the cells it should hold (seed 0 of every method; at the final budget also the
    leaders' ``more_seeds``), the curves still rising by ``RULE`` (None while seed 0 is
    incomplete) and the budget the grid doubles to (None: this one is final, or undecided)."""
    sub, rcfg = out / name / f"rounds-{rounds}", cfg.with_overrides({"fed.rounds": rounds})
    seed0 = [(name, m, 0) for m in methods]
    done, cells = _complete(sub, seed0, rcfg), list(seed0)
    if len(done) < len(seed0):
        return done, cells, None, None
    rising = RULE.still_rising(done, methods)
    following = bench.next_budget(rounds, rising, max_rounds)
    if following is None:
        cells = _grid_cells(name, methods, leaders(done, methods, k), more_seeds)
        done = _complete(sub, cells, rcfg)
    return done, cells, rising, following


def _decided_by(done: list[dict]) -> str:
    """Words saying the plateau decision is seed 0's when the table also holds other seeds: the
    rule decides a budget on seed 0's curves, before any other seed runs."""
    return " on seed 0's curves" if any(r["seed"] != 0 for r in done) else ""


def _done_at(states: dict[int, tuple], budgets: list[int]) -> list[str]:
    """For each of ``budgets``: "N of M cells done at R rounds" (``states``: ``_budget_state``'s by budget)."""
    return [f"{len(states[r][0])} of {len(states[r][1])} cells done at {r} rounds" for r in budgets]


def _budgets(out: Path, name: str) -> list[int]:
    """The budgets begun for benchmark ``name`` in ``out`` (its ``rounds-R`` directories)."""
    return sorted(int(d.name.split("-", 1)[1]) for d in (out / name).glob("rounds-*")
                  if d.name.split("-", 1)[1].isdigit())  # fmt: skip


def _budget_progress(
    name: str, cfg: FedmmConfig, out: Path, rounds: int, methods: list[str],
    more_seeds: tuple[int, ...], k: int, max_rounds: int,
) -> list[str]:  # fmt: skip
    sub = out / name / f"rounds-{rounds}"
    done, cells, rising, following = _budget_state(name, cfg, out, rounds, methods, more_seeds,
                                                   k, max_rounds)  # fmt: skip
    if rising is None:
        state = "plateau not yet decided (seed 0 incomplete)"
    else:
        by = _decided_by(done)
        state = (
            (f"still rising{by}: " + "; ".join(rising)) if rising else f"flat{by} (plateau reached)"
        )
        state += f"; doubled to {following} rounds" if following else "; the final budget"
    have = {(bench._name(r), r["seed"]) for r in done}
    begun = {(bench._name(r), r["seed"]): len(r["history"])
             for r in bench._cell_runs(sub, cells, cfg.peft.type)}  # fmt: skip
    missing = [f"{m} seed {s}" + _begun(begun.get((m, s), 0), rounds)
               for _, m, s in cells if (m, s) not in have]  # fmt: skip
    return [f"## {name}: budget {rounds} rounds, {len(done)} of {len(cells)} cells complete; "
            f"{state}", "", *converged_table(done, methods),
            f"Missing: {', '.join(missing)}." if missing else "No cell missing.", ""]  # fmt: skip


def headline(
    cfgs: dict[str, FedmmConfig], out: Path, methods: Sequence[str] = METHODS,
    more_seeds: tuple[int, ...] = MORE_SEEDS, k: int = LEADERS, max_rounds: int = 80,
) -> list[str]:  # fmt: skip
    """Markdown lines of the README's converged tables, from what ``out`` holds (runs nothing):
    per benchmark, the largest budget whose seed-0 cells are all complete -- so that one table
    compares every method on one budget -- as ``headline_table``, under a line naming the budget,
    the seeds, the plateau decision and what a larger budget begun holds so far.  A benchmark with
    no such budget is named as such."""
    out, methods = Path(out), list(methods)
    lines = []
    for name, cfg in cfgs.items():
        budgets, states = _budgets(out, name), {}
        for rounds in budgets:
            states[rounds] = _budget_state(name, cfg, out, rounds, methods, more_seeds, k,
                                           max_rounds)  # fmt: skip
        whole = [r for r in budgets if states[r][2] is not None]
        if not whole:
            lines += [f"**{name}**: no budget with every method's seed 0 complete yet"
                      f" ({', '.join(_done_at(states, budgets)) or 'not started'}).", ""]  # fmt: skip
            continue
        rounds = whole[-1]
        done, cells, rising, following = states[rounds]
        seeds, by = sorted({r["seed"] for r in done}), _decided_by(done)
        curves = "; ".join(c.replace(f" on {name} ", " ") for c in rising or [])
        state = (f"not flat yet by the rule below{by}, still rising: {curves}" if rising
                 else f"flat by the rule below{by}")  # fmt: skip
        state += f"; the grid goes on to {following} rounds" if following else "; final budget"
        later = _done_at(states, [r for r in budgets if r > rounds])
        note = f" ({', '.join(later)})" if later else ""
        if following is None and len(done) < len(cells):
            note += (f"; seed{'s' if len(more_seeds) > 1 else ''} "
                     f"{', '.join(map(str, more_seeds))} of the leading methods to come")  # fmt: skip
        lines += [f"**{name}**, {rounds} rounds × {cfg.train.local_steps} local steps, "
                  f"{cfg.train.precision}, seed{'s' if len(seeds) > 1 else ''} "
                  f"{', '.join(map(str, seeds))} ({len(done)} of {len(cells)} cells): "
                  f"{state}{note}.", "",
                  *_own_options(cfg, cfgs), *headline_table(done, methods), ""]  # fmt: skip
    return lines + [
        "Accuracy in %: final-round mean over clients, then mean ± std over seeds ((n = 1): one "
        "seed); a cell is one method and one seed, a curve one method's accuracy in one view kind "
        "round by round. Δ: the method's accuracy (all questions) minus centralized's `shared`, "
        "in points, from the unrounded means. Rounds to target: the first round at which the "
        "mean over clients reaches the view kind's target (in brackets: the lowest final "
        "accuracy of that kind among the methods, so every method reaches it), mean over the "
        f"seeds that reach it. Plateau rule: {RULE.describe()}. {_common_options(cfgs)}"
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--benchmark", default=",".join(GRID))
    p.add_argument("--method", default=",".join(METHODS))
    p.add_argument("--start-rounds", type=int, default=10)
    p.add_argument("--max-rounds", type=int, default=80)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    only = p.add_mutually_exclusive_group()
    only.add_argument("--progress", action="store_true",
                   help="run nothing: write OUT/converged-progress.md, the complete cells so far "
                   "(give the same --set and --max-rounds as the grid's run)")  # fmt: skip
    only.add_argument("--headline", action="store_true",
                   help="run nothing: write OUT/converged-headline.md, the README's converged "
                   "tables from the cells complete so far (give the same --set and --max-rounds "
                   "as the grid's run)")  # fmt: skip
    args = p.parse_args(argv)
    cfgs = grid_configs([b.strip() for b in args.benchmark.split(",") if b.strip()],
                        parse_set(args.set))  # fmt: skip
    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    if args.progress or args.headline:
        if not args.out.is_dir():
            raise SystemExit(f"--out {args.out}: no such directory (no grid has run there)")
        write, file = (progress, "converged-progress.md") if args.progress else (
            headline, "converged-headline.md")  # fmt: skip
        text = "\n".join(write(cfgs, args.out, methods, max_rounds=args.max_rounds)) + "\n"
        atomic_write(args.out / file, text.encode())
        print(text + f"written: {args.out / file}")
        return 0
    emulated = [
        n for n, c in cfgs.items() if emulated_bf16(c.train.precision, resolve_device(c.device))
    ]
    if emulated:  # 25x slower per step on an AVX2 EPYC: a grid that would not finish in a sitting
        raise SystemExit(f"{', '.join(emulated)}: {EMULATED_BF16}. A benchmark's cells must "
                         "share their options: resume bf16 cells on a CPU with native bf16, "
                         "or leave train.precision at the grid's fp32 (another --out than "
                         "the bf16 cells').")  # fmt: skip
    summary = run_grid(cfgs, args.out, methods, start_rounds=args.start_rounds,
                       max_rounds=args.max_rounds)  # fmt: skip
    for name, s in summary.items():
        print(f"{name}: {s['rounds']} rounds, plateaued {s['plateau']['plateaued']}, leaders "
              f"{', '.join(s['leaders'])} -> {args.out / s['dir']}")  # fmt: skip
    print(f"table: {args.out / 'converged.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
