"""FedPIA -- Permuting and Integrating Adapters (Saha et al., AAAI 2025, arXiv 2412.14424).

**A reconstruction**: the paper has no public code; what it confirms is marked (paper), every other
choice is an option with the default below (see ../shared docs, methods.md).

Why: adapters trained on heterogeneous clients land in different basins; averaging them unit by
unit mixes unrelated hidden units.  A bottleneck adapter ``A(h) = W_up ReLU(W_down h + b_down) +
b_up`` is unchanged when its r hidden units are permuted -- rows of W_down and b_down and columns of
W_up together -- so units can be matched before merging (one r×r plan per adapter layer; d is
pinned by the backbone, so there is nothing to chain across layers).

Unit i of adapter P is the vector u_i = [W_down[i,:], b_down[i], W_up[:,i]].  Aligning P to an
anchor Q solves the assignment

    π* = argmin_π Σ_j ‖u^P_{π(j)} − u^Q_j‖²          (exact: scipy's linear_sum_assignment)

and the aligned adapter's unit j is P's unit π*(j).

Server (paper: align every upload to an anchor layer by layer, merge by a weighted sum -- a
Wasserstein barycenter of the hidden units):
    anchor Q ← previous global adapter (``fedpia.anchor = "global"``), or the plain weighted
              average of the uploads (``"fedavg"``), or the upload of the largest client
              (``"largest"``);
    A^{t+1} = Σ_k w_k π_k(A_k),  w_k ∝ n_k;  repeated ``fedpia.iterations`` times with Q ← A^{t+1}.
The projection and the head have no such symmetry: they are averaged as in FedAvg.

Client (paper: align the received global adapter G to the local adapter L, integrate, train):
    L ← λ·L + (1 − λ)·π(G) (``fedpia.lam``, default 0.5); projection and head likewise without π;
    in its first round a client starts from the global model.  Train ``train.local_steps`` steps on
    CE, keep the result as the local model, upload it.
Views: ``global`` = the merged global model; ``personalized`` = the client's local model.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from fedmm.config import ConfigError
from fedmm.methods.base import (
    ClientContext,
    NDArrays,
    Reply,
    State,
    to_numpy,
    weighted_average,
)
from fedmm.methods.fedavg import FedAvg

ADAPTER = "adapter.global_adapter"
ANCHORS = ("global", "fedavg", "largest")


# ---------------------------------------------------------------------- permutation algebra
def adapter_layers(state: NDArrays, prefix: str = ADAPTER) -> list[str]:
    """``["{prefix}/0", "{prefix}/1", ...]``: one entry per adapter layer in ``state``."""
    layers = {
        k.rsplit(".down.weight", 1)[0]
        for k in state
        if k.startswith(prefix) and k.endswith(".down.weight")
    }
    return sorted(layers, key=lambda k: int(k.rsplit("/", 1)[1]))


def unit_vectors(state: NDArrays, layer: str) -> np.ndarray:
    """``(r, 2d + 1)``: row i = [W_down[i,:], b_down[i], W_up[:,i]]."""
    return np.concatenate(
        [
            state[f"{layer}.down.weight"],
            state[f"{layer}.down.bias"][:, None],
            state[f"{layer}.up.weight"].T,
        ],
        axis=1,
    )


def permute(state: NDArrays, layer: str, perm: np.ndarray) -> NDArrays:
    """The adapter with hidden unit j taken from unit ``perm[j]`` (function unchanged)."""
    out = dict(state)
    out[f"{layer}.down.weight"] = state[f"{layer}.down.weight"][perm]
    out[f"{layer}.down.bias"] = state[f"{layer}.down.bias"][perm]
    out[f"{layer}.up.weight"] = state[f"{layer}.up.weight"][:, perm]
    return out


def match(state: NDArrays, anchor: NDArrays, layer: str) -> np.ndarray:
    """π* minimising Σ_j ‖u^state_{π(j)} − u^anchor_j‖² (exact assignment)."""
    p, q = unit_vectors(state, layer), unit_vectors(anchor, layer)
    cost = ((q[:, None, :] - p[None, :, :]) ** 2).sum(-1)  # cost[j, i]: anchor unit j <- unit i
    rows, cols = linear_sum_assignment(cost)
    perm = np.empty(len(rows), dtype=np.int64)
    perm[rows] = cols
    return perm


def align(state: NDArrays, anchor: NDArrays, prefix: str = ADAPTER) -> NDArrays:
    """``state`` with every adapter layer's hidden units permuted to match ``anchor``."""
    for layer in adapter_layers(state, prefix):
        state = permute(state, layer, match(state, anchor, layer))
    return state


# ---------------------------------------------------------------------- the method
class FedPIA(FedAvg):
    name = "fedpia"

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        if cfg.fedpia.anchor not in ANCHORS:
            raise ConfigError(f"fedpia.anchor must be one of {ANCHORS}, got {cfg.fedpia.anchor!r}")
        if not 0.0 <= cfg.fedpia.lam <= 1.0 or cfg.fedpia.iterations < 1:
            raise ConfigError("fedpia.lam must be in [0, 1] and fedpia.iterations >= 1")

    # ------------------------------------------------------------------ server
    def aggregate(self, global_state: NDArrays, replies: Sequence[Reply]) -> NDArrays:
        weighting = self.cfg.fed.weighting
        anchor = {
            "global": lambda: global_state,
            "fedavg": lambda: weighted_average(replies, weighting),
            "largest": lambda: max(replies, key=lambda r: r.num_examples).arrays,
        }[self.cfg.fedpia.anchor]()
        merged = anchor
        for _ in range(self.cfg.fedpia.iterations):
            aligned = [
                Reply(r.client_index, align(r.arrays, anchor), r.num_examples) for r in replies
            ]
            merged = weighted_average(aligned, weighting)
            anchor = merged
        return merged

    # ------------------------------------------------------------------ client
    def client_start(self, ctx: ClientContext, global_state: State) -> State:
        """λ·L + (1 − λ)·π(G): the local model integrated with the aligned global one."""
        local = {k.removeprefix("personal."): v for k, v in ctx.state.items()}
        if not local:  # first round on this client
            return global_state
        lam = self.cfg.fedpia.lam
        aligned = align(to_numpy(global_state), to_numpy(local))
        return {k: lam * local[k] + (1 - lam) * torch.from_numpy(aligned[k]) for k in local}
