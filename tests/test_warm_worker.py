"""The site executor's warm worker (``deploy/supernode_process.py``): the tasks of one run go to
one long-lived ClientApp process, a task of another run never reaches that process, a task that
arrives while the worker is busy runs in a one-task process; and a process's runtime (model +
encoded data) is reused only for the same model / data / precision config.

The executor is driven directly (``SiteExecutor.dispatch``, what ``poll_once`` calls with each
acquired task) with a stand-in ClientApp command that speaks the worker protocol (a token per
stdin line, an exit code per line on ``--status-fd``) and records which process served which
token.  The real worker (``trusted_clientapp --worker``) runs in tests/test_deployment.py, which
also counts the model builds in each site's log.
"""

from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path

import pytest

from fedmm.deploy.supernode_process import SiteExecutor

STANDIN = textwrap.dedent("""\
    import os, sys, time
    log = sys.argv[1]
    args = sys.argv[2:]
    def serve(token, how):
        while token.startswith("slow") and not os.path.exists(log + ".release"):
            time.sleep(0.05)  # busy until the test releases it
        with open(log, "a") as f:
            f.write(f"{how} {os.getpid()} {token}\\n")
    if "--worker" in args:
        status = os.fdopen(int(args[args.index("--status-fd") + 1]), "w", buffering=1)
        for line in sys.stdin:
            serve(line.strip(), "warm")
            status.write("0\\n")
    else:
        serve(os.environ["FEDMM_TASK_TOKEN"], "cold")
""")


@pytest.fixture
def executor(tmp_path, monkeypatch):
    log = tmp_path / "served.log"
    script = tmp_path / "standin.py"
    script.write_text(STANDIN)
    ex = SiteExecutor(runtime_port=1, secret=b"x" * 32, trusted_apps=[])
    monkeypatch.setattr(ex, "task_command", lambda: [sys.executable, str(script), str(log)])
    yield ex, log
    ex.close(grace=2)


def served(log: Path, n: int, timeout: float = 60) -> list[tuple[str, int, str]]:
    """The first ``n`` (how, pid, token) lines of the stand-in's log, waiting for them."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = log.read_text().splitlines() if log.exists() else []
        if len(lines) >= n:
            return [(h, int(p), t) for h, p, t in (line.split() for line in lines[:n])]
        time.sleep(0.1)
    raise AssertionError(f"only {log.read_text() if log.exists() else ''!r} after {timeout} s")


def wait_idle(ex: SiteExecutor, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while ex.worker is not None and ex.worker.busy and time.monotonic() < deadline:
        ex._check_worker()
        time.sleep(0.05)
    assert ex.worker is None or not ex.worker.busy


def test_a_runs_tasks_share_one_warm_process_and_another_run_gets_a_fresh_one(executor):
    ex, log = executor
    for token in ("a1", "a2", "a3"):  # three messages of run 1, one after another
        assert ex.dispatch(1, token) is None  # taken by the warm worker
        wait_idle(ex)
    first = ex.worker.proc
    assert ex.dispatch(2, "b1") is None  # another run: the old worker ends, a new one starts
    rows = served(log, 4)
    assert [t for _, _, t in rows] == ["a1", "a2", "a3", "b1"]
    assert all(how == "warm" for how, _, _ in rows)
    pids = [pid for _, pid, _ in rows]
    assert pids[0] == pids[1] == pids[2] == first.pid  # one process served the whole run
    assert pids[3] != first.pid and first.poll() is not None  # run 1's process is gone
    assert ex.workers_started == 2 and ex.worker.run_id == 2


def test_a_task_arriving_while_the_worker_is_busy_runs_in_a_one_task_process(executor):
    ex, log = executor
    assert ex.dispatch(1, "slow1") is None
    cold = ex.dispatch(1, "t2")  # the worker is still on slow1 (held until released)
    assert cold is not None
    cold.wait(timeout=60)
    Path(f"{log}.release").touch()
    rows = {t: (how, pid) for how, pid, t in served(log, 2)}
    assert rows["t2"] == ("cold", cold.pid) and rows["slow1"][0] == "warm"
    wait_idle(ex)
    assert ex.dispatch(1, "t3") is None  # idle again: back to the warm worker
    assert served(log, 3)[2] == ("warm", rows["slow1"][1], "t3")


def test_without_warm_workers_every_task_gets_its_own_process(executor):
    ex, log = executor
    ex.warm = False
    procs = [ex.dispatch(1, t) for t in ("a1", "a2")]
    for p in procs:
        p.wait(timeout=60)
    rows = served(log, 2)
    assert [how for how, _, _ in rows] == ["cold", "cold"] and rows[0][1] != rows[1][1]
    assert ex.worker is None


def test_an_idle_worker_ends_after_worker_idle_seconds(executor):
    ex, log = executor
    ex.worker_idle = 0.5
    ex.dispatch(1, "a1")
    wait_idle(ex)
    proc = ex.worker.proc
    time.sleep(1.0)
    ex._check_worker()
    assert ex.worker is None and proc.wait(timeout=30) is not None


def test_the_runtime_is_reused_only_for_the_same_model_and_data_config(tiny_cfg):
    """What a warm worker keeps between the messages of a run: ``get_runtime``'s one runtime,
    rebuilt when the model, data or precision config differ."""
    from fedmm.runtime import get_runtime

    first = get_runtime(tiny_cfg)
    assert get_runtime(tiny_cfg.with_overrides({"seed": 5, "method": "feddat"})) is first
    for change in ({"model.backbone_dropout": 0.0}, {"train.precision": "bf16"},
                   {"data.train_per_client": 7}):  # fmt: skip
        other = get_runtime(tiny_cfg.with_overrides(change))
        assert other is not first, change
        assert get_runtime(tiny_cfg) is not other  # one runtime per process: rebuilt again
