"""What a site keeps, where, and how it is removed (``fedmm site purge``).

Everything a site derives from its data stays in its own directories (``consent.site_root``:
``<state-dir>/<site>/``, default ``$XDG_STATE_HOME/fedmm/<site>/``):

* **feature cache** -- ``<cache-dir>/features/*.pt`` (default ``cache-dir``:
  ``<site root>/cache``): the frozen backbone's features of the site's images, patient-derived.
  Kept until purged; recomputed when missing.
* **client state** -- ``<site root>/<run>/client.pt`` (+ ``client.pt.prev``): a run's private
  models (FedDAT's A_c, personal heads, ...), trained on the site's data.  Kept after a run ends
  (a resumed run needs it) until purged.
* **privacy ledger** -- ``<site root>/privacy/<sha256 of the data>.json``: every DP release
  computed from that data over every run (``privacy.py``), and the evaluation counts.
* **audit log** -- ``<site root>/audit.jsonl``: every message received and sent.

``purge`` removes the cache and/or the client state.  The privacy ledger and the audit log are
removed only with ``records=True`` (``--also-delete-privacy-ledger-and-audit-log``): the ledger is
what keeps a site within its ε budget when a run is resumed (without it, the site would account
from zero and could release more than it agreed to), and the audit log is the site's only record
of what left it.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from fedmm.federation import consent
from fedmm.federation.audit import AUDIT_FILE
from fedmm.federation.privacy import LEDGER_DIR

log = logging.getLogger(__name__)
WHAT = ("cache", "state", "all")
STATE_FILES = ("client.pt", "client.pt.prev")  # and a killed write's .fedmm-*.tmp


def cache_dir(settings: Any) -> Path:
    """The site's feature cache directory: ``cache-dir``, else ``<site root>/cache`` for a site
    directory (as ``clientapp.Site`` sets it).  ``ValueError`` for a rehearsed partition without
    ``cache-dir``: it shares the runtime's default cache with the other partitions, which a purge
    of one site must not empty (and must not claim to have emptied)."""
    if settings.cache_dir:
        return Path(settings.cache_dir)
    if consent.site_directory_problem(Path(settings.data_dir)) is not None:
        raise ValueError("this node rehearses a partition and uses the shared feature cache "
                         "($XDG_CACHE_HOME/fedmm); remove it by hand, or give it its own cache-dir")  # fmt: skip
    return consent.default_cache_dir(settings)


def _remove(path: Path, removed: list[Path]) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
    removed.append(path)


def purge(settings: Any, what: str = "all", records: bool = False) -> list[Path]:
    """Remove this site's derived data; returns what was removed.

    ``what``: ``cache`` (``<cache-dir>/features``), ``state`` (every run's ``client.pt``,
    ``client.pt.prev`` and temporary files under the site root) or ``all``.  ``records``: also
    every run's privacy ledger and the audit log (see the module docstring for why not by
    default).  A run directory left empty is removed.  ``ValueError`` for another ``what``, and
    for ``cache`` on a rehearsed partition without its own ``cache-dir`` (``cache_dir``)."""
    if what not in WHAT:
        raise ValueError(f"--what must be one of {', '.join(WHAT)}, got {what!r}")
    if records and what == "cache":
        raise ValueError("the privacy ledger and the audit log are state: give --what state or all")
    removed: list[Path] = []
    if what in ("cache", "all"):
        features = cache_dir(settings) / "features"
        if features.exists():
            _remove(features, removed)
    root = consent.site_root(settings)
    if what in ("state", "all") and root.is_dir():
        own_cache = consent.default_cache_dir(settings)
        ledgers = root / LEDGER_DIR
        for run in sorted(
            p for p in root.iterdir() if p.is_dir() and p not in (own_cache, ledgers)
        ):
            doomed = [run / name for name in STATE_FILES] + list(run.glob(".fedmm-*.tmp"))
            for path in doomed:
                if path.exists():
                    _remove(path, removed)
            if not any(run.iterdir()):
                run.rmdir()
    for record in (root / LEDGER_DIR, root / AUDIT_FILE) if records else ():
        if record.exists():
            _remove(record, removed)
    for path in removed:
        log.info("purged %s", path)
    return removed


__all__ = ["WHAT", "cache_dir", "purge"]
