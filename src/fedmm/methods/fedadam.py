"""FedAdam (Reddi et al., ICLR 2021, "Adaptive Federated Optimization", arXiv 2003.00295).

Clients do exactly what FedAvg clients do (θ = {adapter ``global_adapter``, projection, head}).
The server treats the averaged client change as a pseudo-gradient and takes an Adam step:

    Δ_t   = Σ_k w_k θ_k − θ^t                       (w_k ∝ n_k, or uniform)
    m_t   = β₁ m_{t−1} + (1 − β₁) Δ_t
    v_t   = β₂ v_{t−1} + (1 − β₂) Δ_t²
    θ^{t+1} = θ^t + η · m_t / (√v_t + τ)

(no bias correction, as in the paper's Algorithm 2; FedYogi changes only the v update,
``second_moment``).  ``fedadam.server_lr`` = η,
``fedadam.beta1/beta2`` = β₁/β₂, ``fedadam.tau`` = τ.  The moments m, v are server state, kept on
this object across rounds (and in server checkpoints: ``server_state``).  Views as FedAvg.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedmm.methods.aggregation import Reply, weighted_average
from fedmm.methods.base import register
from fedmm.methods.fedavg import FedAvg
from fedmm.methods.state import Arrays


@register("fedadam")
class FedAdam(FedAvg):
    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.m: Arrays = {}
        self.v: Arrays = {}

    def second_moment(self, v: np.ndarray | float, delta: np.ndarray) -> np.ndarray:
        """Adam's ``v_t = β₂ v_{t−1} + (1 − β₂) Δ_t²``."""
        beta2 = self.opts.beta2
        return beta2 * v + (1 - beta2) * delta**2

    def aggregate(self, global_state: Arrays, replies: Sequence[Reply]) -> Arrays:
        c = self.opts  # fedadam.*, or fedyogi.* for FedYogi
        average = weighted_average(replies, self.cfg.fed.weighting)
        new_state = {}
        for key, theta in global_state.items():
            delta = average[key].astype(np.float64) - theta
            m = c.beta1 * self.m.get(key, 0.0) + (1 - c.beta1) * delta
            v = self.second_moment(self.v.get(key, 0.0), delta)
            self.m[key], self.v[key] = m, v
            new_state[key] = (theta + c.server_lr * m / (np.sqrt(v) + c.tau)).astype(np.float32)
        return new_state

    def server_state(self) -> Arrays:
        return {f"m/{k}": np.asarray(v) for k, v in self.m.items()} | {
            f"v/{k}": np.asarray(v) for k, v in self.v.items()
        }

    def load_server_state(self, state: Arrays) -> None:
        self.m = {k[2:]: np.array(v) for k, v in state.items() if k.startswith("m/")}
        self.v = {k[2:]: np.array(v) for k, v in state.items() if k.startswith("v/")}
