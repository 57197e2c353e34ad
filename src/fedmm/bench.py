"""``fedmm bench``: methods × benchmarks × seeds → one honest report.

Every cell (benchmark, method, seed) is one ``fedmm run`` into the same directory (its
``results.json`` is the store).  A cell whose run is already there, complete (``fed.rounds``
rounds) and made with the same configuration is not rerun, so an interrupted bench resumes where
it stopped.  Frozen visual features are cached on disk per (backbone, preprocessing, data) and
shared by every method and seed of a benchmark.

Outputs in ``--out``: ``bench.json`` (the grid and every cell's run with every round),
``report.md`` (per benchmark: methods × views, **mean ± std over seeds** of the final per-client
mean accuracy -- with closed/open accuracy where the benchmark tags questions --, trainable
parameters, KB per client per round, seconds per round), ``bench_curves.png`` (accuracy per round,
mean with a ±std band) and ``bench_bytes.png`` (final accuracy vs total bytes communicated).
"""

from __future__ import annotations

import io
import json
import statistics
from pathlib import Path

from fedmm import __version__, results
from fedmm.config import FedmmConfig
from fedmm.files import atomic_write

# config keys that do not change a result (data.schema: where the server's copy of the schema is;
# its content is the benchmark's)
VOLATILE = ("out_dir", "cache_dir", "progress", "resume", "data.schema")


def cell_config(cfg: FedmmConfig, method: str, seed: int, out: Path) -> FedmmConfig:
    """The run of one cell: ``cfg`` (one benchmark's configuration) with method, seed, out."""
    return cfg.with_overrides({"method": method, "seed": seed, "out_dir": str(out)}).resolved()


def _same(run: dict, cfg: FedmmConfig) -> bool:
    """Whether a stored run was made with ``cfg``.  A key the stored config lacks (an option
    added to fedmm after the run) counts as its default value, which is what the run used."""
    flat, defaults = cfg.to_flat(), FedmmConfig().to_flat()
    return len(run["history"]) == cfg.fed.rounds and all(
        run["config"].get(k, defaults[k]) == v for k, v in flat.items() if k not in VOLATILE
    )


def run_bench(cfgs: list[FedmmConfig], methods: list[str], seeds: list[int], out: Path) -> dict:
    """Run every missing cell of the grid (one config per benchmark); write bench.json,
    report.md and the plots after each cell."""
    from tqdm.auto import tqdm

    from fedmm.engine import run_method

    out = Path(out)
    by_name = {c.data.benchmark: c for c in cfgs}
    cells = [(b, m, s) for b in by_name for s in seeds for m in methods]
    bar = tqdm(total=len(cells), desc="bench", unit="cell", disable=not cfgs[0].progress)
    ran = 0
    for benchmark, method, seed in cells:
        ccfg = cell_config(by_name[benchmark], method, seed, out)
        existing = {results.run_key(r): r for r in results.load(out)["runs"]}
        key = (method, ccfg.peft.type, benchmark, seed)
        bar.set_postfix_str(f"{method} on {benchmark}, seed {seed}")
        if key not in existing or not _same(existing[key], ccfg):
            run_method(ccfg)
            ran += 1
        bar.update(1)
        write_outputs(out, cells, ccfg.peft.type)
    bar.close()
    return {"cells": len(cells), "ran": ran}


def _cell_runs(out: Path, cells: list[tuple], peft: str) -> list[dict]:
    wanted = {(m, peft, b, s) for b, m, s in cells}
    return [r for r in results.load(out)["runs"] if results.run_key(r) in wanted]


def write_outputs(out: Path, cells: list[tuple], peft: str) -> None:
    runs = _cell_runs(out, cells, peft)
    grid = {
        "benchmarks": sorted({c[0] for c in cells}),
        "methods": list(dict.fromkeys(c[1] for c in cells)),
        "seeds": sorted({c[2] for c in cells}),
        "peft": peft,
    }
    payload = {"fedmm_version": __version__, "grid": grid, "runs": runs}
    atomic_write(out / "bench.json", json.dumps(payload, indent=1).encode())
    atomic_write(out / "report.md", (report(runs, grid) + "\n").encode())
    plot(out, runs, grid)


def _mean_std(values: list[float]) -> str:
    if not values:
        return "—"
    mean = 100 * statistics.fmean(values)
    std = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.1f} ± {std:.1f}"


def _groups(runs: list[dict]) -> list[str]:
    names = {k.split(".", 1)[1] for r in runs for k in r["final"] if "." in k}
    return sorted(names)


