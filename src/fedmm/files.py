"""Crash-consistent file writes: a reader (or a process restarted after a crash, or after the
machine lost power) sees the old file or the new one, never half of one.

    write the data to  <dir>/.fedmm-<random>.tmp      (same directory: same file system)
    fsync the temporary file                          (its bytes are on disk ...)
    os.replace(temporary, target)                     (... before the name points at them)
    fsync the directory                               (the new name itself is on disk)

An exception between the steps removes the temporary file; a killed process leaves it behind.
``remove_stale_temps`` deletes such leftovers -- only files named by these helpers
(``.fedmm-*.tmp``), never anything else -- and is called when a run starts (for ``<out>`` and
``<out>/checkpoints``) and before a client saves its state (its state directory).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

TMP_PREFIX, TMP_SUFFIX = ".fedmm-", ".tmp"


def fsync_dir(directory: str | Path) -> None:
    """Make a rename or a new file in ``directory`` durable (a no-op where directories cannot
    be opened, e.g. on Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a directory; the rename still holds
        pass
    finally:
        os.close(fd)


def _atomic(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        dir=path.parent, prefix=TMP_PREFIX, suffix=TMP_SUFFIX, delete=False
    ) as tmp:
        try:
            write(tmp)
            tmp.flush()
            os.fsync(tmp.fileno())
        except Exception:
            tmp.close()
            os.unlink(tmp.name)
            raise
    try:
        os.replace(tmp.name, path)
    except Exception:
        Path(tmp.name).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably (parent directories are created)."""
    _atomic(path, lambda fh: fh.write(data))


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj)`` to ``path`` atomically and durably (parent directories are created)."""
    import torch

    _atomic(path, lambda fh: torch.save(obj, fh))


def remove_stale_temps(directory: str | Path) -> list[Path]:
    """Delete the temporary files that interrupted writes of ``atomic_write`` /
    ``atomic_torch_save`` left in ``directory`` (not its subdirectories); returns them.

    Call it where no write into ``directory`` is under way (a run's start): a live write's
    temporary file looks the same."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for stale in sorted(directory.glob(f"{TMP_PREFIX}*{TMP_SUFFIX}")):
        try:
            stale.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("could not remove the stale temporary file %s: %s", stale, exc)
            continue
        removed.append(stale)
        log.info("removed %s, left by an interrupted write", stale)
    return removed


__all__ = ["TMP_PREFIX", "TMP_SUFFIX", "atomic_torch_save", "atomic_write", "fsync_dir",
           "remove_stale_temps"]  # fmt: skip
