"""Privacy accounting at the site: one budget per site and data set that no server can reset.

**What is accounted.**  Every release of something computed from the site's training data (a
training reply under DP) is one entry of the site's *ledger*, with the parameters that decide its
privacy loss; ε is recomputed from all entries with Google's ``dp-accounting`` (Rényi DP,
Mironov 2017, composed over every entry, converted to (ε, δ) at the site's ``dp-delta``).  The
accounting is never hand-written here: each entry becomes a ``dp_accounting.DpEvent``.

* ``dp-mode = "update"`` (``dp.py``): the whole local update is clipped to ‖Δ‖₂ ≤ C and one
  Gaussian N(0, (σC)²I) added.  The server sees *this site's* update, not a sum, so the unit
  protected is the site's whole contribution and neighbouring data sets D, D' may differ
  arbitrarily (replace-one at the level of the site): ‖clip(Δ(D)) − clip(Δ(D'))‖₂ ≤ 2C (the
  diameter of the C-ball), so the L2 sensitivity is **2C**, not C.  dp-accounting's
  ``GaussianDpEvent(noise_multiplier)`` is "noise std / L2 sensitivity" (its docstring), and its
  unsampled Gaussian is accounted the same under ``ADD_OR_REMOVE_ONE`` and ``REPLACE_ONE``
  (checked: both give 4.73 at multiplier 1, δ = 1e-5), so the release is
  ``GaussianDpEvent(σC / 2C) = GaussianDpEvent(σ/2)``.  At σ = 1, δ = 1e-5: ε = 10.73 for one
  release, 30.13 for five (the sensitivity-C figures 4.73 / 12.3 of fedmm ≤ 0.2 were too small).
  No amplification by sampling: the server chooses who trains, the site cannot rely on it.
* ``dp-mode = "record"`` (``dpsgd.py``, DP-SGD of Abadi et al., CCS 2016, with Opacus): every
  local step draws a Poisson sample of the site's N training records (each independently with
  probability q = train.batch_size / N, Opacus's ``UniformWithReplacementSampler``), clips each
  example's gradient to C and adds N(0, (σC)²) to the sum.  Unit protected: one record, add/remove
  adjacency.  One round of T = train.local_steps steps is
  ``SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(σ)), T)`` -- what Opacus's own
  ``RDPAccountant`` accounts for (q, σ, T) (tested equal).
* Mixed modes compose in the same accountant.  A site-level guarantee implies the record-level
  one at the same ε, so the ledger's ε is always a bound for one record; it is also a bound for
  the site's whole data set only while every entry is update-level (``Ledger.unit``).

**Keyed by what the site holds, not by what the server says.**  The ledger is
``<state root of the site>/privacy/<identity>.json`` with ``identity`` = sha256 of the site's
training data (``data_identity``): for a site directory the bytes of ``train.jsonl`` and the task
schema's sha256; for a rehearsed partition of a central benchmark the benchmark, the partition id
and the data directory (not the partitioning options the server sends: a server that changes them
still spends the same budget -- over-counting, the safe side).  Run id, seed, method and PEFT
type are recorded per entry for the audit and never part of the key, so a new run, seed, method
or PEFT type spends the same budget.  A site directory whose ``train.jsonl`` changes gets a new
ledger (the old one stays beside it); an operator who edits the data knowingly decides.

**Concurrency and crashes.**  ``Ledger.spend`` takes an exclusive ``fcntl.flock`` on
``<identity>.lock`` across read → check → append → atomic write (``fedmm.files.atomic_write``),
so two concurrent messages cannot both pass a budget that allows one.  The entry is written
**before** the training it pays for (the caller spends first, then trains, then replies): a crash
or a failure in between leaves a release counted that never left -- over-counting, the safe side.
An unreadable ledger is a loud error, never a fresh start.  Ledgers of fedmm ≤ 0.2 (one
``privacy.json`` per run directory) are not read: their releases were accounted with the wrong
sensitivity and per run; a site that used them should lower its ``dp-max-epsilon`` by what they
spent.

**Evaluation limits** (``EvaluationLog``, beside the ledger, under the same kind of lock): a site
answers at most ``max-evaluations-per-run`` evaluation requests per run id and at most
``max-evaluations-per-state`` per global state (sha256 of the received arrays, ``state_digest``),
counted over every run; beyond, it refuses with the reason.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fedmm.files import atomic_write

MODES = ("update", "record")
LEDGER_DIR = "privacy"


class PrivacyBudgetExceeded(RuntimeError):
    """This release would take the site's ε above its ``dp-max-epsilon``."""


class EvaluationLimit(RuntimeError):
    """This evaluation would exceed the site's ``max-evaluations-per-run`` or ``-per-state``."""


