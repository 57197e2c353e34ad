"""The generated answers a generative run's rehearsed sites kept (``predictions.jsonl`` beside
each client's state), rendered for summary.md.  No torch: reading and rendering results never
loads the model stack (tests/test_spec.py)."""

from __future__ import annotations

import json
from pathlib import Path

PREDICTIONS_FILE = "predictions.jsonl"


def predictions_section(out_dir: str | Path) -> str:
    """Markdown of the prediction samples the rehearsed sites of ``out_dir`` wrote
    (``<out>/client_state/<site>/<client>/<run>/predictions.jsonl``): per run, the last evaluated
    round's question / reference / generated, per client and view; "" when there are none."""
    files = sorted(Path(out_dir).glob(f"client_state/*/*/*/{PREDICTIONS_FILE}"))
    runs: dict[str, list[dict]] = {}
    for path in files:
        run = path.parent.name
        with open(path, encoding="utf-8") as fh:
            runs.setdefault(run, []).extend(json.loads(line) for line in fh if line.strip())
    lines: list[str] = []
    for run, rows in sorted(runs.items()):
        lines += predictions_markdown(rows, run)
    return "\n".join(["## Generated answers (a sample per client)", "", *lines]) if lines else ""


def predictions_markdown(rows: list[dict], title: str) -> list[str]:
    """A markdown table of the last round's predictions per client and view."""
    if not rows:
        return []
    last = max(r["round"] for r in rows)
    lines = [f"### {title} (round {last})", "",
             "| client | view | question | reference | generated |", "|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        if r["round"] == last:
            cells = [r["client"], r["view"], r["question"], r["reference"], r["generated"]]
            lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return lines + [""]
