"""``fedmm bench``: methods × benchmarks × seeds → one honest report.

Every cell (benchmark, method or variant, seed) is one ``fedmm run`` into the same directory (its
``results.json`` is the store).  A cell whose run is already there, complete (``fed.rounds``
rounds) and made with the same configuration is not rerun, so an interrupted bench resumes where
it stopped.  Frozen visual features are cached on disk per (backbone, preprocessing, data) and
shared by every method and seed of a benchmark.

**Variants** are named configurations of a method, run and reported as rows of their own
(``--method fedavg,feddat,feddat-fedhead``): the ablations in ``VARIANTS`` isolate each method's
idea; ``--variant NAME=METHOD:KEY=VALUE,...`` adds one of your own.

Outputs in ``--out``: ``bench.json`` (the grid and every cell's run with every round),
``report.md`` (per benchmark: methods × views, **mean ± std over seeds** of the final per-client
mean accuracy -- with closed/open accuracy where the benchmark tags questions --, trainable
parameters, KB per client per round, seconds per round), ``bench_curves.png`` (accuracy per round,
mean with a ±std band) and ``bench_bytes.png`` (final accuracy vs total bytes communicated).

Size (~480 lines): the grid, its resume rule and its report read one cell identity (``RunKey``) and
are kept together; the two plots are the part that could move out.
"""

from __future__ import annotations

import io
import json
import statistics
import warnings
from dataclasses import dataclass
from pathlib import Path

from fedmm import __version__, results
from fedmm.config import MAY_DIFFER, ConfigError, FedmmConfig
from fedmm.files import atomic_write
from fedmm.runkey import RunKey
from fedmm.spec import KINDS, METHOD_SPECS, VIEW_ORDER, Variant

# the methods' ablations and the like-with-like comparisons of their claims, as each method
# declares them (fedmm.spec.MethodSpec.variants / comparisons), in the registry's order
VARIANTS: dict[str, Variant] = {n: v for s in METHOD_SPECS.values() for n, v in s.variants.items()}
COMPARISONS: tuple[tuple[tuple[str, str], tuple[str, str], str], ...] = tuple(
    c for s in METHOD_SPECS.values() for c in s.comparisons
)


def compare(a: list[float], b: list[float]) -> dict:
    """Mean ± sample std (in %) of each side over seeds, their difference, and whether it
    exceeds the spread: |Δ| > std_a + std_b (the two ±1 std intervals do not overlap); None
    when a side has fewer than 2 seeds (no spread to compare with; its std is None, not 0)."""
    ma, mb = 100 * statistics.fmean(a), 100 * statistics.fmean(b)
    sa = 100 * statistics.stdev(a) if len(a) > 1 else None  # one seed: no spread
    sb = 100 * statistics.stdev(b) if len(b) > 1 else None
    exceeds = abs(ma - mb) > sa + sb if min(len(a), len(b)) > 1 else None
    return {"a": (ma, sa, len(a)), "b": (mb, sb, len(b)), "delta": ma - mb, "exceeds": exceeds}


def _signed_points(points: float) -> str:
    """A difference in points to one decimal with its sign, "0.0" when it rounds to zero (never
    "-0.0" or "+0.0")."""
    text = f"{points:+.1f}"
    return "0.0" if float(text) == 0 else text


def _comparison_lines(runs: list[dict], names: list[str]) -> list[str]:
    rows = []
    for (na, va), (nb, vb), what in COMPARISONS:
        if na not in names or nb not in names:
            continue
        a = [r["final"][va] for r in runs if _name(r) == na and va in r["final"]]
        b = [r["final"][vb] for r in runs if _name(r) == nb and vb in r["final"]]
        if not a or not b:
            continue
        c = compare(a, b)
        verdict = {True: "yes", False: "no", None: "n/a (< 2 seeds)"}[c["exceeds"]]
        kinds = "same" if va == vb else "cross"
        side_a, side_b = (_spread(*side) + (f" ({side[2]})" if side[2] > 1 else "")
                          for side in (c["a"], c["b"]))  # fmt: skip
        rows.append(f"| {na} `{va}` | {nb} `{vb}` | {kinds} | {side_a} | {side_b} | "
                    f"{_signed_points(c['delta'])} | {verdict} | {what} |")  # fmt: skip
    if not rows:
        return []
    return ["", "Comparisons (Δ = A − B in points; mean ± std over (n) seeds; exceeds spread: "
            "|Δ| > std_A + std_B; kinds: same = one view kind on both sides, cross = the two "
            "models a claim compares):", "",
            "| A | B | kinds | A | B | Δ | exceeds spread | measures |",
            "|---|---|---|---|---|---|---|---|", *rows]  # fmt: skip


