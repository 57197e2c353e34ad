"""A fedmm site's SuperNode: ``flower-supernode --isolation process`` plus fedmm's own executor.

``fedmm site`` (``deploy/site.py``) supervises one child, this module::

    python -m fedmm.deploy.supernode_process --runtime-port 9094 [--trusted-app HASH ...] \\
        -- flower-supernode --superlink HOST:PORT --root-certificates ca.crt ...

It starts the given ``flower-supernode`` command with ``--isolation process --host 127.0.0.1
--port RUNTIME_PORT --superexec-auth-secret-file /dev/fd/N`` and, in place of Flower's SuperExec
(which would start ``flwr-clientapp``, i.e. install the run's FAB and import its ClientApp), runs
the **site executor**: a loop that acquires the SuperNode's tasks over its Runtime API and starts,
per task, ``python -m fedmm.deploy.trusted_clientapp`` (it checks the run's app and runs the
site's own fedmm ClientApp, or refuses).  Sources (Flower 1.41):

* ``flwr/supernode/start_client_internal.py``: only ``--isolation subprocess`` makes the SuperNode
  start ``flower-superexec``; with ``process`` it starts nothing and only stores tasks;
* ``flwr/supercore/superexec/run_superexec.py``: the executor loop is ``AcquireTask`` with the
  supported task types, every second, then a launch with the returned token; this loop asks for
  ``flwr-clientapp`` tasks only (an agent app, a connector, ... is never acquired, so never run);
* ``flwr/supernode/cli/flower_supernode.py``: the Runtime API binds ``--host`` (here always
  127.0.0.1) and, in process isolation, ``--superexec-auth-secret-file`` makes ``AcquireTask``
  require an HMAC of that secret (``SuperExecAuthHttpInterceptor``).  The secret is 32 random bytes
  made per start and handed to the SuperNode through an inherited pipe (``/dev/fd/N``), so it is
  never on disk: another local process that reaches 127.0.0.1 cannot acquire the site's tasks.

The SuperNode's output passes through unchanged on stdout (the runner reads "SuperNode ID:" and
the refusal lines in it); this process's own lines start with ``fedmm site executor:``.  When the
SuperNode exits, the executor ends its running tasks and this process exits with the SuperNode's
exit code (128 + N for a signal N).  SIGTERM / SIGINT are passed on to the SuperNode.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time

log = logging.getLogger("fedmm.site")
POLL_SECONDS = 0.5  # between AcquireTask calls (Flower's SuperExec: 1 s)
DEFAULT_RUNTIME_PORT = 9094  # Flower's SUPERNODE_UVICORN_DEFAULT_PORT
ACQUIRE_METHOD = "/flwr.proto.Runtime/AcquireTask"


def supernode_command(base: list[str], runtime_port: int, secret_fd: int) -> list[str]:
    """``base`` (a ``flower-supernode`` command) in process isolation, its Runtime API on
    127.0.0.1:``runtime_port``, ``AcquireTask`` guarded by the secret readable at ``secret_fd``."""
    for flag in ("--isolation", "--host", "--port", "--superexec-auth-secret-file"):
        if any(arg == flag or arg.startswith(flag + "=") for arg in base):
            raise ValueError(f"the SuperNode command may not set {flag}: the site executor does")
    return [*base, "--isolation", "process", "--host", "127.0.0.1", "--port", str(runtime_port),
            "--superexec-auth-secret-file", f"/dev/fd/{secret_fd}"]  # fmt: skip


class SiteExecutor:
    """Acquires the SuperNode's ClientApp tasks and starts one trusted ClientApp per task."""

    def __init__(self, runtime_port: int, secret: bytes, trusted_apps: list[str]) -> None:
        from flwr.supercore.interceptors import (
            RuntimeVersionHttpInterceptor,
            SuperExecAuthHttpInterceptor,
        )
        from flwr.supercore.runtime import RuntimeHttpClient

        self.address = f"127.0.0.1:{runtime_port}"
        self.trusted_apps = list(trusted_apps)
        # no retry invoker: a failed call is retried by the loop (Flower's would log
        # "Connection successful after ...", a line the runner reads as the SuperNode's)
        self.client = RuntimeHttpClient.from_server_address(
            server_address=self.address, insecure=True, root_certificates=None,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec"),
                          SuperExecAuthHttpInterceptor(master_secret=secret,
                                                       protected_methods={ACQUIRE_METHOD})],
        )  # fmt: skip
        self.tasks: list[subprocess.Popen] = []
        self._last_problem = ""

    def poll_once(self) -> subprocess.Popen | None:
        """One ``AcquireTask``; the started task process, or None when there was none."""
        import httpx
        from flwr.proto.runtime_pb2 import AcquireTaskRequest
        from flwr.supercore.constant import TaskType

        self.tasks = [t for t in self.tasks if t.poll() is None]
        try:
            res = self.client.AcquireTask(
                AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
            )
        except (httpx.HTTPError, ValueError) as exc:
            problem = f"{type(exc).__name__}: {exc}"
            if problem != self._last_problem and not isinstance(exc, httpx.ConnectError):
                log.warning("fedmm site executor: the SuperNode's Runtime API: %s", problem)
            self._last_problem = problem
            return None
        self._last_problem = ""
        if not (res.HasField("task") and res.token):
            return None
        # -P: the task imports fedmm from the site's installation, never from its working dir
        cmd = [sys.executable, "-P", "-m", "fedmm.deploy.trusted_clientapp",
               "--runtime-api-address", self.address, "--parent-pid", str(os.getpid())]  # fmt: skip
        for digest in self.trusted_apps:
            cmd += ["--trusted-app", digest]
        from fedmm.deploy.trusted_clientapp import TOKEN_ENV

        proc = subprocess.Popen(cmd, env=dict(os.environ, **{TOKEN_ENV: res.token}))
        log.info("fedmm site executor: task %d of run %d -> trusted ClientApp (pid %d)",
                 res.task.task_id, res.task.run_id, proc.pid)  # fmt: skip
        self.tasks.append(proc)
        return proc

    def close(self, grace: float = 5.0) -> None:
        """End the running tasks (SIGTERM, then SIGKILL after ``grace`` seconds)."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for task in self.tasks:
                if task.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        task.send_signal(sig)
            deadline = time.monotonic() + grace
            while any(t.poll() is None for t in self.tasks) and time.monotonic() < deadline:
                time.sleep(0.1)
        self.client.close()


def run(base: list[str], runtime_port: int, trusted_apps: list[str]) -> int:
    """Start the SuperNode ``base`` + the site executor; the SuperNode's exit code."""
    secret = secrets.token_bytes(32)
    read_fd, write_fd = os.pipe()
    os.write(write_fd, secret)
    os.close(write_fd)
    try:
        supernode = subprocess.Popen(
            supernode_command(base, runtime_port, read_fd), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, bufsize=1, pass_fds=(read_fd,),
            preexec_fn=_die_with_parent,
        )  # fmt: skip
    finally:
        os.close(read_fd)

    def forward() -> None:
        for line in supernode.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()

    pump = threading.Thread(target=forward, daemon=True)
    pump.start()

    def stop(signum, frame) -> None:
        if supernode.poll() is None:
            supernode.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    executor = SiteExecutor(runtime_port, secret, trusted_apps)
    try:
        while supernode.poll() is None:
            executor.poll_once()
            time.sleep(POLL_SECONDS)
    finally:
        if supernode.poll() is None:
            supernode.terminate()
        executor.close()
        rc = supernode.wait()
        pump.join(timeout=5)
    return rc  # negative: killed by that signal (``main`` dies of it too)


