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
Views: ``global`` = θ^{t+1}; ``personalized`` = v_k.
"""

from __future__ import annotations

import torch

from fedmm.backbones import FusionVLModel
from fedmm.methods.base import (
    ClientContext,
    State,
    get_parts,
    load_parts,
    model_groups,
    proximal_term,
    supervised_update,
)  # fmt: skip
from fedmm.methods.fedavg import PARTS, FedAvg

PERSONAL = ("adapter.personal_adapter", "proj", "head")
RENAME_TO_PERSONAL = {"adapter.global_adapter": "adapter.personal_adapter"}


class Ditto(FedAvg):
    name = "ditto"
    adapter_sets = ("global_adapter", "personal_adapter")

    def count_trainable(self, model: FusionVLModel) -> int:
        """Two full models per client: the global copy and the personal one."""
        return 2 * super().count_trainable(model)

    def client_train(self, ctx: ClientContext, global_state: State) -> State:
        model = ctx.model
        self.prepare(model)
        # 1. the global model: FedAvg's local update from θ^t
        load_parts(model, global_state)
        supervised_update(ctx, "global_adapter")
        upload = get_parts(model, PARTS)

        # 2. the personal model, pulled towards θ^t
        global_steps = ctx.stats["steps"]
        load_parts(model, global_state, rename=RENAME_TO_PERSONAL)
        if ctx.state:
            load_parts(model, ctx.state)
        params = [p for group in model_groups(model, "personal_adapter") for p in group]
        anchor = [
            torch.as_tensor(global_state[k]).to(p.device) for k, p in zip(_keys(model), params)
        ]
        regulariser = proximal_term(params, anchor, self.cfg.ditto.lam)
        supervised_update(ctx, "personal_adapter", regulariser)
        ctx.stats["personal_steps"] = ctx.stats["steps"] - global_steps
        ctx.stats["steps"] = global_steps
        ctx.state.clear()
        ctx.state.update(get_parts(model, PERSONAL))
        return upload

    def client_evaluate(self, ctx: ClientContext, global_state: State) -> dict[str, float]:
        model = ctx.model
        self.prepare(model)
        load_parts(model, global_state)
        with model.active("global_adapter"):
            ctx.view("global")
        if ctx.state:
            load_parts(model, ctx.state)
        else:
            load_parts(model, global_state, rename=RENAME_TO_PERSONAL)
        with model.active("personal_adapter"):
            return ctx.view("personalized")


def _keys(model) -> list[str]:
    """Global-state keys in the order of the personal model's parameters (adapter, proj, head)."""
    names = [
        f"adapter.global_adapter/{n}"
        for n, _ in model.peft.set_module("personal_adapter").named_parameters()
    ]
    names += [f"proj/{n}" for n, _ in model.visual_proj.named_parameters()]
    names += [f"head/{n}" for n, _ in model.head.named_parameters()]
    return names
