"""A real deployment: SuperLink + 3 SuperNodes as OS processes on 127.0.0.1, TLS, node auth.

The sites are directories written by ``fedmm split``; each SuperNode's ``--node-config`` names
its own (``data-dir``), and the ServerApp's run config names none -- it reads the task schema
only.  One federation of 3 rounds (tiny backbone) serves two checks, to keep the suite short:

* rounds 1-2 are fault-free and must equal ``fedmm run --sites`` (Flower's simulation) on the
  same site directories, config and seed: the same accuracies per client and view, training
  losses within 1e-5 relative;
* SuperNode 2 is SIGKILLed as soon as round 2 is recorded (round 3's messages are out): round 3
  must complete with the two others (fed.min_clients = 2), the dead node counted in ``failed``.

A generative federation (``tiny-gen``, text targets, issue 26) runs FedAvg for 2 rounds and must
equal its simulation, with only the LoRA set and the projector in each reply.

A further federation runs FedAvg under SecAgg+ (``fed.secure_aggregation = "secagg+"``, issue
25) for 2 rounds: every round passes the four stages with 3 survivors and equals the simulation.

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
from fedmm.federation import secagg

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


def split_sites(cfg, tmp_path: Path, keys: tuple[str, ...] = ()) -> Path:
    """``fedmm split`` of fmnist-domain into 3 site directories with ``cfg``'s data sizes (and
    the options ``keys``)."""
    flat = cfg.to_flat()
    sites = tmp_path / "sites"
    split = ["split", "--benchmark", "fmnist-domain", "--clients", "3", "--out", str(sites)]
    for key in ("model.backbone", "model.image_size", "data.train_per_client",
                "data.test_per_client", *keys):  # fmt: skip
        split += ["--set", f"{key}={flat[key]}"]
    assert main(split) == 0
    return sites


def deploy(cfg, sites: Path, tmp_path: Path, extra: list[str], keys: tuple[str, ...]) -> dict:
    """``fedmm deploy`` (SuperLink + 3 SuperNodes, TLS, node auth) of ``cfg`` on ``sites``; the
    run config options ``keys`` are passed with ``--set``.  Returns results.json's run."""
    flat = cfg.to_flat()
    args = ["deploy", "--method", cfg.method, "--out", cfg.out_dir, "--sites", str(sites),
            "--seed", str(cfg.seed), "--rounds", str(cfg.fed.rounds),
            "--workdir", str(tmp_path / "deployment"), *extra]  # fmt: skip
    for key in ("model.backbone", "model.image_size", "train.local_steps", "train.batch_size",
                "train.threads", "progress", *keys):  # fmt: skip
        args += ["--set", f"{key}={flat[key]}"]
    assert main(args) == 0
    deployed = json.loads((Path(cfg.out_dir) / "results.json").read_text())["runs"][0]
    # the ServerApp's run config held no site path: it could not have read any site's data
    assert deployed["config"]["data.data_dir"] == "" and deployed["config"]["cache_dir"] == ""
    return deployed


def simulate(cfg, sites: Path, tmp_path: Path) -> dict:
    """``fedmm run --sites``: Flower's simulation of ``cfg`` on the same site directories."""
    return run_method(cfg.with_overrides({"data.benchmark": "sites", "data.data_dir": str(sites),
                                          "out_dir": str(tmp_path / "simulated")}))  # fmt: skip


def assert_warm_workers(tmp_path: Path, sites: tuple[int, ...], messages: int) -> None:
    """The warm worker (deploy/supernode_process.py): each of ``sites`` built its model once for
    the run's ``messages``+ messages, in one long-lived ClientApp process."""
    for k in sites:
        site_log = (tmp_path / "deployment" / f"supernode-{k}.log").read_text()
        assert site_log.count("warm worker for run") == 1, site_log[-3000:]
        assert site_log.count("fedmm.runtime: built model") == 1, site_log[-3000:]
        assert site_log.count("-> trusted ClientApp, warm worker") >= messages


@needs_flower
def test_deployment_with_tls_and_auth_matches_simulation_and_survives_a_killed_node(
    tiny_cfg, tmp_path
):
    cfg = tiny_cfg.with_overrides({
        "method": "feddat", "fed.rounds": 3, "fed.min_clients": 2, "fed.round_timeout": 90.0,
        "seed": 3, "out_dir": str(tmp_path / "deployed"), "train.threads": 1,
    })  # fmt: skip
    sites = split_sites(cfg, tmp_path)
    # a site is killed on purpose, so round 3 is partial: --allow-partial keeps exit 0
    extra = ["--kill-node", "2", "--kill-after-round", "2", "--timeout", "480", "--allow-partial"]
    deployed = deploy(cfg, sites, tmp_path, extra, ("fed.min_clients", "fed.round_timeout"))
    simulated = simulate(cfg, sites, tmp_path)

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
    assert_warm_workers(tmp_path, (0, 1), 6)
    # the TLS + auth material the deployment used
    certs = tmp_path / "deployment" / "certs"
    assert (certs / "ca.crt").is_file() and (certs / "supernode-2.pub").is_file()
    assert (certs / "supernode-0").stat().st_mode & 0o077 == 0  # private keys are 0600


