"""Every option checked before anything starts; a run that did not train never exits 0
(issue 15, kinds 4 and 5)."""

from __future__ import annotations

import math

import pytest

from fedmm import results
from fedmm.cli import main
from fedmm.config import ConfigError, FedmmConfig
from fedmm.validate import validate_config


# ------------------------------------------------------------------ kind 5: one validation pass
@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("train.lr=nan", "train.lr must be a finite number in (0, inf), got nan"),
        ("train.lr=0", "train.lr must be a finite number in (0, inf)"),
        ("train.lr=inf", "train.lr must be a finite number in (0, inf)"),
        ("train.weight_decay=-1", "train.weight_decay must be a finite number in [0, inf)"),
        ("train.batch_size=0", "train.batch_size must be a finite number in [1, inf)"),
        ("train.eval_batch_size=0", "train.eval_batch_size"),
        ("train.warmup_frac=1", "train.warmup_frac must be a finite number in [0, 1)"),
        ("train.grad_clip=-0.5", "train.grad_clip"),
        ("train.schedule=step", "unknown train.schedule 'step'; choices: cosine, linear, constant"),
        ("model.dropout=1.0", "model.dropout must be a finite number in [0, 1)"),
        ("model.max_text_len=2", "model.max_text_len must be a finite number in [3, inf)"),
        ("model.max_text_len=200", "model.max_text_len=200 + model.grid²=9"),
        ("model.image_size=0", "model.image_size"),
        ("model.grid=0", "model.grid"),
        ("fed.min_clients=6", "fed.min_clients=6 can never be reached"),
        ("fed.fraction=0", "fed.fraction must be a finite number in (0, 1]"),
        ("fed.round_timeout=-1", "fed.round_timeout"),
        ("fed.eval_fraction=1.5", "fed.eval_fraction"),
        ("fed.weighting=median", "unknown fed.weighting 'median'; choices: samples, uniform"),
        ("dp.clip_norm=-1", "dp.clip_norm"),
        ("dp.noise_multiplier=1", "dp.noise_multiplier=1 needs dp.clip_norm > 0"),
        ("validate.max_examples=0", "validate.max_examples"),
        ("validate.max_upload_mb=nan", "validate.max_upload_mb"),
        ("feddat.temperature=0", "feddat.temperature must be a finite number in (0, inf)"),
        ("fedprox.mu=-0.1", "fedprox.mu"),
        ("fedadam.beta2=1", "fedadam.beta2 must be a finite number in [0, 1)"),
        ("fedadam.tau=0", "fedadam.tau"),
        ("ditto.lam=-1", "ditto.lam"),
        ("fedpia.lam=2", "fedpia.lam must be a finite number in [0, 1]"),
        ("fedpia.solver=hungarian", "unknown fedpia.solver 'hungarian'; choices: exact, emd, sinkhorn"),
        ("tap.val_frac=1", "tap.val_frac must be a finite number in (0, 1)"),
        ("tap.distill_lr=0", "tap.distill_lr"),
        ("data.alpha=0", "data.alpha must be a finite number in (0, inf)"),
        ("data.train_per_client=0", "data.train_per_client must be a finite number in [1, inf)"),
        ("data.test_per_client=0", "data.test_per_client"),
        ("data.test_split=random", "unknown data.test_split 'random'; choices: standard, image-disjoint"),
        ("data.clients_by=hash", "unknown data.clients_by 'hash'; choices: column, iid, dirichlet"),
        ("data.dirichlet_by=size", "unknown data.dirichlet_by 'size'; choices: answer, organ"),
        ("peft.lora_alpha=0", "peft.lora_alpha"),
        ("adapter.reduction_factor=0", "adapter.reduction_factor"),
        ("device=gpu", "device must be auto, cpu, cuda or cuda:N"),
        ("seed=-1", "seed must be a finite number in [0, inf)"),
    ],
)  # fmt: skip
def test_bad_settings_are_refused_by_name_before_anything_runs(tmp_path, capsys, setting, message):
    out = tmp_path / "never"
    argv = ["run", "--set", "model.backbone=tiny", "--set", setting, "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not out.exists()


def test_a_lora_target_typo_is_refused_before_any_run_listing_the_layer_names(tmp_path, capsys):
    out = tmp_path / "never"
    for targets, bad in (("qurey", "qurey"), ("query,valeu", "valeu")):  # each entry must match
        argv = ["run", "--peft", "lora", "--set", "model.backbone=tiny",
                "--set", f"peft.lora_targets={targets}", "--out", str(out)]  # fmt: skip
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"peft.lora_targets {bad!r} matches no linear layer" in err
        assert "dense, key, query, value" in err
    assert not out.exists()
    validate_config(FedmmConfig().with_overrides({"model.backbone": "tiny", "peft.type": "lora",
                                                  "peft.lora_targets": "query,value"}))  # fmt: skip


def test_lora_targets_are_checked_on_hugging_face_families_without_weights():
    cfg = FedmmConfig().with_overrides({"model.backbone": "clip", "model.hf_path": "tiny-random",
                                        "peft.type": "lora"})  # fmt: skip
    validate_config(cfg, ["fedavg"])  # the family's default targets match
    with pytest.raises(ConfigError, match="q_proj"):
        validate_config(cfg.with_overrides({"peft.lora_targets": "query"}), ["fedavg"])


def test_every_numeric_option_has_a_range():
    """Every number is declared with its interval (``fedmm.spec.option``), core or method, and
    validation checks it: the smallest value outside is refused, naming the option."""
    from fedmm.config import declared_fields
    from fedmm.spec import parse_interval

    cfg = FedmmConfig()
    numeric = {k for k, v in cfg.to_flat().items()
               if isinstance(v, int | float) and not isinstance(v, bool)}  # fmt: skip
    declared = {k for k, f in declared_fields().items() if f.metadata.get("interval")}
    assert numeric == declared
    from fedmm.methods import METHODS

    validate_config(FedmmConfig(), list(METHODS))  # every method's defaults are valid
    for key in ("train.lr", "fed.fraction", "data.alpha", "feddat.temperature"):
        lo = parse_interval(declared_fields()[key].metadata["interval"])[0]
        with pytest.raises(ConfigError, match=key.replace(".", "\\.")):
            validate_config(cfg.with_overrides({key: lo}), list(METHODS))  # open lower bound


# ------------------------------------------------------------------ kind 4: health
def entry(rnd: int, trained: int, sampled: int = 3, scored: int = 3, rejected: int = 0) -> dict:
    return {
        "round": rnd, "seconds": 1.0, "server_seconds": 0.0, "bytes_up": 0, "bytes_down": 0,
        "bytes_eval": 0, "sampled": sampled, "failures": sampled - trained,
        "failed": [{"node": i, "client": f"c{i}", "reason": "x"}
                   for i in range(sampled - trained - rejected)],
        "rejected": [{"node": 9, "client": f"r{i}", "reason": "NaN"} for i in range(rejected)],
        "eval_failed": [], "evaluated": 3,
        "clients": {f"c{i}": {"global": 0.5} for i in range(scored)},
        "train": {f"c{i}": {"steps": 2.0} for i in range(trained)}, "eval": {},
    }  # fmt: skip


def record(*entries: dict, excluded: dict | None = None) -> dict:
    run = {"method": "fedavg", "peft": "adapter", "benchmark": "b", "seed": 0,
           "views": ["global"], "trainable_params": 1, "history": [], "final": {},
           "excluded_clients": excluded or {}}  # fmt: skip
    for e in entries:
        results.add_round(run, e)
    return run


def test_health_counts_trained_evaluated_rejected_and_failed():
    run = record(entry(1, 3), entry(2, 1, rejected=1))
    h = run["health"]
    assert (h["sampled"], h["trained"], h["rejected"], h["failed"]) == (6, 4, 1, 1)
    assert (h["expected"], h["evaluated"], h["status"]) == (6, 6, "partial")
    assert "4/6 client-rounds trained, 6/6 evaluations, 1 rejected, 1 failed" in (
        results.health_line(run)
    )
    assert record(entry(1, 3))["health"]["status"] == "ok"
    assert record(entry(1, 0, rejected=3))["health"]["status"] == "trained nothing"
    assert record(entry(1, 3, scored=0))["health"]["status"] == "evaluated nothing"
    assert results.unhealthy(record(entry(1, 3))) is None
    assert "partial" in results.unhealthy(run)
    assert results.unhealthy(run, allow_partial=True) is None
    assert "trained nothing" in results.unhealthy(record(entry(1, 0)), allow_partial=True)
    summary = results.summary_table({"runs": [run]})
    assert "health: 4/6 client-rounds trained" in summary


def test_excluded_clients_are_left_out_of_every_mean_and_shown_as_n_a():
    e = entry(1, 3)
    e["clients"] = {"c0": {"global": 0.8}, "c1": {"global": 0.4}, "c2": {}}
    run = record(e, excluded={"c2": "0 test rows"})
    assert run["final"] == {"global": pytest.approx(0.6)}
    assert run["health"]["status"] == "ok"  # c2 was never expected to score
    e2 = entry(1, 3)
    e2["clients"] = {"c0": {"global": 0.8}, "c1": {"global": 0.1}, "c2": {"global": math.nan}}
    run = record(e2, excluded={"c1": "0 train rows"})
    assert run["final"] == {"global": pytest.approx(0.8)}  # neither c1 (excluded) nor NaN
    only = entry(1, 3)
    only["clients"] = {"c0": {}}
    run = record(only, excluded={"c0": "0 test rows"})
    assert run["final"] == {}
    table = results.summary_table({"runs": [run]})
    assert "| n/a |" in table and "excluded from every mean (n/a): c0 (0 test rows)" in table


def test_new_run_keeps_loader_notes_and_excluded_clients(tiny_cfg):
    from fedmm.data import load_benchmark

    bench = load_benchmark(tiny_cfg)
    run = results.new_run(tiny_cfg, bench.name, {}, None, ("global",), 1, notes={"dropped": 2})
    assert run["loader_notes"] == {"dropped": 2} and run["excluded_clients"] == {}
    results.attach_notes(run, {"test_unk": 3})
    assert run["loader_notes"] == {"test_unk": 3}
    assert (
        results.new_run(tiny_cfg, bench.name, {}, None, ("global",), 1, bench.notes)["loader_notes"]
        == bench.notes
    )


def fake_run_method(history: list[dict]):
    def run_method(cfg: FedmmConfig, site=None) -> dict:
        from fedmm.data import load_benchmark

        cfg = cfg.resolved()
        bench = load_benchmark(cfg)
        run = results.new_run(
            cfg,
            bench.name,
            {c.client_id: "" for c in bench.clients},
            None,
            ("global",),
            1,
            excluded=bench.excluded,
        )
        for e in history:
            results.add_round(run, e)
        results.save_run(cfg.out_dir, run)
        return run

    return run_method


@pytest.mark.parametrize(
    ("history", "flags", "code", "says"),
    [
        ([entry(1, 0, rejected=3), entry(2, 0, rejected=3)], [], 3, "trained nothing"),
        ([entry(1, 0, rejected=3)], ["--allow-partial"], 3, "trained nothing"),
        ([entry(1, 3, scored=0)], [], 3, "evaluated nothing"),
        ([entry(1, 2, rejected=1)], [], 3, "partial"),
        ([entry(1, 2, rejected=1)], ["--allow-partial"], 0, ""),
        ([entry(1, 3)], [], 0, ""),
    ],
)
def test_cli_exit_status_follows_the_runs_health(
    tiny_cfg, tmp_path, capsys, monkeypatch, history, flags, code, says
):
    import fedmm.engine

    monkeypatch.setattr(fedmm.engine, "run_method", fake_run_method(history))
    out = tmp_path / "out"
    argv = ["run", "--set", "model.backbone=tiny", "--set", f"data.data_dir={tiny_cfg.data.data_dir}",
            "--set", "data.train_per_client=10", "--set", "data.test_per_client=10",
            "--clients", "3", "--out", str(out), *flags]  # fmt: skip
    assert main(argv) == code
    captured = capsys.readouterr()
    assert "health: " in captured.out
    if says:
        assert f"fedavg seed 0 on fmnist-domain: {says}" in captured.err
    assert "health" in (out / "summary.md").read_text()
    assert "health" in results.load(out)["runs"][0]


def test_cli_bench_exit_status_follows_the_runs_health(tiny_cfg, tmp_path, capsys, monkeypatch):
    import fedmm.engine

    monkeypatch.setattr(fedmm.engine, "run_method", fake_run_method([entry(1, 0, rejected=3)]))
    argv = ["bench", "--set", "model.backbone=tiny", "--set", f"data.data_dir={tiny_cfg.data.data_dir}",
            "--set", "data.train_per_client=10", "--set", "data.test_per_client=10",
            "--set", "fed.rounds=1", "--seeds", "0", "--clients", "3",
            "--out", str(tmp_path / "b")]  # fmt: skip
    assert main(argv) == 3
    assert "trained nothing" in capsys.readouterr().err
