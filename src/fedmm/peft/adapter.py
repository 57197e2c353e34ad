"""Bottleneck adapters as named, composable sets.

One adapter at one insertion point computes

    A(h) = W_up · ReLU(W_down · h + b_down) + b_up,   W_down ∈ R^{r×d}, W_up ∈ R^{d×r}

and the block's output becomes ``h + A(h)``.  Adapters sit after every transformer block's
feed-forward sub-layer, on the residual stream after the FFN's residual add (as the FedDAT
reference does for ViLT).  With ``W_up = 0`` at init (the default, an open choice: the reference
uses N(0, 0.02) for both matrices) every adapter is the identity and the model's output is that of
the frozen backbone.

Several **named sets** live side by side (e.g. FedDAT's ``global_adapter``, ``frozen_global``
and ``client_adapter``); a set has one adapter per insertion point.  A forward pass activates one
set, or combines several at every insertion point:

    single:  h + A_a(h)
    average: h + (1/n) Σ_i A_i(h)       (FedDAT's Dual-Adapter Teacher with n = 2)
    sum:     h + Σ_i A_i(h)

Each set's state is read and written by name (``state_dict_of`` / ``load_set_state``), which is
what crosses the network.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

COMBINES = ("single", "average", "sum")


class BottleneckAdapter(nn.Module):
    """``A(h) = W_up ReLU(W_down h + b_down) + b_up`` (returns the delta, not ``h + A(h)``)."""

    def __init__(self, dim: int, bottleneck: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)

    def reset(self, init_std: float, zero_init_up: bool) -> None:
        nn.init.normal_(self.down.weight, std=init_std)
        nn.init.zeros_(self.down.bias)
        if zero_init_up:
            nn.init.zeros_(self.up.weight)
        else:
            nn.init.normal_(self.up.weight, std=init_std)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(torch.relu(self.down(h)))


@dataclass(frozen=True)
class Activation:
    names: tuple[str, ...] = ()
    combine: str = "single"


class AdapterBank(nn.Module):
    """Named adapter sets injected into a list of insertion points.

    ``points`` are modules whose forward output is the residual stream after a block's FFN
    (e.g. ``BertLayer.output``); a forward hook on each adds the active adapters' output.
    """

    def __init__(
        self,
        points: Sequence[nn.Module],
        dim: int,
        bottleneck: int,
        init_std: float = 0.02,
        zero_init_up: bool = True,
    ) -> None:
        super().__init__()
        if bottleneck < 1:
            raise ValueError(f"adapter bottleneck must be >= 1, got {bottleneck}")
        self.dim, self.bottleneck = dim, bottleneck
        self.init_std, self.zero_init_up = init_std, zero_init_up
        self.sets = nn.ModuleDict()
        self.num_points = len(points)
        self._active = Activation()
        self._hooks = [
            point.register_forward_hook(self._make_hook(i)) for i, point in enumerate(points)
        ]

    # ------------------------------------------------------------------ sets
    def add_set(self, name: str) -> None:
        """Create a set (one adapter per insertion point), initialised by ``reset_set``."""
        if name in self.sets:
            raise ValueError(f"adapter set {name!r} exists already")
        adapters = nn.ModuleList(
            BottleneckAdapter(self.dim, self.bottleneck) for _ in range(self.num_points)
        )
        self.sets[name] = adapters
        self.reset_set(name)

    def ensure_sets(self, names: Sequence[str]) -> None:
        for name in names:
            if name not in self.sets:
                self.add_set(name)

    def reset_set(self, name: str) -> None:
        for adapter in self._get(name):
            adapter.reset(self.init_std, self.zero_init_up)

    def _get(self, name: str) -> nn.ModuleList:
        if name not in self.sets:
            raise KeyError(f"no adapter set {name!r}; sets: {sorted(self.sets)}")
        return self.sets[name]  # type: ignore[return-value]

    def parameters_of(self, name: str) -> list[nn.Parameter]:
        return list(self._get(name).parameters())

    def state_dict_of(self, name: str) -> dict[str, torch.Tensor]:
        """The set's tensors keyed ``"{point}.down.weight"`` etc. (detached clones)."""
        return {k: v.detach().clone() for k, v in self._get(name).state_dict().items()}

    def load_set_state(self, name: str, state: dict[str, torch.Tensor]) -> None:
        """Write a set's state by name (strict: every key, right shapes)."""
        self._get(name).load_state_dict(state, strict=True)

    def copy_set(self, src: str, dst: str) -> None:
        self.load_set_state(dst, self.state_dict_of(src))

    # ------------------------------------------------------------------ activation
    def activate(self, *names: str, combine: str = "single") -> None:
        """Make ``names`` the active sets for subsequent forwards (no names: none active)."""
        if combine not in COMBINES:
            raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")
        if combine == "single" and len(names) > 1:
            raise ValueError("combine='single' takes one set; use 'average' or 'sum'")
        for name in names:
            self._get(name)
        self._active = Activation(tuple(names), combine)

    @contextlib.contextmanager
    def active(self, *names: str, combine: str = "single") -> Iterator[None]:
        """``with bank.active("a", "b", combine="average"): model(x)``."""
        previous = self._active
        self.activate(*names, combine=combine)
        try:
            yield
        finally:
            self._active = previous

    def _make_hook(self, index: int):
        def hook(_module: nn.Module, _inputs: object, output: torch.Tensor) -> torch.Tensor:
            names, combine = self._active.names, self._active.combine
            if not names:
                return output
            delta = sum(self.sets[n][index](output) for n in names)
            if combine == "average":
                delta = delta / len(names)
            return output + delta

        return hook
