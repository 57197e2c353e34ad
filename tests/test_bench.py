"""fedmm bench: the grid, resumability, the report's mean ± std; determinism; per-group views."""

from __future__ import annotations

import json

import pytest
import torch

from fedmm import bench
from fedmm.cli import main
from fedmm.config import ConfigError
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
    moved = [
        tiny_cfg.with_overrides({"fed.rounds": 2, "device": "cpu", "cache_dir": str(tmp_path)})
    ]
    assert bench.run_bench(moved, ["centralized"], [0, 1], out)["ran"] == 0  # where, not what
    assert len(counted) == 2  # a finished cell is not rerun because only the device changed
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
        {"method": "fedavg", "benchmark": "b", "seed": s, "views": ["shared"], "trainable_params": 10,
         "final": {"shared": acc, "shared.closed": acc + 0.1}, "clients": {},
         "history": [{"round": 1, "seconds": 2.0, "bytes_up": 2048, "bytes_down": 2048, "sampled": 2,
                      "clients": {"c": {"shared": acc}}}]}
        for s, acc in ((0, 0.5), (1, 0.7))
    ]  # fmt: skip
    text = bench.report(
        runs, {"benchmarks": ["b"], "methods": ["fedavg"], "seeds": [0, 1], "peft": "adapter"}
    )
    # FedAvg's other views exist, but this run did not measure them (as a run before fedmm 0.2)
    assert (
        "| fedavg | 2 | 60.0 ± 14.1 | n/m | n/m | 70.0 ± 14.1 | n/m | n/m | 10 | 1 | 2.0 |" in text
    )
    assert "shared (closed)" in text


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
        views = ctx.view("shared", "personal")
    preds = ctx.predict(tagged)
    rows = torch.tensor([g == "closed" for g in groups])
    assert views["shared.closed"] == pytest.approx(
        float((preds == test.labels)[rows].float().mean())
    )
    assert views["personal.open"] == views["shared.open"]
    assert set(views) == {
        f"{v}{g}" for v in ("shared", "personal") for g in ("", ".closed", ".open")
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
                "views": ["shared", "personal"], "trainable_params": 1, "history": [],
                "final": {"shared": acc}, "final_by_task": {"vqa": {"shared": acc},
                                                           "tags": {"shared": 0.5}}}  # fmt: skip

    text = bench.report([run(0, 0.4), run(1, 0.6)],
                        {"benchmarks": ["b"], "methods": ["tap"], "seeds": [0, 1], "peft": "adapter"})  # fmt: skip
    assert "| method | tags shared | tags personal | vqa shared | vqa personal |" in text
    assert "| tap | 50.0 ± 0.0 | n/a | 50.0 ± 14.1 | n/a |" in text  # personal: nobody scored


def test_a_cell_made_before_an_option_existed_counts_as_made_with_its_default(tiny_cfg):
    cfg = tiny_cfg.with_overrides({"fed.rounds": 1})
    stored = {"history": [{}], "config": cfg.to_flat()}
    del stored["config"]["train.lr"]  # as if the option were newer than the stored run
    assert bench._same(stored, cfg)
    assert not bench._same(stored, cfg.with_overrides({"train.lr": 0.5}))


def test_variants_are_rows_of_their_own_and_fedpia_without_alignment_or_integration_is_fedavg(
    tiny_cfg, tmp_path, capsys
):
    """A variant runs its method with its options under its own name (results.json key, report
    row); FedPIA with the identity 'alignment' and λ = 0 (the client starts from the global
    model) is FedAvg, view for view, round for round."""
    out = tmp_path / "bench"
    argv = ["bench", "--benchmark", "fmnist-domain", "--method", "fedavg,pia-id",
            "--variant", "pia-id=fedpia:fedpia.solver=identity,fedpia.lam=0", "--seeds", "0",
            "--out", str(out), "--set", "model.backbone=tiny", "--set", "model.image_size=32",
            "--set", "data.train_per_client=40", "--set", "data.test_per_client=20",
            "--clients", "2", "--rounds", "2", "--set", "train.local_steps=3",
            "--set", "train.batch_size=8", "--set", "progress=false"]  # fmt: skip
    assert main(argv) == 0
    data = json.loads((out / "bench.json").read_text())
    runs = {r.get("variant") or r["method"]: r for r in data["runs"]}
    assert set(runs) == {"fedavg", "pia-id"}
    assert runs["pia-id"]["method"] == "fedpia" and runs["pia-id"]["config"]["fedpia.lam"] == 0
    assert [h["clients"] for h in runs["pia-id"]["history"]] == [
        h["clients"] for h in runs["fedavg"]["history"]
    ]
    report = (out / "report.md").read_text()
    assert "| pia-id | 1 |" in report and "| fedavg | 1 |" in report
    assert "`pia-id` = fedpia with fedpia.solver=identity, fedpia.lam=0" in report
    assert main(argv[:4] + ["fedavg,nope"] + argv[5:]) == 2
    assert "unknown method or variant 'nope'" in capsys.readouterr().err


def test_built_in_variants_name_valid_options(tiny_cfg):
    for name, v in bench.VARIANTS.items():
        cfg = bench.cell_config(tiny_cfg, name, 0, tiny_cfg.out_dir)
        assert (cfg.method, cfg.variant) == (v.method, name)
        assert all(cfg.to_flat()[k] == val for k, val in v.overrides.items())


