"""Operating a deployment: the site runner, TLS mismatches, a SuperLink that restarts with its
database, resuming with the run's own options.  Everything on 127.0.0.1, bounded in time, every
process ended."""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import run_federation
from test_resume import CrashingGrid, Interrupted
from test_serverapp import InProcessGrid

from fedmm.cli import main
from fedmm.config import ConfigError
from fedmm.deploy import certs, launch
from fedmm.deploy.site import (
    MARKER,
    SiteConfig,
    classify,
    exit_reason,
    probe_tls,
    run_site,
    stamp,
)
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
    assert kind == "exited" and "exited with code 1 (last line: Traceback: KeyError)" in why


def test_an_exit_is_told_by_its_signal_or_code_and_the_last_line_is_labelled():
    out = "INFO: SuperNode ID: 7\nINFO: SuperExec terminated gracefully.\n"
    kind, why = classify(out, -9, was_online=True)
    assert why == ("flower-supernode killed by SIGKILL (last line: INFO: SuperExec terminated "
                   "gracefully.)")  # fmt: skip
    assert "-9" not in why
    assert (
        classify("", 2, was_online=True)[1]
        == "flower-supernode exited with code 2 (it printed nothing)"
    )
    assert exit_reason(-15) == "killed by SIGTERM"
    assert exit_reason(305 % 256) == "exited with code 49 (Flower's SUPERNODE_CONNECTION_ERROR)"


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
    assert all(STAMPED.match(s) for s in said), said
    refusals = [s for s in said if "retrying" in s]
    assert "not registered" in refusals[0]  # never online yet: the key is the suspect
    assert any("online (SuperNode ID 7)" in s for s in said)
    assert (state / "site" / ".fedmm-supernode-was-online").is_file()  # <state-dir>/<site>/
    # a later refusal of this site is the heartbeat window, not the key
    assert classify("Failed to activate SuperNode", 305, True)[0] == "still-online"


STAMPED = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ fedmm site: ")


