"""Reports say what they show: a mean over one seed is marked (n = 1), never given a spread of
± 0.0; tables and plots are titled with the data set, never with the format name "jsonl"."""

from __future__ import annotations

import matplotlib.axes
import pytest

from fedmm import bench, results
from fedmm.results.curves import write_curves
from fedmm.results.tables import summary_table


def _run(seed: int, acc: float, method: str = "fedavg", benchmark: str = "vqa-rad-dirichlet",
         data_dir: str = "") -> dict:  # fmt: skip
    return {"method": method, "peft": "adapter", "benchmark": benchmark, "seed": seed,
            "views": ["shared"], "view_aliases": {}, "trainable_params": 10,
            "config": {"data.data_dir": data_dir}, "final": {"shared": acc}, "clients": {},
            "health": {}, "history": [{"round": 1, "seconds": 2.0, "bytes_up": 2048,
                                       "bytes_down": 2048, "sampled": 2,
                                       "clients": {"c": {"shared": acc}}}]}  # fmt: skip


GRID = {"benchmarks": ["vqa-rad-dirichlet"], "methods": ["fedavg"], "seeds": [0], "peft": "adapter"}


def test_a_mean_over_one_seed_is_marked_n_1_not_given_a_zero_spread():
    text = bench.report([_run(0, 0.5)], GRID)
    assert "| fedavg | 1 | 50.0 (n = 1) |" in text
    assert "± 0.0" not in text
    two = bench.report([_run(0, 0.5), _run(1, 0.7)], {**GRID, "seeds": [0, 1]})
    assert "| fedavg | 2 | 60.0 ± 14.1 |" in two  # more seeds: mean ± sample std as before


def test_a_comparison_with_one_seed_a_side_shows_no_spread():
    runs = [_run(0, 0.8, "feddat-fedhead"), _run(0, 0.7, "fedavg")]
    runs[0]["method"], runs[0]["variant"] = "feddat", "feddat-fedhead"
    text = bench.report(runs, {**GRID, "methods": ["fedavg", "feddat-fedhead"]})
    row = next(line for line in text.splitlines() if line.startswith("| feddat-fedhead `shared`"))
    assert "80.0 (n = 1) | 70.0 (n = 1) | +10.0 | n/a (< 2 seeds)" in row
    assert "±" not in row
    assert bench.compare([0.8], [0.7])["a"] == (pytest.approx(80.0), None, 1)


def test_dataset_name_is_the_benchmark_or_the_jsonl_directory():
    assert results.dataset_name(_run(0, 0.5)) == "vqa-rad-dirichlet"
    jsonl = _run(0, 0.5, benchmark="jsonl", data_dir="/data/chest-xray-sites")
    assert results.dataset_name(jsonl) == "chest-xray-sites"


def test_jsonl_tables_and_plots_are_titled_with_the_data_set(tmp_path, monkeypatch):
    run = _run(0, 0.5, benchmark="jsonl", data_dir="/data/chest-xray-sites")
    titles = []
    real = matplotlib.axes.Axes.set_title

    def recording(self, label, *args, **kwargs):
        titles.append(label)
        return real(self, label, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "set_title", recording)
    write_curves(tmp_path, {"runs": [run]})
    bench.plot(tmp_path, [run], {**GRID, "benchmarks": ["jsonl"]})
    assert titles == ["chest-xray-sites"] + ["chest-xray-sites: shared"] * 2  # curves, bytes
    assert not any("jsonl" in t for t in titles)

    table = summary_table({"runs": [run]})
    assert "### chest-xray-sites" in table and "### jsonl" not in table
    report = bench.report([run], {**GRID, "benchmarks": ["jsonl"]})
    assert "# fedmm bench: chest-xray-sites" in report and "## chest-xray-sites" in report
    assert "jsonl" not in report.split("Views by kind")[0]
