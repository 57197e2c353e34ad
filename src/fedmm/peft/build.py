"""One PEFT registry for every backbone: the configured ``peft.type``'s bank on a frozen model.

A backbone describes where PEFT can go (``PeftTarget``: insertion points and their widths, the
module LoRA searches, the word embeddings prompt tokens extend, the scope BitFit trains) and
``build_bank`` makes the bank -- the fusion backbone (``backbones.fusion``) and the Hugging Face
families (``backbones.hf``) alike, with one set of formulas:

* adapter: bottleneck ``r = adapter.bottleneck or max(1, d // adapter.reduction_factor)`` at each
  point of width ``d`` (Houlsby et al. 2019);
* LoRA: rank ``peft.lora_r``, or -- 0 -- the rank whose size matches one adapter set
  (``Σ_points 2·d·r + r + d`` parameters; ``lora_rank_for_budget``), on ``lora_target_list``;
* prompt: ``peft.prompt_length`` tokens before the joint sequence (refused where there is none);
* BitFit: the biases of the scope.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from fedmm.config import ConfigError
from fedmm.peft.adapter import AdapterBank
from fedmm.peft.base import PeftBank
from fedmm.peft.bitfit import BitFitBank
from fedmm.peft.lora import LoraBank, lora_rank_for_budget
from fedmm.peft.prompt import PromptBank
from fedmm.sections import AdapterConfig, PeftConfig
from fedmm.spec import PEFT_TYPE_NAMES


@dataclass
class PeftTarget:
    """Where a backbone takes PEFT modules.

    ``model``: the module LoRA's targets are searched in (and BitFit's biases, unless
    ``bitfit_scope``); ``points``: adapter insertion points (their forward output is the residual
    stream), ``dims`` their widths; ``word_embeddings``: the embeddings prompt tokens extend (None:
    no joint sequence); ``lora_default``: the backbone's LoRA targets when ``peft.lora_targets``
    is left at its default ("" = that default as it is); ``no_prompt``: why prompt tuning is
    refused ("" = it is not); ``name``: the backbone, for messages."""

    model: nn.Module
    points: list[nn.Module]
    dims: list[int]
    word_embeddings: nn.Embedding | None = None
    bitfit_scope: nn.Module | None = None
    lora_default: str = ""
    no_prompt: str = ""
    name: str = field(default="")


def lora_target_list(targets: str, backbone_default: str = "") -> list[str]:
    """``peft.lora_targets`` as entries; at its default value, the backbone's own default (the
    Hugging Face families name their layers differently) where it has one."""
    if backbone_default and targets == PeftConfig().lora_targets:
        targets = backbone_default
    return [t.strip() for t in targets.split(",") if t.strip()]


def adapter_ranks(dims: list[int], adapter_cfg: AdapterConfig) -> list[int]:
    """The adapter bottleneck at each insertion point of width ``d`` (module docstring)."""
    return [adapter_cfg.bottleneck or max(1, d // adapter_cfg.reduction_factor) for d in dims]


def build_bank(cfg: PeftConfig, adapter_cfg: AdapterConfig, target: PeftTarget) -> PeftBank:
    """The bank of ``cfg.type`` on ``target``.  Raises ``ConfigError`` for an unknown type or
    prompt tuning where ``target`` has no joint sequence."""
    if cfg.type not in PEFT_TYPE_NAMES:
        raise ConfigError(f"unknown peft.type {cfg.type!r}; choices: {', '.join(PEFT_TYPE_NAMES)}")
    ranks = adapter_ranks(target.dims, adapter_cfg)
    if cfg.type == "adapter":
        return AdapterBank(
            target.points, target.dims, ranks, adapter_cfg.init_std, adapter_cfg.zero_init_up
        )
    if cfg.type == "lora":
        targets = lora_target_list(cfg.lora_targets, target.lora_default)
        budget = sum(2 * d * r + r + d for d, r in zip(target.dims, ranks))  # one adapter set
        rank = cfg.lora_r or lora_rank_for_budget(target.model, targets, budget)
        return LoraBank(target.model, targets, rank, cfg.lora_alpha)
    if cfg.type == "prompt":
        if target.word_embeddings is None or target.no_prompt:
            raise ConfigError(f"peft.type 'prompt' on {target.name}: {target.no_prompt}")
        return PromptBank(target.word_embeddings, cfg.prompt_length)
    return BitFitBank(target.bitfit_scope or target.model)
