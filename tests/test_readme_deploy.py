"""The deployment guide's commands, run as written: the fenced blocks marked
``<!-- readme-test: NAME [per-site] [background] [file=PATH] -->`` are taken from wherever they
live -- README.md or a page of docs/ (today docs/deployment.md, "Step by step across machines" and
"After a crash") --, their placeholders replaced (host, port, paths, the site index K, RUN_ID; a
tiny model and 2 rounds instead of the real one), and run on two tiny sites on 127.0.0.1:
certificates, the SuperLink, `flwr`'s connection, registration, `fedmm site` per site, the run;
then the ServerApp is killed after round 1 and the guide's after-a-crash commands (`flwr ls`,
`flwr stop`, the resume command) finish the run.  An edit that breaks a command breaks this test.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedmm.deploy.launch import free_port
from fedmm.deploy.site import descendants

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MARKED = re.compile(
    r"^[ \t]*<!-- readme-test: (?P<spec>[^>]*?) -->[ \t]*\n"
    r"(?P<indent>[ \t]*)```\w*\n(?P<body>.*?)\n(?P=indent)```",
    re.S | re.M,
)
NEEDED = ["certs", "superlink", "flwr-config", "register", "site-toml", "site", "run", "stop",
          "resume"]  # fmt: skip
needs_flower = pytest.mark.skipif(
    not all((BIN / name).exists() or shutil.which(name) for name in
            ("flower-superlink", "flower-supernode", "flwr")),
    reason="Flower's deployment CLIs are not installed",
)  # fmt: skip


@dataclass
class Block:
    name: str
    body: str
    per_site: bool = False
    background: bool = False
    file: str = ""


def marked_files() -> list[Path]:
    """Where marked blocks may live: the README and every page of docs/."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def deployment_blocks(files: list[Path] | None = None) -> dict[str, Block]:
    """Every marked block of ``files`` (default: ``marked_files()``), by name; a name marked twice
    is an error (which one would run?)."""
    blocks: dict[str, Block] = {}
    where: dict[str, Path] = {}
    for path in marked_files() if files is None else files:
        for m in MARKED.finditer(path.read_text()):
            name, *flags = m["spec"].split()
            assert name not in blocks, (f"block {name!r} is marked in {where[name].name} and "
                                        f"again in {path.name}")  # fmt: skip
            options = dict(f.split("=", 1) for f in flags if "=" in f)
            body = textwrap.dedent(m["body"])
            blocks[name] = Block(name, body, "per-site" in flags, "background" in flags,
                                 options.get("file", ""))  # fmt: skip
            where[name] = path
    return blocks


def test_the_docs_mark_every_deployment_step_they_promise():
    blocks = deployment_blocks()
    assert sorted(blocks) == sorted(NEEDED)
    for name in ("superlink", "site", "run", "resume"):  # long-running: no relative paths
        for word in blocks[name].body.split():
            value = word.split("=", 1)[-1].strip("'\"\\")
            assert not re.match(r"^(certs|sites|runs)/", value), (name, word)
    assert "--stream" in blocks["resume"].body
    assert "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1" in blocks["resume"].body
    assert "cache-dir" in blocks["site-toml"].body


class Placeholders:
    """The guide's values -> this test's: one machine, two tiny sites, 2 rounds."""

    def __init__(self, tmp: Path, sites: list[Path], port: int) -> None:
        self.tmp, self.sites, self.port = tmp, sites, port
        self.run_id = ""

    def __call__(self, text: str, k: int | None = None) -> str:
        t = self.tmp
        pairs = [
            ("/etc/fedmm/site.toml", f"{t}/etc/site-{k}.toml"),
            ('# flwr-home = "/var/lib/fedmm/flwr"', f'flwr-home = "{t}/var/flwr-{k}"'),
            ("/srv/fedmm/site-K", str(self.sites[k]) if k is not None else ""),
            ("/srv/fedmm/schema.json", str(self.sites[0].parent / "schema.json")),
            ("/etc/fedmm", f"{t}/etc"), ("/var/lib/fedmm", f"{t}/var"),
            ("/var/cache/fedmm", f"{t}/cache"),
            ("superlink.example.org,10.0.0.5,127.0.0.1", "127.0.0.1"),
            ("superlink.example.org", "127.0.0.1"), ("0.0.0.0", "127.0.0.1"),
            ("9093", str(self.port)), ("# port = 9094", f"port = {free_port()}"),
            ("--supernodes 3", "--supernodes 2"), ("fed.clients=3", "fed.clients=2"),
            ("fed.rounds=5", "fed.rounds=2 model.backbone='tiny' model.image_size=32 "
                             "train.local_steps=3 train.batch_size=8"),
            ("RUN_ID", self.run_id),
        ]  # fmt: skip
        for old, new in pairs:
            text = text.replace(old, new)
        if k is not None:
            text = re.sub(r"-K\b", f"-{k}", text)
        assert not re.search(r"example\.org|/srv/|/etc/fedmm|-K\b", text), text
        return text


