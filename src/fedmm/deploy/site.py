"""``fedmm site``: one command that runs a site's SuperNode from the site's own settings and keeps
it up.

A site operator writes one TOML file::

    superlink = "superlink.example.org:9093"      # the SuperLink's Fleet API
    root-certificates = "/etc/fedmm/ca.crt"       # the CA certificate (or: insecure = true)
    auth-key = "/etc/fedmm/supernode-3"           # this site's private key (SuperNode auth)
    # flwr-home = "/var/lib/fedmm/flwr"           # the SuperNode's FLWR_HOME (optional)
    # port = 9094                                 # the SuperNode's Runtime API port, on 127.0.0.1
    # trusted-apps = ["<app hash>"]               # only these fedmm apps (`fedmm app-hash DIR`)

    [settings]                                    # the site settings (federation/site.py)
    data-dir = "/srv/fedmm/site"
    state-dir = "/var/lib/fedmm/state"
    dp-clip-norm = 1.0

and runs ``fedmm site --config site.toml``.  The runner starts ``flower-supernode`` with these
settings as its ``--node-config`` -- in process isolation, with fedmm's own site executor in place
of Flower's, so a run's app bundle is checked and never executed: the site runs its own fedmm
ClientApp or refuses the run (``deploy/supernode_process.py``, ``deploy/trust.py``) -- and
restarts it with backoff (2 s doubling to 60 s; reset once
it is online) whenever it exits, saying why in words Flower does not:

* **TLS mismatch**, checked before the first start with a TLS handshake of our own: an
  ``insecure`` site against a TLS SuperLink (Flower would retry forever without a word), a TLS
  site against a plaintext SuperLink, a certificate the site's CA does not trust.  These stop the
  runner (exit 2): retrying cannot fix them.
* **still registered as online**: a site restarted after a crash is refused ("Failed to activate
  SuperNode", exit 305) until the SuperLink's heartbeat window (about 60 s) expires; the runner
  knows this site was online before (a marker in its state directory) and retries.
* **key not registered**: the same refusal for a site that was never online: the operator must
  run ``flwr supernode register <key>.pub <connection>``; the runner keeps retrying (slowly), so
  the site joins as soon as that is done.
* anything else: the SuperNode's exit code and last line, then a retry.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fedmm.config import ConfigError
from fedmm.federation.site import SiteSettings, node_config_arg

log = logging.getLogger(__name__)
ONLINE = "SuperNode ID:"  # what flower-supernode prints once the SuperLink activated it
RECONNECTED = "Connection successful after"  # ... and once it is through to a restarted SuperLink
REFUSED = "Failed to activate SuperNode"
MARKER = ".fedmm-supernode-was-online"
KEYS = {"superlink", "root-certificates", "insecure", "auth-key", "flwr-home", "port", "settings",
        "trusted-apps"}  # fmt: skip


@dataclass
class SiteConfig:
    """A site's runner settings: where the SuperLink is, how to trust it, the site settings."""

    superlink: str
    root_certificates: str = ""
    insecure: bool = False
    auth_key: str = ""
    flwr_home: str = ""
    port: int = 0
    settings: dict = field(default_factory=dict)
    trusted_apps: tuple[str, ...] = ()  # app hashes (deploy/trust.py); empty: any fedmm app

    @classmethod
    def load(cls, path: str | Path) -> SiteConfig:
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read the site config: {exc}") from None
        extra = sorted(set(raw) - KEYS)
        if extra:
            raise ConfigError(f"{path}: unknown key {extra[0]!r}; keys: {', '.join(sorted(KEYS))}")
        if not isinstance(raw.get("superlink"), str) or ":" not in raw["superlink"]:
            raise ConfigError(f'{path}: superlink = "HOST:PORT" is required')
        cfg = cls(
            raw["superlink"], str(raw.get("root-certificates", "")), bool(raw.get("insecure")),
            str(raw.get("auth-key", "")), str(raw.get("flwr-home", "")), int(raw.get("port", 0)),
            dict(raw.get("settings", {})),
        )  # fmt: skip
        if cfg.insecure == bool(cfg.root_certificates):
            raise ConfigError(f"{path}: give exactly one of root-certificates = PATH (TLS) or "
                              "insecure = true")  # fmt: skip
        SiteSettings.from_node_config(cfg.settings)  # a bad site setting stops here
        cfg.trusted_apps = _trusted_apps(path, raw.get("trusted-apps", []))
        return cfg

    def command(self, executable_dir: Path | None = None) -> list[str]:
        """The one child the runner supervises: ``flower-supernode`` (process isolation) with
        fedmm's site executor (``deploy/supernode_process.py``), which runs only the site's own
        fedmm ClientApp."""
        from fedmm.deploy.supernode_process import DEFAULT_RUNTIME_PORT

        # -P: nothing from the working directory is importable (Python >= 3.11)
        wrapper = [sys.executable, "-P", "-m", "fedmm.deploy.supernode_process",
                   "--runtime-port", str(self.port or DEFAULT_RUNTIME_PORT)]  # fmt: skip
        for digest in self.trusted_apps:
            wrapper += ["--trusted-app", digest]
        return [*wrapper, "--", *self.supernode_command(executable_dir)]

    def supernode_command(self, executable_dir: Path | None = None) -> list[str]:
        """The ``flower-supernode`` command line (the executor adds isolation and the port)."""
        bindir = executable_dir or Path(sys.executable).parent
        cmd = [str(bindir / "flower-supernode"), "--superlink", self.superlink]
        cmd += ["--insecure"] if self.insecure else ["--root-certificates", self.root_certificates]
        if self.auth_key:
            cmd += ["--auth-supernode-private-key", self.auth_key]
        if self.settings:
            cmd += ["--node-config", node_config_arg(self.settings)]
        return cmd

    def state_root(self) -> Path:
        """The site's state directory, named as its client state's is (``site.json``'s name)."""
        from fedmm.data.sites import read_site_info

        settings = SiteSettings.from_node_config(self.settings)
        data_dir = Path(settings.data_dir)
        try:
            name = read_site_info(data_dir).name if settings.data_dir else "site"
        except ValueError:
            name = data_dir.name or "site"
        return settings.state_root(name)