@dataclass(frozen=True)
class Release:
    """The accounting parameters of one release (one training reply under DP).

    ``mode``: ``update`` (one Gaussian on the clipped update, sensitivity 2C) or ``record``
    (DP-SGD: ``steps`` Poisson-sampled Gaussian steps with sampling probability
    ``sample_rate``); ``noise_multiplier`` σ: noise std / clip norm; ``clip_norm`` C (kept for
    the audit: ε does not depend on it)."""

    mode: str
    noise_multiplier: float
    clip_norm: float
    sample_rate: float = 1.0
    steps: int = 1

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"dp-mode must be one of {MODES}, got {self.mode!r}")
        if self.noise_multiplier < 0 or self.clip_norm <= 0:
            raise ValueError(f"a DP release needs σ >= 0 and C > 0, got σ = "
                             f"{self.noise_multiplier}, C = {self.clip_norm}")  # fmt: skip
        if not 0 < self.sample_rate <= 1 or self.steps < 0:
            raise ValueError(f"sample rate must be in (0, 1] and steps >= 0, got "
                             f"{self.sample_rate}, {self.steps}")  # fmt: skip

    def event(self):
        """This release as a ``dp_accounting.DpEvent`` (see the module docstring for why)."""
        import dp_accounting as dpa

        if self.mode == "update":  # L2 sensitivity 2C, noise std σC: multiplier σ/2
            return dpa.GaussianDpEvent(self.noise_multiplier / 2)
        step = dpa.PoissonSampledDpEvent(
            self.sample_rate, dpa.GaussianDpEvent(self.noise_multiplier)
        )
        return dpa.SelfComposedDpEvent(step, self.steps)

    @classmethod
    def from_entry(cls, entry: Mapping) -> Release:
        names = ("mode", "noise_multiplier", "clip_norm", "sample_rate", "steps")
        return cls(**{k: entry[k] for k in names})


def _quiet_orders(record: logging.LogRecord) -> bool:
    """dp-accounting warns once per fractional order α < 2 whose series for a sampled Gaussian
    does not converge (small q, small α) and leaves that order out: the bound over the other
    orders stays valid, so the warning (dozens per call) is dropped."""
    return "failed to converge" not in record.getMessage()


def epsilon(releases: Iterable[Release], delta: float) -> float:
    """ε at ``delta`` of all ``releases`` composed (dp-accounting's ``RdpAccountant``, its
    default orders, add/remove-one relation; see the module docstring for each event).

    0 for no release; ``inf`` when any release has σ = 0 (no noise).  Raises ``ValueError`` for
    δ outside (0, 1)."""
    if not 0 < delta < 1:
        raise ValueError(f"δ must be in (0, 1), got {delta}")
    releases = [r for r in releases if r.steps > 0]
    if not releases:
        return 0.0
    if min(r.noise_multiplier for r in releases) <= 0:
        return math.inf
    from dp_accounting.rdp import RdpAccountant

    logging.getLogger("absl").addFilter(_quiet_orders)
    accountant = RdpAccountant()
    for release in releases:
        accountant.compose(release.event())
    return float(accountant.get_epsilon(delta))


# ---------------------------------------------------------------------- where the budget lives
def _sha256_file(path: Path, digest) -> None:
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)


def data_identity(
    benchmark: str, data_dir: str, schema_sha256: str, partition_id: int = -1
) -> str:  # fmt: skip
    """sha256 (hex) naming the training data a site holds; the key of its ledger.

    ``partition_id < 0`` (a site directory): the bytes of ``<data_dir>/train.jsonl`` and the
    schema's sha256.  Else (rehearsal of a central benchmark): the benchmark name, the partition
    id and the absolute data directory.  Raises ``FileNotFoundError`` when a site directory has
    no ``train.jsonl``."""
    digest = hashlib.sha256()
    if partition_id < 0:
        train = Path(data_dir) / "train.jsonl"
        if not train.is_file():
            raise FileNotFoundError(f"{train} does not exist: the privacy ledger is keyed by the "
                                    "site's training data")  # fmt: skip
        digest.update(b"site\0" + schema_sha256.encode() + b"\0")
        _sha256_file(train, digest)
    else:
        where = str(Path(data_dir).resolve()) if data_dir else ""
        digest.update(f"rehearsal\0{benchmark}\0{partition_id}\0{where}".encode())
    return digest.hexdigest()


def ledger_path(state_root: Path, identity: str) -> Path:
    """``<state_root>/privacy/<identity>.json``: the one ledger of that data at that site."""
    return Path(state_root) / LEDGER_DIR / f"{identity}.json"


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive ``fcntl.flock`` on ``<path>.lock`` (blocking) for the ``with`` body: one
    process or thread at a time reads, checks and writes ``path``."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        raise RuntimeError("the privacy ledger's lock needs fcntl.flock (a POSIX system): a site "
                           "with DP runs on Linux or macOS") from None  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise TypeError(f"expected an object, got {type(data).__name__}")
        return data
    except (ValueError, TypeError) as exc:
        # never a silent fresh start: a lost ledger would reset what the site has spent
        raise RuntimeError(
            f"{what} {path} is unreadable ({exc}); restore it from a backup or move it away "
            "knowingly (what it counted would start again at 0)"
        ) from exc


