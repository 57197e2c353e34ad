"""What the server half of a method sees: a client's ``ClientInfo``, its training ``Reply``, and the
sample-weighted average every averaging method starts from (FedAvg, McMahan et al. 2017, Alg. 1)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedmm.methods.state import Arrays


# ---------------------------------------------------------------------- server helpers
@dataclass(frozen=True)
class ClientInfo:
    """What the server learns about a client from its site (the query handshake): its name, its
    task of the schema ("" on single-task schemas) and its modalities.  Never its data."""

    client_id: str
    task: str = ""
    modalities: tuple[str, ...] = ("image", "text")


@dataclass
class Reply:
    """One client's training reply as the server's aggregation sees it."""

    client_index: int
    arrays: Arrays
    num_examples: int


def weighted_average(replies: Sequence[Reply], weighting: str = "samples") -> Arrays:
    """``Σ_k w_k θ_k`` with ``w_k ∝ n_k`` (``samples``) or ``w_k = 1/K`` (``uniform``)."""
    if not replies:
        raise ValueError("cannot aggregate zero replies")
    if weighting not in ("samples", "uniform"):
        raise ValueError(f"fed.weighting must be 'samples' or 'uniform', got {weighting!r}")
    weights = np.array(
        [r.num_examples if weighting == "samples" else 1.0 for r in replies], dtype=np.float64
    )
    if weights.sum() <= 0:
        raise ValueError("aggregation weights sum to zero")
    weights /= weights.sum()
    keys = replies[0].arrays.keys()
    return {
        k: sum(w * r.arrays[k].astype(np.float64) for w, r in zip(weights, replies)).astype(
            np.float32
        )
        for k in keys
    }
