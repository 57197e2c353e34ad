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
    supervised_update,
)  # fmt: skip


class Local(Method):
    name = "local"
    views = ("personalized",)
    adapter_sets = ("local_adapter",)

    def trainable_parts(self) -> tuple[str, ...]:
        return (f"adapter.{self.adapter_sets[0]}", "proj", "head")

    def init_global(self, model: FusionVLModel) -> NDArrays:
        return {}

    def aggregate(self, global_state: NDArrays, replies: Sequence[Reply]) -> NDArrays:
        return {}

    def _load(self, ctx: ClientContext) -> None:
        self.prepare(ctx.model)
        if ctx.state:
            load_parts(ctx.model, ctx.state)

    def client_train(self, ctx: ClientContext, global_state: State) -> State:
        """Continue training θ_k from the client's state; nothing is uploaded."""
        self._load(ctx)
        supervised_update(ctx, self.adapter_sets[0])
        ctx.state.clear()
        ctx.state.update(get_parts(ctx.model, self.trainable_parts()))
        return {}

    def client_evaluate(self, ctx: ClientContext, global_state: State) -> dict[str, float]:
        self._load(ctx)
        with ctx.model.active(self.adapter_sets[0]):
            return ctx.view(self.views[0])