class Ledger:
    """The releases of one site's data set over every run: ``{"releases": [entry, ...]}``, each
    entry a ``Release`` plus its audit fields (run id, round, method, PEFT type, time)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def entries(self) -> list[dict]:
        """Every recorded release (raises ``RuntimeError`` for an unreadable ledger)."""
        entries = _read_json(self.path, "privacy ledger").get("releases", [])
        try:
            for entry in entries:
                Release.from_entry(entry)
        except (KeyError, TypeError, ValueError) as exc:
            raise RuntimeError(f"privacy ledger {self.path} holds an invalid release ({exc!r}); "
                               "restore it from a backup") from exc  # fmt: skip
        return list(entries)

    def releases(self) -> list[Release]:
        return [Release.from_entry(e) for e in self.entries()]

    def epsilon(self, delta: float) -> float:
        """ε at ``delta`` spent so far."""
        return epsilon(self.releases(), delta)

    def unit(self) -> str:
        """What the spent ε protects: ``site`` while every release was update-level, else
        ``record``."""
        return "site" if all(r.mode == "update" for r in self.releases()) else "record"

    def spend(
        self, release: Release, delta: float, max_epsilon: float, audit: Mapping | None = None
    ) -> float:
        """Under the ledger's lock: ε after ``release``; refuses (``PrivacyBudgetExceeded``,
        nothing written) when it exceeds ``max_epsilon`` > 0 (0: no cap), else records the
        release (atomically) and returns the new ε.  Call it before the work it pays for."""
        with locked(self.path):
            entries = self.entries()
            before = [Release.from_entry(e) for e in entries]
            after = epsilon([*before, release], delta)
            if max_epsilon > 0 and after > max_epsilon:
                raise PrivacyBudgetExceeded(
                    f"privacy budget: this release ({release.mode}-level, σ = "
                    f"{release.noise_multiplier:g}) would take ε to {after:.3g} (δ = {delta:g}) > "
                    f"the site's dp-max-epsilon = {max_epsilon:g}; {len(entries)} releases of "
                    f"this data spent ε = {epsilon(before, delta):.3g} over all runs"
                )
            entry = asdict(release) | dict(audit or {}) | {"time": time.time()}
            atomic_write(self.path, json.dumps({"releases": [*entries, entry]}, indent=1).encode())
            return after


# ---------------------------------------------------------------------- evaluation limits
def state_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 (hex) of a global state: keys, dtypes, shapes and bytes, in key order."""
    digest = hashlib.sha256()
    for key in sorted(arrays):
        value = np.ascontiguousarray(arrays[key])
        digest.update(f"{key}\0{value.dtype.str}\0{value.shape}\0".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


class EvaluationLog:
    """How often this site answered evaluations, over every run: ``{"runs": {run id: n},
    "states": {state sha256: n}}`` in ``<ledger>.evaluations.json``."""

    def __init__(self, ledger: Path) -> None:
        self.path = Path(ledger).with_suffix(".evaluations.json")

    def count(self, run_id: str, digest: str, per_run: int, per_state: int) -> None:
        """Under the lock: refuse (``EvaluationLimit``, nothing written) an evaluation that would
        be the (per_run+1)-th of run ``run_id`` or the (per_state+1)-th of the state ``digest``;
        else count it (atomically).  A limit of 0 means no limit."""
        with locked(self.path):
            data = _read_json(self.path, "evaluation log")
            runs, states = dict(data.get("runs", {})), dict(data.get("states", {}))
            if per_run > 0 and runs.get(run_id, 0) >= per_run:
                raise EvaluationLimit(
                    f"this site already answered {runs[run_id]} evaluations of run {run_id} "
                    f"(its max-evaluations-per-run = {per_run})"
                )
            if per_state > 0 and states.get(digest, 0) >= per_state:
                raise EvaluationLimit(
                    f"this site already evaluated this global state (sha256 {digest[:12]}) "
                    f"{states[digest]} times (its max-evaluations-per-state = {per_state})"
                )
            runs[run_id], states[digest] = runs.get(run_id, 0) + 1, states.get(digest, 0) + 1
            atomic_write(self.path, json.dumps({"runs": runs, "states": states}).encode())


__all__ = ["MODES", "EvaluationLimit", "EvaluationLog", "Ledger", "PrivacyBudgetExceeded",
           "Release", "data_identity", "epsilon", "ledger_path", "locked",
           "state_digest"]  # fmt: skip
