"""``<out>/results.json`` on disk: read (upgrading old runs), insert-or-replace one run, and render
the reports (``summary.md``, ``curves.png``) from it when a run ends."""

from __future__ import annotations

import json
from pathlib import Path

from fedmm import __version__
from fedmm.files import atomic_write
from fedmm.results.curves import write_curves
from fedmm.results.tables import write_summary
from fedmm.results.views import run_key, upgrade


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


def save_run(out_dir: str | Path, run: dict) -> None:
    """Insert or replace ``run`` in ``<out>/results.json`` (atomically).  The reports are not
    rendered here, every round, for every run of the directory: ``write_reports`` renders them
    when a run ends (or on demand: ``scripts/render_results.py``)."""
    data = load(out_dir)
    data["runs"] = [r for r in data["runs"] if run_key(r) != run_key(run)]
    data["runs"].append(run)
    data["fedmm_version"] = __version__
    atomic_write(Path(out_dir) / "results.json", json.dumps(data, indent=1).encode())


def write_reports(out_dir: str | Path) -> dict:
    """Render ``summary.md`` and ``curves.png`` from ``<out>/results.json``; returns its data."""
    data = load(out_dir)
    write_summary(out_dir, data)
    write_curves(out_dir, data)
    return data
