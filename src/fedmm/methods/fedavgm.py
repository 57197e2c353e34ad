"""FedAvgM (Hsu et al., 2019, "Measuring the Effects of Non-Identical Data Distribution for
Federated Visual Classification", arXiv 1909.06335): FedAvg with server momentum.

Clients do exactly what FedAvg clients do (θ = {adapter ``global_adapter``, projection, head}).
The server treats the averaged client change as a pseudo-gradient and takes a heavy-ball step:

    Δ_t     = θ^t − Σ_k w_k θ_k                    (w_k ∝ n_k, or uniform: ``fed.weighting``)
    v_t     = β v_{t−1} + Δ_t                      (v_0 = 0; ``fedavgm.momentum`` = β)
    θ^{t+1} = θ^t − η v_t                          (``fedavgm.server_lr`` = η)

β = 0 and η = 1 is FedAvg (tested).  The same update as Flower's ``FedAvgM`` strategy
(``server_momentum``, ``server_learning_rate``; no Nesterov).  Hsu et al. report the effective
step η/(1 − β); the defaults here are β = 0.9, η = 1.  The momentum v is server state, kept on
this object across rounds and in server checkpoints (``server_state``).  Views as FedAvg.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedmm.methods.aggregation import Reply, weighted_average
from fedmm.methods.base import register
from fedmm.methods.fedavg import FedAvg
from fedmm.methods.state import Arrays


@register("fedavgm")
class FedAvgM(FedAvg):
    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.velocity: Arrays = {}

    def aggregate(self, global_state: Arrays, replies: Sequence[Reply]) -> Arrays:
        c = self.opts
        average = weighted_average(replies, self.cfg.fed.weighting)
        new_state = {}
        for key, theta in global_state.items():
            theta = theta.astype(np.float64)
            delta = theta - average[key].astype(np.float64)  # the pseudo-gradient
            self.velocity[key] = c.momentum * self.velocity.get(key, 0.0) + delta
            new_state[key] = (theta - c.server_lr * self.velocity[key]).astype(np.float32)
        return new_state

    def server_state(self) -> Arrays:
        return {f"v/{k}": np.asarray(v) for k, v in self.velocity.items()}

    def load_server_state(self, state: Arrays) -> None:
        self.velocity = {k[2:]: np.array(v) for k, v in state.items() if k.startswith("v/")}
