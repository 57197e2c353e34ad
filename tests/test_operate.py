"""Operating a deployment: the site runner, TLS mismatches, a SuperLink that restarts with its
database, resuming with the run's own options.  Everything on 127.0.0.1, bounded in time, every
process ended."""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import sys
import threading
from pathlib import Path

import pytest
from conftest import run_federation
from test_resume import CrashingGrid, Interrupted
from test_serverapp import InProcessGrid

from fedmm.cli import main
from fedmm.config import ConfigError
from fedmm.deploy import certs, launch
from fedmm.deploy.site import SiteConfig, classify, probe_tls, run_site
from fedmm.federation import checkpoint

pytestmark = pytest.mark.usefixtures("flower_task_identity")
needs_flower = pytest.mark.skipif(
    not (Path(sys.executable).parent / "flower-superlink").exists()
    and shutil.which("flower-superlink") is None,
    reason="Flower's deployment CLIs are not installed",
)


# ---------------------------------------------------------------------- the site runner
def test_refusals_are_told_apart_by_whether_the_site_was_online_before():
    out = "INFO: Starting\nERROR: Failed to activate SuperNode.\n"
    kind, why = classify(out, 305, was_online=True)
    assert kind == "still-online" and "heartbeat window" in why
    kind, why = classify(out, 305, was_online=False)
    assert kind == "not-registered" and "flwr supernode register" in why
    kind, why = classify("boom\nTraceback: KeyError\n", 1, was_online=True)
    assert kind == "exited" and "exited with 1" in why and "KeyError" in why


def test_the_runner_restarts_with_backoff_and_says_why(tmp_path):
    """A stand-in SuperNode that is refused twice, then comes online and exits."""
    state = tmp_path / "state"
    script = tmp_path / "supernode.py"
    count = tmp_path / "count"
    script.write_text(
        "import pathlib, sys\n"
        f"p = pathlib.Path({str(count)!r}); n = int(p.read_text()) if p.exists() else 0\n"
        "p.write_text(str(n + 1))\n"
        "print('SuperNode ID: 7' if n == 2 else 'ERROR: Failed to activate SuperNode.')\n"
        "sys.exit(0 if n == 2 else 305)\n"
    )
    with socket.socket() as server:  # something listens (plaintext) at the SuperLink's address
        server.bind(("127.0.0.1", 0))
        server.listen()
        cfg = SiteConfig(f"127.0.0.1:{server.getsockname()[1]}", insecure=True,
                         settings={"data-dir": str(tmp_path / "site"), "state-dir": str(state)})  # fmt: skip
        said: list[str] = []
        accept = threading.Thread(target=lambda: server.accept()[0].close(), daemon=True)
        accept.start()
        rc = run_site(cfg, emit=said.append, max_starts=3, command=[sys.executable, str(script)],
                      min_wait=0.01, max_wait=0.05)  # fmt: skip
    assert rc == 0
    refusals = [s for s in said if "retrying" in s]
    assert "not registered" in refusals[0]  # never online yet: the key is the suspect
    assert "online" in said[-2] or any(s.endswith("online") for s in said)
    assert (state / "site" / ".fedmm-supernode-was-online").is_file()  # <state-dir>/<site>/
    # a later refusal of this site is the heartbeat window, not the key
    assert classify("Failed to activate SuperNode", 305, True)[0] == "still-online"


def _tls_server(cert_dir: Path) -> tuple[socket.socket, threading.Thread]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_dir / "server.pem", cert_dir / "server.key")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()

    def serve() -> None:
        for _ in range(10):
            try:
                conn, _ = server.accept()
            except OSError:
                return
            try:
                with context.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return server, thread


def test_tls_mismatches_are_named_before_anything_starts(tmp_path):
    paths = certs.generate(tmp_path / "certs", 1)
    server, _ = _tls_server(tmp_path / "certs")
    address = f"127.0.0.1:{server.getsockname()[1]}"
    try:
        assert probe_tls(address, str(paths["ca_cert"])) is None  # TLS, trusted: fine
        problem = probe_tls(address, insecure=True)
        assert "speaks TLS" in problem and "root-certificates" in problem
        other = certs.generate(tmp_path / "other", 1)
        assert "not trusted" in probe_tls(address, str(other["ca_cert"]))
        cfg = SiteConfig(address, insecure=True, settings={"data-dir": str(tmp_path)})
        said: list[str] = []
        assert run_site(cfg, emit=said.append, max_starts=1, command=["false"]) == 2
        assert "speaks TLS" in said[0]
    finally:
        server.close()
    with socket.socket() as plain:  # a plaintext SuperLink, a TLS site
        plain.bind(("127.0.0.1", 0))
        plain.listen()
        threading.Thread(target=lambda: plain.accept()[0].close(), daemon=True).start()
        problem = probe_tls(f"127.0.0.1:{plain.getsockname()[1]}", str(paths["ca_cert"]))
        assert problem is None or "does not speak TLS" in problem