def report(runs: list[dict], grid: dict) -> str:
    lines = [f"# fedmm bench: {', '.join(grid['benchmarks'])}", ""]
    lines.append(
        f"Methods {', '.join(grid['methods'])}; seeds {grid['seeds']}; PEFT {grid['peft']}. "
        "Accuracy in %: final-round mean over clients, then mean ± std over seeds."
    )
    for bench in grid["benchmarks"]:
        bruns = [r for r in runs if r["benchmark"] == bench]
        if not bruns:
            continue
        views = results._views(
            [{"final": {k: v for k, v in r["final"].items() if "." not in k}} for r in bruns]
        )
        groups = _groups(bruns)
        head = ["method", "seeds", *views]
        for g in groups:
            head += [f"{v} ({g})" for v in views]
        head += ["trainable params", "KB up/client/round", "s/round"]
        lines += ["", f"## {bench}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for method in grid["methods"]:
            mruns = [r for r in bruns if r["method"] == method]
            if not mruns:
                continue
            cells = [results.label(mruns[0]), str(len(mruns))]
            for suffix in ["", *(f".{g}" for g in groups)]:
                for v in views:
                    cells.append(
                        _mean_std(
                            [r["final"][v + suffix] for r in mruns if v + suffix in r["final"]]
                        )
                    )
            hist = [h for r in mruns for h in r["history"]]
            n = max(1, len(hist))
            cells += [
                f"{mruns[0]['trainable_params']:,}",
                f"{sum(h['bytes_up'] / max(1, h['sampled']) for h in hist) / n / 1024:.0f}",
                f"{sum(h['seconds'] for h in hist) / n:.1f}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines += _task_lines(bruns, grid["methods"])
    lines += [
        "",
        "Views: `global` = the federated model, `personalized` = each client's own model "
        "(see the README); a dash: the method has no such view. Seconds per round are wall "
        "time on the machine that ran the bench, including evaluation.",
    ]
    return "\n".join(lines)


def _task_lines(runs: list[dict], methods: list[str]) -> list[str]:
    """Per task (multi-task benchmarks): methods x (task, view), the task's metric, mean ± std."""
    runs = [r for r in runs if r.get("final_by_task")]
    if not runs:
        return []
    tasks = sorted({t for r in runs for t in r["final_by_task"]})
    views = [
        v for v in ("global", "personalized", "distilled") if any(v in r["views"] for r in runs)
    ]
    cols = [(t, v) for t in tasks for v in views]
    head = ["method", *(f"{t} {v}" for t, v in cols)]
    lines = ["", "Per task (accuracy; multi-label tasks: mean AUROC):", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]  # fmt: skip
    for method in methods:
        mruns = [r for r in runs if r["method"] == method]
        if mruns:
            cells = [results.label(mruns[0])]
            cells += [_mean_std([r["final_by_task"][t][v] for r in mruns
                                 if v in r["final_by_task"].get(t, {})]) for t, v in cols]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def _primary(run: dict) -> str:
    return "global" if "global" in run["views"] else run["views"][0]


def plot(out: Path, runs: list[dict], grid: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    benches = [b for b in grid["benchmarks"] if any(r["benchmark"] == b for r in runs)]
    if not benches:
        return
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(1, len(benches), figsize=(6 * len(benches), 4), squeeze=False)
    fig2, axes2 = plt.subplots(1, len(benches), figsize=(6 * len(benches), 4), squeeze=False)
    for ax, ax2, bench in zip(axes[0], axes2[0], benches):
        for i, method in enumerate(grid["methods"]):
            mruns = [r for r in runs if r["benchmark"] == bench and r["method"] == method]
            if not mruns:
                continue
            view = _primary(mruns[0])
            rounds = min(len(r["history"]) for r in mruns)
            acc = np.array([[100 * results.mean_views(h["clients"], r.get("excluded_clients", {}))
                             .get(view, np.nan) for h in r["history"][:rounds]]
                            for r in mruns])  # fmt: skip
            xs = np.arange(1, rounds + 1)
            color = colors[i % len(colors)]
            ax.plot(xs, acc.mean(0), marker="o", color=color, label=f"{method} ({view})")
            ax.fill_between(
                xs, acc.mean(0) - acc.std(0), acc.mean(0) + acc.std(0), color=color, alpha=0.2
            )
            total = [
                sum(h["bytes_up"] + h["bytes_down"] for h in r["history"]) / 2**20 for r in mruns
            ]
            final = [100 * r["final"].get(view, np.nan) for r in mruns]
            ax2.errorbar(np.mean(total), np.mean(final), yerr=np.std(final), fmt="o", color=color,
                         label=f"{method} ({view})")  # fmt: skip
        for a, xlabel in ((ax, "round"), (ax2, "total MB communicated (all clients, up + down)")):
            a.set_title(bench)
            a.set_xlabel(xlabel)
            a.set_ylabel("mean client accuracy (%)")
            a.grid(alpha=0.3)
            a.legend(fontsize=7)
    for f, name in ((fig, "bench_curves.png"), (fig2, "bench_bytes.png")):
        f.tight_layout()
        png = io.BytesIO()
        f.savefig(png, format="png", dpi=110)
        plt.close(f)
        atomic_write(out / name, png.getvalue())