# what a variant may not set: the run's identity (RunKey) and where it is written -- they place the
# cell in the grid (or name it), the bench sets them
CELL_KEYS = (*RunKey.CONFIG_KEYS, "out_dir")


def time_to_accuracy(run: dict, view: str, target: float) -> tuple[int, float] | None:
    """``(round, seconds)`` when ``run``'s mean ``view`` accuracy first reaches ``target``
    (0-1; seconds: the rounds' wall time summed up to it), None if it never does."""
    elapsed = 0.0
    for entry, score in zip(run["history"], results.view_curve(run, view)):
        elapsed += entry["seconds"]
        if score is not None and score >= target:
            return entry["round"], elapsed
    return None


def _time_to_accuracy_lines(runs: list[dict], names: list[str], target: float | None) -> list[str]:
    """Per view kind: rounds and seconds each method needs to first reach the target accuracy
    (``target`` %, or by default the lowest final mean among the methods with that kind, which
    every method reaches on average by the last round)."""
    lines = []
    for kind in KINDS:
        rows = {n: [r for r in runs if _name(r) == n and kind in r["final"]] for n in names}
        rows = {n: rs for n, rs in rows.items() if rs}
        if not rows:
            continue
        goal = (
            target / 100
            if target
            else min(statistics.fmean(r["final"][kind] for r in rs) for rs in rows.values())
        )
        cells = []
        for name, rs in rows.items():
            hits = [time_to_accuracy(r, kind, goal) for r in rs]
            got = [h for h in hits if h]
            if not got:
                cells.append(f"| {name} | not reached (0/{len(rs)}) | — |")
                continue
            reached = f" ({len(got)}/{len(rs)} seeds)" if len(got) < len(rs) else ""
            cells.append(f"| {name} | {statistics.fmean(h[0] for h in got):.1f}{reached} | "
                         f"{statistics.fmean(h[1] for h in got):.0f} |")  # fmt: skip
        lines += ["", f"Time to {100 * goal:.1f} % `{kind}` ("
                  + ("the target given" if target else "the lowest final mean of these methods")
                  + "; mean over the seeds that reach it):", "",
                  "| method | rounds | seconds |", "|---|---|---|", *cells]  # fmt: skip
    return lines


def parse_variant(text: str) -> tuple[str, Variant]:
    """``NAME=METHOD:KEY=VALUE,KEY=VALUE`` (``--variant``) -> (name, Variant).

    Raises ``ConfigError`` for a malformed text, a name that is not letters, digits and
    ``_ . + -``, a name that is a method's or a built-in variant's (its runs would pass for
    theirs), or a key of ``CELL_KEYS`` (a variant changes a method's options, not the cell)."""
    import re

    name, eq, rest = (x.strip() for x in text.partition("="))
    method, _, sets = (x.strip() for x in rest.partition(":"))
    if not (eq and name and method):
        raise ConfigError(f"--variant expects NAME=METHOD:KEY=VALUE,..., got {text!r}")
    if not re.fullmatch(r"[A-Za-z0-9_.+-]+", name):
        raise ConfigError(f"--variant {name!r}: a name is letters, digits and _ . + - only")
    if name in METHOD_SPECS or name in VARIANTS:
        raise ConfigError(f"--variant {name!r}: that name is a method's or a built-in "
                          "variant's; pick another (its runs would pass for theirs)")  # fmt: skip
    overrides = {}
    for item in filter(None, (x.strip() for x in sets.split(","))):
        key, eq2, value = item.partition("=")
        if not eq2:
            raise ConfigError(f"--variant {name}: {item!r} is not KEY=VALUE")
        if key.strip().replace("-", "_") in CELL_KEYS:
            raise ConfigError(f"--variant {name}: {key.strip()} is set by the bench grid "
                              f"({', '.join(CELL_KEYS)}), not by a variant")  # fmt: skip
        overrides[key.strip()] = value.strip()
    return name, Variant(method, overrides, "user-defined (--variant)")


