"""A round's budget in local epochs (``train.local_epochs``): its validation, the steps each client
takes from its own data, the same for every method, and the default a user's data gets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedmm.cli import main
from fedmm.cli.options import resolve_config
from fedmm.cli.parser import build_parser
from fedmm.config import ConfigError, FedmmConfig
from fedmm.engine import run_method
from fedmm.sections import TrainConfig, steps_per_round
from fedmm.validate import validate_config


@pytest.mark.parametrize("epochs, n, batch, accumulation, steps", [
    (0.0, 100, 32, 1, 15),  # off: train.local_steps
    (1.0, 100, 32, 1, 4),  # ceil(100 / 32)
    (0.5, 100, 32, 1, 2),  # ceil(50 / 32)
    (2.0, 100, 32, 1, 7),  # ceil(200 / 32)
    (1.0, 100, 32, 2, 2),  # an optimiser step reads batch x accumulation records
    (1.0, 3, 32, 1, 1),  # fewer records than a batch: still one step
    (1.0, 0, 32, 1, 0),  # no records: nothing to train on
])  # fmt: skip
def test_steps_per_round_are_epochs_over_the_clients_own_records(
    epochs, n, batch, accumulation, steps
):
    train = TrainConfig(local_epochs=epochs, batch_size=batch, accumulation=accumulation)
    assert steps_per_round(train, n) == steps


def test_local_steps_and_local_epochs_are_exclusive():
    with pytest.raises(ConfigError, match="train.local_steps=4 and train.local_epochs=1 are both"):
        validate_config(FedmmConfig().with_overrides({"train.local_steps": 4,
                                                      "train.local_epochs": 1}))  # fmt: skip
    with pytest.raises(ConfigError, match="train.local_epochs"):
        validate_config(FedmmConfig().with_overrides({"train.local_epochs": -1}))
    validate_config(FedmmConfig().with_overrides({"train.local_epochs": 1.5}))  # alone: fine


def write_byo(root: Path, per_client: tuple[int, ...]) -> Path:
    """A jsonl directory: client k holds ``per_client[k]`` training records and 2 test records."""
    (root / "img").mkdir(parents=True)
    for i in range(4):
        Image.fromarray(np.full((12, 12, 3), 40 * i, np.uint8)).save(root / "img" / f"{i}.png")

    def rows(client: int, n: int, tag: str) -> list[str]:
        return [json.dumps({"image": f"img/{(i + client) % 4}.png", "text": f"{tag}{i}",
                            "answer": ["yes", "no"][(i + client) % 2], "client": client})
                for i in range(n)]  # fmt: skip

    train = [r for k, n in enumerate(per_client) for r in rows(k, n, "q")]
    test = [r for k in range(len(per_client)) for r in rows(k, 2, "t")]
    (root / "train.jsonl").write_text("\n".join(train) + "\n")
    (root / "test.jsonl").write_text("\n".join(test) + "\n")
    return root


def cli_config(*argv: str) -> FedmmConfig:
    cfgs, _ = resolve_config(build_parser().parse_args(["run", *argv]))
    return cfgs[0]


def test_a_users_data_trains_one_epoch_a_round_for_20_rounds_unless_told(tmp_path):
    root = write_byo(tmp_path / "byo", (12, 6))
    data = ["--benchmark", "jsonl", "--clients", "2", "--set", f"data.data_dir={root}"]
    cfg = cli_config(*data)
    assert (cfg.train.local_epochs, cfg.fed.rounds) == (1.0, 20)
    cfg = cli_config(*data, "--set", "train.local_steps=4", "--rounds", "3")  # stated: kept
    assert (cfg.train.local_epochs, cfg.train.local_steps, cfg.fed.rounds) == (0.0, 4, 3)
    cfg = cli_config(*data, "--set", "train.local_epochs=2")
    assert (cfg.train.local_epochs, cfg.fed.rounds) == (2.0, 20)
    builtin = cli_config("--benchmark", "fmnist-domain")  # the built-in benchmarks: unchanged
    assert (builtin.train.local_epochs, builtin.train.local_steps, builtin.fed.rounds) == (
        0.0, 15, 5)  # fmt: skip
    with pytest.raises(ConfigError, match="both set"):
        cli_config(*data, "--set", "train.local_steps=15", "--set", "train.local_epochs=1")


def test_run_refuses_both_budgets_with_exit_2(tmp_path, capsys):
    assert main(["run", "--set", "train.local_steps=15", "--set", "train.local_epochs=1",
                 "--out", str(tmp_path)]) == 2  # fmt: skip
    assert "train.local_steps and train.local_epochs are both set" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["fedavg", "ditto", "feddat", "scaffold"])
def test_every_method_takes_each_clients_epoch_steps_and_centralized_their_sum(tmp_path, method):
    """Clients of 12 and 6 records, batch 4, 1 epoch: 3 and 2 steps a round in every method
    (Ditto: each of its two updates); the centralised baseline 3 + 2 = 5."""
    root = write_byo(tmp_path / "byo", (12, 6))
    cfg = FedmmConfig().with_overrides({
        "data.benchmark": "jsonl", "data.data_dir": str(root), "fed.clients": 2,
        "model.backbone": "tiny", "model.image_size": 16, "train.batch_size": 4,
        "train.local_epochs": 1, "fed.rounds": 1, "progress": False,
        "out_dir": str(tmp_path / "out"), "method": method,
    })  # fmt: skip
    run = run_method(cfg)
    train = run["history"][0]["train"]
    assert {c: t["steps"] for c, t in train.items()} == {"0": 3, "1": 2}
    if method == "ditto":  # its personal update: the same budget again
        assert {c: t["personal_steps"] for c, t in train.items()} == {"0": 3, "1": 2}
    central = run_method(cfg.with_overrides({"method": "centralized"}))
    assert central["history"][0]["train"]["pooled"]["steps"] == 5


def test_a_site_caps_an_epoch_budget_once_it_knows_its_rows():
    """With ``train.local_epochs`` the step count is the site's own (its rows): ``check_caps``
    leaves it to ``check_steps``, which refuses more micro-batches than ``max-local-steps``."""
    from fedmm.federation import consent
    from fedmm.federation.site import SiteSettings

    settings = SiteSettings.from_node_config({"max-local-steps": 20})
    cfg = FedmmConfig().with_overrides({"train.local_epochs": 1, "train.accumulation": 2})
    consent.check_caps(cfg, settings)  # 15 x 2 local steps are not this run's budget
    consent.check_steps(cfg, 10, settings)  # 10 steps x 2 = 20 micro-batches: the limit
    with pytest.raises(consent.NotAccepted, match=r"train.local_epochs=1.0: 11 steps x "
                       r"train.accumulation=2 .* = 22 micro-batches.*max-local-steps=20"):  # fmt: skip
        consent.check_steps(cfg, 11, settings)
    with pytest.raises(
        consent.NotAccepted, match=r"train.local_steps x train.accumulation=30.*max-local-steps=20"
    ):  # steps: checked before
        consent.check_caps(FedmmConfig().with_overrides({"train.accumulation": 2}), settings)
