"""A real deployment: SuperLink + 3 SuperNodes as OS processes on 127.0.0.1, TLS, node auth.

The sites are directories written by ``fedmm split``; each SuperNode's ``--node-config`` names
its own (``data-dir``), and the ServerApp's run config names none -- it reads the task schema
only.  One federation of 3 rounds (tiny backbone) serves two checks, to keep the suite short:

* rounds 1-2 are fault-free and must equal ``fedmm run --sites`` (Flower's simulation) on the
  same site directories, config and seed: the same accuracies per client and view, training
  losses within 1e-5 relative;
* SuperNode 2 is SIGKILLed as soon as round 2 is recorded (round 3's messages are out): round 3
  must complete with the two others (fed.min_clients = 2), the dead node counted in ``failed``.

Every process is started in its own process group and killed in ``finally``; ports are free
ones on 127.0.0.1; every wait is bounded.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fedmm.cli import main
from fedmm.engine import run_method

FLOWER = Path(sys.executable).parent / "flower-superlink"
needs_flower = pytest.mark.skipif(
    not FLOWER.exists() and shutil.which("flower-superlink") is None,
    reason="Flower's deployment CLIs are not installed",
)


def test_certs_command_makes_a_ca_signed_server_cert_and_private_node_keys(tmp_path, capsys):
    out = tmp_path / "certs"
    assert (
        main(["certs", "--out", str(out), "--supernodes", "2", "--hosts", "link.example,10.1.2.3"])
        == 0
    )
    assert "register" in capsys.readouterr().out
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["link.example"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.1.2.3"]
    for k in range(2):
        key = serialization.load_ssh_private_key((out / f"supernode-{k}").read_bytes(), None)
        assert key.curve.name == "secp384r1"  # Flower accepts NIST EC curves only
        assert (out / f"supernode-{k}").stat().st_mode & 0o077 == 0
        assert (out / f"supernode-{k}.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    assert (out / "server.key").stat().st_mode & 0o077 == 0


@needs_flower
def test_deployment_with_tls_and_auth_matches_simulation_and_survives_a_killed_node(
    tiny_cfg, tmp_path
):
    cfg = tiny_cfg.with_overrides({
        "method": "feddat", "fed.rounds": 3, "fed.min_clients": 2, "fed.round_timeout": 90.0,
        "seed": 3, "out_dir": str(tmp_path / "deployed"), "train.threads": 1,
    })  # fmt: skip
    flat = cfg.to_flat()
    sites = tmp_path / "sites"
    split = ["split", "--benchmark", "fmnist-domain", "--clients", "3", "--out", str(sites)]
    for key in ("model.backbone", "model.image_size", "data.train_per_client",
                "data.test_per_client"):  # fmt: skip
        split += ["--set", f"{key}={flat[key]}"]
    assert main(split) == 0
    # a site is killed on purpose, so round 3 is partial: --allow-partial keeps exit 0
    args = ["deploy", "--method", "feddat", "--out", cfg.out_dir, "--sites", str(sites),
            "--seed", "3", "--rounds", "3", "--workdir", str(tmp_path / "deployment"),
            "--kill-node", "2", "--kill-after-round", "2", "--timeout", "480",
            "--allow-partial"]  # fmt: skip
    for key in ("model.backbone", "model.image_size", "train.local_steps", "train.batch_size",
                "train.threads", "progress", "fed.min_clients", "fed.round_timeout"):  # fmt: skip
        args += ["--set", f"{key}={flat[key]}"]
    assert main(args) == 0
    deployed = json.loads((tmp_path / "deployed" / "results.json").read_text())["runs"][0]
    # the ServerApp's run config held no site path: it could not have read any site's data
    assert deployed["config"]["data.data_dir"] == "" and deployed["config"]["cache_dir"] == ""
    site_cfg = cfg.with_overrides({"data.benchmark": "sites", "data.data_dir": str(sites),
                                   "out_dir": str(tmp_path / "simulated")})  # fmt: skip
    simulated = run_method(site_cfg)

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
    # the warm worker (deploy/supernode_process.py): a site that served every round built its
    # model once for the run's 6+ messages, in one long-lived ClientApp process
    for k in (0, 1):
        site_log = (tmp_path / "deployment" / f"supernode-{k}.log").read_text()
        assert site_log.count("warm worker for run") == 1, site_log[-3000:]
        assert site_log.count("fedmm.runtime: built model") == 1, site_log[-3000:]
        assert site_log.count("-> trusted ClientApp, warm worker") >= 6
    # the TLS + auth material the deployment used
    certs = tmp_path / "deployment" / "certs"
    assert (certs / "ca.crt").is_file() and (certs / "supernode-2.pub").is_file()
    assert (certs / "supernode-0").stat().st_mode & 0o077 == 0  # private keys are 0600