def _trusted_apps(path: Path, value) -> tuple[str, ...]:
    """``trusted-apps``: a list of app hashes (64 hex digits each, ``fedmm app-hash DIR``)."""
    if not isinstance(value, list) or not all(
        isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v.lower())
        for v in value
    ):
        raise ConfigError(f'{path}: trusted-apps = ["<app hash>", ...] takes app hashes (64 hex '
                          "digits each) as `fedmm app-hash DIR` prints them")  # fmt: skip
    return tuple(v.lower() for v in value)


def probe_tls(address: str, root_certificates: str = "", insecure: bool = False,
              timeout: float = 5.0) -> str | None:  # fmt: skip
    """What is wrong between this site's TLS settings and the SuperLink at ``address``, or None
    (also None when nothing answers yet: that is for the retry loop, not a mismatch)."""
    host, port = address.rsplit(":", 1)
    host = host.strip("[]")
    context = ssl.create_default_context(cafile=root_certificates or None)
    if insecure:  # does the server speak TLS at all? (no verification: only the handshake)
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as sock:
            with context.wrap_socket(sock, server_hostname=host):
                pass
    except ssl.SSLCertVerificationError as exc:
        return (f"the SuperLink's certificate is not trusted by {root_certificates} "
                f"({exc.verify_message}); use the CA certificate the operator gave you, and a "
                "superlink host name the certificate lists")  # fmt: skip
    except ssl.SSLError as exc:
        if insecure:
            return None  # no TLS there, as the site expects
        return (f"the SuperLink at {address} does not speak TLS ({exc.reason}); ask the operator, "
                "or set insecure = true if the SuperLink is deliberately plaintext")  # fmt: skip
    except OSError:
        return None
    if insecure:
        return (
            f"the SuperLink at {address} speaks TLS but this site is set insecure = true; set "
            "root-certificates = PATH to the CA certificate (Flower would retry forever)"
        )
    return None


def classify(output: str, returncode: int, was_online: bool) -> tuple[str, str]:
    """``(kind, explanation)`` of a SuperNode that exited with ``returncode`` after ``output``."""
    last = next((ln.strip() for ln in reversed(output.splitlines()) if ln.strip()), "")
    if REFUSED in output:
        if was_online:
            return "still-online", (
                "still registered as online: the SuperLink has not yet noticed that this site's "
                "previous SuperNode stopped (its heartbeat window is about 60 s)"
            )
        return "not-registered", (
            "the SuperLink refused this site's key: it is not registered; the operator runs "
            "`flwr supernode register <this site's key>.pub <connection>`"
        )
    return "exited", f"flower-supernode exited with {returncode}: {last[:200]}"


