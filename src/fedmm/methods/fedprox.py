"""FedProx (Li et al., MLSys 2020, arXiv 1812.06127): FedAvg with a proximal client objective.

Federated parameters θ = {adapter ``global_adapter``, visual projection, head}, as in FedAvg.

* Client k, round t: θ_k ← θ^t, then ``train.local_steps`` AdamW steps on

      h_k(θ) = CE(f(x; θ), y) + (μ/2)·‖θ − θ^t‖²

  which keeps heterogeneous clients from drifting far from the global model (``fedprox.mu``;
  μ = 0 is exactly FedAvg).  Upload θ_k and n_k.
* Server: the FedAvg weighted average.

Views as FedAvg: ``shared``, ``shared+head`` and ``personal`` (the client's last locally trained
θ_k).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fedmm.methods.base import register
from fedmm.methods.context import ClientContext, model_groups
from fedmm.methods.fedavg import FedAvg
from fedmm.methods.losses import proximal_term


@register("fedprox")
class FedProx(FedAvg):
    def regulariser(self, ctx: ClientContext) -> Callable[[], torch.Tensor] | None:
        """(μ/2)·‖θ − θ^t‖², with θ^t the global model just loaded."""
        params = [p for group in model_groups(ctx.model, "global_adapter") for p in group]
        return proximal_term(params, [p.clone() for p in params], self.cfg.fedprox.mu)
