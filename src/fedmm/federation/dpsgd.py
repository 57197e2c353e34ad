"""Record-level DP-SGD for one round of a client (``dp-mode = "record"``), with Opacus.

DP-SGD (Abadi et al., "Deep Learning with Differential Privacy", CCS 2016, Algorithm 1) on the
trainable parameters θ (the PEFT set, the visual projection, the head) of a method whose local
update is a plain loss over one model (``Method.dp_sgd_refusal == ""``).  Each of the round's T
optimiser steps:

    B_t  = Poisson sample of the site's N records, each with probability q = B / N
           (Opacus's ``UniformWithReplacementSampler``; B = ``train.batch_size``)
    g_i  = ∇_θ ℓ(x_i; θ)  for i ∈ B_t                  (Opacus's ``GradSampleModule`` hooks)
    ḡ    = (1/B) [ Σ_i g_i · min(1, C/‖g_i‖₂) + N(0, σ²C² I) ]
                                                        (Opacus's ``DPOptimizer``: C = clip norm,
                                                         σ = noise multiplier, expected batch B)
    θ    ← optimiser step with ḡ (+ ∇ of a data-independent term, e.g. FedProx's proximal term,
           added after the noise: post-processing)

Privacy: one round is ``SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(σ)), T)``
under add/remove of one record (``privacy.Release``); fedmm's usual fixed-size shuffled batches
are *not* used in this mode (their accounting would differ), so batch sizes vary around B and a
step whose sample is empty still adds noise (and moves θ by it).

Secrecy of the randomness: the noise and the Poisson sample are drawn from generators seeded from
the operating system's entropy, never from the run seed (a server that knows the seed could
otherwise subtract the noise or know which records were used), so a record-level run is not
reproducible from its seed.  Dropout keeps the run's seed (it adds no privacy, it is not relied
on).  ``train.grad_clip`` is not applied (the per-example clip replaces it);
``train.accumulation > 1`` is refused.

The model is shared by the process (``runtime``): ``close`` removes every Opacus hook and
attribute, and the ClientApp calls it whatever happens in the round.
"""

from __future__ import annotations

import logging
import secrets
import warnings
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

log = logging.getLogger(__name__)