@contextmanager
def _listening():
    """Something listening (plaintext) where the SuperLink should be: the TLS probe passes."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        threading.Thread(target=lambda: server.accept()[0].close(), daemon=True).start()
        yield f"127.0.0.1:{server.getsockname()[1]}"


def _fake_supernode(tmp_path: Path, body: str) -> list[str]:
    script = tmp_path / "supernode.py"
    script.write_text("import os, pathlib, signal, sys\n" + body)
    return [sys.executable, str(script)]


def _site(tmp_path: Path, address: str) -> SiteConfig:
    settings = {"data-dir": str(tmp_path / "site"), "state-dir": str(tmp_path / "state")}
    return SiteConfig(address, insecure=True, settings=settings)


def test_a_kill_and_an_exit_code_are_reported_in_words(tmp_path):
    kill = _fake_supernode(tmp_path, "print('INFO: SuperExec terminated gracefully.', flush=True)\n"
                                     "os.kill(os.getpid(), signal.SIGKILL)\n")  # fmt: skip
    said: list[str] = []
    with _listening() as address:
        run_site(_site(tmp_path, address), emit=said.append, max_starts=1, command=kill,
                 sleep=lambda s: None)  # fmt: skip
    assert any("flower-supernode killed by SIGKILL (last line: INFO: SuperExec terminated "
               "gracefully.); retrying in 2 s" in s for s in said), said  # fmt: skip
    code = _fake_supernode(tmp_path, "print('ValueError: bad site', flush=True); sys.exit(1)\n")
    said = []
    with _listening() as address:
        run_site(_site(tmp_path, address), emit=said.append, max_starts=1, command=code,
                 sleep=lambda s: None)  # fmt: skip
    assert any("exited with code 1 (last line: ValueError: bad site)" in s for s in said), said
    assert all(STAMPED.match(s) for s in said), said


def test_a_reconnect_is_reported_with_or_without_a_failed_attempt(tmp_path):
    """A SuperNode that comes online, loses the SuperLink and gets back (Flower's own lines),
    then once more with only Flower's success line (no failed attempt seen)."""
    lines = ["INFO :      SuperNode ID: 7",
             "WARNING :   Connection attempt failed, retrying in 1.00 seconds",
             "WARNING :   Connection attempt failed, retrying in 2.00 seconds",
             "INFO :      Connection successful after 3.10 seconds and 3 tries.",
             "INFO :      Connection successful after 12.00 seconds and 2 tries."]  # fmt: skip
    fake = _fake_supernode(tmp_path, "".join(f"print({ln!r}, flush=True)\n" for ln in lines))
    said: list[str] = []
    with _listening() as address:
        run_site(_site(tmp_path, address), emit=said.append, max_starts=1, command=fake,
                 sleep=lambda s: None)  # fmt: skip
    assert all(STAMPED.match(s) for s in said), said
    mine = [s.split("fedmm site: ", 1)[1] for s in said]
    assert mine[1].startswith("online (SuperNode ID 7), ") and "after the runner started" in mine[1]
    assert mine[2] == "cannot reach the SuperLink; flower-supernode retries on its own"  # once
    assert re.fullmatch(r"online again \(the SuperLink unreachable since \S+Z, \d+ s\)", mine[3])
    assert mine[4] == "online again (Flower: after 12.00 seconds and 2 tries)"
    marker = tmp_path / "state" / "site" / MARKER
    assert marker.is_file() and float(marker.read_text()) > 0  # when it was last seen alive


def test_retries_after_a_crash_are_paced_to_the_superlinks_heartbeat_window(tmp_path):
    """The previous SuperNode was last seen alive at t=1000 (the marker); the SuperLink refuses
    this key as "still online" until t=1063 (its last heartbeat came a little after the
    marker's time).  The runner, restarted at t=1005, waits until the window ends (t=1061) and
    then retries every 3 s: online at t=1064, not after a 2-4-8-16-32 s backoff (t=1067+)."""
    now = [1005.0]
    clock_file = tmp_path / "now"
    clock_file.write_text(str(now[0]))
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        now[0] += seconds
        clock_file.write_text(str(now[0]))

    fake = _fake_supernode(tmp_path, (
        f"t = float(pathlib.Path({str(clock_file)!r}).read_text())\n"
        "if t < 1063:\n"
        "    print('ERROR :     Failed to activate SuperNode.', flush=True); sys.exit(49)\n"
        "print('INFO :      SuperNode ID: 7', flush=True)\n"
    ))  # fmt: skip
    marker = tmp_path / "state" / "site" / MARKER
    marker.parent.mkdir(parents=True)
    marker.write_text("1000\n")
    said: list[str] = []
    with _listening() as address:
        run_site(_site(tmp_path, address), emit=said.append, max_starts=3, command=fake,
                 clock=lambda: now[0], sleep=sleep)  # fmt: skip
    assert waits[:2] == [56.0, 3.0], (waits, said)  # 1000 + 60 + 1 - 1005; then short retries
    online = next(s for s in said if "online (SuperNode ID 7)" in s)
    assert online.startswith(stamp(1064)), said
    assert "64 s after this site's previous SuperNode was last seen alive" in online
    assert "still registered as online" in said[1] and "retrying in 56 s" in said[1]


def test_sigterm_ends_the_runner_during_a_long_wait(tmp_path):
    """A runner waiting 600 s before its next start stops at once on SIGTERM (systemd's stop)."""
    fake = _fake_supernode(tmp_path, "sys.exit(1)\n")
    with _listening() as address:
        code = (
            "from fedmm.deploy.site import SiteConfig, run_site\n"
            f"cfg = SiteConfig({address!r}, insecure=True, settings={{'data-dir': "
            f"{str(tmp_path / 'site')!r}, 'state-dir': {str(tmp_path / 'state')!r}}})\n"
            f"raise SystemExit(run_site(cfg, emit=lambda m: print(m, flush=True), "
            f"command={fake!r}, min_wait=600))\n"
        )
        runner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)  # fmt: skip
        try:
            for line in runner.stdout:
                if "retrying in 600 s" in line:
                    break
            runner.send_signal(signal.SIGTERM)
            assert runner.wait(timeout=120) == 0  # not after the 600 s wait
        finally:
            runner.kill()
            runner.wait()


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
        killed_at = time.time()
        dep.kill_superlink()
        dep.start_superlink()
        # the SuperLink's own word that it heard from each site again: no registering
        back = dep.wait_back([0, 1], killed_at, timeout=150)
        assert all(t >= killed_at for t in back.values())
        assert dep.online_nodes() == 2
        registered = dep.flwr(["supernode", "list", launch.CONNECTION, "--format", "json"], 30)
        assert len(json.loads(registered.stdout)["nodes"]) == 2  # the same two, kept
    finally:
        dep.stop()
    assert all(p.poll() is not None for p in [dep.superlink, *dep.supernodes.values()])


def test_a_resume_stops_the_runs_flower_still_shows_unfinished(tmp_path):
    """What flwr ls shows unfinished (a run whose ServerApp died stays "running" until its
    heartbeat window passes) is stopped before a resume; finished runs are left alone."""
    runs = [{"run-id": "11", "status": "finished:completed"}, {"run-id": "12", "status": "running"},
            {"run-id": "13", "status": "finished:failed"}, {"run-id": "14", "status": "pending"}]  # fmt: skip
    calls: list[list[str]] = []

    def flwr(args, timeout):
        calls.append(args)
        out = json.dumps({"success": True, "runs": runs}) if args[0] == "ls" else "stopped"
        return subprocess.CompletedProcess(args, 0, out, "")

    dep = launch.Deployment(tmp_path, 0, 0, {})
    dep.flwr = flwr
    said: list[str] = []
    assert dep.stop_dead_runs(said.append) == ["12", "14"]
    assert calls[1:] == [["stop", "12", "fedmm"], ["stop", "14", "fedmm"]]
    assert "run 12 is still 'running'" in said[0] and "flwr stop 12 fedmm" in said[0]
    dep.flwr = lambda args, timeout: subprocess.CompletedProcess(args, 1, "", "connection refused")
    with pytest.raises(RuntimeError, match="flwr ls failed"):
        dep.stop_dead_runs(said.append)
