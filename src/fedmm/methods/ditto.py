"""Ditto (Li et al., ICML 2021, arXiv 2012.04221): fair and robust personalisation.

Client k keeps a personal model v_k = {adapter ``personal_adapter``, projection, head} that never
leaves it, next to the global model θ = {adapter ``global_adapter``, projection, head}.

Round t on client k:
1. global update, exactly FedAvg's: θ_k ← θ^t, ``train.local_steps`` AdamW steps on CE; upload θ_k;
2. personal update: ``train.local_steps`` AdamW steps on

       CE(f(x; v_k), y) + (λ/2)·‖v_k − θ^t‖²      (``ditto.lam``; λ = 0: plain local models)

   starting from the client's previous v_k (θ^t in its first round).

Each of the two models gets the same step budget and schedule as any other method's model, so a
Ditto round costs two models' steps (``steps`` counts the global model's, ``personal_steps`` the
personal model's).  Server: the FedAvg average of θ_k.
Views: ``shared`` = θ^{t+1}; ``personal`` = v_k (none before the client first trains).  No
``shared+head``: the client's own head is v_k's, trained on v_k's body, not on θ's.

Generative backbones (docs/generative.md): the same, with CE the next-token cross-entropy on the
answer tokens.  A generative model has no head, so θ = {PEFT set ``global_adapter``, projector}
and v_k = {PEFT set ``personal_adapter``, its own projector}: v_k is a full personal copy of
everything trainable, and neither it nor any part of it is ever uploaded.  Both views are
scored by greedy generation.
"""

from __future__ import annotations

import torch

from fedmm.backbones import FusionVLModel
from fedmm.methods.base import ClientUpdate, register
from fedmm.methods.context import ClientContext, model_groups, supervised_update
from fedmm.methods.fedavg import PARTS, FedAvg
from fedmm.methods.losses import proximal_term  # fmt: skip
from fedmm.methods.state import State, from_namespace, get_parts, load_parts, namespaced
from fedmm.spec import PERSONAL, SHARED

PERSONAL_PARTS = ("adapter.personal_adapter", "proj", "head")
RENAME_TO_PERSONAL = {"adapter.global_adapter": "adapter.personal_adapter"}


@register("ditto")
class Ditto(FedAvg):
    adapter_sets = ("global_adapter", "personal_adapter")
    dp_sgd_refusal = "it trains two models per round (the global and the personal v_k)"

    def count_trainable(self, model: FusionVLModel) -> int:
        """Two full models per client: the global copy and the personal one."""
        return 2 * super().count_trainable(model)

    def _load_personal(self, ctx: ClientContext, received: State) -> None:
        """v_k: the client's own, or θ^t before its first round."""
        load_parts(ctx.model, received, rename=RENAME_TO_PERSONAL)
        personal = from_namespace(ctx.kept, "personal")
        if personal:
            load_parts(ctx.model, personal)

    def local_update(self, ctx: ClientContext, received: State) -> ClientUpdate:
        model = ctx.model
        # 1. the global model (loaded by the base class): FedAvg's local update from θ^t
        supervised_update(ctx, "global_adapter")
        upload = get_parts(model, PARTS)

        # 2. the personal model, pulled towards θ^t, on a second step budget
        self._load_personal(ctx, received)
        params = [p for group in model_groups(model, "personal_adapter") for p in group]
        anchor = [torch.as_tensor(received[k]).to(p.device) for k, p in zip(_keys(model), params)]
        regulariser = proximal_term(params, anchor, self.cfg.ditto.lam)
        supervised_update(ctx, "personal_adapter", regulariser, stat="personal_steps")
        return ClientUpdate(upload, keep=namespaced(get_parts(model, PERSONAL_PARTS), "personal"))

    def evaluate(self, ctx: ClientContext, received: State) -> dict[str, float]:
        model = ctx.model
        with model.active("global_adapter"):
            ctx.view(SHARED)
        if not from_namespace(ctx.kept, "personal"):  # not trained yet: no v_k
            return ctx.views
        self._load_personal(ctx, received)
        with model.active("personal_adapter"):
            return ctx.view(PERSONAL)


def _keys(model) -> list[str]:
    """Global-state keys in the order of the personal model's parameters (adapter, proj, head)."""
    names = [
        f"adapter.global_adapter/{n}"
        for n, _ in model.peft.set_module("personal_adapter").named_parameters()
    ]
    names += [f"proj/{n}" for n, _ in model.visual_proj.named_parameters()]
    names += [f"head/{n}" for n, _ in model.head.named_parameters()]
    return names
