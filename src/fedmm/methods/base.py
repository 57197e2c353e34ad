"""What every method shares: the method interface, its registry and small training helpers.

A method module holds both halves of its protocol and registers itself (``@register("name")``,
plus one line in ``fedmm/methods/__init__.py``); docs/adding-a-method.md walks through one.

* server half: ``init_global`` (the first global state), ``aggregate`` (replies -> new global),
  optionally ``global_for_client`` (with ``per_client_messages = True``) and ``server_state``;
* client half: ``local_update`` (one round of local work: returns a ``ClientUpdate`` -- what it
  uploads and what it keeps private) and ``evaluate`` (score per *view*, by kind: ``shared``,
  ``shared+head``, ``personal``, plus a method's own extras -- ``VIEW_KINDS``).  The base class
  runs the round around them (``client_train`` / ``client_evaluate``): it resets the model
  (``prepare``), loads what the client received and what it kept (``load``), calls the method,
  and the ClientApp stores the returned private state.

The round loop (``fedmm.federation``) and the transport never look inside.  States are flat
``{key: tensor}`` dicts with keys ``"<part>/<param>"`` where part is ``proj``, ``head`` or
``adapter.<set name>`` (a named PEFT set of the configured ``peft.type``: adapter, LoRA, prompt
or BitFit) -- exactly what ``load_parts`` writes back.  A key whose part carries a namespace
(``"personal:adapter.global_adapter/..."``, ``"c/..."`` for a tensor that is no model part) is the
method's own: ``load`` leaves it alone.  What a method uploads is declared (``upload_spec``: keys
-> shapes, model parts and extra tensors such as SCAFFOLD's control variates); validation, the
payload audit and DP read that declaration.

Equal terms for every method: ``ClientContext.steps`` yields the same number of optimiser steps
per round (``train.local_steps``) and sets the learning rate from one schedule over the whole run,
indexed by the global step ``(round - 1) * local_steps + i`` -- it never restarts; a method that
trains two models (Ditto, TAP) asks for the budget twice and counts the second under its own
name.  The optimiser is AdamW over explicit parameter groups unless a method asks for another
(``ClientContext.optimizer(kind=...)``); gradients are reset to ``None`` (an unused parameter gets
no update from stale moments).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedmm.backbones import FusionVLModel, check_backbone_peft
from fedmm.config import ConfigError, FedmmConfig, TrainConfig, register_section
from fedmm.peft import PEFT_TYPES
from fedmm.precision import (  # noqa: F401  (re-exported: fedmm.methods.base was their home)
    BF16_CPU_FLAGS,
    PRECISIONS,
    autocast_for,
    cpu_flags,
    native_bf16,
    resolve_precision,
)
from fedmm.results import KINDS
from fedmm.runtime import Encoded

State = dict[str, torch.Tensor]
Arrays = dict[str, np.ndarray]  # Flower's Arrays is a list; fedmm's states are keyed


# ---------------------------------------------------------------------- state by part name
def part_module(model: FusionVLModel, part: str) -> nn.Module:
    if part == "proj":
        return model.visual_proj
    if part == "head":
        return model.head
    if part.startswith("adapter."):
        return model.peft.set_module(part.removeprefix("adapter."))
    raise KeyError(f"unknown trainable part {part!r}")


def get_parts(model: FusionVLModel, parts: Sequence[str]) -> State:
    """``{"<part>/<param>": tensor}`` (detached CPU copies) of the named trainable parts."""
    return {
        f"{part}/{k}": v.detach().cpu().clone()
        for part in parts
        for k, v in part_module(model, part).state_dict().items()
    }


def load_parts(
    model: FusionVLModel,
    state: State,
    rename: dict[str, str] | None = None,
    partial: bool = False,
) -> None:
    """Write ``get_parts``-style state into the model; ``rename`` maps a part to another part.

    ``partial``: a part may be given only some of its tensors (TAP: one task's head of several);
    an unknown key is an error either way."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        part, name = key.split("/", 1)
        grouped.setdefault((rename or {}).get(part, part), {})[name] = value
    for part, sub in grouped.items():
        module = part_module(model, part)
        device = next(module.parameters()).device
        result = module.load_state_dict(
            {k: torch.as_tensor(v).to(device) for k, v in sub.items()}, strict=not partial
        )
        if result.unexpected_keys:
            raise KeyError(f"unknown tensors for part {part!r}: {result.unexpected_keys}")


def part_shapes(model: FusionVLModel, parts: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """``{"<part>/<param>": shape}`` of the named trainable parts (``get_parts``' keys)."""
    return {
        f"{part}/{name}": tuple(tensor.shape)
        for part in parts
        for name, tensor in part_module(model, part).state_dict().items()
    }


def select(state: State, parts: Sequence[str]) -> State:
    return {k: v for k, v in state.items() if k.split("/", 1)[0] in parts}


def is_model_key(key: str) -> bool:
    """Whether ``key`` names a model part's tensor (``proj/...``, ``head/...``,
    ``adapter.<set>/...``) rather than a method's own namespaced tensor."""
    part = key.split("/", 1)[0]
    return part in ("proj", "head") or (part.startswith("adapter.") and ":" not in part)


def model_keys(state: Mapping[str, torch.Tensor]) -> State:
    return {k: v for k, v in state.items() if is_model_key(k)}


def namespaced(state: Mapping[str, torch.Tensor], ns: str) -> State:
    """``state`` with every key under namespace ``ns`` (``"personal:proj/weight"``)."""
    return {f"{ns}:{k}": v for k, v in state.items()}


def from_namespace(state: Mapping[str, torch.Tensor], ns: str) -> State:
    """The tensors of ``state`` under namespace ``ns``, without it."""
    prefix = f"{ns}:"
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


def to_numpy(state: State) -> Arrays:
    return {k: v.detach().cpu().float().numpy() for k, v in state.items()}


def to_torch(arrays: Arrays) -> State:
    return {k: torch.from_numpy(np.array(v, copy=True)) for k, v in arrays.items()}


def num_params(model: FusionVLModel, parts: Sequence[str]) -> int:
    return sum(p.numel() for part in parts for p in part_module(model, part).parameters())


# ---------------------------------------------------------------------- views by kind
SHARED, SHARED_HEAD, PERSONAL = KINDS
VIEW_KINDS = {
    SHARED: "every parameter the federation shares, with the shared head: the model a new client "
    "would receive",
    SHARED_HEAD: "the shared body (PEFT set, projection) with the client's own head: the head it "
    "trained locally in its last round and kept",
    PERSONAL: "the client's own full model (FedAvg's locally trained copy, Ditto's v_k, FedDAT's "
    "DAT, FedPIA's local model, TAP's stage-1 model, local training's)",
}
"""The view kinds every method names the same way (docs: README "Views").  A method that has no
such model has no such view -- its table cell is "—", never another model under the name.
Method-specific extras: FedDAT ``client`` (A_c alone), TAP ``distilled`` (stage 2)."""


# ---------------------------------------------------------------------- server helpers
@dataclass(frozen=True)
class ClientInfo:
    """What the server learns about a client from its site (the query handshake): its name, its
    task of the schema ("" on single-task schemas) and its modalities.  Never its data."""

    client_id: str
    task: str = ""
    modalities: tuple[str, ...] = ("image", "text")


@dataclass
class Reply:
    """One client's training reply as the server's aggregation sees it."""

    client_index: int
    arrays: Arrays
    num_examples: int


def weighted_average(replies: Sequence[Reply], weighting: str = "samples") -> Arrays:
    """``Σ_k w_k θ_k`` with ``w_k ∝ n_k`` (``samples``) or ``w_k = 1/K`` (``uniform``)."""
    if not replies:
        raise ValueError("cannot aggregate zero replies")
    if weighting not in ("samples", "uniform"):
        raise ValueError(f"fed.weighting must be 'samples' or 'uniform', got {weighting!r}")
    weights = np.array(
        [r.num_examples if weighting == "samples" else 1.0 for r in replies], dtype=np.float64
    )
    if weights.sum() <= 0:
        raise ValueError("aggregation weights sum to zero")
    weights /= weights.sum()
    keys = replies[0].arrays.keys()
    return {
        k: sum(w * r.arrays[k].astype(np.float64) for w, r in zip(weights, replies)).astype(
            np.float32
        )
        for k in keys
    }


# ---------------------------------------------------------------------- client helpers
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
    stats: dict[str, float] = field(default_factory=dict)
    views: dict[str, float] = field(default_factory=dict)  # filled by ``view``
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
        """
        scores = self.score(self.test)
        for name in names:
            self.views.update({f"{name}{suffix}": v for suffix, v in scores.items()})
        return self.views

    def accuracy(self, split: Encoded | None = None) -> float | None:
        """The task's primary metric of the current configuration on ``split`` (default: test);
        None for an empty split (no score)."""
        return self.score(split).get("")


def multilabel_scores(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """``{"": mean AUROC, ".f1": macro-F1}`` of multi-label ``logits`` against 0/1 ``targets``.

    AUROC per label by the rank statistic (ties get average ranks), averaged over the labels that
    have both a positive and a negative example; F1 per label at logit 0 (probability 0.5),
    averaged over labels with any positive example or prediction (0 when there is none).
    """
    from scipy.stats import rankdata

    y, z = targets.numpy().astype(bool), logits.numpy()
    aucs, f1s = [], []
    for j in range(y.shape[1]):
        pos, n_pos = y[:, j], int(y[:, j].sum())
        n_neg = len(pos) - n_pos
        if n_pos and n_neg:
            ranks = rankdata(z[:, j])
            aucs.append((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
        pred = z[:, j] > 0
        tp, fp, fn = int((pred & pos).sum()), int((pred & ~pos).sum()), int((~pred & pos).sum())
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return {
        "": float(np.mean(aucs)) if aucs else 0.5,
        ".f1": float(np.mean(f1s)) if f1s else 0.0,
    }


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
            ctx.step(opt, task_loss(model(feats, ids, mask), labels), public=regulariser)


def proximal_term(
    params: Sequence[torch.Tensor], anchor: Sequence[torch.Tensor], weight: float
) -> Callable[[], torch.Tensor] | None:
    """``() -> (weight/2)·‖params − anchor‖²`` for ``supervised_update``; None when weight is 0."""
    if weight == 0:
        return None
    anchor = [a.detach() for a in anchor]
    return lambda: 0.5 * weight * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))


def task_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The task's loss: cross-entropy for single-label tasks (``labels`` long ``(B,)``),
    BCE-with-logits for multi-label tasks (``labels`` float 0/1 ``(B, K)``)."""
    if labels.is_floating_point():
        return F.binary_cross_entropy_with_logits(logits, labels)
    return F.cross_entropy(logits, labels)


def distill_kl(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float, multilabel: bool = False
) -> torch.Tensor:
    """``T² · KL(softmax(teacher/T) ‖ softmax(student/T))``, batch mean; teacher not detached here.

    ``multilabel``: each logit is its own Bernoulli, ``T² · mean_j KL(σ(t_j/T) ‖ σ(s_j/T))``.
    """
    t = temperature
    if multilabel:
        s, q = student / t, teacher / t
        p_t = torch.sigmoid(q)
        kl = p_t * (F.logsigmoid(q) - F.logsigmoid(s)) + (1 - p_t) * (
            F.logsigmoid(-q) - F.logsigmoid(-s)
        )
        return (t * t) * kl.mean()
    return (t * t) * F.kl_div(
        F.log_softmax(student / t, dim=-1), F.log_softmax(teacher / t, dim=-1),
        reduction="batchmean", log_target=True,
    )  # fmt: skip


# ---------------------------------------------------------------------- the interface
@dataclass
class ClientUpdate:
    """What a method's ``local_update`` returns: nothing else of a round leaves the method.

    ``upload``: the tensors sent to the server, exactly the keys of ``Method.upload_spec`` (TAP:
    those of the client's own modules); ``keep``: the client's whole private state for its next
    round (it replaces what it kept before; the ClientApp stores it, never the server)."""

    upload: State
    keep: State = field(default_factory=dict)


class Method(ABC):
    """A federated method: both halves of its protocol.  Subclasses set the class attributes and
    register with ``@register("name")``; ``options`` is the dataclass of their own config section
    (``cfg.<name>``), defined in their module."""

    name: str = ""  # set by ``register``
    options: type | None = None  # the method's options dataclass (config section ``name``)
    # what ``evaluate`` scores: kinds of VIEW_KINDS first, then the method's extras (an instance
    # may narrow it by its options: FedDAT with a federated head has no ``shared+head``)
    views: tuple[str, ...] = (SHARED,)
    # the names before fedmm 0.2, kept in results.json for one release (gone in 0.3): old -> new
    view_aliases: Mapping[str, str] = MappingProxyType({})
    adapter_sets: tuple[str, ...] = ()
    federated: bool = True  # False: trained without the round loop (centralised)
    # True: the server sends each client its own part of the global state (global_for_client)
    # and expects only that part back
    per_client_messages: bool = False
    # why record-level DP-SGD (site setting dp-mode=record, federation/dpsgd.py) cannot serve this
    # method's local update; "" = it can: the update is ``ctx.steps`` / ``ctx.step`` on one
    # plain loss over one model (data-independent terms passed as ``step(public=...)``)
    dp_sgd_refusal: str = "its local update is not declared to be one plain loss over one model"

    def __init__(self, cfg: FedmmConfig) -> None:
        self.cfg = cfg
        if cfg.peft.type not in PEFT_TYPES:
            raise ConfigError(
                f"unknown peft.type {cfg.peft.type!r}; choices: {', '.join(PEFT_TYPES)}"
            )
        if cfg.train.precision not in PRECISIONS or cfg.train.accumulation < 1:
            raise ConfigError(
                f"train.precision must be one of {PRECISIONS} (got {cfg.train.precision!r}) and "
                f"train.accumulation >= 1 (got {cfg.train.accumulation})"
            )
        check_backbone_peft(cfg.model, cfg.peft)  # e.g. prompt tuning on a dual encoder
        if type(self).name in cfg.methods:  # its own options: intervals and choices
            from fedmm.validate import check_section

            check_section(type(self).name, cfg.methods[type(self).name])

    @classmethod
    def aliases_for(cls, flat_config: Mapping[str, object]) -> Mapping[str, str]:
        """The ``view_aliases`` of this method run with ``flat_config`` (a results.json run's
        ``config``), for renaming the views of runs stored before fedmm 0.2."""
        return cls.view_aliases

    @classmethod
    def views_for(cls, flat_config: Mapping[str, object]) -> tuple[str, ...]:
        """The views this method scores when run with ``flat_config`` (reports mark a view the
        method has but an older run lacks)."""
        return cls.views

    @property
    def opts(self):
        """This method's options section (``cfg.<name>``): that of the nearest class in its
        MRO that declares ``options`` (a subclass without its own reads its parent's)."""
        for cls in type(self).__mro__:
            if cls.__dict__.get("options") is not None:
                return self.cfg.methods[cls.name]
        raise AttributeError(f"{type(self).__name__} has no options")

    def prepare(self, model: FusionVLModel) -> None:
        """Make sure the model has this method's adapter sets, then reset every trainable part."""
        model.peft.ensure_sets(self.adapter_sets)
        model.reset_trainable(self.cfg.seed)

    # ------------------------------------------------------------------ declarations
    def upload_parts(self) -> tuple[str, ...]:
        """Model parts that leave the client."""
        return ()

    def extra_uploads(self, model: FusionVLModel) -> dict[str, tuple[int, ...]]:
        """Uploaded tensors that are no model part (SCAFFOLD's control-variate change): key ->
        shape.  Their keys are absent from the global state, so DP measures them from 0."""
        return {}

    def upload_spec(self, model: FusionVLModel) -> dict[str, tuple[int, ...]]:
        """Everything a training reply may carry, key -> shape: the ``upload_parts`` of
        ``model`` plus ``extra_uploads``.  Read by the server's reply validation, the payload
        audit and the upload-size bound."""
        return part_shapes(model, self.upload_parts()) | self.extra_uploads(model)

    def trainable_parts(self) -> tuple[str, ...]:
        """Parts this method trains (for parameter counts)."""
        return ("proj", "head", *(f"adapter.{s}" for s in self.adapter_sets))

    def count_trainable(self, model: FusionVLModel) -> int:
        """Trainable parameters of this method's model (one client's view)."""
        model.peft.ensure_sets(self.adapter_sets)
        return num_params(model, self.trainable_parts())

    # ------------------------------------------------------------------ server half
    @abstractmethod
    def init_global(self, model: FusionVLModel) -> Arrays:
        """The global state sent in round 1 (may be empty)."""

    @abstractmethod
    def aggregate(self, global_state: Arrays, replies: Sequence[Reply]) -> Arrays:
        """New global state from this round's replies."""

    def bind(self, tasks: Sequence[str], clients: Mapping[int, ClientInfo]) -> None:
        """The schema's tasks and the clients (server: all, from the query; client: itself), for
        methods whose modules depend on them (TAP).  Default: nothing to do."""
        return None

    def global_for_client(self, global_state: Arrays, client_index: int) -> Arrays:
        """What the server sends client ``client_index`` (default: the whole global state;
        a method that overrides it sets ``per_client_messages = True``)."""
        return global_state

    def server_state(self) -> Arrays:
        """State the server half keeps across rounds besides the global state (e.g. FedAdam's
        moments), for checkpoints; flat ``{name: array}``.  Default: none."""
        return {}

    def load_server_state(self, state: Arrays) -> None:
        """Restore what ``server_state`` returned (resuming a run)."""
        if state:
            raise ValueError(f"{self.name} keeps no server state, got {sorted(state)[:3]}")

    # ------------------------------------------------------------------ client half
    def client_train(self, ctx: ClientContext, received: State) -> ClientUpdate:
        """One round of local training, as the ClientApp runs it: reset the model, load what
        the client received and kept (``load``), then the method's ``local_update``."""
        self.prepare(ctx.model)
        self.load(ctx, received)
        return self.local_update(ctx, received)

    def client_evaluate(self, ctx: ClientContext, received: State) -> dict[str, float]:
        """Score per view, as the ClientApp runs it: reset, ``load``, the method's ``evaluate``."""
        self.prepare(ctx.model)
        self.load(ctx, received)
        return self.evaluate(ctx, received)

    def load(self, ctx: ClientContext, received: State) -> None:
        """Write the received model tensors, then the kept ones, into the freshly reset model.
        Namespaced keys (a method's own, e.g. ``personal:...``) are left to the method."""
        load_parts(ctx.model, model_keys(received))
        load_parts(ctx.model, model_keys(ctx.kept))

    @abstractmethod
    def local_update(self, ctx: ClientContext, received: State) -> ClientUpdate:
        """One round of local work on the loaded model: the upload and the new private state."""

    @abstractmethod
    def evaluate(self, ctx: ClientContext, received: State) -> dict[str, float]:
        """Test score per view (``ctx.view``) of the loaded model."""


# ---------------------------------------------------------------------- the registry
METHODS: dict[str, type[Method]] = {}


def register(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: method ``name`` (``--method name``), with its ``options`` dataclass as
    config section ``name`` (``cfg.<name>``, ``--set <name>.<option>=...``)."""

    def decorate(cls: type[Method]) -> type[Method]:
        if name in METHODS and METHODS[name] is not cls:
            raise ValueError(f"method {name!r} is registered twice")
        cls.name = name
        if "options" in cls.__dict__ and cls.options is not None:
            if not dataclasses.is_dataclass(cls.options):
                raise TypeError(f"{cls.__qualname__}.options must be a dataclass")
            register_section(name, cls.options)
        METHODS[name] = cls
        return cls

    return decorate
