"""Configuration and command line: defaults, overrides, clear errors."""

from __future__ import annotations

import pytest

from fedmm.cli import main
from fedmm.config import ConfigError, FedmmConfig, load_toml, parse_set


def test_overrides_coerce_types_and_reject_unknown_keys():
    cfg = FedmmConfig().with_overrides({"train.lr": "5e-4", "fed.rounds": "3", "progress": "false"})
    assert cfg.train.lr == 5e-4 and cfg.fed.rounds == 3 and cfg.progress is False
    assert FedmmConfig().train.lr == 1e-3  # the original is untouched
    with pytest.raises(ConfigError, match="valid keys: .*train.lr"):
        FedmmConfig().with_overrides({"train.lrr": 1})
    with pytest.raises(ConfigError, match="expects a int"):
        FedmmConfig().with_overrides({"fed.rounds": "many"})
    assert FedmmConfig.from_json(cfg.to_json()) == cfg


def test_toml_and_set_parsing(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('method = "feddat"\n[train]\nlr = 0.01\n[feddat]\ntemperature = 2.0\n')
    flat = load_toml(path)
    assert flat == {"method": "feddat", "train.lr": 0.01, "feddat.temperature": 2.0}
    assert parse_set(["a.b=1"]) == {"a.b": "1"}
    with pytest.raises(ConfigError, match="key=value"):
        parse_set(["oops"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_toml(tmp_path / "none.toml")


def test_cli_rejects_unknown_names_with_choices(capsys):
    assert main(["run", "--method", "fedavg,fedmagic"]) == 2
    assert "fedmagic" in capsys.readouterr().err
    assert main(["run", "--benchmark", "nope"]) == 2
    assert "choices: fmnist-caption, fmnist-domain" in capsys.readouterr().err
    assert main(["run", "--set", "train.nope=1"]) == 2
    assert "valid keys" in capsys.readouterr().err
    assert main(["run", "--peft", "ia3"]) == 2
    assert "choices: adapter, lora, prompt, bitfit" in capsys.readouterr().err


def test_cli_rejects_a_senseless_method_peft_pair_before_running_anything(capsys, tmp_path):
    out = tmp_path / "never"
    assert main(["run", "--method", "fedavg,fedpia", "--peft", "bitfit", "--out", str(out)]) == 2
    assert "fedpia aligns hidden units" in capsys.readouterr().err
    assert not out.exists()  # fedavg did not run first


def test_cli_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "feddat" in out and "fmnist-function" in out and "train.local_steps" in out


def test_flower_app_config_in_pyproject_lists_every_option():
    """`flwr run --run-config` only accepts keys declared in [tool.flwr.app.config]."""
    import tomllib
    from pathlib import Path

    from fedmm.config import flatten, flwr_app_config

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    declared = flatten(tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]["config"])
    assert declared == FedmmConfig().to_flat()
    # generated, never edited by hand: run `python scripts/flwr_app_config.py --write`
    assert flwr_app_config() in pyproject.read_text()
    assert flatten(tomllib.loads(flwr_app_config())["tool"]["flwr"]["app"]["config"]) == declared
    components = tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]["components"]
    assert components == {"serverapp": "fedmm.federation.serverapp:app",
                          "clientapp": "fedmm.federation.clientapp:app"}  # fmt: skip


def test_cli_reports_bad_sizes_and_unreadable_results_without_running(tiny_cfg, tmp_path, capsys):
    common = ["run", "--set", "model.backbone=tiny", "--set", f"data.data_dir={tiny_cfg.data.data_dir}",
              "--set", "data.train_per_client=10", "--set", "data.test_per_client=10"]  # fmt: skip
    assert main([*common, "--clients", "100", "--out", str(tmp_path / "a")]) == 2
    assert "exceeds Fashion-MNIST" in capsys.readouterr().err
    bad = tmp_path / "b"
    bad.mkdir()
    (bad / "results.json").write_text("{not json")
    assert main([*common, "--out", str(bad)]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert (bad / "results.json").read_text() == "{not json"  # left as it was


def test_an_error_while_running_is_not_reported_as_refused(tiny_cfg, tmp_path, capsys, monkeypatch):
    """The exit status says whether anything ran: an option refused before the run exits 2, an
    error after the run started (out of memory is a RuntimeError) exits 4 (cli's docstring)."""
    import fedmm.engine
    from fedmm.cli.commands import EXIT_FAILED, EXIT_REFUSED

    started = []

    def out_of_memory(cfg, site=None):
        started.append(cfg.method)
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(fedmm.engine, "run_method", out_of_memory)
    common = ["run", "--set", "model.backbone=tiny", "--set", f"data.data_dir={tiny_cfg.data.data_dir}",
              "--set", "data.train_per_client=10", "--set", "data.test_per_client=10",
              "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(common) == EXIT_FAILED == 4
    assert started == ["fedavg"] and "out of memory" in capsys.readouterr().err
    assert main([*common, "--set", "train.lr=-1"]) == EXIT_REFUSED == 2
    assert started == ["fedavg"]  # refused: nothing ran
