"""FedDAT -- Federated Dual-Adapter Teacher (Chen et al., AAAI 2024, arXiv 2308.12305).

State on client k (all adapter sets have the same shape, one adapter per transformer block):

* ``global_adapter``  A_s -- received from the server each round, trained, uploaded, averaged;
* ``frozen_global``   Â_s -- a frozen copy of the A_s received this round, never trained;
* ``client_adapter``  A_c -- trained locally, **kept on the client across rounds**, never uploaded;
* the task head -- personal by default (``feddat.federate_head``; open choice, the reference keeps
  it personal).  The visual projection is federated with A_s (it is the shared input path).

Dual-Adapter Teacher at every insertion point: ``h + ½(A_c(h) + Â_s(h))`` (``feddat.dat_combine =
"average"``; ``"sum"`` drops the ½).  Other PEFT types (``peft.type``): LoRA -- the average of the
two LoRA deltas, ``W + ½(s·B_c A_c + s·B̂_s Â_s)``; BitFit -- the average of the two bias deltas;
prompt tuning -- the average of the two prompts (``sum`` is refused for prompts).

Local update, per batch (x, y), with temperature T, weights α, β (reference: T=3, α=β=0.5):

    z_DAT = f(x; DAT)            z_s = f(x; A_s)
    L_s   = α·CE(z_s, y)   + (1−α)·T²·KL(softmax(sg[z_DAT]/T) ‖ softmax(z_s/T))
    L_DAT = β·CE(z_DAT, y) + (1−β)·T²·KL(softmax(sg[z_s]/T)   ‖ softmax(z_DAT/T))

(sg = stop-gradient).  One backward of ``L_s + L_DAT`` and **one** AdamW step per batch: A_s only
appears in z_s and A_c only in z_DAT, and each distillation target is detached, so A_s receives
exactly ∇L_s and A_c exactly ∇L_DAT -- the reference's steps 2 and 3 -- while the teacher pass
z_DAT serves as both the step-1 target and the step-3 prediction (same parameters).  The shared
projection and head receive ∇(L_s + L_DAT).  Â_s has ``requires_grad = False`` and is in no
optimiser group.  This keeps FedDAT on the same optimiser-step budget and learning-rate schedule
as every other method (the reference steps its restarted schedule twice per batch).

Server: A^{t+1}_s = Σ_k w_k A_{s,k}, w_k ∝ n_k (``fed.weighting = "uniform"`` reproduces the
reference's uniform mean).

Views (``client_evaluate``, with the freshly aggregated A_s also used as Â_s):
``global`` = A_s alone (the deployable model, plain-adapter inference cost), ``personalized`` and
``dat`` = the DAT, ``client`` = A_c alone.

Reference defects avoided: A_c stays in the optimiser every round (explicit parameter groups,
pinned by a test that A_c changes in every round); one schedule over the whole run, one step per
batch; gradients reset to None; the bottleneck size is a real option; client sampling.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedmm.backbones import FusionVLModel
from fedmm.config import ConfigError
from fedmm.methods.base import (
    ClientContext,
    Method,
    NDArrays,
    Reply,
    State,
    distill_kl,
    get_parts,
    load_parts,
    select,
    task_loss,
    to_numpy,
    weighted_average,
)  # fmt: skip
from fedmm.peft import PEFT_TYPES

GLOBAL, FROZEN, CLIENT = "global_adapter", "frozen_global", "client_adapter"


class FedDAT(Method):
    name = "feddat"
    views = ("global", "personalized", "dat", "client")
    adapter_sets = (GLOBAL, FROZEN, CLIENT)

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        combines = PEFT_TYPES[cfg.peft.type].combines
        if cfg.feddat.dat_combine not in ("average", "sum"):
            raise ConfigError(
                f"feddat.dat_combine must be average or sum, got {cfg.feddat.dat_combine!r}"
            )
        if cfg.feddat.dat_combine not in combines:
            raise ConfigError(
                f"feddat.dat_combine={cfg.feddat.dat_combine!r} is not defined for peft.type "
                f"{cfg.peft.type!r} (it combines by {', '.join(combines)}); use 'average'"
            )

    def upload_parts(self) -> tuple[str, ...]:
        parts = (f"adapter.{GLOBAL}", "proj")
        return (*parts, "head") if self.cfg.feddat.federate_head else parts

    def personal_parts(self) -> tuple[str, ...]:
        parts = (f"adapter.{CLIENT}",)
        return parts if self.cfg.feddat.federate_head else (*parts, "head")

    def trainable_parts(self) -> tuple[str, ...]:
        return (*self.upload_parts(), *self.personal_parts())

    # ------------------------------------------------------------------ server
    def init_global(self, model: FusionVLModel) -> NDArrays:
        self.prepare(model)
        return to_numpy(get_parts(model, self.upload_parts()))

    def aggregate(self, global_state: NDArrays, replies: Sequence[Reply]) -> NDArrays:
        return weighted_average(replies, self.cfg.fed.weighting)

    # ------------------------------------------------------------------ client
    def _load(self, ctx: ClientContext, global_state: State) -> None:
        """Global parts from the server, Â_s ← A_s, personal parts from the client's state."""
        model = ctx.model
        self.prepare(model)
        load_parts(model, global_state)
        load_parts(
            model,
            select(global_state, (f"adapter.{GLOBAL}",)),
            rename={f"adapter.{GLOBAL}": f"adapter.{FROZEN}"},
        )
        if ctx.state:
            load_parts(model, ctx.state)
        for p in model.peft.parameters_of(FROZEN):
            p.requires_grad_(False)

    def client_train(self, ctx: ClientContext, global_state: State) -> State:
        model, cfg = ctx.model, self.cfg.feddat
        self._load(ctx, global_state)
        opt = ctx.optimizer([
            model.peft.parameters_of(GLOBAL),
            model.peft.parameters_of(CLIENT),
            list(model.visual_proj.parameters()),
            list(model.head.parameters()),
        ])  # fmt: skip
        t, multilabel = cfg.temperature, ctx.train.kind == "multilabel"
        for feats, ids, mask, labels in ctx.steps(opt):
            with model.active(CLIENT, FROZEN, combine=cfg.dat_combine):
                z_dat = model(feats, ids, mask)
            with model.active(GLOBAL):
                z_s = model(feats, ids, mask)
            loss_s = cfg.alpha * task_loss(z_s, labels) + (1 - cfg.alpha) * distill_kl(
                z_s, z_dat.detach(), t, multilabel
            )
            loss_dat = cfg.beta * task_loss(z_dat, labels) + (1 - cfg.beta) * distill_kl(
                z_dat, z_s.detach(), t, multilabel
            )
            ctx.step(opt, loss_s + loss_dat)
        ctx.state.clear()
        ctx.state.update(get_parts(model, self.personal_parts()))
        return get_parts(model, self.upload_parts())

    def client_evaluate(self, ctx: ClientContext, global_state: State) -> dict[str, float]:
        model = ctx.model
        self._load(ctx, global_state)
        with model.active(GLOBAL):
            ctx.view("global")
        with model.active(CLIENT, FROZEN, combine=self.cfg.feddat.dat_combine):
            ctx.view("personalized", "dat")
        with model.active(CLIENT):
            return ctx.view("client")