def run_site(
    cfg: SiteConfig, emit: Callable[[str], None] = print, max_starts: int | None = None,
    command: list[str] | None = None, min_wait: float = 2.0, max_wait: float = 60.0,
    subreaper: bool = False,
) -> int:  # fmt: skip
    """Run (and re-run) the site's SuperNode until SIGTERM/SIGINT, or ``max_starts`` starts.
    Returns 2 for a configuration no retry can fix (TLS), else 0.  ``subreaper`` (the ``fedmm
    site`` command): what the SuperNode leaves running when it exits is this process's to end."""
    problem = probe_tls(cfg.superlink, cfg.root_certificates, cfg.insecure)
    if problem:
        emit(f"fedmm site: {problem}")
        return 2
    marker = cfg.state_root() / MARKER
    command = command or cfg.command()
    env = dict(os.environ)
    if cfg.flwr_home:
        env["FLWR_HOME"] = cfg.flwr_home
    stopping, child = False, None

    def stop(signum, frame) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.terminate()

    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    if subreaper:
        _become_subreaper()
    wait, starts, before = min_wait, 0, set()
    try:
        while not stopping and (max_starts is None or starts < max_starts):
            starts += 1
            emit(f"fedmm site: starting the SuperNode (start {starts}): {' '.join(command)}")
            before = set(descendants(os.getpid()))
            child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     env=env, text=True, bufsize=1)  # fmt: skip
            lines: list[str] = []
            for line in _lines_until_exit(child, before):
                sys.stdout.write(line)
                sys.stdout.flush()
                lines = (lines + [line])[-200:]
                if ONLINE in line or RECONNECTED in line:
                    marker.parent.mkdir(parents=True, exist_ok=True)
                    marker.write_text(f"{time.time():.0f}\n")
                    emit("fedmm site: online")
                    wait = min_wait
            rc = child.wait()
            if stopping:
                break
            kind, why = classify("".join(lines), rc, marker.is_file())
            if kind == "not-registered":
                wait = max(wait, min(30.0, max_wait))  # the operator must act: no hurry
            emit(f"fedmm site: {why}; retrying in {wait:.0f} s")
            time.sleep(wait)
            wait = min(max_wait, wait * 2)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        if child is not None:
            _end_group(child, before)
    return 0


def _lines_until_exit(child: subprocess.Popen, before: set[int]):
    """The child's output lines until it exits.  flower-supernode's helpers (its SuperExec) may
    keep the pipe open after the SuperNode itself exited (after a refused activation, say), so
    the end is the child's exit, not the pipe's; its process group is ended then."""
    lines: queue.Queue = queue.Queue()

    def read() -> None:
        for line in child.stdout:
            lines.put(line)

    threading.Thread(target=read, daemon=True).start()
    while True:
        try:
            yield lines.get(timeout=0.2)
            continue
        except queue.Empty:
            pass
        if child.poll() is not None:
            _end_group(child, before)
            time.sleep(0.2)
            while not lines.empty():
                yield lines.get_nowait()
            return


def descendants(pid: int) -> list[int]:
    """Every descendant process of ``pid`` (Linux /proc; none elsewhere)."""
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            kids = [int(c) for t in Path(f"/proc/{parent}/task").iterdir()
                    for c in (t / "children").read_text().split()]  # fmt: skip
        except OSError:
            continue
        out += kids
        todo += kids
    return out


def _end_group(child: subprocess.Popen, before: set[int]) -> None:
    """End the child and everything it started (this process's descendants not in ``before``).
    As subreaper (Linux) the runner inherits what the child leaves behind (its SuperExec); all
    stay in the runner's process group, so a crash of the runner's group takes them all."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in [child.pid, *(set(descendants(os.getpid())) - before)]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=5)
        if sig == signal.SIGTERM:
            time.sleep(0.5)


def _become_subreaper() -> None:
    """Orphans of the SuperNode (its SuperExec) become this runner's children (Linux only)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
