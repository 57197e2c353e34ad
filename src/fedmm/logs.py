"""Logging inside Flower's app processes.

``flwr-serverapp`` and ``flwr-clientapp`` (one process per run, one per message) never configure
Python logging, so without this fedmm's INFO lines (the server's line per round, a client's
"restored client state of round R") would not show anywhere.  The ServerApp's main and the
ClientApp's handlers call ``configure(role)`` first:

* a process whose root logger already has handlers (``fedmm run``: ``cli.main`` configured it,
  WARNING unless ``-v``; pytest) is left alone;
* otherwise the ``fedmm`` logger gets one handler on stderr (which the SuperNode's log and
  ``flwr run --stream`` show), at level ``$FEDMM_LOG_LEVEL`` (default INFO), each line naming
  the process's role and id: ``2025-01-01 12:00:00,000 INFO fedmm-serverapp[4242]
  fedmm.federation.serverapp: round 1/5: ...``.

A simulation's workers (Ray processes) inherit the environment, so ``engine`` sets
``FEDMM_LOG_LEVEL`` to the level of the process that runs the simulation (``workers_log_like_me``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator

ENV = "FEDMM_LOG_LEVEL"
DEFAULT_LEVEL = "INFO"
_MARK = "_fedmm_configured"


def level_from_env() -> int:
    """``$FEDMM_LOG_LEVEL`` as a logging level (a name such as ``DEBUG`` or a number); INFO when
    it is unset or not a level."""
    value = os.environ.get(ENV, "").strip().upper() or DEFAULT_LEVEL
    if value.isdigit():
        return int(value)
    level = logging.getLevelName(value)
    return level if isinstance(level, int) else logging.INFO


def configure(role: str) -> bool:
    """Show fedmm's log lines in this process, tagged with ``role`` (``serverapp``,
    ``clientapp``); returns whether it configured anything.  Idempotent, and a no-op where the
    root logger is already configured."""
    logger = logging.getLogger("fedmm")
    if logging.getLogger().handlers or any(getattr(h, _MARK, False) for h in logger.handlers):
        return False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(
            f"%(asctime)s %(levelname)s fedmm-{role}[%(process)d] %(name)s: %(message)s"
        )
    )
    setattr(handler, _MARK, True)
    logger.addHandler(handler)
    logger.setLevel(level_from_env())
    return True


@contextlib.contextmanager
def workers_log_like_me() -> Iterator[None]:
    """Within the block, processes started from this one (a simulation's workers) log fedmm's
    lines at this process's level -- unless ``$FEDMM_LOG_LEVEL`` already says otherwise."""
    if ENV in os.environ:
        yield
        return
    os.environ[ENV] = logging.getLevelName(logging.getLogger("fedmm").getEffectiveLevel())
    try:
        yield
    finally:
        os.environ.pop(ENV, None)


__all__ = ["ENV", "configure", "level_from_env", "workers_log_like_me"]
