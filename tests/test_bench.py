"""fedmm bench: the grid, resumability, the report's mean ± std; determinism; per-group views."""

from __future__ import annotations

import json

import pytest
import torch

from fedmm import bench
from fedmm.cli import main
from fedmm.engine import run_method
from fedmm.methods import ClientContext
from fedmm.runtime import Encoded, get_runtime


@pytest.fixture()
def counted(monkeypatch):
    calls = []
    real = run_method

    def counting(cfg):
        calls.append((cfg.method, cfg.seed))
        return real(cfg)

    monkeypatch.setattr("fedmm.engine.run_method", counting)
    return calls


def test_bench_runs_each_missing_cell_once_and_reports_mean_and_std(tiny_cfg, tmp_path, counted):
    out = tmp_path / "bench"
    cfgs = [tiny_cfg.with_overrides({"fed.rounds": 2})]
    assert bench.run_bench(cfgs, ["centralized"], [0, 1], out) == {"cells": 2, "ran": 2}
    assert bench.run_bench(cfgs, ["centralized"], [0, 1], out) == {"cells": 2, "ran": 0}
    assert len(counted) == 2  # the second call resumed: nothing reran
    changed = [tiny_cfg.with_overrides({"fed.rounds": 2, "train.lr": 5e-4})]
    assert bench.run_bench(changed, ["centralized"], [0], out)["ran"] == 1  # other config: rerun

    data = json.loads((out / "bench.json").read_text())
    assert data["grid"]["seeds"] == [0] and len(data["runs"]) == 1
    assert all(len(r["history"]) == 2 for r in data["runs"])
    report = (out / "report.md").read_text()
    assert "| centralized | 1 |" in report and "±" in report
    assert (out / "bench_curves.png").stat().st_size > 0 and (out / "bench_bytes.png").is_file()


def test_report_mean_and_std_over_seeds():
    runs = [
        {"method": "fedavg", "benchmark": "b", "seed": s, "views": ["global"], "trainable_params": 10,
         "final": {"global": acc, "global.closed": acc + 0.1}, "clients": {},
         "history": [{"round": 1, "seconds": 2.0, "bytes_up": 2048, "bytes_down": 2048, "sampled": 2,
                      "clients": {"c": {"global": acc}}}]}
        for s, acc in ((0, 0.5), (1, 0.7))
    ]  # fmt: skip
    text = bench.report(
        runs, {"benchmarks": ["b"], "methods": ["fedavg"], "seeds": [0, 1], "peft": "adapter"}
    )
    assert "| fedavg | 2 | 60.0 ± 14.1 | 70.0 ± 14.1 | 10 | 1 | 2.0 |" in text
    assert "global (closed)" in text


def test_the_same_config_and_seed_give_the_same_metrics(tiny_cfg, tmp_path):
    cfg = tiny_cfg.with_overrides({"method": "fedavg", "fed.rounds": 2})
    first = run_method(cfg.with_overrides({"out_dir": str(tmp_path / "a")}))
    second = run_method(cfg.with_overrides({"out_dir": str(tmp_path / "b")}))
    assert [h["clients"] for h in first["history"]] == [h["clients"] for h in second["history"]]
    assert [h["train"][c]["loss"] for h in first["history"] for c in h["train"]] == [
        h["train"][c]["loss"] for h in second["history"] for c in h["train"]
    ]


def test_views_are_scored_per_group_when_the_split_has_groups(tiny_cfg):
    rt = get_runtime(tiny_cfg)
    test = rt.client_split(0, "test")
    groups = tuple("closed" if i % 2 else "open" for i in range(len(test)))
    tagged = Encoded(test.feats, test.input_ids, test.attention_mask, test.labels, groups)
    ctx = ClientContext(tiny_cfg, rt.model, test, tagged, {}, 1, 0, 1, 1)
    rt.model.peft.ensure_sets(["a"])
    with rt.model.active("a"):
        views = ctx.view("global", "personalized")
    preds = ctx.predict(tagged)
    rows = torch.tensor([g == "closed" for g in groups])
    assert views["global.closed"] == pytest.approx(
        float((preds == test.labels)[rows].float().mean())
    )
    assert views["personalized.open"] == views["global.open"]
    assert set(views) == {
        f"{v}{g}" for v in ("global", "personalized") for g in ("", ".closed", ".open")
    }


def test_cli_bench_and_run_check_benchmark_lists(capsys, tmp_path):
    assert main(["run", "--benchmark", "fmnist-domain,fmnist-function"]) == 2
    assert "use fedmm bench" in capsys.readouterr().err
    assert main(["bench", "--benchmark", "fmnist-domain,nope", "--out", str(tmp_path)]) == 2
    assert "unknown benchmark 'nope'" in capsys.readouterr().err
    assert main(["bench", "--seeds", "0,x", "--out", str(tmp_path)]) == 2


def test_report_has_a_per_task_table_for_multi_task_benchmarks():
    def run(seed, acc):
        return {"method": "tap", "peft": "adapter", "benchmark": "b", "seed": seed,
                "views": ["global", "personalized"], "trainable_params": 1, "history": [],
                "final": {"global": acc}, "final_by_task": {"vqa": {"global": acc},
                                                           "tags": {"global": 0.5}}}  # fmt: skip

    text = bench.report([run(0, 0.4), run(1, 0.6)],
                        {"benchmarks": ["b"], "methods": ["tap"], "seeds": [0, 1], "peft": "adapter"})  # fmt: skip
    assert "| method | tags global | tags personalized | vqa global | vqa personalized |" in text
    assert "| tap | 50.0 ± 0.0 | — | 50.0 ± 14.1 | — |" in text


def test_a_cell_made_before_an_option_existed_counts_as_made_with_its_default(tiny_cfg):
    cfg = tiny_cfg.with_overrides({"fed.rounds": 1})
    stored = {"history": [{}], "config": cfg.to_flat()}
    del stored["config"]["train.lr"]  # as if the option were newer than the stored run
    assert bench._same(stored, cfg)
    assert not bench._same(stored, cfg.with_overrides({"train.lr": 0.5}))
