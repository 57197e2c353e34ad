"""Markdown reports of stored runs: ``summary.md``'s tables (methods x views per benchmark, per task),
the loader notes' lines and a round's engine overhead.  Needs no torch and no matplotlib."""

from __future__ import annotations

from pathlib import Path

from fedmm.files import atomic_write
from fedmm.results.health import health_line, missing_line, sites_scored
from fedmm.results.predictions import predictions_section  # generative runs: what the model said
from fedmm.results.views import (
    dataset_name,
    declared_views,
    label,
    missing_cell,
    scored_views,
    view_rank,
    withheld_scores,
)

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


def report_views(runs: list[dict]) -> list[str]:
    """The views a table of ``runs`` has columns for: scored, stored or declared, in view order."""
    seen = {v for r in runs
            for v in (*scored_views(r), *r.get("views", ()), *declared_views(r))}  # fmt: skip
    return sorted(seen, key=view_rank)


def summary_table(data: dict) -> str:
    """Markdown: one table per benchmark, methods x views (mean accuracy over clients)."""
    lines = []
    for bench in sorted({r["benchmark"] for r in data["runs"]}):
        runs = [r for r in data["runs"] if r["benchmark"] == bench]
        views = report_views(runs)
        lines += [f"### {dataset_name(runs[0])}", ""]
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
            if stop := r.get("stopped_early"):
                lines.append(f"  stopped early after round {stop['round']} of "
                             f"{r['config'].get('fed.rounds', '?')}: the mean validation score of "
                             f"{stop['view']} last improved at round {stop['best_round']} "
                             f"({stop['best']:.1f}), patience {stop['patience']}")  # fmt: skip
        lines.append("")
    lines += task_table(data["runs"])
    if any(withheld_scores(r) for r in data["runs"]):
        lines.append("withheld: sites under differential privacy kept their scores (site setting "
                     "dp-evaluation; docs/deployment.md, Privacy).\n")  # fmt: skip
    lines.append(
        "Accuracy in %, mean over clients after the last round (multi-label tasks: mean AUROC, "
        "see the per-task table); views by kind (docs/methods.md, Views); —: the method has no such "
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
        views = [v for v in report_views(rs) if "." not in v]
        cols = [(t, v) for t in tasks for v in views if any(v in r["final_by_task"].get(t, {})
                                                           for r in rs)]  # fmt: skip
        lines += [f"### {dataset_name(rs[0])}, per task", ""]
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
    text = summary_table(data) + "\n"
    predictions = predictions_section(out_dir)
    atomic_write(Path(out_dir) / "summary.md", (text + (f"\n{predictions}\n" if predictions
                                                         else "")).encode())  # fmt: skip


def engine_overhead(entry: dict) -> dict[str, float]:
    """One round of ``history``: its wall time, the clients' own seconds (training and evaluation
    replies, summed) and the engine's share ``(wall − Σ client seconds) / wall``."""
    client = sum(t.get("seconds", 0.0) for t in entry.get("train", {}).values())
    client += sum(e.get("seconds", 0.0) for e in entry.get("eval", {}).values())
    wall = float(entry["seconds"])
    return {"wall": wall, "client": client, "overhead": (wall - client) / wall if wall else 0.0}