@needs_flower
def test_the_deployment_commands_run_as_written(tmp_path, fmnist_dir):
    from fedmm.cli import main

    sites_dir = tmp_path / "sites"
    assert main(["split", "--benchmark", "fmnist-domain", "--clients", "2", "--out",
                 str(sites_dir), "--set", "model.backbone=tiny", "--set", "model.image_size=32",
                 "--set", "data.train_per_client=40", "--set", "data.test_per_client=20"]) == 0  # fmt: skip
    sites = sorted(p for p in sites_dir.iterdir() if p.is_dir())
    blocks = deployment_blocks()
    sub = Placeholders(tmp_path, sites, free_port())
    for d in ("etc", "var", "cache", "flwr-home", "logs"):
        (tmp_path / d).mkdir()
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["FLWR_HOME"] = str(tmp_path / "flwr-home")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *filter(None, [env.get("PYTHONPATH")])])
    services: dict[str, subprocess.Popen] = {}  # long-running: the SuperLink, the sites
    logs = tmp_path / "logs"

    def write(block: Block, k: int | None = None) -> Path:
        path = Path(sub(block.file.replace("$FLWR_HOME", env["FLWR_HOME"]), k))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(sub(block.body, k) + "\n")
        return path

    def bash(block: Block, k: int | None = None, timeout: float = 300.0):
        name = f"{block.name}-{k}" if k is not None else block.name
        log = logs / f"{name}.log"
        with log.open("wb") as fh:
            proc = subprocess.Popen(["bash", "-euc", sub(block.body, k)], stdout=fh,
                                    stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                    start_new_session=True)  # fmt: skip
        if block.background:
            if block.name != "run":
                services[name] = proc
            return proc
        try:
            rc = proc.wait(timeout=timeout)
        finally:
            _end(proc)
        assert rc == 0, f"marked block {name!r} failed ({rc}):\n{log.read_text()[-3000:]}"
        return log.read_text()

    try:
        bash(blocks["certs"])
        superlink = bash(blocks["superlink"])
        _wait_for(lambda: _listening(sub.port), services, logs, "the SuperLink to listen", 120)
        write(blocks["flwr-config"])
        for k in range(2):
            bash(blocks["register"], k)
        for k in range(2):
            write(blocks["site-toml"], k)
            bash(blocks["site"], k)
        _wait_for(lambda: _online(env) == 2, services, logs, "both sites online", 300)

        out = tmp_path / "var" / "runs" / "deployed"
        run = bash(blocks["run"])
        _wait_for(lambda: _rounds(out) >= 1 or run.poll() is not None, services, logs,
                  "round 1 of the run", 600)  # fmt: skip
        assert run.poll() is None, (logs / "run.log").read_text()[-3000:]
        killed = [pid for pid in descendants(superlink.pid) if _is_serverapp(pid)]
        assert killed, "no flwr-serverapp process under the SuperLink"
        for pid in killed:
            os.kill(pid, signal.SIGKILL)
        _end(run, signal.SIGINT)  # the operator's Ctrl-C on the stream

        runs = _runs(env)
        dead = [r for r in runs if not r["status"].startswith("finished")]
        if dead:  # Flower 1.41: "running" until the ServerApp's heartbeat window passes
            sub.run_id = dead[0]["run-id"]
            listing = bash(blocks["stop"])
            assert sub.run_id in listing
            assert {r["run-id"]: r["status"] for r in _runs(env)}[sub.run_id] == "finished:stopped"
        else:  # a very slow machine: Flower already marked it failed
            assert runs and runs[-1]["status"] == "finished:failed", runs
        bash(blocks["resume"], timeout=900)
        record = json.loads((out / "results.json").read_text())["runs"]
        assert [(r["method"], len(r["history"])) for r in record] == [("feddat", 2)]
    finally:
        for proc in reversed(services.values()):
            _end(proc)
    assert all(p.poll() is not None for p in services.values())


def _end(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    for s in (sig, signal.SIGKILL):
        try:
            os.killpg(proc.pid, s)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=20)
            return
        except subprocess.TimeoutExpired:
            continue


def _wait_for(ready, services: dict[str, subprocess.Popen], logs: Path, what: str,
              timeout: float) -> None:  # fmt: skip
    """Until ``ready()``: bounded but generous (a loaded CI machine), never a fixed sleep; a
    long-running marked command that exits meanwhile fails the test at once, with its log."""
    deadline = time.monotonic() + timeout
    while not ready():
        for name, proc in services.items():
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited ({proc.returncode}) while waiting for "
                                     f"{what}:\n{(logs / f'{name}.log').read_text()[-3000:]}")  # fmt: skip
        assert time.monotonic() < deadline, f"no {what} within {timeout:.0f} s"
        time.sleep(0.5)


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _flwr(env: dict, *args: str) -> dict:
    out = subprocess.run([str(BIN / "flwr"), *args, "--format", "json"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    try:
        return json.loads(out.stdout)
    except json.JSONDecodeError:
        return {}


def _online(env: dict) -> int:
    nodes = _flwr(env, "supernode", "list", "fedmm").get("nodes", [])
    return sum(1 for n in nodes if n.get("status") == "online")


def _runs(env: dict) -> list[dict]:
    return _flwr(env, "ls", "fedmm").get("runs", [])


def _rounds(out: Path) -> int:
    try:
        runs = json.loads((out / "results.json").read_text())["runs"]
    except (OSError, ValueError, KeyError):
        return 0
    return max((len(r["history"]) for r in runs), default=0)


def _is_serverapp(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(part.endswith(b"flwr-serverapp") for part in cmdline)
