"""FedAvg over PEFT parameters (McMahan et al., AISTATS 2017), the plain federated baseline.

Federated parameters θ = {adapter ``global_adapter``, visual projection, head}.

* Client k, round t: θ_k ← θ^t; run ``train.local_steps`` AdamW steps on the task loss
  ``CE(f(x; θ_k), y)``; upload θ_k and n_k (training examples).  The trained θ_k is also kept on
  the client (``personal``) for the personalised view.
* Server: θ^{t+1} = Σ_k w_k θ_k with w_k ∝ n_k (``fed.weighting = "samples"``) or 1/K (``uniform``).

Views (``fedmm.spec.VIEW_KINDS``), on the client's test set: ``shared`` = θ^{t+1};
``shared+head`` = θ^{t+1}'s body (adapter, projection) with the head of the client's last locally
trained θ_k; ``personal`` = that θ_k (FedAvg + local finetuning).  A client that has not trained
yet has no θ_k: it reports ``shared`` only (never θ^{t+1} under a personal name).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from fedmm.backbones import FusionVLModel
from fedmm.methods.aggregation import Reply, weighted_average  # fmt: skip
from fedmm.methods.base import ClientUpdate, Method, register
from fedmm.methods.context import ClientContext, supervised_update
from fedmm.methods.state import (
    Arrays,
    State,
    from_namespace,
    get_parts,
    load_parts,
    model_keys,
    namespaced,
    select,
    to_numpy,
)
from fedmm.spec import PERSONAL, SHARED, SHARED_HEAD

PARTS = ("adapter.global_adapter", "proj", "head")


@register("fedavg")
class FedAvg(Method):
    adapter_sets = ("global_adapter",)
    dp_sgd_refusal = ""  # one plain loss over one model: record-level DP-SGD serves it
    # θ^{t+1} is the weighted mean of the uploads: secure aggregation (the sum) serves it, and
    # the subclasses whose server step reads only that mean (FedProx, FedAdam, FedYogi, FedAvgM,
    # FedPer, Ditto); FedPIA, which aligns each upload, sets its own refusal
    secagg_refusal = ""

    def upload_parts(self) -> tuple[str, ...]:
        return PARTS

    def trainable_parts(self) -> tuple[str, ...]:
        return PARTS

    # ------------------------------------------------------------------ server
    def init_global(self, model: FusionVLModel) -> Arrays:
        self.prepare(model)
        return to_numpy(get_parts(model, PARTS))

    def aggregate(self, global_state: Arrays, replies: Sequence[Reply]) -> Arrays:
        return weighted_average(replies, self.cfg.fed.weighting)

    # ------------------------------------------------------------------ client
    @staticmethod
    def personal_model(kept: State) -> State:
        """The client's last locally trained θ_k (empty before its first round)."""
        return from_namespace(kept, "personal")

    def client_start(self, ctx: ClientContext, received: State) -> State:
        """Where local training starts: θ^t (FedPIA overrides this)."""
        return received

    def regulariser(self, ctx: ClientContext) -> Callable[[], torch.Tensor] | None:
        """An extra term of the local objective, built once θ^t is loaded (FedProx's proximal term)."""
        return None

    def local_update(self, ctx: ClientContext, received: State) -> ClientUpdate:
        load_parts(ctx.model, model_keys(self.client_start(ctx, received)))
        supervised_update(ctx, "global_adapter", self.regulariser(ctx))
        upload = get_parts(ctx.model, PARTS)
        return ClientUpdate(upload, keep=namespaced(upload, "personal"))

    def evaluate(self, ctx: ClientContext, received: State) -> dict[str, float]:
        model = ctx.model
        with model.active("global_adapter"):
            personal = self.personal_model(ctx.kept)
            headless = not any(True for _ in model.head.parameters())
            if personal and headless:  # a generative model: shared+head *is* the shared model
                ctx.view(SHARED, SHARED_HEAD)  # one evaluation (decoding), scored under both
            else:
                ctx.view(SHARED)
            if not personal:  # not trained yet: no head or model of its own
                return ctx.views
            if not headless:
                load_parts(model, select(personal, ("head",)))
                ctx.view(SHARED_HEAD)
            load_parts(model, personal)
            return ctx.view(PERSONAL)