def variant(name: str, extra: dict[str, Variant] | None = None) -> Variant:
    """The variant called ``name`` (``extra`` first, then ``VARIANTS``), or plain method ``name``."""
    found = (extra or {}).get(name) or VARIANTS.get(name)
    return found if found is not None else Variant(name)


def cell_config(
    cfg: FedmmConfig, name: str, seed: int, out: Path, extra: dict[str, Variant] | None = None
) -> FedmmConfig:
    """The run of one cell: ``cfg`` (one benchmark's configuration) with the method or variant
    ``name`` (its overrides and ``variant = name``), seed and out."""
    v = variant(name, extra)
    tag = {"variant": name} if v.method != name else {}
    return cfg.with_overrides(
        {**v.overrides, "method": v.method, **tag, "seed": seed, "out_dir": str(out)}
    ).resolved()


def _same(run: dict, cfg: FedmmConfig) -> bool:
    """Whether a stored run was made with ``cfg`` and is complete (``fed.rounds`` rounds, or
    fewer when early stopping ended it): the options that affect results are equal
    (``config.MAY_DIFFER``, where things are and how they are shown -- paths, the device --, may
    differ).  A key the stored config lacks (an option added to fedmm after the run) counts as its
    default value, which is what the run used."""
    flat, defaults = cfg.to_flat(), FedmmConfig().to_flat()
    return results.is_complete(run, cfg.fed.rounds) and all(
        run["config"].get(k, defaults[k]) == v for k, v in flat.items() if k not in MAY_DIFFER
    )


def run_bench(
    cfgs: list[FedmmConfig], methods: list[str], seeds: list[int], out: Path,
    extra: dict[str, Variant] | None = None, target: float | None = None,
) -> dict:  # fmt: skip
    """Run every missing cell of the grid (one config per benchmark; ``methods``: method or
    variant names, ``extra``: user-defined variants); write bench.json, report.md and the plots
    after each cell.  ``target``: the accuracy (%) of the report's time-to-accuracy table."""
    from tqdm.auto import tqdm

    from fedmm.engine import run_method

    out = Path(out)
    by_name = {c.data.benchmark: c for c in cfgs}
    cells = [(b, m, s) for b in by_name for s in seeds for m in methods]
    bar = tqdm(total=len(cells), desc="bench", unit="cell", disable=not cfgs[0].progress)
    ran = 0
    for benchmark, method, seed in cells:
        ccfg = cell_config(by_name[benchmark], method, seed, out, extra)
        existing = {results.run_key(r): r for r in results.load(out)["runs"]}
        key = RunKey(ccfg.method, ccfg.variant, ccfg.peft.type, benchmark, seed)
        bar.set_postfix_str(f"{method} on {benchmark}, seed {seed}")
        if key not in existing or not _same(existing[key], ccfg):
            run_method(ccfg)  # renders summary.md, curves.png of every run so far when it ends
            ran += 1
        bar.update(1)
        write_outputs(out, cells, ccfg.peft.type, extra, target)
    bar.close()
    return {"cells": len(cells), "ran": ran}


@dataclass(frozen=True)
class PlateauRule:
    """A curve has flattened when its gain over the last ``frac`` of its rounds (at least one
    round) is below ``tol`` points: ``acc[-1] − acc[-1 − k] < tol``, ``k = ceil(frac · R)``."""

    tol: float = 0.5
    frac: float = 0.2

    def describe(self) -> str:
        return (f"< {self.tol:g} pt gain over the last {100 * self.frac:g} % of rounds, on the "
                "mean curve over seeds of every view kind a method has")  # fmt: skip

    def still_rising(self, runs: list[dict], names: list[str]) -> list[str]:
        """``"<method> on <benchmark> (<view>): +g pt"`` for every mean curve not flat yet."""
        import math

        rising = []
        for bench in sorted({r["benchmark"] for r in runs}):
            for name in names:
                mruns = [r for r in runs if r["benchmark"] == bench and _name(r) == name]
                for kind in KINDS:
                    curves = [[y for h, y in zip(r["history"], results.view_curve(r, kind))
                               if h["clients"]] for r in mruns]  # evaluated rounds  # fmt: skip
                    curves = [c for c in curves if c and None not in c]
                    if not curves:
                        continue
                    rounds = min(len(c) for c in curves)
                    mean = [100 * statistics.fmean(c[i] for c in curves) for i in range(rounds)]
                    k = max(1, math.ceil(self.frac * rounds))
                    gain = mean[-1] - mean[-1 - k] if rounds > k else float("inf")
                    if gain >= self.tol:
                        rising.append(f"{name} on {bench} ({kind}): +{gain:.1f} pt")
        return rising


