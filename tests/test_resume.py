"""Server checkpoints: a run interrupted mid-round and resumed ends exactly like one never stopped.

The interruption is in-process: the grid raises while round 3 is being evaluated, after every
sampled client has trained round 3 and written its state (the worst moment: clients are a round
ahead of the server's checkpoint).  The resumed server starts with fresh node Contexts, as
restarted SuperNodes would, so clients come back from their files on disk.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import bound_method, run_federation
from flwr.app import MessageType
from test_serverapp import InProcessGrid

from fedmm.cli import main
from fedmm.config import ConfigError
from fedmm.engine import prepare, rehearsal_sites
from fedmm.federation import checkpoint
from fedmm.methods import Reply

pytestmark = pytest.mark.usefixtures("flower_task_identity")


class Interrupted(RuntimeError):
    pass


class CrashingGrid(InProcessGrid):
    """Raises (the server 'dies') when asked to evaluate round ``crash_round``."""

    def __init__(self, n: int, crash_round: int, sites: dict | None = None) -> None:
        super().__init__(n, sites=sites)
        self.crash_round = crash_round

    def send_and_receive(self, messages, *, timeout=None):
        first = messages[0]
        rnd = int(first.content["config"]["round"])
        if first.metadata.message_type == MessageType.EVALUATE and rnd == self.crash_round:
            raise Interrupted(f"server killed in round {rnd}")
        return super().send_and_receive(messages, timeout=timeout)


def rounds(record: dict) -> list[dict]:
    keep = ("round", "clients", "sampled", "failures", "bytes_up")
    return [{k: h[k] for k in keep} | {"loss": {c: s["loss"] for c, s in h["train"].items()}}
            for h in record["history"]]  # fmt: skip


def test_interrupted_then_resumed_equals_uninterrupted(tiny_cfg):
    """FedAdam: server state (moments) and client sampling must resume exactly; FedDAT's client
    state (A_c) across a restart is the CLI test's below."""
    method = "fedadam"
    cfg = tiny_cfg.with_overrides({"method": method, "fed.rounds": 3, "fed.fraction": 0.67})
    full = run_federation(InProcessGrid(3), cfg.with_overrides({"out_dir": cfg.out_dir + "-full"}))

    with pytest.raises(Interrupted):
        run_federation(CrashingGrid(3, crash_round=3), cfg)
    saved = checkpoint.load(cfg)
    assert saved is not None and saved.round == 2 and len(saved.record["history"]) == 2
    # the server optimiser's moments are part of the checkpoint
    assert saved.server_state and all(k[:2] in ("m/", "v/") for k in saved.server_state)
    resumed = run_federation(InProcessGrid(3), cfg.with_overrides({"resume": True}))

    assert [h["round"] for h in resumed["history"]] == [1, 2, 3]
    assert rounds(resumed) == rounds(full)  # bit-for-bit: every accuracy and loss, every round
    assert resumed["final"] == full["final"]
    on_disk = json.loads((Path(cfg.out_dir) / "results.json").read_text())["runs"][0]
    assert on_disk["final"] == full["final"]


def test_resume_without_checkpoint_is_refused_and_other_configs_too(tiny_cfg):
    cfg = tiny_cfg.with_overrides({"method": "fedavg", "fed.rounds": 1})
    with pytest.raises(ConfigError, match="no checkpoint"):  # never a silent fresh run
        run_federation(InProcessGrid(3), cfg.with_overrides({"resume": True}))
    record = run_federation(InProcessGrid(3), cfg)
    assert len(record["history"]) == 1
    with pytest.raises(ConfigError, match="train.lr"):
        checkpoint.load(cfg.with_overrides({"train.lr": 0.5}))
    again = run_federation(InProcessGrid(3), cfg.with_overrides({"resume": True}))
    assert again["history"] == json.loads(json.dumps(record["history"]))  # nothing left to do


def test_fedadam_server_state_round_trips(tiny_cfg):
    method = bound_method(tiny_cfg.with_overrides({"method": "fedadam"}))
    method.m, method.v = {"a": np.ones(3)}, {"a": np.full(3, 2.0)}
    other = bound_method(tiny_cfg.with_overrides({"method": "fedadam"}))
    other.load_server_state(method.server_state())
    assert np.array_equal(other.m["a"], method.m["a"]) and np.array_equal(
        other.v["a"], method.v["a"]
    )
    with pytest.raises(ValueError):
        bound_method(tiny_cfg).load_server_state({"m/a": np.ones(1)})


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedavgm"])
def test_server_optimiser_state_survives_a_checkpoint(tiny_cfg, name):
    """FedAdam's / FedYogi's moments and FedAvgM's momentum: a server restored from
    ``server_state`` takes the same next step as the one that never stopped."""
    method = bound_method(tiny_cfg.with_overrides({"method": name}))
    theta = {"w": np.array([1.0], dtype=np.float32)}
    method.aggregate(theta, [Reply(0, {"w": np.array([3.0], np.float32)}, 1)])
    other = bound_method(tiny_cfg.with_overrides({"method": name}))
    other.load_server_state(method.server_state())
    step = [Reply(0, {"w": np.array([2.0], np.float32)}, 1)]
    np.testing.assert_array_equal(
        method.aggregate(theta, step)["w"], other.aggregate(theta, step)["w"]
    )


def test_cli_resume_continues_in_the_flower_simulation(tiny_cfg, capsys):
    """`fedmm run --resume DIR` picks the checkpoint up and finishes the run on the Ray runtime."""
    cfg = tiny_cfg.with_overrides({"method": "feddat", "fed.rounds": 3})
    full = run_federation(InProcessGrid(3), cfg.with_overrides({"out_dir": cfg.out_dir + "-full"}))
    sites = rehearsal_sites(prepare(cfg))  # the sites keep their state where the simulation does
    with pytest.raises(Interrupted):
        run_federation(CrashingGrid(3, crash_round=3, sites=sites), cfg)
    assert main(["run", "--resume", cfg.out_dir, "--set", "progress=false"]) == 0
    assert "resuming feddat" in capsys.readouterr().out
    run = json.loads((Path(cfg.out_dir) / "results.json").read_text())["runs"][0]
    assert rounds(run) == rounds(full)
    # the client state on disk is round 3's, with round 2's kept beside it
    (state,) = (Path(cfg.out_dir) / "client_state" / "site-0" / "0-original").glob(
        f"feddat-adapter-{cfg.data.benchmark}-seed0-{run['run_id']}"
    )
    assert torch.load(state / "client.pt", weights_only=True)["round"] == 3
    assert torch.load(state / "client.pt.prev", weights_only=True)["round"] == 2
    assert main(["run", "--resume", str(Path(cfg.out_dir) / "nothing-here")]) == 2
