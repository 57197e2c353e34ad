"""``fedmm site``: one command that runs a site's SuperNode from the site's own settings and keeps
it up.

A site operator writes one TOML file::

    superlink = "superlink.example.org:9093"      # the SuperLink's Fleet API
    root-certificates = "/etc/fedmm/ca.crt"       # the CA certificate (or: insecure = true)
    auth-key = "/etc/fedmm/supernode-3"           # this site's private key (SuperNode auth)
    # flwr-home = "/var/lib/fedmm/flwr"           # the SuperNode's FLWR_HOME (optional)
    # port = 9094                                 # the SuperNode's Runtime API port, on 127.0.0.1
    # trusted-apps = ["<app hash>"]               # only these fedmm apps (`fedmm app-hash DIR`)
    # warm-worker = true                          # keep one ClientApp process per run (false:
    #                                             # a fresh process per message, 8.5 s each)

    [settings]                                    # the site settings (federation/site.py)
    data-dir = "/srv/fedmm/site"
    state-dir = "/var/lib/fedmm/state"
    dp-clip-norm = 1.0

and runs ``fedmm site --config site.toml``.  The runner starts ``flower-supernode`` with these
settings as its ``--node-config`` -- in process isolation, with fedmm's own site executor in place
of Flower's, so a run's app bundle is checked and never executed: the site runs its own fedmm
ClientApp or refuses the run (``deploy/supernode_process.py``, ``deploy/trust.py``) -- passes its
output through, and adds its own lines, each stamped with the time (ISO-8601 UTC): when the
SuperNode is online (how long after the runner started, and after this site's previous SuperNode
was last seen alive), when it lost and regained the SuperLink, and why it exited, in words Flower
does not use:

* **TLS mismatch**, checked before the first start with a TLS handshake of our own: an
  ``insecure`` site against a TLS SuperLink (Flower would retry forever without a word), a TLS
  site against a plaintext SuperLink, a certificate the site's CA does not trust.  These stop the
  runner (exit 2): retrying cannot fix them.
* **still registered as online**: a site restarted after a crash is refused ("Failed to activate
  SuperNode") until the SuperLink's heartbeat window for its previous SuperNode ends (``WINDOW``,
  60 s after that SuperNode's last heartbeat).  The runner keeps a marker in the site's state
  directory (this site was online; when its SuperNode was last seen alive) and retries right
  after the window ends, then every few seconds: a killed site misses only the round it was
  killed in.
* **key not registered**: the same refusal for a site that was never online: the operator must
  run ``flwr supernode register <key>.pub <connection>``; the runner retries every 30 s, so the
  site joins as soon as that is done.
* anything else: how the SuperNode ended (``killed by SIGKILL``, ``exited with code 1``) and its
  last line, then a retry after 2 s doubling to 60 s (reset once it is online).

Size (~480 lines): the site's settings file, its checks and the supervised SuperNode process are
one operator-facing command; the settings dataclass is the part that could move out.
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
from datetime import UTC, datetime
from pathlib import Path

from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL, HEARTBEAT_PATIENCE
from flwr.supercore.exit.exit_code import ExitCode

from fedmm.config import ConfigError
from fedmm.federation.site import SiteSettings, node_config_arg

log = logging.getLogger(__name__)
ONLINE = "SuperNode ID:"  # what flower-supernode prints once the SuperLink activated it
RECONNECTED = "Connection successful after"  # ... and once it is through to a restarted SuperLink
RETRYING = "Connection attempt failed, retrying"  # ... when a call to the SuperLink failed
REFUSED = "Failed to activate SuperNode"
# The SuperLink's heartbeat window: a node is online until its last heartbeat (or activation)
# + HEARTBEAT_PATIENCE x its interval (flwr/server/superlink/linkstate/sql_linkstate.py,
# activate_node / acknowledge_node_heartbeat; the SuperNode sends HEARTBEAT_DEFAULT_INTERVAL,
# flwr/supernode/fleet_http_connection.py); until then a new SuperNode of the key is refused.
WINDOW = float(HEARTBEAT_PATIENCE * HEARTBEAT_DEFAULT_INTERVAL)  # 60 s in Flower 1.41
RETRY_EVERY = 3.0  # once the window is over: short retries
ALIVE_EVERY = 2.0  # how often the marker's "last seen alive" is refreshed
MARKER = ".fedmm-supernode-was-online"
KEYS = {"superlink", "root-certificates", "insecure", "auth-key", "flwr-home", "port", "settings",
        "trusted-apps", "warm-worker"}  # fmt: skip


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
    # one long-lived ClientApp process per run (deploy/supernode_process.py); False: one per task
    warm_worker: bool = True

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
        warm = raw.get("warm-worker", True)
        if not isinstance(warm, bool):
            raise ConfigError(f"{path}: warm-worker = true or false, got {warm!r}")
        cfg.warm_worker = warm
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
        if not self.warm_worker:
            wrapper.append("--no-warm-worker")
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
        """The site's own directory (``consent.site_root``: ``site.json``'s name made a safe
        path component), where its audit log, ledger and client state are too."""
        from fedmm.federation import consent

        settings = SiteSettings.from_node_config(self.settings)
        try:
            return consent.site_root(settings)
        except ValueError:  # no readable site.json yet: the directory's name, made safe
            name = Path(settings.data_dir).name or "site"
            return settings.state_root(consent.safe_name(name))


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


def exit_reason(returncode: int) -> str:
    """How a process ended, in words: ``killed by SIGKILL``, ``exited with code 1``."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    flower = _flower_exit_names().get(returncode)
    return f"exited with code {returncode}" + (f" (Flower's {flower})" if flower else "")


