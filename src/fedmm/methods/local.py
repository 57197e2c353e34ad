"""Local training only: every client trains its own PEFT parameters and never communicates.

θ_k = {adapter ``local_adapter``, visual projection, head} lives only on client k and is trained
``train.local_steps`` steps per round on ``CE(f(x; θ_k), y)`` -- the same step budget and
schedule as every federated method, so "does federation help?" is answered on equal terms.
Nothing is uploaded; the server state stays empty.  View: ``personalized``.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedmm.backbones import FusionVLModel
from fedmm.methods.base import (
    ClientContext,
    Method,
    NDArrays,
    Reply,
    State,
    get_parts,
    load_parts,
    task_loss,
)  # fmt: skip

PARTS = ("adapter.local_adapter", "proj", "head")


class Local(Method):
    name = "local"
    views = ("personalized",)
    adapter_sets = ("local_adapter",)

    def init_global(self, model: FusionVLModel) -> NDArrays:
        return {}

    def aggregate(self, global_state: NDArrays, replies: Sequence[Reply]) -> NDArrays:
        return {}

    def client_train(self, ctx: ClientContext, global_state: State) -> State:
        model = ctx.model
        self.prepare(model)
        if ctx.state:
            load_parts(model, ctx.state)
        opt = ctx.optimizer(
            [
                model.adapters.parameters_of("local_adapter"),
                list(model.visual_proj.parameters()),
                list(model.head.parameters()),
            ]
        )
        with model.active("local_adapter"):
            for feats, ids, mask, labels in ctx.steps(opt):
                ctx.step(opt, task_loss(model(feats, ids, mask), labels))
        ctx.state.clear()
        ctx.state.update(get_parts(model, PARTS))
        return {}

    def client_evaluate(self, ctx: ClientContext, global_state: State) -> dict[str, float]:
        model = ctx.model
        self.prepare(model)
        if ctx.state:
            load_parts(model, ctx.state)
        with model.active("local_adapter"):
            return {"personalized": ctx.accuracy()}

    def trainable_parts(self) -> tuple[str, ...]:
        return PARTS
