"""Local training only: every client trains its own PEFT parameters and never communicates.

θ_k = {adapter ``local_adapter``, visual projection, head} lives only on client k and is trained
``train.local_steps`` steps per round on ``CE(f(x; θ_k), y)`` -- the same step budget and
schedule as every federated method, so "does federation help?" is answered on equal terms.
Nothing is uploaded; the server state stays empty.  View: ``personal``.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedmm.backbones import FusionVLModel
from fedmm.methods.aggregation import Reply  # fmt: skip
from fedmm.methods.base import ClientUpdate, Method, register
from fedmm.methods.context import ClientContext, supervised_update
from fedmm.methods.state import Arrays, State, get_parts


@register("local")
class Local(Method):
    adapter_sets = ("local_adapter",)
    dp_sgd_refusal = ""  # one plain loss over one model: record-level DP-SGD serves it
    secagg_refusal = "it uploads nothing: there is no sum to protect (run it with it off)"

    def trainable_parts(self) -> tuple[str, ...]:
        return (f"adapter.{self.adapter_sets[0]}", "proj", "head")

    def init_global(self, model: FusionVLModel) -> Arrays:
        return {}

    def aggregate(self, global_state: Arrays, replies: Sequence[Reply]) -> Arrays:
        return {}

    # the base class loads θ_k from what the client kept (nothing is received)
    def local_update(self, ctx: ClientContext, received: State) -> ClientUpdate:
        """Continue training θ_k; nothing is uploaded."""
        supervised_update(ctx, self.adapter_sets[0])
        return ClientUpdate({}, keep=get_parts(ctx.model, self.trainable_parts()))

    def evaluate(self, ctx: ClientContext, received: State) -> dict[str, float]:
        if not ctx.kept:  # not trained yet: no model to score
            return ctx.views
        with ctx.model.active(self.adapter_sets[0]):
            return ctx.view(self.views[0])
