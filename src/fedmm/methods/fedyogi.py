"""FedYogi (Reddi et al., ICLR 2021, "Adaptive Federated Optimization", arXiv 2003.00295).

FedAdam's server step with Yogi's second moment (Zaheer et al., NeurIPS 2018), which grows or
shrinks v by at most (1 − β₂)Δ² per round instead of moving it towards Δ² -- less sensitive to a
few large updates.  Clients do exactly what FedAvg clients do.

    Δ_t   = Σ_k w_k θ_k − θ^t                       (w_k ∝ n_k, or uniform)
    m_t   = β₁ m_{t−1} + (1 − β₁) Δ_t
    v_t   = v_{t−1} − (1 − β₂) Δ_t² · sign(v_{t−1} − Δ_t²)
    θ^{t+1} = θ^t + η · m_t / (√v_t + τ)

(m_0 = v_0 = 0, no bias correction, as in the paper's Algorithm 2 and Flower's ``FedYogi``
strategy.)  ``fedyogi.server_lr`` = η, ``fedyogi.beta1/beta2`` = β₁/β₂, ``fedyogi.tau`` = τ;
defaults as FedAdam's here (η = 0.01: Flower's default too).  The moments are server state,
checkpointed as FedAdam's.  Views as FedAvg.
"""

from __future__ import annotations

import numpy as np

from fedmm.methods.base import register
from fedmm.methods.fedadam import FedAdam


@register("fedyogi")
class FedYogi(FedAdam):
    def second_moment(self, v: np.ndarray | float, delta: np.ndarray) -> np.ndarray:
        """Yogi's ``v_t = v_{t−1} − (1 − β₂) Δ_t² sign(v_{t−1} − Δ_t²)``."""
        square = delta**2
        return v - (1 - self.opts.beta2) * square * np.sign(v - square)