def _flower_exit_names() -> dict[int, str]:
    """Flower's own exit codes (``flwr.supercore.exit.ExitCode``, 100 and up) by the status a
    parent sees (the code modulo 256: ``SUPERNODE_CONNECTION_ERROR = 305`` arrives as 49); a
    status two of them share is not named."""
    names: dict[int, list[str]] = {}
    for name, code in vars(ExitCode).items():
        if name.isupper() and isinstance(code, int) and code >= 100:
            names.setdefault(code % 256, []).append(name)
    return {status: found[0] for status, found in names.items() if len(found) == 1}


def classify(output: str, returncode: int, was_online: bool) -> tuple[str, str]:
    """``(kind, explanation)`` of a SuperNode that exited with ``returncode`` after ``output``."""
    last = next((ln.strip() for ln in reversed(output.splitlines()) if ln.strip()), "")
    if REFUSED in output:
        if was_online:
            return "still-online", (
                "still registered as online: the SuperLink has not yet noticed that this site's "
                f"previous SuperNode stopped (its heartbeat window is {WINDOW:.0f} s)"
            )
        return "not-registered", (
            "the SuperLink refused this site's key: it is not registered; the operator runs "
            "`flwr supernode register <this site's key>.pub <connection>`"
        )
    said = f" (last line: {last[:200]})" if last else " (it printed nothing)"
    return "exited", f"flower-supernode {exit_reason(returncode)}{said}"


def stamp(t: float) -> str:
    """``t`` (seconds since the epoch) as ISO-8601 UTC to the second."""
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def run_site(
    cfg: SiteConfig, emit: Callable[[str], None] = print, max_starts: int | None = None,
    command: list[str] | None = None, min_wait: float = 2.0, max_wait: float = 60.0,
    subreaper: bool = False, clock: Callable[[], float] = time.time,
    sleep: Callable[[float], object] | None = None, retry_every: float = RETRY_EVERY,
) -> int:  # fmt: skip
    """Run (and re-run) the site's SuperNode until SIGTERM/SIGINT, or ``max_starts`` starts.
    Returns 2 for a configuration no retry can fix (TLS), else 0.  ``subreaper`` (the ``fedmm
    site`` command): what the SuperNode leaves running when it exits is this process's to end.

    Every line it emits starts with the time (ISO-8601 UTC).  ``clock``/``sleep`` are the wall
    clock and the wait between starts (tests pass their own; by default a wait that SIGTERM
    ends at once).  Waits: after a "still registered
    as online" refusal, until the heartbeat window of the previous SuperNode ends (its last sign
    of life, in the marker, + ``WINDOW``) and then every ``retry_every`` s; after a refusal of
    the key 30 s; after any other exit ``min_wait`` doubling to ``max_wait`` (reset once online).
    """

    def say(message: str) -> None:
        emit(f"{stamp(clock())} fedmm site: {message}")

    problem = probe_tls(cfg.superlink, cfg.root_certificates, cfg.insecure)
    if problem:
        say(problem)
        return 2
    marker = cfg.state_root() / MARKER
    command = command or cfg.command()
    env = dict(os.environ)
    if cfg.flwr_home:
        env["FLWR_HOME"] = cfg.flwr_home
    stopping, child, stopped = False, None, threading.Event()
    sleep = sleep or stopped.wait

    def stop(signum, frame) -> None:
        nonlocal stopping
        stopping = True
        stopped.set()
        if child is not None and child.poll() is None:
            child.terminate()

    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    if subreaper:
        _become_subreaper()
    started, backoff, starts, before = clock(), min_wait, 0, set()
    try:
        while not stopping and (max_starts is None or starts < max_starts):
            starts += 1
            say(f"starting the SuperNode (start {starts}): {' '.join(command)}")
            before = set(descendants(os.getpid()))
            child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     env=env, text=True, bufsize=1)  # fmt: skip
            lines: list[str] = []
            link = _Liveness(marker, clock, say, started)
            for line in _lines_until_exit(child, before, link.tick):
                sys.stdout.write(line)
                sys.stdout.flush()
                lines = (lines + [line])[-200:]
                if link.saw(line):
                    backoff = min_wait
            rc = child.wait()
            link.ended()
            if stopping:
                break
            kind, why = classify("".join(lines), rc, _recently_alive(marker, clock()))
            if kind == "still-online":
                wait = _until_window_ends(marker, clock(), retry_every)
            elif kind == "not-registered":
                wait = max(backoff, min(30.0, max_wait))  # the operator must act: no hurry
            else:
                wait, backoff = backoff, min(max_wait, backoff * 2)
            say(f"{why}; retrying in {wait:.0f} s")
            sleep(wait)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        if child is not None:
            _end_group(child, before)
    return 0


