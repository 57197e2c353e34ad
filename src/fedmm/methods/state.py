"""A model's trainable state by part name: ``{"<part>/<param>": tensor}`` with part ``proj``,
``head`` or ``adapter.<set name>``; namespaced keys (``"personal:..."``, ``"c/..."``) are a method's own.

What crosses the network is this flat dict (``to_numpy`` / ``to_torch``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from fedmm.backbones import FusionVLModel

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