def test_report_compares_like_with_like_and_says_whether_the_gap_exceeds_the_spread():
    def run(method, seed, view, acc):
        return {"method": method, "benchmark": "b", "seed": seed, "views": [view],
                "view_aliases": {}, "trainable_params": 1, "final": {view: acc},
                "history": [{"round": 1, "seconds": 1.0, "bytes_up": 0, "bytes_down": 0,
                             "sampled": 1, "clients": {"c": {view: acc}}}]}  # fmt: skip

    runs = [run("feddat", 0, "shared+head", 0.80), run("feddat", 1, "shared+head", 0.82),
            run("fedper", 0, "shared+head", 0.70), run("fedper", 1, "shared+head", 0.72),
            run("fedavg", 0, "shared", 0.79), run("fedavg", 1, "shared", 0.81)]  # fmt: skip
    grid = {"benchmarks": ["b"], "methods": ["fedavg", "fedper", "feddat"], "seeds": [0, 1],
            "peft": "adapter"}  # fmt: skip
    text = bench.report(runs, grid)
    assert (
        "| feddat `shared+head` | fedper `shared+head` | same | 81.0 ± 1.4 (2) | 71.0 ± 1.4 (2) | "
        "+10.0 | yes |" in text
    )
    assert "feddat `shared+head` | fedavg" not in text  # FedAvg has no shared+head run here
    c = bench.compare([0.80, 0.82], [0.79, 0.81])
    assert c["delta"] == pytest.approx(1.0) and not c["exceeds"]
    # a gap that rounds to zero is "0.0", never "-0.0" (FedDAT a hair below FedPer)
    runs[0]["final"]["shared+head"], runs[1]["final"]["shared+head"] = 0.7048, 0.7148
    assert "| 71.0 ± 0.7 (2) | 71.0 ± 1.4 (2) | 0.0 | no |" in bench.report(runs, grid)


@pytest.mark.parametrize("text, message", [
    ("a/b=fedpia:fedpia.lam=0", "letters, digits"),
    ("fedpia=fedpia:fedpia.lam=0", "is a method's or a built-in variant's"),
    ("feddat-fedhead=feddat:feddat.alpha=1", "is a method's or a built-in variant's"),
    ("x=fedpia:peft.type=lora", "set by the bench grid"),
    ("x=fedpia:seed=3", "set by the bench grid"),
    ("x=fedpia:fedpia.lam", "is not KEY=VALUE"),
    ("x", "NAME=METHOD"),
])  # fmt: skip
def test_a_user_variant_cannot_pass_for_another_run(text, message):
    with pytest.raises(ConfigError, match=message):
        bench.parse_variant(text)


def test_one_seed_comparisons_claim_no_spread():
    assert bench.compare([0.8], [0.7])["exceeds"] is None


def test_until_plateau_doubles_one_budget_for_every_method_until_every_curve_is_flat(
    tiny_cfg, tmp_path
):
    out = tmp_path / "bench"
    cfgs = [tiny_cfg.with_overrides({"fed.rounds": 1})]
    # one round has no gain to measure (still rising); at 2 rounds a 1000-pt tolerance is flat
    summary = bench.run_until_plateau(cfgs, ["centralized"], [0], out,
                                      rule=bench.PlateauRule(tol=1000.0), max_rounds=8)  # fmt: skip
    assert [b["rounds"] for b in summary["budgets"]] == [1, 2] and summary["plateaued"]
    assert summary["budgets"][0]["still_rising"] and not summary["budgets"][1]["still_rising"]
    assert json.loads((out / "plateau.json").read_text())["final_rounds"] == 2
    runs = json.loads((out / "rounds-2" / "bench.json").read_text())["runs"]
    assert [len(r["history"]) for r in runs] == [2]
    # the doubling never goes beyond --max-rounds
    strict = bench.run_until_plateau(cfgs, ["centralized"], [0], tmp_path / "strict",
                                     rule=bench.PlateauRule(tol=1e-9), max_rounds=2)  # fmt: skip
    assert [b["rounds"] for b in strict["budgets"]] == [1, 2]


def test_time_to_accuracy_is_the_first_round_reaching_the_target():
    run = {"history": [{"round": r, "seconds": 10.0, "clients": {"c": {"shared": acc}}}
                       for r, acc in ((1, 0.5), (2, 0.7), (3, 0.65))]}  # fmt: skip
    assert bench.time_to_accuracy(run, "shared", 0.6) == (2, 20.0)
    assert bench.time_to_accuracy(run, "shared", 0.8) is None
    assert bench.time_to_accuracy(run, "personal", 0.1) is None


def test_cli_until_plateau_prints_each_budget_and_the_rule(tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["bench", "--benchmark", "fmnist-domain", "--method", "centralized", "--seeds", "0",
            "--out", str(out), "--set", "model.backbone=tiny", "--set", "model.image_size=32",
            "--set", "data.train_per_client=40", "--set", "data.test_per_client=20",
            "--clients", "2", "--rounds", "1", "--set", "train.local_steps=2",
            "--set", "train.batch_size=8", "--set", "progress=false", "--until-plateau",
            "--max-rounds", "2", "--plateau-tol", "1000", "--target-accuracy", "1"]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "1 rounds (" in text and "still rising: centralized on fmnist-domain" in text
    assert "2 rounds (" in text and "every curve flat" in text and "all flat at 2 rounds" in text
    assert "2 cells ran" in text
    report = (out / "rounds-2" / "report.md").read_text()
    assert "Time to 1.0 % `shared` (the target given" in report
    assert main([*argv, "--plateau-frac", "0"]) == 2