class DPSGD:
    """The DP-SGD machinery of one client round: sampler, per-example clipping and noise."""

    def __init__(
        self, clip_norm: float, noise_multiplier: float, batch_size: int, rows: int
    ) -> None:
        """``clip_norm`` C > 0 (per-example L2 bound), ``noise_multiplier`` σ ≥ 0 (noise std /
        C), ``batch_size`` B (expected Poisson batch), ``rows`` N ≥ 1 (the site's training
        records).  Raises ``ValueError`` otherwise."""
        if clip_norm <= 0 or noise_multiplier < 0 or batch_size < 1 or rows < 1:
            raise ValueError(f"DP-SGD needs C > 0, σ >= 0, B >= 1 and N >= 1; got C = {clip_norm}"
                             f", σ = {noise_multiplier}, B = {batch_size}, N = {rows}")  # fmt: skip
        self.clip_norm, self.noise_multiplier = float(clip_norm), float(noise_multiplier)
        self.batch_size, self.rows = int(batch_size), int(rows)
        self.sample_rate = min(1.0, batch_size / rows)
        self._gsm = None
        self._optimizer = None
        self._params: list[nn.Parameter] = []
        self._reached: set[int] | None = None  # ids of the parameters a batch's forward reaches
        self._sample_gen = torch.Generator().manual_seed(secrets.randbits(63))

    # ------------------------------------------------------------------ sampling
    def batches(self, steps: int) -> Iterator[torch.Tensor]:
        """``steps`` Poisson samples of row indices (each row independently with probability
        ``sample_rate``; possibly empty)."""
        from opacus.utils.uniform_sampler import UniformWithReplacementSampler

        sampler = UniformWithReplacementSampler(
            num_samples=self.rows, sample_rate=self.sample_rate, generator=self._sample_gen,
            steps=steps,
        )  # fmt: skip
        for indices in sampler:
            yield torch.as_tensor(indices, dtype=torch.long)

    # ------------------------------------------------------------------ the optimiser
    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        """Attach Opacus's per-example gradient hooks to ``model`` and return ``optimizer``
        wrapped in its ``DPOptimizer`` (one per round; ``close`` undoes it)."""
        from opacus.grad_sample import GradSampleModule
        from opacus.optimizers import DPOptimizer

        if self._gsm is not None:
            raise RuntimeError("DP-SGD serves one optimiser per round: a method that builds a "
                               "second one cannot run with dp-mode=record")  # fmt: skip
        self._gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True)
        device = next(p.device for g in optimizer.param_groups for p in g["params"])
        noise_gen = torch.Generator(device=device).manual_seed(secrets.randbits(63))
        self._optimizer = DPOptimizer(
            optimizer, noise_multiplier=self.noise_multiplier, max_grad_norm=self.clip_norm,
            expected_batch_size=self.batch_size, loss_reduction="mean", generator=noise_gen,
        )  # fmt: skip
        self._params = [p for g in optimizer.param_groups for p in g["params"]]
        return self._optimizer

    def step(
        self, optimizer, loss: torch.Tensor | None, batch: int,
        public: Callable[[], torch.Tensor] | None = None,
        adjust: Callable[[], None] | None = None,
    ) -> None:  # fmt: skip
        """One DP-SGD step: backward of ``loss`` (the batch mean; None for an empty sample of
        ``batch`` = 0 rows), per-example clip + noise (``DPOptimizer.pre_step``), then the
        gradient of ``public()`` (a data-independent term) and ``adjust()``, then the wrapped
        optimiser's step.  A parameter the forward never reaches (another task's head: fixed by
        the model, not the data) gets no grad and is not moved; an empty sample's step is noise
        only, on the parameters a batch reached (on all before any batch did)."""
        if optimizer is not self._optimizer:
            raise RuntimeError("dp-mode=record: step with the optimiser ctx.optimizer returned")
        optimizer.zero_grad(set_to_none=True)
        if loss is not None and batch > 0:
            with torch.autocast(loss.device.type, enabled=False), warnings.catch_warnings():
                # the visual projection's input (cached features) needs no grad: its hook still
                # gets the output's gradient, all Opacus needs
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                loss.backward()
        unreached = [p for p in self._params if getattr(p, "grad_sample", None) is None]
        if batch > 0:  # which parameters the forward reaches is fixed by the model, not the data
            self._reached = {id(p) for p in self._params} - {id(p) for p in unreached}
        for p in unreached:
            p.grad_sample = torch.zeros((batch, *p.shape), device=p.device, dtype=p.dtype)
        if not optimizer.pre_step():  # clip each example, sum, add N(0, σ²C²), divide by B
            raise RuntimeError("Opacus skipped a DP-SGD step (no accumulation is configured)")
        for p in self._params:  # never moved: no record's gradient reaches them
            if self._reached is not None and id(p) not in self._reached:
                p.grad = None
        if public is not None:
            term = public()
            params = [p for p in self._params if p.grad is not None]
            for p, g in zip(params, torch.autograd.grad(term, params, allow_unused=True)):
                if g is not None:
                    p.grad = p.grad + g
        if adjust is not None:
            adjust()
        optimizer.original_optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def close(self) -> None:
        """Remove Opacus's hooks and per-parameter attributes from the shared model."""
        if self._gsm is not None:
            self._gsm._close()
            for p in self._params:
                for name in ("grad_sample", "summed_grad", "_forward_counter"):
                    if hasattr(p, name):
                        delattr(p, name)
        self._gsm = self._optimizer = None
        self._params, self._reached = [], None


def refusal(method, cfg) -> str:
    """Why ``dp-mode=record`` cannot serve the run ``cfg`` of ``method`` ("" when it can): the
    method's declared ``dp_sgd_refusal``, a PEFT type whose parameters no Opacus layer computes
    per-example gradients for, gradient accumulation, or activation checkpointing (its
    recomputation would run Opacus's activation hooks twice)."""
    if method.dp_sgd_refusal:
        return f"method {method.name!r}: {method.dp_sgd_refusal}"
    if cfg.peft.type not in RECORD_PEFT_TYPES:
        return (
            f"peft.type {cfg.peft.type!r} adds parameters outside any layer Opacus computes "
            f"per-example gradients for; dp-mode=record serves {', '.join(RECORD_PEFT_TYPES)}"
        )
    if cfg.train.accumulation > 1:
        return "train.accumulation > 1 (a Poisson-sampled step is one batch)"
    if cfg.model.gradient_checkpointing:
        return "model.gradient_checkpointing (its recomputation runs Opacus's hooks twice)"
    return ""


RECORD_PEFT_TYPES: Sequence[str] = ("adapter", "lora")


__all__ = ["DPSGD", "RECORD_PEFT_TYPES", "refusal"]
