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

(sg = stop-gradient).  The KL terms are averaged over the output positions that take a loss
(``losses.output_positions``): one per example for a classifier (``batchmean``).

Generative backbones (``fedmm.backbones.generative``, docs/generative.md): the same two losses
**per answer token**.  With z_{·,i,t} ∈ R^V the next-token logits of row i at position t and
𝒯 = {(i, t): y_{i,t} ≠ −100} the answer and end-of-turn positions of the batch (prompt, image
and padding positions excluded),

    CE_tok(z, y) = (1/|𝒯|) Σ_{(i,t)∈𝒯} −log softmax(z_{i,t})[y_{i,t}]
    KL_tok(p ‖ q) = (1/|𝒯|) Σ_{(i,t)∈𝒯} KL(softmax(p_{i,t}/T) ‖ softmax(q_{i,t}/T))   (over V)
    L_s   = α·CE_tok(z_s, y)   + (1−α)·T²·KL_tok(sg[z_DAT] ‖ z_s)
    L_DAT = β·CE_tok(z_DAT, y) + (1−β)·T²·KL_tok(sg[z_s]   ‖ z_DAT)

i.e. the temperature softens each position's vocabulary distribution and both terms are means
over answer tokens; the logits at the excluded positions enter neither the value nor the
gradient (tested).  A_s, Â_s and A_c are PEFT sets of the decoder (LoRA, bottleneck adapters
after each decoder block, or prompt tokens -- the DAT averages the two prompts); the projector is
federated with A_s; there is no head.  The batched fast path below covers adapters (the decoder
has no frozen block below the first adapter to share, so ``batched-prefix`` runs as ``batched``);
LoRA and prompts take two forwards; either way the output layer and the softmax run at the
answer positions only (``feddat_step_losses``: ``GenerativeVLModel.forward``'s ``keep``).  Tested
on ``tiny-gen``: the fast path follows the reference step (which computes every position's
logits), the gradient split, and what travels (A_s and the projector, never A_c).

 three forward passes and two optimiser steps per batch
(``reference_step``: 1. z_DAT without gradient; 2. z_s, L_s, step A_s; 3. z_DAT again, L_DAT, step
A_c).  fedmm's fast path (``feddat_logits`` + ``feddat_losses``) takes one backward of
``L_s + L_DAT`` and **one** AdamW step per batch: A_s only appears in z_s and A_c only in z_DAT,
and each distillation target is detached, so A_s receives exactly ∇L_s and A_c exactly ∇L_DAT --
the reference's steps 2 and 3 -- while the teacher pass z_DAT serves as both the step-1 target and
the step-3 prediction (same parameters).  The shared projection and head receive
∇(L_s + L_DAT).  With adapters, both paths run as **one** forward over ``2B`` rows (rows ``[0, B)``
through A_s, rows ``[B, 2B)`` through the DAT: ``AdapterBank.row_blocks``), and the frozen first
transformer block below the first adapter runs once for both.  Tested: the fast path's A_s and A_c
follow the reference's updates step for step (dropout off, projection and head frozen, no
clipping) and its gradients equal the two-forward ones for every trainable part.  Â_s has ``requires_grad = False`` and is in no
optimiser group.  This keeps FedDAT on the same optimiser-step budget and learning-rate schedule
as every other method (the reference steps its restarted schedule twice per batch).

