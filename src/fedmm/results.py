"""Results: ``results.json`` (every run, every round), ``summary.md`` and ``curves.png``.

Schema of ``<out>/results.json``::

    {"fedmm_version": str,
     "runs": [{"method", "peft", "benchmark", "seed", "views": [view, ...],
               "trainable_params": int, "config": {flat config},
               "clients": {client id: description},
               "history": [{"round", "seconds", "server_seconds", "bytes_up", "bytes_down",
                            "bytes_eval", "sampled", "failures", "evaluated",
                            "failed" | "rejected" | "eval_failed": [{"node", "client", "reason"}],
                            "clients": {client id: {view: accuracy}},
                            "train": {client id: {"steps", "lr-first", "lr-last", "loss",
                                                  "seconds", "bytes_up", "bytes_down"
                                                  [, "dp-norm", "dp-scale"]}},
                            "eval": {client id: {"seconds"}}}],
               "privacy": {"dp_clip_norm", "dp_noise_multiplier"},
               "final": {view: mean accuracy over clients in the last evaluated round},
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
by (method, peft, benchmark, seed); writing it again replaces it, so a directory collects a
comparison across several ``fedmm run`` calls.  Files are written atomically.
"""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path

from fedmm import __version__
from fedmm.config import FedmmConfig
from fedmm.files import atomic_write

VIEW_ORDER = ("global", "personalized", "dat", "client")


def new_run(
    cfg: FedmmConfig, benchmark: str, clients: dict[str, str], tasks: dict[str, str] | None,
    views: tuple[str, ...], trainable_params: int,
) -> dict:  # fmt: skip
    """A new run record: ``clients`` maps each client's name to its description, ``tasks`` each
    client to its task (multi-task schemas; None otherwise).  ``run_id`` names the run's client
    state at every site; it is kept when the run is resumed."""
    return {
        "method": cfg.method,
        "peft": cfg.peft.type,
        "benchmark": benchmark,
        "seed": cfg.seed,
        "run_id": uuid.uuid4().hex,
        "views": list(views),
        "trainable_params": trainable_params,
        "config": cfg.to_flat(),
        "clients": dict(sorted(clients.items())),
        **({"tasks": dict(sorted(tasks.items()))} if tasks else {}),
        "history": [],
        "final": {},
    }


def add_round(run: dict, entry: dict) -> None:
    run["history"].append(entry)
    if entry["clients"] or not run["final"]:  # a round without evaluation keeps the last one
        run["final"] = mean_views(entry["clients"])
        if run.get("tasks"):  # the mean over clients mixes metrics; per task it does not
            run["final_by_task"] = {
                task: mean_views(
                    {c: m for c, m in entry["clients"].items() if run["tasks"][c] == task}
                )
                for task in sorted(set(run["tasks"].values()))
            }
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


def mean_views(clients: dict[str, dict[str, float]]) -> dict[str, float]:
    views: dict[str, list[float]] = {}
    for metrics in clients.values():
        for view, acc in metrics.items():
            views.setdefault(view, []).append(acc)
    return {v: sum(a) / len(a) for v, a in sorted(views.items())}


def load(out_dir: str | Path) -> dict:
    path = Path(out_dir) / "results.json"
    if not path.is_file():
        return {"fedmm_version": __version__, "runs": []}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"{path} is not valid JSON ({exc}); move it away or pick another --out"
        ) from exc


def run_key(run: dict) -> tuple:
    return (run["method"], run.get("peft", "adapter"), run["benchmark"], run["seed"])


def label(run: dict) -> str:
    """``method`` for the default bottleneck adapter, else ``method+peft``."""
    peft = run.get("peft", "adapter")
    return run["method"] if peft == "adapter" else f"{run['method']}+{peft}"


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
    seen = {v for r in runs for v in r["final"]}
    return [v for v in VIEW_ORDER if v in seen] + sorted(seen - set(VIEW_ORDER))


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
            cells += [f"{100 * r['final'][v]:.1f}" if v in r["final"] else "—" for v in views]
            cells += [
                f"{r['trainable_params']:,}",
                f"{sum(h['seconds'] for h in hist) / n:.1f}",
                f"{sum(h['bytes_up'] / max(1, h['sampled']) for h in hist) / n / 1024:.0f}",
                f"{sum(h['bytes_down'] / max(1, h['sampled']) for h in hist) / n / 1024:.0f}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += task_table(data["runs"])
    lines.append(
        "Accuracy in %, mean over clients after the last round (multi-label tasks: mean AUROC, "
        "see the per-task table). KB: one client's training messages per round (tensor "
        "payload), averaged over the sampled clients and rounds."
    )
    return "\n".join(lines)


def task_table(runs: list[dict]) -> list[str]:
    """Markdown lines: per multi-task benchmark, methods x (task, view) with the task's metric,
    and TAP's replacement counts."""
    lines = []
    for bench in sorted({r["benchmark"] for r in runs if r.get("final_by_task")}):
        rs = [r for r in runs if r["benchmark"] == bench and r.get("final_by_task")]
        tasks = sorted({t for r in rs for t in r["final_by_task"]})
        views = [v for v in _views(rs) if v in ("global", "personalized", "distilled")]
        cols = [(t, v) for t in tasks for v in views if any(v in r["final_by_task"].get(t, {})
                                                           for r in rs)]  # fmt: skip
        lines += [f"### {bench}, per task", ""]
        head = ["method", "seed", *(f"{t} {v}" for t, v in cols)]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rs:
            cells = [label(r), str(r["seed"])]
            for t, v in cols:
                score = r["final_by_task"].get(t, {}).get(v)
                cells.append("—" if score is None else f"{100 * score:.1f}")
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
    atomic_write(Path(out_dir) / "summary.md", (summary_table(data) + "\n").encode())


def write_curves(out_dir: str | Path, data: dict) -> None:
    """Accuracy per round, one line per (method, view); one panel per benchmark."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benches = sorted({r["benchmark"] for r in data["runs"]})
    if not benches:
        return
    fig, axes = plt.subplots(1, len(benches), figsize=(6 * len(benches), 4), squeeze=False)
    styles = {"global": "-", "personalized": "--", "client": ":"}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, bench in zip(axes[0], benches):
        runs = [r for r in data["runs"] if r["benchmark"] == bench]
        for i, r in enumerate(runs):
            for view in r["views"]:
                if view == "dat":  # FedDAT's dat view is its personalized view: drawn once
                    continue
                xs = [h["round"] for h in r["history"]]
                ys = [100 * mean_views(h["clients"]).get(view, float("nan")) for h in r["history"]]
                ax.plot(xs, ys, styles.get(view, "-."), color=colors[i % len(colors)], marker="o",
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