def test_site_config_errors_name_the_file_and_key(tmp_path):
    bad = tmp_path / "site.toml"
    bad.write_text('superlink = "x:1"\ninsecure = true\n[settings]\ndata_dir = "/srv"\n')
    with pytest.raises(ConfigError, match="data_dir"):
        SiteConfig.load(bad)
    bad.write_text('superlink = "x:1"\nroot-certificates = "ca.crt"\ninsecure = true\n')
    with pytest.raises(ConfigError, match="exactly one"):
        SiteConfig.load(bad)
    assert main(["site", "--config", str(tmp_path / "missing.toml")]) == 2


# ---------------------------------------------------------------------- resume
def test_resume_takes_the_runs_own_options_and_refuses_when_there_is_none(tiny_cfg):
    cfg = tiny_cfg.with_overrides({"method": "fedadam", "fed.rounds": 3, "fed.fraction": 0.67})
    full = run_federation(InProcessGrid(3), cfg.with_overrides({"out_dir": cfg.out_dir + "-full"}))
    with pytest.raises(Interrupted):
        run_federation(CrashingGrid(3, crash_round=3), cfg)
    # resume=true naming nothing but the directory, with a longer round timeout: FedAdam resumes
    bare = tiny_cfg.with_overrides({"resume": True, "fed.round_timeout": 300.0})
    resumed = run_federation(InProcessGrid(3), bare)
    assert resumed["method"] == "fedadam" and len(resumed["history"]) == 3
    assert [h["clients"] for h in resumed["history"]] == [h["clients"] for h in full["history"]]
    assert resumed["config"]["fed.round_timeout"] == 300.0
    empty = tiny_cfg.with_overrides({"resume": True, "out_dir": tiny_cfg.out_dir + "-empty"})
    with pytest.raises(ConfigError, match="no checkpoint"):
        run_federation(InProcessGrid(3), empty)


def test_cli_resume_refuses_a_deployed_run_and_non_operational_changes(tiny_cfg, capsys):
    cfg = tiny_cfg.with_overrides({"method": "fedavg", "fed.rounds": 3})
    with pytest.raises(Interrupted):
        run_federation(CrashingGrid(3, crash_round=2), cfg)
    assert main(["run", "--resume", cfg.out_dir, "--set", "train.lr=0.5"]) == 2
    assert "may change only" in capsys.readouterr().err
    source = next((Path(cfg.out_dir) / "checkpoints").glob("*.pt"))
    import torch

    payload = torch.load(source, weights_only=True)
    record = json.loads(payload["record"]) | {"engine": "deployment"}
    payload["record"] = json.dumps(record)
    torch.save(payload, source)
    assert main(["run", "--resume", cfg.out_dir]) == 2
    assert "fedmm deploy --resume" in capsys.readouterr().err
    assert checkpoint.find_runs(cfg.out_dir)[0][1]["engine"] == "deployment"


# ---------------------------------------------------------------------- the SuperLink
@needs_flower
def test_a_superlink_restarted_with_its_database_keeps_its_sites(tmp_path):
    nodes = [{"data-dir": str(tmp_path / f"site-{k}")} for k in range(2)]
    dep = launch.start(tmp_path / "deployment", nodes, timeout=120)
    try:
        assert dep.database.is_file()
        offsets = [dep.log_size(k) for k in range(2)]
        dep.kill_superlink()
        dep.start_superlink()
        for k in range(2):  # each site's own word that it is through again: no registering
            dep.wait_site_online(k, offsets[k], timeout=150)
        assert dep.online_nodes() == 2
        registered = dep.flwr(["supernode", "list", launch.CONNECTION, "--format", "json"], 30)
        assert len(json.loads(registered.stdout)["nodes"]) == 2  # the same two, kept
    finally:
        dep.stop()
    assert all(p.poll() is not None for p in [dep.superlink, *dep.supernodes.values()])
