"""A run's identity (``fedmm.runkey.RunKey``): one value every module matches runs by."""

from __future__ import annotations

import json

import pytest

from fedmm.config import FedmmConfig
from fedmm.deploy import launch
from fedmm.runkey import RunKey


def stored(method, benchmark, seed=0, peft="adapter", variant="", rounds=2) -> dict:
    return {"method": method, "variant": variant, "peft": peft, "benchmark": benchmark,
            "seed": seed, "views": [], "view_aliases": {}, "final": {},
            "history": [{"round": r + 1, "clients": {}} for r in range(rounds)]}  # fmt: skip


def test_the_key_of_a_stored_run_and_of_its_config_agree():
    cfg = FedmmConfig().with_overrides({"method": "feddat", "seed": 3, "peft.type": "lora"})
    assert RunKey.of_config(cfg) == RunKey.of_run(stored("feddat", "fmnist-domain", 3, "lora"))
    old = {"method": "fedavg", "benchmark": "b", "seed": 1, "config": {"variant": "v"}}
    assert RunKey.of_run(old) == RunKey("fedavg", "v", "adapter", "b", 1)  # older results.json


@pytest.mark.parametrize(
    "other",
    [stored("fedavg", "fmnist-task"),  # same method, seed and PEFT: another benchmark
     stored("fedavg", "fmnist-domain", variant="fedavg-x")],  # another variant
)  # fmt: skip
def test_deploy_never_takes_another_benchmarks_or_variants_run_as_its_own(tmp_path, other):
    """``fedmm deploy`` into an --out holding the same method and seed on another benchmark (or
    variant) used to return that old run as its result and count its rounds as done."""
    (tmp_path / "results.json").write_text(json.dumps({"runs": [other]}))
    cfg = FedmmConfig().with_overrides({"method": "fedavg", "fed.rounds": 2,
                                        "out_dir": str(tmp_path)})  # fmt: skip
    assert launch._rounds_done(tmp_path, cfg) == 0
    with pytest.raises(RuntimeError, match="did not complete"):
        launch._finished_run(cfg, tmp_path)
    mine = stored("fedavg", "fmnist-domain")
    (tmp_path / "results.json").write_text(json.dumps({"runs": [other, mine]}))
    assert launch._rounds_done(tmp_path, cfg) == 2
    assert launch._finished_run(cfg, tmp_path)["benchmark"] == "fmnist-domain"


def test_the_clis_help_and_the_run_identity_load_no_torch():
    """``fedmm --help`` used to import torch (cli.py took the string "sites" from runtime.py)."""
    import subprocess
    import sys

    code = ("import sys, contextlib\nimport fedmm.cli, fedmm.runkey, fedmm.results\n"
            "with contextlib.suppress(SystemExit):\n    fedmm.cli.main(['--help'])\n"
            "with contextlib.suppress(SystemExit):\n    fedmm.cli.main(['site', '--help'])\n"
            "print('torch loaded:', 'torch' in sys.modules)\n")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("torch loaded: False"), out.stdout[-300:]
