"""Privacy accounting at the site: each client keeps its own (ε, δ) over the rounds it trained.

A client that uploads with clip norm C and noise multiplier σ (``dp.py``) releases, per round it
takes part in, one Gaussian mechanism of L2 sensitivity C and noise std σC over its whole update
-- client-level (local) DP.  Composed over its T releases with Rényi DP (Mironov 2017; Flower's
``RdpAccountant`` over Google's ``dp-accounting``), without sampling amplification (the server
chooses the sample, so a site cannot rely on it)::

    ε(δ) = min_α  [ T·α/(2σ²) + log(1/δ)/(α−1) ]   (RDP of the Gaussian, converted; dp-accounting
                                                     uses the tighter conversion)

σ = 0 means no noise: ε = ∞.  The ledger (one JSON file beside the client state, written
atomically) lists every release with its round and σ; a redone round after a resume is a new
release and counts again (the server may have seen the first one).  ``check_budget`` refuses a
release that would take ε above the site's ``dp-max-epsilon``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from fedmm.files import atomic_write

LEDGER = "privacy.json"


class PrivacyBudgetExceeded(RuntimeError):
    """Training this round would take the site's ε above its ``dp-max-epsilon``."""


def epsilon(sigmas: list[float], delta: float) -> float:
    """ε at ``delta`` after one Gaussian release per entry of ``sigmas`` (noise multipliers).

    Raises nothing: no release gives 0, any release with σ = 0 gives ``inf``."""
    if not sigmas:
        return 0.0
    if min(sigmas) <= 0:
        return math.inf
    from flwr.supercore.privacy_accounting import (
        GaussianPrivacyEvent,
        NeighboringRelation,
        PrivacyConfig,
        SamplingMethod,
    )
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    accountant = RdpAccountant(
        PrivacyConfig(delta, 1, NeighboringRelation.ADD_OR_REMOVE_ONE,
                      SamplingMethod.NO_AMPLIFICATION)
    )  # fmt: skip
    for sigma in sigmas:
        accountant.compose(GaussianPrivacyEvent(float(sigma), 1, 1))
    return accountant.get_epsilon(delta)


class Ledger:
    """The releases of one client in one run: ``[{"round": r, "sigma": σ, "clip": C}]``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.releases: list[dict] = []
        if path.is_file():
            try:
                self.releases = list(json.loads(path.read_text())["releases"])
            except (ValueError, KeyError, TypeError) as exc:
                # never a silent fresh start: a lost ledger would reset the site's spent budget
                raise RuntimeError(
                    f"privacy ledger {path} is unreadable ({exc}); restore it from a backup or "
                    "move it away knowingly (its budget would start again at 0)"
                ) from exc

    def epsilon(self, delta: float, extra: float | None = None) -> float:
        sigmas = [float(r["sigma"]) for r in self.releases]
        return epsilon(sigmas + ([extra] if extra is not None else []), delta)

    def check_budget(self, sigma: float, delta: float, max_epsilon: float) -> float:
        """ε after one more release with ``sigma``; raises when it exceeds ``max_epsilon`` > 0."""
        after = self.epsilon(delta, sigma)
        if max_epsilon > 0 and after > max_epsilon:
            raise PrivacyBudgetExceeded(
                f"privacy budget: training this round would spend ε = {after:.3g} (δ = {delta:g}) "
                f"> the site's dp-max-epsilon = {max_epsilon:g} after {len(self.releases)} "
                "releases; this site sits out the rest of the run"
            )
        return after

    def record(self, rnd: int, sigma: float, clip: float) -> None:
        self.releases.append({"round": rnd, "sigma": sigma, "clip": clip})
        atomic_write(self.path, json.dumps({"releases": self.releases}, indent=1).encode())


__all__ = ["LEDGER", "Ledger", "PrivacyBudgetExceeded", "epsilon"]
