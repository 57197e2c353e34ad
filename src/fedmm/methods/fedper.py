"""FedPer (Arivazhagan et al., 2019, arXiv 1912.00818): federated body, personal head.

Federated body θ_B = {adapter ``global_adapter``, visual projection}; the head θ_H,k stays on
client k across rounds and is never uploaded.

* Client k, round t: θ_B ← θ_B^t, θ_H ← θ_H,k (its own; the common init in round 1), then
  ``train.local_steps`` AdamW steps on ``CE(f(x; θ_B, θ_H), y)``; keep θ_H,k, upload θ_B and n_k.
* Server: θ_B^{t+1} = Σ_k w_k θ_B,k (samples or uniform weights, as FedAvg).

View: ``shared+head`` (the global body with the client's head).  There is no shared head, so no
``shared`` view, and no model of the client's own beyond that one, so no ``personal`` view.  A
client that has not trained yet has no head: it scores nothing.
"""

from __future__ import annotations

from fedmm.backbones import FusionVLModel
from fedmm.methods.base import ClientUpdate, register
from fedmm.methods.context import ClientContext, supervised_update  # fmt: skip
from fedmm.methods.fedavg import FedAvg
from fedmm.methods.state import Arrays, State, get_parts, to_numpy
from fedmm.spec import SHARED_HEAD

BODY = ("adapter.global_adapter", "proj")


@register("fedper")
class FedPer(FedAvg):
    def upload_parts(self) -> tuple[str, ...]:
        return BODY

    def init_global(self, model: FusionVLModel) -> Arrays:
        self.prepare(model)
        return to_numpy(get_parts(model, BODY))

    # the base class loads θ_B^t, then the kept personal head
    def local_update(self, ctx: ClientContext, received: State) -> ClientUpdate:
        supervised_update(ctx, "global_adapter")
        return ClientUpdate(get_parts(ctx.model, BODY), keep=get_parts(ctx.model, ("head",)))

    def evaluate(self, ctx: ClientContext, received: State) -> dict[str, float]:
        if not ctx.kept:  # not trained yet: no head of its own, nothing to score
            return ctx.views
        with ctx.model.active("global_adapter"):
            return ctx.view(SHARED_HEAD)