def next_budget(rounds: int, rising: list[str], max_rounds: int) -> int | None:
    """The budget ``run_until_plateau`` runs after ``rounds``: 2 * ``rounds`` while any curve is
    ``rising`` (``PlateauRule.still_rising``) and that stays <= ``max_rounds``; ``None`` when
    ``rounds`` is the final budget."""
    return 2 * rounds if rising and 2 * rounds <= max_rounds else None


def run_until_plateau(
    cfgs: list[FedmmConfig], methods: list[str], seeds: list[int], out: Path,
    extra: dict[str, Variant] | None = None, target: float | None = None,
    rule: PlateauRule = PlateauRule(), max_rounds: int = 80,
) -> dict:  # fmt: skip
    """The same budget for every method, doubled until every method's curves have flattened.

    Runs the grid at ``fed.rounds`` = R into ``out/rounds-R`` (a run's learning-rate schedule
    spans its whole budget, so a longer budget is a new run, not a continuation), checks every
    curve against ``rule``, and doubles R while any is still rising and 2R <= ``max_rounds``.
    Writes ``out/plateau.json`` (each budget: what was still rising) and returns it; the last
    budget's directory holds the report to read."""
    out = Path(out)
    rounds, budgets, ran = cfgs[0].fed.rounds, [], 0
    while True:
        sub = out / f"rounds-{rounds}"
        ran += run_bench([c.with_overrides({"fed.rounds": rounds}) for c in cfgs], methods, seeds,
                         sub, extra, target)["ran"]  # fmt: skip
        cells = [(c.data.benchmark, m, s) for c in cfgs for s in seeds for m in methods]
        rising = rule.still_rising(_cell_runs(sub, cells, cfgs[0].peft.type, extra), methods)
        budgets.append({"rounds": rounds, "dir": sub.name, "still_rising": rising})
        done = not rising
        if (following := next_budget(rounds, rising, max_rounds)) is None:
            break
        rounds = following
    summary = {"rule": rule.describe(), "budgets": budgets, "plateaued": done,
               "final_rounds": rounds, "ran": ran}  # fmt: skip
    atomic_write(out / "plateau.json", json.dumps(summary, indent=1).encode())
    return summary


def cell_key(name: str, peft: str, benchmark: str, seed: int,
             extra: dict[str, Variant] | None = None) -> RunKey:  # fmt: skip
    """The results.json run key (``results.run_key``) of a cell."""
    v = variant(name, extra)
    return RunKey(v.method, name if v.method != name else "", peft, benchmark, seed)


def _cell_runs(
    out: Path, cells: list[tuple], peft: str, extra: dict[str, Variant] | None = None
) -> list[dict]:
    wanted = {cell_key(m, peft, b, s, extra) for b, m, s in cells}
    return [r for r in results.load(out)["runs"] if results.run_key(r) in wanted]


def write_outputs(
    out: Path, cells: list[tuple], peft: str, extra: dict[str, Variant] | None = None,
    target: float | None = None,
) -> None:  # fmt: skip
    runs = _cell_runs(out, cells, peft, extra)
    grid = {
        "benchmarks": sorted({c[0] for c in cells}),
        "methods": list(dict.fromkeys(c[1] for c in cells)),
        "seeds": sorted({c[2] for c in cells}),
        "peft": peft,
    }
    used = {m: variant(m, extra) for m in grid["methods"] if variant(m, extra).method != m}
    grid["variants"] = {m: {"method": v.method, "overrides": v.overrides, "isolates": v.isolates}
                        for m, v in used.items()}  # fmt: skip
    if target:
        grid["target"] = target
    payload = {"fedmm_version": __version__, "grid": grid, "runs": runs}
    atomic_write(out / "bench.json", json.dumps(payload, indent=1).encode())
    atomic_write(out / "report.md", (report(runs, grid) + "\n").encode())
    plot(out, runs, grid)


