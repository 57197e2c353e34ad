"""FedPer (Arivazhagan et al., 2019, arXiv 1912.00818): federated body, personal head.

Federated body θ_B = {adapter ``global_adapter``, visual projection}; the head θ_H,k stays on
client k across rounds and is never uploaded.

* Client k, round t: θ_B ← θ_B^t, θ_H ← θ_H,k (its own; the common init in round 1), then
  ``train.local_steps`` AdamW steps on ``CE(f(x; θ_B, θ_H), y)``; keep θ_H,k, upload θ_B and n_k.
* Server: θ_B^{t+1} = Σ_k w_k θ_B,k (samples or uniform weights, as FedAvg).

View: ``personalized`` (global body + the client's head); there is no global head to evaluate.
"""

from __future__ import annotations

from fedmm.backbones import FusionVLModel
from fedmm.methods.base import (
    ClientContext,
    NDArrays,
    State,
    get_parts,
    load_parts,
    supervised_update,
    to_numpy,
)  # fmt: skip
from fedmm.methods.fedavg import FedAvg

BODY = ("adapter.global_adapter", "proj")


class FedPer(FedAvg):
    name = "fedper"
    views = ("personalized",)

    def upload_parts(self) -> tuple[str, ...]:
        return BODY

    def init_global(self, model: FusionVLModel) -> NDArrays:
        self.prepare(model)
        return to_numpy(get_parts(model, BODY))

    def _load(self, ctx: ClientContext, global_state: State) -> None:
        self.prepare(ctx.model)
        load_parts(ctx.model, global_state)
        if ctx.state:
            load_parts(ctx.model, ctx.state)  # the personal head

    def client_train(self, ctx: ClientContext, global_state: State) -> State:
        self._load(ctx, global_state)
        supervised_update(ctx, "global_adapter")
        ctx.state.clear()
        ctx.state.update(get_parts(ctx.model, ("head",)))
        return get_parts(ctx.model, BODY)

    def client_evaluate(self, ctx: ClientContext, global_state: State) -> dict[str, float]:
        self._load(ctx, global_state)
        with ctx.model.active("global_adapter"):
            return ctx.view("personalized")