def _die_with_parent() -> None:
    """In the SuperNode (between fork and exec): SIGTERM when this process dies (Linux)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runtime-port", type=int, default=DEFAULT_RUNTIME_PORT,
                        help="the SuperNode's Runtime API port on 127.0.0.1")  # fmt: skip
    parser.add_argument("--trusted-app", action="append", default=[], metavar="HASH",
                        help="an app hash the site trusts (site.toml trusted-apps)")  # fmt: skip
    parser.add_argument("supernode", nargs=argparse.REMAINDER,
                        help="-- then the flower-supernode command")  # fmt: skip
    args = parser.parse_args(argv)
    base = args.supernode[1:] if args.supernode[:1] == ["--"] else args.supernode
    if not base:
        parser.error("give the flower-supernode command after --")
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="%(levelname)s %(name)s: %(message)s")  # fmt: skip
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per Runtime API call
    try:
        rc = run(base, args.runtime_port, args.trusted_app)
    except (OSError, ValueError) as exc:
        print(f"fedmm site executor: cannot start the SuperNode: {exc}", flush=True)
        return 2
    if rc < 0:  # the SuperNode was killed (e.g. SIGKILL by the OOM killer): so is this process,
        sys.stdout.flush()  # and the runner says "killed by SIGKILL", not "exited with 137"
        with contextlib.suppress(OSError, ValueError):
            signal.signal(-rc, signal.SIG_DFL)
        os.kill(os.getpid(), -rc)
        return 128 - rc  # a signal that does not end a process
    return rc


if __name__ == "__main__":
    sys.exit(main())