Server: A^{t+1}_s = Σ_k w_k A_{s,k}, w_k ∝ n_k (``fed.weighting = "uniform"`` reproduces the
reference's uniform mean).

Views (``evaluate``, with the freshly aggregated A_s also used as Â_s; kinds as
``fedmm.spec.VIEW_KINDS``): ``shared+head`` = A_s with the client's own head (plain-adapter
inference cost), ``personal`` = the DAT, ``client`` = A_c alone.  With ``feddat.federate_head``
the head is shared too: ``shared`` = A_s with the shared head replaces ``shared+head``.  Without
it there is no shared head (the server never has a trained one), so no ``shared`` view: FedDAT's
A_s + own head compares with FedPer and with FedAvg's ``shared+head``, not with FedAvg's
``shared``.  A generative model has no head: A_s with the projector is the whole shared model,
so its views are ``shared``, ``personal`` and ``client`` whatever ``feddat.federate_head`` says
(``fedmm.spec``'s ``_feddat_views``).  A client that has not trained yet has no A_c and no head:
it scores ``shared`` (federated head, or generative) or nothing.

Reference defects avoided: A_c stays in the optimiser every round (explicit parameter groups,
pinned by a test that A_c changes in every round); one schedule over the whole run, one step per
batch; gradients reset to None; the bottleneck size is a real option; client sampling.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fedmm.backbones import FusionVLModel
from fedmm.config import ConfigError
from fedmm.methods.aggregation import Reply, weighted_average
from fedmm.methods.base import ClientUpdate, Method, register
from fedmm.methods.context import ClientContext
from fedmm.methods.losses import answer_positions, distill_kl, output_positions, task_loss
from fedmm.methods.state import Arrays, State, get_parts, load_parts, select, to_numpy
from fedmm.peft import PEFT_TYPES, AdapterBank
from fedmm.spec import PERSONAL, SHARED, FedDATConfig

GLOBAL, FROZEN, CLIENT = "global_adapter", "frozen_global", "client_adapter"
LAYOUTS = ("batched-prefix", "batched", "two-forward")


def feddat_losses(
    z_s: torch.Tensor, z_dat: torch.Tensor, labels: torch.Tensor, cfg: FedDATConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L_s, L_DAT)`` of the module docstring (each distillation target detached).

    ``z_s``, ``z_dat``: ``(B, C)`` class logits with ``labels`` ``(B,)`` (a multi-label task,
    float 0/1 ``labels`` ``(B, K)``, distils per-label Bernoulli distributions), or ``(B, L, V)``
    next-token logits with ``labels`` ``(B, L')`` (-100 off the answer): cross-entropy and KL are
    then means over the answer tokens (``losses.output_positions``)."""
    t, multilabel = cfg.temperature, labels.is_floating_point()
    p_s, p_dat = output_positions(z_s, labels), output_positions(z_dat, labels)
    loss_s = cfg.alpha * task_loss(z_s, labels) + (1 - cfg.alpha) * distill_kl(
        p_s, p_dat.detach(), t, multilabel
    )
    loss_dat = cfg.beta * task_loss(z_dat, labels) + (1 - cfg.beta) * distill_kl(
        p_dat, p_s.detach(), t, multilabel
    )
    return loss_s, loss_dat


def prefix_block(model: FusionVLModel) -> nn.Module | None:
    """The transformer block enclosing the first adapter (its inputs see no PEFT set), or None
    when the backbone has no ``encoder.layer`` list or the PEFT type is not ``adapter``."""
    bank = model.peft
    layers = getattr(getattr(getattr(model, "text", None), "encoder", None), "layer", None)
    if not isinstance(bank, AdapterBank) or not layers:
        return None
    return layers[0] if any(m is bank.points[0] for m in layers[0].modules()) else None


def feddat_logits(
    model: FusionVLModel,
    feats: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor,
    combine: str = "average",
    layout: str = "batched-prefix",
    keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z_s, z_DAT)`` on one batch.  ``layout``: ``batched-prefix`` (adapters: one forward of
    ``2B`` rows, the frozen block below the first adapter once), ``batched`` (one forward of
    ``2B`` rows), ``two-forward`` (two forwards of ``B``; the only layout for LoRA, prompts and
    BitFit, whose sets act below or inside the first block).  ``keep`` (generative models, bool
    ``(B, L)``): the logits at those positions only, ``(N, V)`` each (``answer_positions``)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    at = {} if keep is None else {"keep": keep}
    if layout == "two-forward" or not isinstance(model.peft, AdapterBank):
        with model.active(CLIENT, FROZEN, combine=combine):
            z_dat = model(feats, ids, mask, **at)
        with model.active(GLOBAL):
            z_s = model(feats, ids, mask, **at)
        return z_s, z_dat
    block = prefix_block(model) if layout == "batched-prefix" else None
    rows = feats.shape[0] if keep is None else int(keep.sum())
    at = {} if keep is None else {"keep": torch.cat([keep, keep])}  # row-major: A_s rows first
    with model.peft.row_blocks([(GLOBAL,), (CLIENT, FROZEN)], combine, prefix_block=block):
        z = model(*(torch.cat([x, x]) for x in (feats, ids, mask)), **at)
    return z[:rows], z[rows:]


def feddat_step_losses(
    model: FusionVLModel,
    batch: Sequence[torch.Tensor],
    cfg: FedDATConfig,
    layout: str = "batched-prefix",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L_s, L_DAT)`` of one batch ``(feats, ids, mask, labels)`` as ``local_update`` takes
    them: ``feddat_logits`` + ``feddat_losses``, a generative model's logits computed at the
    answer positions only (``answer_positions``: the output layer and softmax skip the prompt's
    positions; the same values as ``feddat_losses`` on every position's logits, tested)."""
    feats, ids, mask, labels = batch
    keep, targets = answer_positions(labels, ids.shape[1])
    z_s, z_dat = feddat_logits(model, feats, ids, mask, cfg.dat_combine, layout, keep)
    return feddat_losses(z_s, z_dat, targets, cfg)


def reference_step(
    model: FusionVLModel,
    opt_s: torch.optim.Optimizer,
    opt_c: torch.optim.Optimizer,
    batch: Sequence[torch.Tensor],
    cfg: FedDATConfig,
) -> tuple[float, float]:
    """The reference's literal step: three forwards, two backwards, two optimiser steps.

    1. z_DAT = f(x; DAT) without gradient;  2. z_s = f(x; A_s), L_s, step ``opt_s`` (A_s);
    3. z_DAT = f(x; DAT) with gradient, L_DAT with sg[z_s], step ``opt_c`` (A_c).
    Kept to pin the fast path against (tests) and to time it (``benchmarks/feddat_step.py``).
    """
    feats, ids, mask, labels = batch
    with torch.no_grad(), model.active(CLIENT, FROZEN, combine=cfg.dat_combine):
        z_dat = model(feats, ids, mask)
    with model.active(GLOBAL):
        z_s = model(feats, ids, mask)
    loss_s, _ = feddat_losses(z_s, z_dat, labels, cfg)
    opt_s.zero_grad(set_to_none=True)
    loss_s.backward()
    opt_s.step()
    opt_s.zero_grad(set_to_none=True)
    with model.active(CLIENT, FROZEN, combine=cfg.dat_combine):
        z_dat = model(feats, ids, mask)
    _, loss_dat = feddat_losses(z_s.detach(), z_dat, labels, cfg)
    opt_c.zero_grad(set_to_none=True)
    loss_dat.backward()
    opt_c.step()
    opt_c.zero_grad(set_to_none=True)
    return float(loss_s.detach()), float(loss_dat.detach())


@register("feddat")
class FedDAT(Method):
    adapter_sets = (GLOBAL, FROZEN, CLIENT)
    dp_sgd_refusal = "its loss distils between two adapters (a sum of losses over several models)"
    secagg_refusal = ""  # A_s (with proj / head when federated) is the weighted mean: a sum

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        combines = PEFT_TYPES[cfg.peft.type].combines
        if cfg.feddat.dat_combine not in combines:
            raise ConfigError(
                f"feddat.dat_combine={cfg.feddat.dat_combine!r} is not defined for peft.type "
                f"{cfg.peft.type!r} (it combines by {', '.join(combines)}); use 'average'"
            )
        # a federated head (or none: a generative model) makes A_s the whole shared model
        flat = {"feddat.federate_head": cfg.feddat.federate_head,
                "model.backbone": cfg.model.backbone}  # fmt: skip
        self.views, self.view_aliases = self.views_for(flat), self.aliases_for(flat)

    def upload_parts(self) -> tuple[str, ...]:
        parts = (f"adapter.{GLOBAL}", "proj")
        return (*parts, "head") if self.cfg.feddat.federate_head else parts

    def personal_parts(self) -> tuple[str, ...]:
        parts = (f"adapter.{CLIENT}",)
        return parts if self.cfg.feddat.federate_head else (*parts, "head")

    def trainable_parts(self) -> tuple[str, ...]:
        return (*self.upload_parts(), *self.personal_parts())

    # ------------------------------------------------------------------ server
    def init_global(self, model: FusionVLModel) -> Arrays:
        self.prepare(model)
        return to_numpy(get_parts(model, self.upload_parts()))

    def aggregate(self, global_state: Arrays, replies: Sequence[Reply]) -> Arrays:
        return weighted_average(replies, self.cfg.fed.weighting)

    # ------------------------------------------------------------------ client
    def load(self, ctx: ClientContext, received: State) -> None:
        """Global parts from the server, Â_s ← A_s, personal parts from the client's state."""
        super().load(ctx, received)
        model = ctx.model
        load_parts(
            model,
            select(received, (f"adapter.{GLOBAL}",)),
            rename={f"adapter.{GLOBAL}": f"adapter.{FROZEN}"},
        )
        for p in model.peft.parameters_of(FROZEN):
            p.requires_grad_(False)

    def local_update(self, ctx: ClientContext, received: State) -> ClientUpdate:
        model, cfg = ctx.model, self.cfg.feddat
        opt = ctx.optimizer([
            model.peft.parameters_of(GLOBAL),
            model.peft.parameters_of(CLIENT),
            list(model.visual_proj.parameters()),
            list(model.head.parameters()),
        ])  # fmt: skip
        for batch in ctx.steps(opt):
            loss_s, loss_dat = feddat_step_losses(model, batch, cfg)
            ctx.step(opt, loss_s + loss_dat)
        return ClientUpdate(
            get_parts(model, self.upload_parts()), keep=get_parts(model, self.personal_parts())
        )

    def evaluate(self, ctx: ClientContext, received: State) -> dict[str, float]:
        model = ctx.model
        if not ctx.kept:  # not trained yet: no A_c, no head of its own
            if self.views[0] == SHARED:  # A_s is the whole shared model
                with model.active(GLOBAL):
                    ctx.view(SHARED)
            return ctx.views
        with model.active(GLOBAL):
            ctx.view(self.views[0])  # shared (federated or no head) or shared+head (own head)
        with model.active(CLIENT, FROZEN, combine=self.cfg.feddat.dat_combine):
            ctx.view(PERSONAL)
        with model.active(CLIENT):
            return ctx.view("client")