def _until_window_ends(marker: Path, now: float, retry_every: float) -> float:
    """Seconds until the SuperLink's heartbeat window for this site's previous SuperNode ends:
    its last sign of life (the marker) + ``WINDOW`` + 1 s; ``retry_every`` once that is past
    (or when the marker holds no time).  Until then a new SuperNode of this key is refused."""
    last_alive = _last_alive(marker)
    if last_alive is None:
        return retry_every
    return max(retry_every, last_alive + WINDOW + 1.0 - now)


class _Liveness:
    """What the SuperNode's output says about its link to the SuperLink, told to the operator
    with times, and the marker (this site was online; the last time it was seen alive, which
    paces the retries after a crash) kept current while it runs.

    flower-supernode prints ``SuperNode ID: N`` once the SuperLink activated it
    (``flwr/supernode/start_client_internal.py``), ``Connection attempt failed, retrying in X
    seconds`` when a call to the SuperLink fails and ``Connection successful after X seconds and
    N tries.`` when a retried call gets through (``flwr/supercore/retry/http_retry.py``,
    ``_wait``/``_on_success``).  A SuperLink that was down only between two of the SuperNode's
    polls (every 3 s) leaves no trace on the SuperNode's side: there is nothing to report then,
    and the SuperLink's own node list (``fedmm deploy --drill``) is the judge."""

    def __init__(self, marker: Path, clock: Callable[[], float], say: Callable[[str], None],
                 runner_started: float) -> None:  # fmt: skip
        self.marker, self.clock, self.say = marker, clock, say
        self.runner_started = runner_started
        self.online, self.unreachable_since, self.written = False, None, 0.0
        self.previous = _last_alive(marker)  # the previous SuperNode's last sign of life

    def saw(self, line: str) -> bool:
        """Note ``line``; True when it says the SuperNode is (again) online."""
        now = self.clock()
        if ONLINE in line:
            node = line.split(ONLINE, 1)[1].strip()
            since = f"{now - self.runner_started:.0f} s after the runner started"
            if self.previous is not None:
                since += (f", {now - self.previous:.0f} s after this site's previous SuperNode "
                          f"was last seen alive ({stamp(self.previous)})")  # fmt: skip
            self.say(f"online (SuperNode ID {node}), {since}")
        elif RECONNECTED in line:
            flower = line.split(RECONNECTED, 1)[1].strip().rstrip(".")
            since = (f"the SuperLink unreachable since {stamp(self.unreachable_since)}, "
                     f"{now - self.unreachable_since:.0f} s"
                     if self.unreachable_since is not None else f"Flower: after {flower}")  # fmt: skip
            self.say(f"online again ({since})")
        elif RETRYING in line:
            if self.unreachable_since is None:
                self.unreachable_since = now
                self.say("cannot reach the SuperLink; flower-supernode retries on its own")
            return False
        else:
            return False
        self.online, self.unreachable_since = True, None
        self.tick(force=True)
        return True

    def tick(self, force: bool = False) -> None:
        """While online, the marker holds the time this SuperNode was last seen alive."""
        now = self.clock()
        if self.online and (force or now - self.written >= ALIVE_EVERY):
            self.marker.parent.mkdir(parents=True, exist_ok=True)
            self.marker.write_text(f"{now:.0f}\n")
            self.written = now

    def ended(self) -> None:
        self.tick(force=True)  # it was alive until now


def _recently_alive(marker: Path, now: float) -> bool:
    """Whether this site's previous SuperNode was seen alive within the heartbeat window (+30 s):
    only then can a refusal of its key mean "still registered as online"; later, the SuperLink
    has forgotten the key (a SuperLink restarted without its database, say)."""
    last = _last_alive(marker)
    return last is not None and now - last <= WINDOW + 30.0


def _last_alive(marker: Path) -> float | None:
    try:
        return float(marker.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _lines_until_exit(child: subprocess.Popen, before: set[int], tick: Callable[[], None]):
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
        tick()
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
