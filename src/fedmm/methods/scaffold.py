"""SCAFFOLD (Karimireddy et al., ICML 2020, "SCAFFOLD: Stochastic Controlled Averaging for
Federated Learning", arXiv 1910.06378): control variates that correct client drift.

Federated parameters x = {adapter ``global_adapter``, visual projection, head}, as in FedAvg.
Besides x the server holds a control variate c and each client i its own c_i (both shaped like
x, zero at the start); c travels with x, c_i never leaves the client.

Client i, round t (the paper's Algorithm 1; K = ``train.local_steps`` steps):

    y_i ← x;   for each of K batches:  y_i ← y_i − η_l (g_i(y_i) + c − c_i)
    c_i⁺ ← ∇f_i(x)                                   option I   (``scaffold.variant = "I"``)
    c_i⁺ ← c_i − c + (x − y_i) / (K η_l)             option II  (``"II"``, the default)
    upload y_i and Δc_i = c_i⁺ − c_i;   keep c_i ← c_i⁺

Server, with S the replying clients and N = ``fed.clients``:

    x ← x + η_g (Σ_i w_i y_i − x)                    (w_i as FedAvg's: ``fed.weighting``)
    c ← c + (1/N) Σ_{i∈S} Δc_i                       (= c + |S|/N · mean Δc_i)

(η_g = ``scaffold.server_lr``, 1 by default: x becomes FedAvg's average.)

Choices, because fedmm's local step is more than plain SGD:
* The correction c − c_i is added to the gradient after ``train.grad_clip`` clips the stochastic
  gradient and before the optimiser step (``ClientContext.step(adjust=...)``).
* ``scaffold.optimizer``: ``sgd`` (the paper's; peak learning rate ``scaffold.local_lr``, on the
  run's schedule -- warm-up and cosine over the same step budget as every method) or ``adamw``
  (fedmm's optimiser: Adam then normalises the corrected gradient).  Option II's (x − y_i)/(K η_l)
  is an average gradient only for SGD, so ``adamw`` requires option I (refused otherwise).  With
  a schedule, K η_l is the sum of the K learning rates actually used.
* Option I computes ∇f_i(x) at the received x, before training, over K batches of
  ``train.batch_size`` rows of the client's training data (dropout off, its own batch order,
  not clipped): K more forward/backward passes.  The local steps use clipped gradients
  (``train.grad_clip``), so with clipping active option I's c_i is on the scale of the raw
  gradient, option II's on that of the clipped one.
* Δc_i is uploaded under keys ``dc/<key>`` that the global state lacks, so client-side DP
  (``dp.*``) clips and noises it together with the model change, measured from 0 (it shares
  the clip budget with y_i − x).
* N counts every client of the federation, also a site with no training rows (never sampled).

Where the protocol's invariant c = (1/N) Σ_i c_i no longer holds exactly (the paper assumes every
sampled reply arrives intact): a reply the server does not aggregate (rejected, timed out, fewer
than ``fed.min_clients``) leaves that client's new c_i in place while c never receives its Δc_i;
with DP or lossy ``fed.compression`` the server adds the noised / compressed Δc_i while the client
keeps the exact c_i⁺.  The drift is bounded by those rounds' Δc_i; nothing detects it.

Views as FedAvg: ``shared`` = x, ``shared+head`` = x's body with y_i's head, ``personal`` = the
client's last y_i.
Tested: with one client (c = c_i after every round, so the correction is 0) SCAFFOLD is FedAvg
with the same optimiser, round after round; c − c_i enters the step; option II's c_i⁺ is the
gradient of a full-batch SGD step (in general: the learning-rate-weighted mean of the clipped
gradients), option I's the gradient at x.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from fedmm.backbones import FusionVLModel
from fedmm.config import ConfigError
from fedmm.methods.aggregation import Reply, weighted_average
from fedmm.methods.base import ClientUpdate, register
from fedmm.methods.context import ClientContext, model_groups
from fedmm.methods.fedavg import PARTS, FedAvg
from fedmm.methods.losses import supervised_loss, task_loss  # fmt: skip
from fedmm.methods.state import (
    Arrays,
    State,
    get_parts,
    is_model_key,
    namespaced,
    part_module,
    part_shapes,
)
from fedmm.spec import ScaffoldConfig

SERVER_C, CLIENT_C, DELTA_C = "c", "c_i", "dc"  # key prefixes: c/<key>, c_i/<key>, dc/<key>


def prefixed(state: dict, prefix: str) -> dict:
    """The entries of ``state`` under ``<prefix>/``, without it."""
    return {k.removeprefix(f"{prefix}/"): v for k, v in state.items() if k.startswith(f"{prefix}/")}


@register("scaffold")
class Scaffold(FedAvg):
    dp_sgd_refusal = ("its control variates (variant I: an exact gradient over the site's data) "
                      "leave the site outside the per-example clipping")  # fmt: skip
    # secure aggregation serves it: x needs the weighted mean of y_i, c the plain sum of Δc_i
    # (``secagg_summed``); ``aggregate`` of that one summed reply is the same server step
    secagg_refusal = ""

    def secagg_summed(self, key: str) -> bool:
        """Δc_i is summed over the sites (c ← c + (1/N) Σ_i Δc_i), not averaged."""
        return key.startswith(f"{DELTA_C}/")

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        if cfg.scaffold.optimizer == "adamw" and cfg.scaffold.variant == "II":
            raise ConfigError(
                "scaffold.variant=II derives c_i from (x − y_i)/(K η_l), an average gradient only "
                "for plain SGD; with scaffold.optimizer=adamw use scaffold.variant=I"
            )

    def extra_uploads(self, model: FusionVLModel) -> dict[str, tuple[int, ...]]:
        """Δc_i, one tensor per federated tensor."""
        return {f"{DELTA_C}/{k}": s for k, s in part_shapes(model, PARTS).items()}

    # ------------------------------------------------------------------ server
    def init_global(self, model: FusionVLModel) -> Arrays:
        x = super().init_global(model)
        return x | {f"{SERVER_C}/{k}": np.zeros_like(v) for k, v in x.items()}

    def aggregate(self, global_state: Arrays, replies: Sequence[Reply]) -> Arrays:
        c = self.cfg.scaffold
        models = [Reply(r.client_index, {k: v for k, v in r.arrays.items() if is_model_key(k)},
                        r.num_examples) for r in replies]  # fmt: skip
        average = weighted_average(models, self.cfg.fed.weighting)
        new_state = {}
        for key, x in global_state.items():
            if not is_model_key(key):
                continue
            if c.server_lr == 1.0:
                new_state[key] = average[key]
            else:
                x64 = x.astype(np.float64)
                new_state[key] = (x64 + c.server_lr * (average[key] - x64)).astype(np.float32)
            n = self.cfg.fed.clients
            control = global_state[f"{SERVER_C}/{key}"].astype(np.float64)
            control = control + sum(r.arrays[f"{DELTA_C}/{key}"].astype(np.float64)
                                    for r in replies) / n  # fmt: skip
            new_state[f"{SERVER_C}/{key}"] = control.astype(np.float32)
        return new_state

    # ------------------------------------------------------------------ client
    def local_update(self, ctx: ClientContext, received: State) -> ClientUpdate:
        c = self.cfg.scaffold
        model = ctx.model
        params = {
            f"{part}/{name}": p
            for part in PARTS
            for name, p in part_module(model, part).named_parameters()
        }
        x = {k: v.detach().clone() for k, v in get_parts(model, PARTS).items()}
        server_c = prefixed(received, SERVER_C)
        client_c = prefixed(ctx.kept, CLIENT_C) or {k: torch.zeros_like(v) for k, v in x.items()}
        correction = {
            k: (server_c[k] - client_c[k]).to(p.device) for k, p in params.items()
        }  # fmt: skip
        if c.variant == "I":
            gradient = self.gradient_at(ctx, params)  # ∇f_i(x), before any step
        groups = model_groups(model, "global_adapter")
        sgd = c.optimizer == "sgd"
        opt = ctx.optimizer(groups, kind=c.optimizer, lr=c.local_lr if sgd else None)

        nonzero = {k for k, v in correction.items() if bool(v.any())}
        rates: list[float] = []  # the learning rate of each optimiser step taken

        def adjust() -> None:  # g + c − c_i, after clipping, before the step
            rates.append(opt.param_groups[0]["lr"])
            for key in nonzero:  # a zero correction leaves the step exactly FedAvg's
                p = params[key]
                if p.grad is None:  # a parameter the loss does not reach (another task's head)
                    p.grad = correction[key].clone()
                else:
                    p.grad.add_(correction[key])

        with model.active("global_adapter"):
            for feats, ids, mask, labels in ctx.steps(opt):
                ctx.step(opt, supervised_loss(model, feats, ids, mask, labels), adjust)
        y = get_parts(model, PARTS)
        if c.variant == "I":
            new_c = gradient
        elif not rates:  # no training data: nothing learned about this client's drift
            new_c = client_c
        else:  # K η_l: the sum of the rates the optimiser actually used
            lr_sum = sum(rates)
            new_c = {k: client_c[k] - server_c[k] + (x[k] - y[k]) / lr_sum for k in x}
        upload = y | {f"{DELTA_C}/{k}": new_c[k] - client_c[k] for k in x}
        keep = namespaced(y, "personal") | {f"{CLIENT_C}/{k}": v for k, v in new_c.items()}
        return ClientUpdate(upload, keep=keep)

    def gradient_at(self, ctx: ClientContext, params: dict[str, torch.nn.Parameter]) -> State:
        """Option I: ∇f_i at the current (received) model, averaged over ``steps_per_round``
        batches of the training data (dropout off; its own seeded batch order)."""
        model, n = ctx.model, len(ctx.train)
        grads = {k: torch.zeros_like(p, device="cpu") for k, p in params.items()}
        if n == 0:
            return grads
        for p in params.values():
            p.requires_grad_(True)
        gen = torch.Generator().manual_seed(
            self.cfg.seed * 1_000_003 + ctx.client_index * 9_176 + ctx.round + 7_919
        )
        bs, batches = self.cfg.train.batch_size, ctx.steps_per_round
        model.eval()
        with model.active("global_adapter"):
            for _ in range(batches):
                idx = torch.randperm(n, generator=gen)[:bs]
                feats, ids, mask, labels = ctx.train.batch(idx, ctx.device)
                with ctx.autocast():
                    logits = model(feats, ids, mask)
                loss = task_loss(logits.float(), labels) / batches
                found = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
                for (key, _), g in zip(params.items(), found):
                    if g is not None:
                        grads[key] += g.detach().cpu()
        return grads


__all__ = ["Scaffold", "ScaffoldConfig"]
