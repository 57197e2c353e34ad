"""The client half's round: ``ClientContext`` (the step budget, the learning-rate schedule, the
optimiser, evaluation by view) and the plain supervised update most methods run.

Equal terms for every method: ``ClientContext.steps`` yields the same number of optimiser steps
per round (``train.local_steps``) and sets the learning rate from one schedule over the whole run,
indexed by the global step ``(round - 1) * local_steps + i`` -- it never restarts."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from fedmm.backbones import FusionVLModel
from fedmm.config import ConfigError, FedmmConfig
from fedmm.methods.losses import multilabel_scores, supervised_loss
from fedmm.methods.precision import autocast_for, resolve_precision
from fedmm.runtime import Encoded
from fedmm.sections import TrainConfig


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Learning rate at global step ``step`` of ``total``: linear warm-up, then the schedule."""
    warmup = int(cfg.warmup_frac * total)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "linear":
        return cfg.lr * max(0.0, 1.0 - progress)
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    raise ValueError(f"train.schedule must be cosine, linear or constant, got {cfg.schedule!r}")


OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
}


@dataclass
class ClientContext:
    """Everything a method's client half needs for one round on one client."""

    cfg: FedmmConfig
    model: FusionVLModel
    train: Encoded
    test: Encoded
    kept: Mapping[str, torch.Tensor]  # what the client kept last round (ClientUpdate.keep)
    round: int  # 1-based
    client_index: int
    steps_per_round: int
    total_steps: int  # over the whole run, for the learning-rate schedule
    # record-level DP-SGD (``federation/dpsgd.py``, site setting dp-mode=record): Poisson batches,
    # per-example clipping and noise in ``optimizer`` / ``steps`` / ``step``; None: plain training
    dp_sgd: Any = None
    # the validation split (``data.val_frac``; early stopping): scored beside the test split in
    # the view ``val_view`` only (``federation.early_stopping.stopping_view``)
    val: Encoded | None = None
    val_view: str = ""
    stats: dict[str, float] = field(default_factory=dict)
    views: dict[str, float] = field(default_factory=dict)  # filled by ``view``
    val_views: dict[str, float] = field(default_factory=dict)  # primary score on ``val``, per view
    # generative tasks (fedmm.generation): a sample of what the model said, per view
    predictions: dict[str, list[dict]] = field(default_factory=dict)
    last_predictions: list[dict] = field(default_factory=list)
    _micro: tuple[int, int] = field(default=(0, 1), init=False, repr=False)  # (micro-batch, k)
    _rows: int = field(default=0, init=False, repr=False)  # rows of the batch last yielded
    # Σ loss over the steps so far, kept as a tensor on the device: reading it per step
    # (``float(loss)``) would wait for the device at every step; ``steps`` adds it to
    # ``stats["loss_sum"]`` once, when its loop ends
    _loss_sum: torch.Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.kept = MappingProxyType(dict(self.kept))  # read-only: a method returns its new state
        self.model.set_task(self.train.task)  # multi-task benchmarks: this client's head

    @property
    def device(self) -> torch.device:
        return next(self.model.visual_proj.parameters()).device

    def optimizer(
        self, groups: Sequence[Sequence[nn.Parameter]], kind: str = "adamw",
        lr: float | None = None, **options,
    ) -> torch.optim.Optimizer:  # fmt: skip
        """An optimiser over explicit parameter groups (each parameter must require grad).

        ``kind``: ``adamw`` (every method's default) or ``sgd`` (plain SGD; ``options`` such as
        ``momentum`` pass through); both with ``train.weight_decay`` unless ``options`` says.  ``lr``: the method's own peak
        learning rate (default ``train.lr``); ``steps`` scales the run's schedule to it, so the
        schedule's shape and step budget stay those of every other method.
        """
        if kind not in OPTIMIZERS:
            raise ConfigError(f"unknown optimiser {kind!r}; choices: {', '.join(OPTIMIZERS)}")
        for group in groups:
            for p in group:
                p.requires_grad_(True)
        scale = 1.0 if lr is None else lr / self.cfg.train.lr
        options.setdefault("weight_decay", self.cfg.train.weight_decay)
        optimizer = OPTIMIZERS[kind](
            [{"params": list(g), "lr_scale": scale} for g in groups if len(g)],
            lr=self.cfg.train.lr * scale,
            **options,
        )
        if self.dp_sgd is not None:  # per-example clipping and noise (Opacus's DPOptimizer)
            return self.dp_sgd.wrap(self.model, optimizer)
        return optimizer

    def autocast(self) -> contextlib.AbstractContextManager:
        """``train.precision``: bf16 autocast on this device, or nothing (fp32)."""
        return autocast_for(self.cfg.train.precision, self.device)

    def steps(
        self, optimizer: torch.optim.Optimizer, n: int | None = None, *,
        data: Encoded | None = None, stat: str = "steps", schedule: TrainConfig | None = None,
        first_step: int | None = None, total: int | None = None, seed_round: int | None = None,
    ) -> Iterator[tuple[torch.Tensor, ...]]:  # fmt: skip
        """Yield ``n`` optimiser steps' training batches (default: the round's budget
        ``steps_per_round``), setting the scheduled learning rate before each.

        The step budget can be asked for more than once (Ditto's and TAP's second model); each
        call counts its steps in ``stats[stat]`` (``steps`` for the model the round is about,
        e.g. ``personal_steps`` for a second one) and starts the same batch order and dropout
        stream, so two models of one round see the same batches.  ``data``: another training
        split (TAP trains on its data minus a validation part).  The learning rate at the i-th
        step is ``lr_at(first_step + i, total, schedule)`` -- by default the run's schedule
        (``train.*``) at global step ``(round - 1) * steps_per_round + i`` of ``total_steps``;
        TAP's stage 2 runs its own (``schedule`` with its lr, ``first_step = 0``, ``total = n``,
        ``seed_round`` = the round whose batch order it draws).

        With ``train.accumulation = k`` each optimiser step gets k micro-batches of
        ``train.batch_size`` (``step`` accumulates their gradients and steps on the k-th); the
        step budget and the schedule count optimiser steps.  The consumer's forward runs under
        ``train.precision``'s autocast.

        With record-level DP-SGD (``dp_sgd``) each step's batch is instead a Poisson sample of the
        rows (``DPSGD.batches``: each row independently with probability batch_size / rows, from
        a secret generator); a step whose sample is empty is taken here, noise only, and not
        yielded.
        """
        data = self.train if data is None else data
        n = self.steps_per_round if n is None else n
        schedule = self.cfg.train if schedule is None else schedule
        first = (self.round - 1) * self.steps_per_round if first_step is None else first_step
        total = self.total_steps if total is None else total
        if len(data) == 0:  # nothing to learn from: no step (a batch of 0 rows has a NaN loss)
            return
        rnd = self.round if seed_round is None else seed_round
        seed = self.cfg.seed * 1_000_003 + self.client_index * 9_176 + rnd
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)  # dropout: the same masks whichever process runs this client
        # the precision this site trains in (``auto`` resolves per device): results' train stats
        self.stats["bf16"] = float(
            resolve_precision(self.cfg.train.precision, self.device) == "bf16"
        )
        self.model.train()
        if getattr(data, "truncated", 0):  # generative targets cut to train.max_target_tokens
            self.stats["targets_truncated"] = float(data.truncated)
        try:
            yield from self._batches(data, n, optimizer, schedule, first, total, gen, stat)
        finally:  # one host read of the summed loss per call, not one per step
            self.flush_loss()

    def flush_loss(self) -> None:
        """Add the loss summed on the device since the last flush to ``stats["loss_sum"]``."""
        if self._loss_sum is not None:
            self.stats["loss_sum"] = self.stats.get("loss_sum", 0.0) + float(self._loss_sum)
            self._loss_sum = None

    def _batches(
        self, data: Encoded, n: int, optimizer: torch.optim.Optimizer, schedule: TrainConfig,
        first: int, total: int, gen: torch.Generator, stat: str,
    ) -> Iterator[tuple[torch.Tensor, ...]]:  # fmt: skip
        rows, bs = len(data), self.cfg.train.batch_size
        k = max(1, self.cfg.train.accumulation)
        order = torch.randperm(rows, generator=gen)
        pos = 0
        poisson = self.dp_sgd.batches(n) if self.dp_sgd is not None else None
        for i in range(n):
            lr = lr_at(first + i, total, schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            self.stats.setdefault("lr_first", lr)
            self.stats["lr_last"] = lr
            self.stats[stat] = self.stats.get(stat, 0) + 1
            if poisson is not None:  # record-level DP-SGD: one Poisson batch per step
                idx = next(poisson)
                self._rows = len(idx)
                if self._rows == 0:
                    self.dp_sgd.step(optimizer, None, 0)
                    continue
                with self.autocast():
                    yield data.batch(idx, self.device)
                continue
            for micro in range(k):
                if pos + min(bs, rows) > rows:
                    order, pos = torch.randperm(rows, generator=gen), 0
                idx = order[pos : pos + bs]
                pos += bs
                self._micro = (micro, k)
                with self.autocast():
                    yield data.batch(idx, self.device)
        self._micro = (0, 1)

    def step(
        self, optimizer: torch.optim.Optimizer, loss: torch.Tensor,
        adjust: Callable[[], None] | None = None,
        public: Callable[[], torch.Tensor] | None = None,
    ) -> None:  # fmt: skip
        """Backward, clip, ``adjust()`` (a method's change of the gradients, e.g. SCAFFOLD's
        control-variate correction), one optimiser step, gradients back to None (with
        accumulation: the loss is scaled by 1/k and the step taken on the k-th micro-batch).

        ``public``: a term of the objective that reads no data (FedProx's proximal term); it is
        added to ``loss``, except under record-level DP-SGD, where ``loss`` (the batch mean of
        the per-example losses) is clipped and noised per example and ``public``'s gradient is
        added after the noise (``DPSGD.step``)."""
        if self.dp_sgd is not None:
            self.stats["loss_sum"] = self.stats.get("loss_sum", 0.0) + float(loss.detach())
            self.dp_sgd.step(optimizer, loss, self._rows, public=public, adjust=adjust)
            return
        if public is not None:
            loss = loss + public()
        micro, k = self._micro
        if micro == 0:
            optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, enabled=False):  # backward outside autocast
            (loss / k if k > 1 else loss).backward()
        part = loss.detach().double() / k  # fp64, as the Python float sum it replaces
        self._loss_sum = part if self._loss_sum is None else self._loss_sum + part
        if micro < k - 1:
            return
        if self.cfg.train.grad_clip > 0:
            params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.cfg.train.grad_clip)
        if adjust is not None:
            adjust()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def logits(self, split: Encoded | None = None) -> torch.Tensor:
        """Logits of the model's current configuration on ``split`` (default: test split)."""
        split = self.test if split is None else split
        self.model.set_task(split.task)
        self.model.eval()
        out, bs = [], self.cfg.train.eval_batch_size
        for start in range(0, len(split), bs):
            idx = torch.arange(start, min(start + bs, len(split)))
            feats, ids, mask, _ = split.batch(idx, self.device)
            with self.autocast():
                out.append(self.model(feats, ids, mask).float().cpu())
        return torch.cat(out) if out else torch.empty(0, self.model.task_head()[-1].out_features)

    def predict(self, split: Encoded | None = None) -> torch.Tensor:
        """Predicted answer indices of the model's current configuration (default: test split)."""
        return self.logits(split).argmax(-1)

    def score(self, split: Encoded | None = None) -> dict[str, float]:
        """The task's metrics on ``split`` (default: test), ``{"": primary, ".<extra>": ...}``.

        Single-label tasks: top-1 accuracy, and per evaluation group (VQA-RAD: ``.closed`` /
        ``.open``).  Multi-label tasks: mean AUROC over labels (primary) and ``.f1`` macro-F1.
        An empty split has no score: ``{}`` (not 0.0, which would be averaged in as a real
        accuracy, and not NaN, which poisons every mean it touches); the client's evaluation
        reply then carries no view and results leave it out of every mean.
        """
        split = self.test if split is None else split
        if len(split) == 0:
            return {}
        if split.kind == "generate":  # greedy decoding, exact match and token F1
            from fedmm.generation import generative_scores

            return generative_scores(self, split)
        logits = self.logits(split)
        if split.kind == "multilabel":
            return multilabel_scores(logits, split.labels)
        correct = (logits.argmax(-1) == split.labels).float()
        scores = {"": float(correct.mean())}
        for group in sorted(set(split.groups or ())):
            rows = torch.tensor([g == group for g in split.groups])
            scores[f".{group}"] = float(correct[rows].mean())
        return scores

    def view(self, *names: str) -> dict[str, float]:
        """Score the model's current configuration on the test split as view(s) ``names``.

        Records ``views[name]`` = the task's primary metric (accuracy; multi-label: mean AUROC)
        and ``views[f"{name}.{suffix}"]`` for the extras of ``score`` (groups, macro-F1).  Several
        names share one evaluation (FedAvg before a client first trains: every view is θ^{t+1}).
        With a validation split (``val``) and ``val_view`` among ``names``: ``val_views[val_view]``
        = the primary metric on it too (scored first, so that a generative test split's
        predictions are the ones kept).
        """
        if self.val is not None and self.val_view in names:
            primary = self.score(self.val).get("")  # None: an empty split has no score
            if primary is not None:
                self.val_views[self.val_view] = primary
        scores = self.score(self.test)
        for name in names:
            self.views.update({f"{name}{suffix}": v for suffix, v in scores.items()})
            if self.last_predictions:
                self.predictions[name] = self.last_predictions
        return self.views

    def accuracy(self, split: Encoded | None = None) -> float | None:
        """The task's primary metric of the current configuration on ``split`` (default: test);
        None for an empty split (no score)."""
        return self.score(split).get("")


def model_groups(model: FusionVLModel, adapter_set: str) -> list[list[nn.Parameter]]:
    """Parameter groups of one trainable model: [adapter set, visual projection, head]."""
    return [
        model.peft.parameters_of(adapter_set),
        list(model.visual_proj.parameters()),
        list(model.head.parameters()),
    ]


def supervised_update(
    ctx: ClientContext, adapter_set: str, regulariser: Callable[[], torch.Tensor] | None = None,
    stat: str = "steps",
) -> None:  # fmt: skip
    """The plain local update: ``train.local_steps`` AdamW steps on ``CE(f(x; θ), y)`` (plus
    ``regulariser()`` when given) with θ = {adapter set ``adapter_set``, visual projection, head};
    the steps are counted in ``ctx.stats[stat]``."""
    model = ctx.model
    opt = ctx.optimizer(model_groups(model, adapter_set))
    with model.active(adapter_set):
        for feats, ids, mask, labels in ctx.steps(opt, stat=stat):
            ctx.step(opt, supervised_loss(model, feats, ids, mask, labels), public=regulariser)
