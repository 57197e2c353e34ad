"""FedProx (Li et al., MLSys 2020, arXiv 1812.06127): FedAvg with a proximal client objective.

Federated parameters θ = {adapter ``global_adapter``, visual projection, head}, as in FedAvg.

* Client k, round t: θ_k ← θ^t, then ``train.local_steps`` AdamW steps on

      h_k(θ) = CE(f(x; θ), y) + (μ/2)·‖θ − θ^t‖²

  which keeps heterogeneous clients from drifting far from the global model (``fedprox.mu``;
  μ = 0 is exactly FedAvg).  Upload θ_k and n_k.
* Server: the FedAvg weighted average.

Views as FedAvg: ``global`` and ``personalized`` (the client's last locally trained θ_k).
"""

from __future__ import annotations

import torch

from fedmm.methods.base import ClientContext, State, get_parts, load_parts, supervised_update
from fedmm.methods.fedavg import PARTS, FedAvg


class FedProx(FedAvg):
    name = "fedprox"

    def client_train(self, ctx: ClientContext, global_state: State) -> State:
        model = ctx.model
        self.prepare(model)
        load_parts(model, global_state)
        params = [
            *model.adapters.parameters_of("global_adapter"),
            *model.visual_proj.parameters(),
            *model.head.parameters(),
        ]
        anchor = [p.detach().clone() for p in params]  # θ^t, the received global model
        mu = self.cfg.fedprox.mu

        def proximal() -> torch.Tensor:
            return 0.5 * mu * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))

        supervised_update(ctx, "global_adapter", proximal if mu > 0 else None)
        upload = get_parts(model, PARTS)
        ctx.state.clear()
        ctx.state.update({f"personal.{k}": v for k, v in upload.items()})
        return upload
