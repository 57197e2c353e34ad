"""A real deployment: SuperLink + 3 SuperNodes as OS processes on 127.0.0.1, TLS, node auth.

One federation of 3 rounds (tiny backbone) serves two checks, to keep the suite short:

* rounds 1-2 are fault-free and must equal the Flower simulation (Ray) of the same config and
  seed: the same accuracies per client and view, training losses within 1e-5 relative;
* SuperNode 2 is SIGKILLed as soon as round 2 is recorded (round 3's messages are out): round 3
  must complete with the two others (fed.min_clients = 2), the dead node counted in ``failed``.

Every process is started in its own process group and killed in ``finally``; ports are free
ones on 127.0.0.1; every wait is bounded.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from fedmm.deploy import launch
from fedmm.engine import run_method

FLOWER = Path(sys.executable).parent / "flower-superlink"
pytestmark = pytest.mark.skipif(
    not FLOWER.exists() and shutil.which("flower-superlink") is None,
    reason="Flower's deployment CLIs are not installed",
)


def test_deployment_with_tls_and_auth_matches_simulation_and_survives_a_killed_node(
    tiny_cfg, tmp_path
):
    cfg = tiny_cfg.with_overrides({
        "method": "feddat", "fed.rounds": 3, "fed.min_clients": 2, "fed.round_timeout": 45.0,
        "seed": 3, "out_dir": str(tmp_path / "deployed"),
    })  # fmt: skip
    deployed = launch.deploy_and_run(
        cfg, tmp_path / "deployment", kill_node=2, kill_after_round=2, timeout=480
    )
    simulated = run_method(cfg.with_overrides({"out_dir": str(tmp_path / "simulated")}))

    hist_d, hist_s = deployed["history"], simulated["history"]
    assert [h["round"] for h in hist_d] == [1, 2, 3]
    for d, s in zip(hist_d[:2], hist_s[:2]):  # fault-free rounds: the same federation
        assert d["failures"] == 0 and not d["failed"] and not d["rejected"]
        assert d["clients"].keys() == s["clients"].keys()
        for client, views in d["clients"].items():
            assert views == pytest.approx(s["clients"][client], abs=1e-6)
        for client, stats in d["train"].items():
            assert stats["loss"] == pytest.approx(s["train"][client]["loss"], rel=1e-5)
            assert stats["bytes_up"] == s["train"][client]["bytes_up"]

    last = hist_d[2]  # SuperNode 2 is dead: the round completes with the others
    dead = [f for f in last["failed"] if f["client"] == "2-blurred"]
    assert len(dead) == 1, last["failed"]  # either Flower's "Node Unavailable" or our timeout
    assert all(f["client"] for f in last["failed"])  # every failure names its client
    assert "2-blurred" not in last["train"] and len(last["train"]) >= 2
    assert last["failures"] == last["sampled"] - len(last["train"])
    assert {"0-original", "1-inverted"} <= set(last["clients"])
    # the TLS + auth material the deployment used
    certs = tmp_path / "deployment" / "certs"
    assert (certs / "ca.crt").is_file() and (certs / "supernode-2.pub").is_file()
    assert (certs / "supernode-0").stat().st_mode & 0o077 == 0  # private keys are 0600
