"""FedPIA -- Permuting and Integrating Adapters (Saha et al., AAAI 2025, arXiv 2412.14424).

**A reconstruction**: the paper has no public code; what it confirms is marked (paper), every other
choice is an option with the default below (see ../shared docs, methods.md).

Why: adapters trained on heterogeneous clients land in different basins; averaging them unit by
unit mixes unrelated hidden units.  A bottleneck adapter ``A(h) = W_up ReLU(W_down h + b_down) +
b_up`` is unchanged when its r hidden units are permuted -- rows of W_down and b_down and columns of
W_up together -- so units can be matched before merging (one r×r plan per adapter layer; d is
pinned by the backbone, so there is nothing to chain across layers).  LoRA's ``B A`` is unchanged
when its r rank components are permuted (rows of A with columns of B): the same algebra aligns the
rank axis.  Prompt tokens and BitFit biases have no such symmetry, so FedPIA refuses them.

The same holds in a decoder (the generative backbone, docs/generative.md): LoRA on every layer's
q, k, v, o, gate, up and down projection gives one r×r problem per (layer, projection) -- 30 × 7 =
210 of rank 8 on SmolLM2-135M -- and a bottleneck adapter after every decoder block one per block
(30 of 72 units).  The groups come from the set's state keys (``PeftBank.unit_groups``), so the
classifier's and the decoder's sets go through the same code; the wire holds the PEFT set and the
projector (a decoder has no head).

Unit i of an adapter layer P is the vector u_i = [W_down[i,:], b_down[i], W_up[:,i]] (LoRA:
[A[i,:], B[:,i]]).  Aligning P to an anchor Q (``fedpia.cost``: ``sqeuclidean`` ‖u − v‖², or
``cosine`` 1 − cos(u, v)) solves, with ``fedpia.solver``:

    identity:     π = id, every unit stays where it is (the ablation without alignment: the
                  server merge is FedAvg's, the client integration λ·L + (1 − λ)·G remains);
    exact / emd:  π* = argmin_π Σ_j c(u^P_{π(j)}, u^Q_j)    (scipy's linear_sum_assignment, or
                  POT's ot.emd with uniform marginals), aligned unit j = u^P_{π*(j)};
    sinkhorn:     T* = argmin_T ⟨T, C⟩ − ε H(T), T1 = Tᵀ1 = 1/r  (POT's ot.sinkhorn, ε =
                  ``fedpia.reg`` × mean cost), aligned unit j = r Σ_i T*[j,i] u^P_i (a soft,
                  barycentric alignment: no longer function-preserving, it trades exactness for
                  smoothness).

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
Views as FedAvg: ``shared`` = the merged global model; ``shared+head`` = its body with the local
model's head; ``personal`` = the client's local model.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from fedmm.config import ConfigError
from fedmm.methods.aggregation import Reply, weighted_average
from fedmm.methods.base import register  # fmt: skip
from fedmm.methods.context import ClientContext
from fedmm.methods.fedavg import FedAvg
from fedmm.methods.state import Arrays, State, to_numpy
from fedmm.peft import PEFT_TYPES
from fedmm.spec import FedPIAConfig

ADAPTER = "adapter.global_adapter"


NO_UNITS = {
    "prompt": "prompt tokens carry position embeddings, so permuting them changes the model",
    "bitfit": "a bias vector has no hidden-unit axis",
}


# ---------------------------------------------------------------------- permutation algebra
Group = dict[str, int]  # {state key: the axis that indexes hidden units}


def unit_groups(state: Arrays, peft_type: str = "adapter", prefix: str = ADAPTER) -> list[Group]:
    """The PEFT set ``prefix``'s hidden-unit groups in ``state`` (one per adapter/LoRA layer)."""
    rel = [k.removeprefix(f"{prefix}/") for k in state if k.startswith(f"{prefix}/")]
    groups = PEFT_TYPES[peft_type].unit_groups(rel)
    if groups is None:
        raise ConfigError(f"peft.type {peft_type!r} has no hidden units to align")
    return [{f"{prefix}/{k}": axis for k, axis in g.items()} for g in groups]


def unit_vectors(state: Arrays, group: Group) -> np.ndarray:
    """``(r, D)``: row i = unit i's entries of every tensor in the group (adapter:
    [W_down[i,:], b_down[i], W_up[:,i]])."""
    parts = [np.moveaxis(state[k], axis, 0) for k, axis in group.items()]
    return np.concatenate([p.reshape(len(p), -1) for p in parts], axis=1)


def permute(state: Arrays, group: Group, perm: np.ndarray) -> Arrays:
    """The state with hidden unit j of ``group`` taken from unit ``perm[j]`` (function unchanged)."""
    out = dict(state)
    for k, axis in group.items():
        out[k] = np.take(state[k], perm, axis=axis)
    return out