def _mean_std(values: list[float]) -> str:
    """``mean ± std (%)`` over seeds; one seed has no spread: ``mean (n = 1)``, never ``± 0.0``."""
    if not values:
        return "—"
    return _spread(100 * statistics.fmean(values),
                   100 * statistics.stdev(values) if len(values) > 1 else None, len(values))  # fmt: skip


def _spread(mean: float, std: float | None, n: int) -> str:
    """``"61.2 ± 1.3"`` (n > 1: sample std) or ``"61.2 (n = 1)"``: one seed has no spread."""
    return f"{mean:.1f} ± {std:.1f}" if n > 1 and std is not None else f"{mean:.1f} (n = {n})"


def _groups(runs: list[dict]) -> list[str]:
    names = {k.split(".", 1)[1] for r in runs for k in results.scored_views(r) if "." in k}
    return sorted(names)


def report(runs: list[dict], grid: dict) -> str:
    titles = [next((results.dataset_name(r) for r in runs if r["benchmark"] == b), b)
              for b in grid["benchmarks"]]  # fmt: skip
    lines = [f"# fedmm bench: {', '.join(titles)}", ""]
    lines.append(
        f"Methods {', '.join(grid['methods'])}; seeds {grid['seeds']}; PEFT {grid['peft']}. "
        "Accuracy in %: final-round mean over clients, then mean ± std over seeds ((n = 1): one "
        "seed, no spread to show)."
    )
    for bench in grid["benchmarks"]:
        bruns = [r for r in runs if r["benchmark"] == bench]
        if not bruns:
            continue
        views = [v for v in results.report_views(bruns) if "." not in v]
        groups = _groups(bruns)
        head = ["method", "seeds", *views]
        for g in groups:
            head += [f"{v} ({g})" for v in views]
        head += ["trainable params", "KB up/client/round", "s/round"]
        lines += ["", f"## {results.dataset_name(bruns[0])}", "", "| " + " | ".join(head) + " |",
                  "|" + "---|" * len(head)]  # fmt: skip
        for method in grid["methods"]:
            mruns = [r for r in bruns if _name(r) == method]
            if not mruns:
                continue
            cells = [results.label(mruns[0]), str(len(mruns))]
            for suffix in ["", *(f".{g}" for g in groups)]:
                for v in views:
                    values = [r["final"][v + suffix] for r in mruns if v + suffix in r["final"]]
                    cells.append(_mean_std(values) if values
                                 else results.missing_cell(mruns[0], v + suffix))  # fmt: skip
            hist = [h for r in mruns for h in r["history"]]
            n = max(1, len(hist))
            cells += [
                f"{mruns[0]['trainable_params']:,}",
                f"{sum(h['bytes_up'] / max(1, h['sampled']) for h in hist) / n / 1024:.0f}",
                f"{sum(h['seconds'] for h in hist) / n:.1f}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines += _comparison_lines(bruns, grid["methods"])
        lines += _time_to_accuracy_lines(bruns, grid["methods"], grid.get("target"))
        lines += _task_lines(bruns, grid["methods"])
    lines += [
        "",
        "Views by kind (docs/methods.md, Views): `shared` = every parameter the federation shares, with "
        "the shared head (what a new client would receive); `shared+head` = the shared body with "
        "the client's own head; `personal` = the client's own full model; "
        + "; ".join(
            f"`{view}` ({name}: {meaning})"
            for name, s in METHOD_SPECS.items()
            for view, meaning in s.extras.items()
        )  # fmt: skip
        + " are method extras. A dash: the method has no "
        "such model; n/m: it has one, but these runs predate the view (fedmm < 0.2) and did "
        "not measure it. Seconds per round are wall time on the machine that ran the bench, "
        "including evaluation.",
    ]
    if grid.get("variants"):
        lines += ["", "Variants (ablations):", ""]
        lines += [f"- `{name}` = {v['method']} with "
                  f"{', '.join(f'{k}={val}' for k, val in v['overrides'].items())}: {v['isolates']}"
                  for name, v in grid["variants"].items()]  # fmt: skip
    return "\n".join(lines)


def _name(run: dict) -> str:
    """The bench name of a run: its variant, else its method."""
    return results.variant_of(run) or run["method"]


def _task_lines(runs: list[dict], methods: list[str]) -> list[str]:
    """Per task (multi-task benchmarks): methods x (task, view), the task's metric, mean ± std."""
    runs = [r for r in runs if r.get("final_by_task")]
    if not runs:
        return []
    tasks = sorted({t for r in runs for t in r["final_by_task"]})
    views = [v for v in VIEW_ORDER if any(v in r["views"] for r in runs)]
    cols = [(t, v) for t in tasks for v in views]
    head = ["method", *(f"{t} {v}" for t, v in cols)]
    lines = ["", "Per task (accuracy; multi-label tasks: mean AUROC):", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]  # fmt: skip
    for method in methods:
        mruns = [r for r in runs if _name(r) == method]
        if mruns:
            cells = [results.label(mruns[0])]
            for t, v in cols:
                values = [r["final_by_task"][t][v] for r in mruns
                          if v in r["final_by_task"].get(t, {})]  # fmt: skip
                cells.append(_mean_std(values) if values else results.missing_cell(mruns[0], v))
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def plot(out: Path, runs: list[dict], grid: dict) -> None:
    """``bench_curves.png`` (accuracy per round) and ``bench_bytes.png`` (final accuracy vs MB
    communicated): one panel per (view kind, benchmark), so a panel compares like with like;
    mean over seeds with a ±std band / error bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    benches = [b for b in grid["benchmarks"] if any(r["benchmark"] == b for r in runs)]
    kinds = [k for k in KINDS if any(k in r["views"] for r in runs)]
    if not benches or not kinds:
        return
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    shape = (len(kinds), len(benches))
    size = (6 * len(benches), 3.6 * len(kinds))
    fig, axes = plt.subplots(*shape, figsize=size, squeeze=False)
    fig2, axes2 = plt.subplots(*shape, figsize=size, squeeze=False)
    for row, view in enumerate(kinds):
        for col, bench in enumerate(benches):
            ax, ax2 = axes[row][col], axes2[row][col]
            for i, method in enumerate(grid["methods"]):
                mruns = [r for r in runs if r["benchmark"] == bench and _name(r) == method
                         and view in r["views"]]  # fmt: skip
                if not mruns:
                    continue
                # each seed's own rounds (one that stopped early ends there): the mean at
                # round t is over the seeds that reached it
                rounds = max(len(r["history"]) for r in mruns)
                acc = np.full((len(mruns), rounds), np.nan)
                for k, r in enumerate(mruns):
                    curve = results.view_curve(r, view)
                    acc[k, : len(curve)] = [np.nan if y is None else 100 * y for y in curve]
                xs = np.arange(1, rounds + 1)
                color = colors[i % len(colors)]
                with np.errstate(invalid="ignore"), warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)  # a round no seed reached
                    mean = np.nanmean(acc, 0)
                    std = np.nanstd(acc, 0, ddof=1) if len(acc) > 1 else np.zeros(rounds)
                ax.plot(xs, mean, marker="o", color=color, label=method)
                std = np.nan_to_num(std)  # as the table: one seed has no spread
                ax.fill_between(xs, mean - std, mean + std, color=color, alpha=0.2)
                total = [sum(h["bytes_up"] + h["bytes_down"] for h in r["history"]) / 2**20
                         for r in mruns]  # fmt: skip
                final = [100 * r["final"].get(view, np.nan) for r in mruns]
                yerr = np.std(final, ddof=1) if len(final) > 1 else 0.0
                ax2.errorbar(np.mean(total), np.mean(final), yerr=yerr, fmt="o", color=color,
                             label=method)  # fmt: skip
            for a, xlabel in ((ax, "round"), (ax2, "total MB communicated (all clients, up+down)")):
                title = results.dataset_name(next(r for r in runs if r["benchmark"] == bench))
                a.set_title(f"{title}: {view}")  # the data set, never the format ("jsonl")
                if a is ax:  # rounds are whole numbers
                    a.xaxis.get_major_locator().set_params(integer=True)
                a.set_xlabel(xlabel)
                a.set_ylabel("mean client accuracy (%)")
                a.grid(alpha=0.3)
                if a.has_data():
                    a.legend(fontsize=7)
    for f, name in ((fig, "bench_curves.png"), (fig2, "bench_bytes.png")):
        f.tight_layout()
        png = io.BytesIO()
        f.savefig(png, format="png", dpi=110)
        plt.close(f)
        atomic_write(out / name, png.getvalue())
