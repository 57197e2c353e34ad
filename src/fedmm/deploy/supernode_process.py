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

**A warm worker per run** (Flower's ``flwr-clientapp`` handles exactly one message,
``flwr/supernode/runtime/run_clientapp.py``, so every message paid imports, model building and data
loading again -- about 8.5 s, docs/benchmarks.md "What a deployed round costs"): the executor keeps
one long-lived ``trusted_clientapp --worker`` process for the run whose tasks it is serving and
hands it each task's token; the worker checks every task's app as a one-task process does and keeps
the imports, the model and the encoded site data across the run's messages. A task of another run
ends the worker and starts a fresh one (nothing of one run's process serves another, whatever its
config); a task that arrives while the worker is busy runs in a one-task process, as before; an
idle worker ends after ``--worker-idle`` seconds (its memory is one model and one site's data).
``--no-warm-worker``: one process per task, as before.

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
BUSY_WAIT_SECONDS = 2.0  # a task waits this long for the busy worker before a one-task process
WORKER_IDLE_SECONDS = 600.0  # a warm worker idle this long ends (frees its model and data)


class WarmWorker:
    """One long-lived ``trusted_clientapp --worker`` process serving the tasks of run ``run_id``:
    tokens go to its stdin, each task's exit code comes back as a line on a pipe."""

    def __init__(self, cmd: list[str], run_id: int) -> None:
        self.run_id = run_id
        read_fd, write_fd = os.pipe()
        try:
            self.proc = subprocess.Popen([*cmd, "--worker", "--status-fd", str(write_fd)],
                                         stdin=subprocess.PIPE, text=True, pass_fds=(write_fd,))  # fmt: skip
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        os.set_blocking(read_fd, False)
        self._status = read_fd
        self.pending = 0  # tasks handed over and not yet finished
        self.tasks_done = 0
        self.idle_since = time.monotonic()

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def poll(self) -> None:
        """Read the exit codes of the tasks finished since the last call."""
        try:
            data = os.read(self._status, 4096)
        except BlockingIOError:
            return
        done = data.count(b"\n")
        if done:
            self.pending -= done
            self.tasks_done += done
            if self.pending == 0:
                self.idle_since = time.monotonic()

    @property
    def busy(self) -> bool:
        return self.pending > 0

    def wait_idle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the worker's tasks to finish; whether they did (the
        next message of a run often arrives just as the reply to the previous one left)."""
        deadline = time.monotonic() + timeout
        while True:
            self.poll()
            if not self.busy or not self.alive or time.monotonic() >= deadline:
                return not self.busy
            time.sleep(0.05)

    def submit(self, token: str) -> None:
        self.proc.stdin.write(token + "\n")
        self.proc.stdin.flush()
        self.pending += 1

    def close(self, grace: float = 5.0) -> None:
        """End of stdin (the worker finishes its task and exits), then SIGTERM, then SIGKILL."""
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if sig is not None and self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=grace)
                break
        with contextlib.suppress(OSError):
            os.close(self._status)


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

    def __init__(
        self, runtime_port: int, secret: bytes, trusted_apps: list[str], warm: bool = True,
        worker_idle: float = WORKER_IDLE_SECONDS,
    ) -> None:  # fmt: skip
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
        self.warm, self.worker_idle = warm, worker_idle
        self.worker: WarmWorker | None = None
        self.workers_started = 0
        self._last_problem = ""

    def task_command(self) -> list[str]:
        """The trusted ClientApp's command (without the per-task or worker arguments)."""
        # -P: the task imports fedmm from the site's installation, never from its working dir
        cmd = [sys.executable, "-P", "-m", "fedmm.deploy.trusted_clientapp",
               "--runtime-api-address", self.address, "--parent-pid", str(os.getpid())]  # fmt: skip
        for digest in self.trusted_apps:
            cmd += ["--trusted-app", digest]
        return cmd

    def _check_worker(self) -> None:
        """Forget a worker that died; end one idle for longer than ``worker_idle``."""
        worker = self.worker
        if worker is None:
            return
        worker.poll()
        if not worker.alive:
            if worker.pending:
                log.warning("fedmm site executor: the warm worker of run %d ended (exit %s) "
                            "with %d task(s) unfinished", worker.run_id, worker.proc.returncode,
                            worker.pending)  # fmt: skip
            self.worker = None
        elif not worker.busy and time.monotonic() - worker.idle_since > self.worker_idle:
            log.info("fedmm site executor: warm worker of run %d idle for %.0f s: ended",
                     worker.run_id, self.worker_idle)  # fmt: skip
            worker.close()
            self.worker = None

    def dispatch(self, run_id: int, token: str) -> subprocess.Popen | None:
        """Hand a task to the run's warm worker (started or replaced as needed); a one-task
        process when warm workers are off or the worker is busy.  Returns that one-task
        process, or None when the worker took the task."""
        self._check_worker()
        worker = self.worker
        if worker is not None and worker.run_id == run_id:
            worker.wait_idle(BUSY_WAIT_SECONDS)
        if self.warm and not (worker is not None and worker.busy):
            if worker is not None and worker.run_id != run_id:
                log.info("fedmm site executor: run %d's task: the warm worker of run %d ends",
                         run_id, worker.run_id)  # fmt: skip
                worker.close()
                worker = self.worker = None
            if worker is None:
                worker = self.worker = WarmWorker(self.task_command(), run_id)
                self.workers_started += 1
                log.info("fedmm site executor: warm worker for run %d started (pid %d)",
                         run_id, worker.proc.pid)  # fmt: skip
            worker.submit(token)
            return None
        from fedmm.deploy.trusted_clientapp import TOKEN_ENV

        proc = subprocess.Popen(self.task_command(), env=dict(os.environ, **{TOKEN_ENV: token}))
        self.tasks.append(proc)
        return proc

    def poll_once(self) -> subprocess.Popen | None:
        """One ``AcquireTask``; the started task process, or None when there was none."""
        import httpx
        from flwr.proto.runtime_pb2 import AcquireTaskRequest
        from flwr.supercore.constant import TaskType

        self.tasks = [t for t in self.tasks if t.poll() is None]
        self._check_worker()
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
        proc = self.dispatch(res.task.run_id, res.token)
        where = (
            f"one-task process (pid {proc.pid})"
            if proc
            else f"warm worker (pid {self.worker.proc.pid})"
        )
        log.info("fedmm site executor: task %d of run %d -> trusted ClientApp, %s",
                 res.task.task_id, res.task.run_id, where)  # fmt: skip
        return proc

    def close(self, grace: float = 5.0) -> None:
        """End the warm worker and the running tasks (SIGTERM, then SIGKILL after ``grace``
        seconds)."""
        if self.worker is not None:
            self.worker.close(grace)
            self.worker = None
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for task in self.tasks:
                if task.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        task.send_signal(sig)
            deadline = time.monotonic() + grace
            while any(t.poll() is None for t in self.tasks) and time.monotonic() < deadline:
                time.sleep(0.1)
        self.client.close()


def run(base: list[str], runtime_port: int, trusted_apps: list[str], warm: bool = True,
        worker_idle: float = WORKER_IDLE_SECONDS) -> int:  # fmt: skip
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
    executor = SiteExecutor(runtime_port, secret, trusted_apps, warm, worker_idle)
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
    parser.add_argument(
        "--no-warm-worker",
        action="store_true",
        help="one process per task (imports and model built for every message)",
    )
    parser.add_argument("--worker-idle", type=float, default=WORKER_IDLE_SECONDS,
                        help="seconds an idle warm worker is kept (default %(default)s)")  # fmt: skip
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
        rc = run(base, args.runtime_port, args.trusted_app, not args.no_warm_worker,
                 args.worker_idle)  # fmt: skip
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
