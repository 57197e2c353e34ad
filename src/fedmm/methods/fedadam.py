"""FedAdam (Reddi et al., ICLR 2021, "Adaptive Federated Optimization", arXiv 2003.00295).

Clients do exactly what FedAvg clients do (θ = {adapter ``global_adapter``, projection, head}).
The server treats the averaged client change as a pseudo-gradient and takes an Adam step:

    Δ_t   = Σ_k w_k θ_k − θ^t                       (w_k ∝ n_k, or uniform)
    m_t   = β₁ m_{t−1} + (1 − β₁) Δ_t
    v_t   = β₂ v_{t−1} + (1 − β₂) Δ_t²
    θ^{t+1} = θ^t + η · m_t / (√v_t + τ)

(no bias correction, as in the paper's Algorithm 2).  ``fedadam.server_lr`` = η,
``fedadam.beta1/beta2`` = β₁/β₂, ``fedadam.tau`` = τ.  The moments m, v are server state, kept on
this object across rounds (and in server checkpoints: ``server_state``).  Views as FedAvg.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedmm.methods.base import NDArrays, Reply, weighted_average
from fedmm.methods.fedavg import FedAvg


class FedAdam(FedAvg):
    name = "fedadam"

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.m: NDArrays = {}
        self.v: NDArrays = {}

    def aggregate(self, global_state: NDArrays, replies: Sequence[Reply]) -> NDArrays:
        c = self.cfg.fedadam
        average = weighted_average(replies, self.cfg.fed.weighting)
        new_state = {}
        for key, theta in global_state.items():
            delta = average[key].astype(np.float64) - theta
            m = c.beta1 * self.m.get(key, 0.0) + (1 - c.beta1) * delta
            v = c.beta2 * self.v.get(key, 0.0) + (1 - c.beta2) * delta**2
            self.m[key], self.v[key] = m, v
            new_state[key] = (theta + c.server_lr * m / (np.sqrt(v) + c.tau)).astype(np.float32)
        return new_state

    def server_state(self) -> NDArrays:
        return {f"m/{k}": np.asarray(v) for k, v in self.m.items()} | {
            f"v/{k}": np.asarray(v) for k, v in self.v.items()
        }

    def load_server_state(self, state: NDArrays) -> None:
        self.m = {k[2:]: np.array(v) for k, v in state.items() if k.startswith("m/")}
        self.v = {k[2:]: np.array(v) for k, v in state.items() if k.startswith("v/")}