def transport(state: Arrays, group: Group, plan: np.ndarray) -> Arrays:
    """Soft alignment: unit j of ``group`` becomes ``Σ_i plan[j, i] · unit_i``."""
    out = dict(state)
    for k, axis in group.items():
        moved = np.tensordot(plan, np.moveaxis(state[k], axis, 0), axes=(1, 0))
        out[k] = np.moveaxis(moved, 0, axis).astype(state[k].dtype)
    return out


def cost_matrix(p: np.ndarray, q: np.ndarray, cost: str) -> np.ndarray:
    """``C[j, i]`` = cost of giving anchor unit j the unit i of ``p`` (``p``, ``q``: ``(r, D)``;
    ``C``: ``(r, r)``).

    ``sqeuclidean``: ‖q_j − p_i‖² = ‖q_j‖² + ‖p_i‖² − 2 q_j·p_i, one matrix product in float64
    rather than an ``(r, r, D)`` difference tensor (a decoder's adapter: 72 × 72 × 1153 per layer,
    the server step's main cost); float64 keeps the cancellation error (~1e-16 of the entries)
    below float32's own rounding of a directly summed difference (~1e-7)."""
    if cost == "cosine":
        pn = p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12)
        qn = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        return 1.0 - qn @ pn.T
    p, q = p.astype(np.float64), q.astype(np.float64)
    sq = np.einsum("jd,jd->j", q, q)[:, None] + np.einsum("id,id->i", p, p)[None, :]
    return np.maximum(sq - 2.0 * (q @ p.T), 0.0)


def match(cost: np.ndarray, solver: str, reg: float) -> np.ndarray:
    """An assignment ``perm`` (exact solvers) or a row-stochastic plan ``(r, r)`` (sinkhorn)."""
    r = len(cost)
    if solver == "identity":
        return np.arange(r)
    if solver == "exact":
        rows, cols = linear_sum_assignment(cost)
        perm = np.empty(r, dtype=np.int64)
        perm[rows] = cols
        return perm
    import ot

    uniform = np.full(r, 1.0 / r)
    if solver == "emd":  # uniform square marginals: an optimal vertex is a permutation
        return ot.emd(uniform, uniform, cost.astype(np.float64)).argmax(axis=1)
    scale = float(cost.mean()) or 1.0
    plan = ot.sinkhorn(uniform, uniform, cost.astype(np.float64) / scale, reg, stopThr=1e-6)
    return r * plan


def align(
    state: Arrays,
    anchor: Arrays,
    cfg: FedPIAConfig | None = None,
    peft_type: str = "adapter",
    prefix: str = ADAPTER,
) -> Arrays:
    """``state`` with every layer's hidden units of set ``prefix`` aligned to ``anchor``'s."""
    cfg = cfg or FedPIAConfig()
    for group in unit_groups(state, peft_type, prefix):
        c = cost_matrix(unit_vectors(state, group), unit_vectors(anchor, group), cfg.cost)
        plan = match(c, cfg.solver, cfg.reg)
        state = permute(state, group, plan) if plan.ndim == 1 else transport(state, group, plan)
    return state


# ---------------------------------------------------------------------- the method
@register("fedpia")
class FedPIA(FedAvg):
    dp_sgd_refusal = "it trains and keeps a local model beside the federated one (two models)"
    secagg_refusal = (
        "its server aligns (permutes) each site's adapters to an anchor before "
        "averaging, which needs every site's upload in the clear, not their sum"
    )

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        if PEFT_TYPES[cfg.peft.type].unit_groups(()) is None:
            raise ConfigError(
                f"fedpia aligns hidden units by permutation before merging, and peft.type "
                f"{cfg.peft.type!r} has none ({NO_UNITS.get(cfg.peft.type, '')}); use peft.type "
                "adapter or lora with fedpia"
            )

    def _align(self, state: Arrays, anchor: Arrays) -> Arrays:
        return align(state, anchor, self.cfg.fedpia, self.cfg.peft.type)

    # ------------------------------------------------------------------ server
    def aggregate(self, global_state: Arrays, replies: Sequence[Reply]) -> Arrays:
        weighting = self.cfg.fed.weighting
        anchor = {
            "global": lambda: global_state,
            "fedavg": lambda: weighted_average(replies, weighting),
            "largest": lambda: max(replies, key=lambda r: r.num_examples).arrays,
        }[self.cfg.fedpia.anchor]()
        merged = anchor
        for _ in range(self.cfg.fedpia.iterations):
            aligned = [
                Reply(r.client_index, self._align(r.arrays, anchor), r.num_examples)
                for r in replies
            ]
            merged = weighted_average(aligned, weighting)
            anchor = merged
        return merged

    # ------------------------------------------------------------------ client
    def client_start(self, ctx: ClientContext, received: State) -> State:
        """λ·L + (1 − λ)·π(G): the local model integrated with the aligned global one."""
        local = self.personal_model(ctx.kept)
        if not local:  # first round on this client
            return received
        lam = self.cfg.fedpia.lam
        aligned = self._align(to_numpy(received), to_numpy(local))
        return {k: lam * local[k] + (1 - lam) * torch.from_numpy(aligned[k]) for k in local}
