"""What every PEFT type shares: named, composable sets of trainable modules on a frozen model.

A *set* is one complete PEFT module for the whole backbone (e.g. one adapter per transformer
block).  Several named sets live side by side (FedDAT's ``global_adapter``, ``frozen_global`` and
``client_adapter``, Ditto's ``personal_adapter``); a forward pass activates one set or combines
several (``single``, ``average``, ``sum``; which combinations a type supports is its
``combines``).  Each set's state is read and written by name: that is what crosses the network.

Subclasses create a set's module (``_new_set``), initialise it (``reset_set``) and make the active
sets act on the backbone (forward hooks, Hugging Face ``peft`` layers or prompt tokens).
``unit_groups`` names the hidden-unit axes a set's function is invariant to permuting (FedPIA's
alignment); a type without such an axis returns None.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

COMBINES = ("single", "average", "sum")


@dataclass(frozen=True)
class Activation:
    names: tuple[str, ...] = ()
    combine: str = "single"

    def weight(self) -> float:
        """The factor each active set's contribution gets (``average``: 1/n)."""
        return 1.0 / len(self.names) if self.combine == "average" and self.names else 1.0


class PeftBank(nn.Module):
    """Named PEFT sets of one type on one frozen backbone."""

    kind: str = ""
    combines: tuple[str, ...] = COMBINES

    def __init__(self) -> None:
        super().__init__()
        self.sets = nn.ModuleDict()
        self._active = Activation()

    # ------------------------------------------------------------------ to implement
    def _new_set(self, name: str) -> nn.Module:
        raise NotImplementedError

    def reset_set(self, name: str) -> None:
        """Initialise a set (deterministic given the global torch RNG state)."""
        raise NotImplementedError

    def _apply_activation(self) -> None:
        """Called after the active sets change (hook-based types read ``self._active``)."""

    @staticmethod
    def unit_groups(keys: Iterable[str]) -> list[dict[str, int]] | None:
        """For a set's state keys: groups ``{key: axis}`` sharing one permutable hidden-unit axis
        (permuting that axis of every tensor in a group together leaves the function unchanged);
        None when this PEFT type has no such symmetry."""
        return None

    # ------------------------------------------------------------------ sets
    def add_set(self, name: str) -> None:
        if name in self.sets:
            raise ValueError(f"{self.kind} set {name!r} exists already")
        # fp32 master weights whatever the backbone's storage dtype (peft's LoRA injection casts
        # a new set to its base layer's dtype: bf16 under train.precision = bf16)
        self.sets[name] = self._new_set(name).float()
        self.reset_set(name)

    def ensure_sets(self, names: Sequence[str]) -> None:
        for name in names:
            if name not in self.sets:
                self.add_set(name)

    def _get(self, name: str) -> nn.Module:
        if name not in self.sets:
            raise KeyError(f"no {self.kind} set {name!r}; sets: {sorted(self.sets)}")
        return self.sets[name]

    def set_module(self, name: str) -> nn.Module:
        """The module holding exactly the set's parameters (its ``state_dict`` is the set's state)."""
        return self._get(name)

    def parameters_of(self, name: str) -> list[nn.Parameter]:
        return list(self._get(name).parameters())

    def state_dict_of(self, name: str) -> dict[str, torch.Tensor]:
        """The set's tensors by key (detached clones)."""
        return {k: v.detach().clone() for k, v in self._get(name).state_dict().items()}

    def load_set_state(self, name: str, state: dict[str, torch.Tensor]) -> None:
        """Write a set's state by name (strict: every key, right shapes)."""
        self._get(name).load_state_dict(state, strict=True)

    def num_params(self, name: str) -> int:
        return sum(p.numel() for p in self.parameters_of(name))

    # ------------------------------------------------------------------ activation
    def activate(self, *names: str, combine: str = "single") -> None:
        """Make ``names`` the active sets for subsequent forwards (no names: none active)."""
        if combine not in self.combines:
            raise ValueError(f"{self.kind} sets combine by {self.combines}, not {combine!r}")
        if combine == "single" and len(names) > 1:
            raise ValueError("combine='single' takes one set; use 'average' or 'sum'")
        for name in names:
            self._get(name)
        self._active = Activation(tuple(names), combine)
        self._apply_activation()

    @contextlib.contextmanager
    def active(self, *names: str, combine: str = "single") -> Iterator[None]:
        """``with bank.active("a", "b", combine="average"): model(x)``."""
        previous = self._active
        self.activate(*names, combine=combine)
        try:
            yield
        finally:
            self._active = previous
            self._apply_activation()

    @property
    def row_block_count(self) -> int:
        """How many row blocks a forward is split into now (``AdapterBank.row_blocks``); 0 when
        the whole batch runs through the active sets."""
        return 0

    def prompt_tokens(self) -> torch.Tensor | None:
        """Tokens ``(n, d)`` to prepend to the joint sequence (prompt tuning only)."""
        return None