@needs_flower
def test_secure_aggregation_deployed_with_tls_and_auth_matches_simulation(tiny_cfg, tmp_path):
    """SecAgg+ (issue 25) on the deployment runtime: 2 FedAvg rounds, 3 SuperNodes through the
    sites' own executor.  Every round passes all four stages with 3 survivors, and the result
    equals Flower's simulation of the same secure run.  Flower's ``quantize`` rounds with
    NumPy's global RNG (unseeded, per process), so the two aggregates may differ by less than
    one step 2c/Q = 1.2e-7 per coordinate (docs/secure-aggregation.md): the accuracies are
    compared at 1e-6 and the losses at 1e-5 relative, as in the plain deployment test."""
    cfg = tiny_cfg.with_overrides({
        "method": "fedavg", "fed.rounds": 2, "fed.secure_aggregation": "secagg+",
        "fed.round_timeout": 120.0, "seed": 3, "out_dir": str(tmp_path / "deployed"),
        "train.threads": 1,
    })  # fmt: skip
    sites = split_sites(cfg, tmp_path)
    deployed = deploy(cfg, sites, tmp_path, ["--timeout", "600"],
                      ("fed.secure_aggregation", "fed.round_timeout"))  # fmt: skip
    simulated = simulate(cfg, sites, tmp_path)

    assert deployed["config"]["fed.secure_aggregation"] == "secagg+"
    hist_d, hist_s = deployed["history"], simulated["history"]
    assert [h["round"] for h in hist_d] == [h["round"] for h in hist_s] == [1, 2]
    for d, s in zip(hist_d, hist_s):
        assert d["skipped"] == "" and d["failures"] == 0 and not d["failed"], d
        assert d["secagg"]["survivors"] == 3 and d["secagg"]["dropped"] == 0, d["secagg"]
        assert all(d["secagg"][stage] == 3 for stage in secagg.STAGES), d["secagg"]
        assert d["secagg"]["bytes_up"] > 0
        assert s["secagg"]["survivors"] == 3
        assert sorted(d["train"]) == sorted(s["train"]) == ["0-original", "1-inverted", "2-blurred"]
        for stats_ in d["train"].values():  # nothing per site but its time leaves
            assert set(stats_) <= {"seconds", "load-seconds"}
        assert d["clients"].keys() == s["clients"].keys()
        for client, views in d["clients"].items():
            assert views == pytest.approx(s["clients"][client], abs=1e-6)
    for view, accuracy in simulated["final"].items():
        assert deployed["final"][view] == pytest.approx(accuracy, abs=1e-6), view
    assert simulated["final"]["shared"] > 0.2  # it learned (chance: 0.1)
    # 2 rounds x 4 SecAgg+ stages + evaluation, every message in the one warm worker per site
    assert_warm_workers(tmp_path, (0, 1, 2), 8)


@needs_flower
def test_generative_federation_deployed_matches_simulation(tiny_cfg, tmp_path):
    """A generative model (tiny-gen: projector + LoRA on a causal LM, answers decoded) on the
    deployment runtime: sites split as generation, 2 FedAvg rounds through the sites' own
    executor, equal to Flower's simulation of the same site directories."""
    gen = {"model.backbone": "tiny-gen", "data.task_kind": "generate", "peft.type": "lora",
           "model.max_text_len": 96, "eval.max_new_tokens": 8}  # fmt: skip
    cfg = tiny_cfg.with_overrides({
        **gen, "method": "fedavg", "fed.rounds": 2, "fed.round_timeout": 120.0, "seed": 3,
        "out_dir": str(tmp_path / "deployed"), "train.threads": 1,
    })  # fmt: skip
    sites = split_sites(cfg, tmp_path, ("data.task_kind",))
    keys = ("peft.type", "model.max_text_len", "eval.max_new_tokens", "fed.round_timeout")
    deployed = deploy(cfg, sites, tmp_path, ["--timeout", "600"], keys)
    simulated = simulate(cfg, sites, tmp_path)

    hist_d, hist_s = deployed["history"], simulated["history"]
    assert [h["round"] for h in hist_d] == [h["round"] for h in hist_s] == [1, 2]
    for d, s in zip(hist_d, hist_s):
        assert d["failures"] == 0 and not d["failed"] and not d["rejected"], d
        assert d["clients"].keys() == s["clients"].keys()
        for client, views in d["clients"].items():
            assert views == pytest.approx(s["clients"][client], abs=1e-6)
            assert "shared.f1" in views  # scored by generation
        for client, stats in d["train"].items():
            assert stats["loss"] == pytest.approx(s["train"][client]["loss"], rel=1e-5)
            assert stats["bytes_up"] == s["train"][client]["bytes_up"]
