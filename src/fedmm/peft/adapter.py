"""Bottleneck adapters as named, composable sets.

One adapter at one insertion point computes

    A(h) = W_up · ReLU(W_down · h + b_down) + b_up,   W_down ∈ R^{r×d}, W_up ∈ R^{d×r}

and the block's output becomes ``h + A(h)``.  Adapters sit after every transformer block's
feed-forward sub-layer, on the residual stream after the FFN's residual add (as the FedDAT
reference does for ViLT).  With ``W_up = 0`` at init (the default, an open choice: the reference
uses N(0, 0.02) for both matrices) every adapter is the identity and the model's output is that of
the frozen backbone.

A set has one adapter per insertion point (named sets: ``fedmm.peft.base``).  A forward pass
activates one set, or combines several at every insertion point:

    single:  h + A_a(h)
    average: h + (1/n) Σ_i A_i(h)       (FedDAT's Dual-Adapter Teacher with n = 2)
    sum:     h + Σ_i A_i(h)

Hidden-unit symmetry (FedPIA): permuting the r hidden units -- rows of W_down and b_down and
columns of W_up together -- leaves ``A`` unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from fedmm.peft.base import PeftBank


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


class AdapterBank(PeftBank):
    """Named adapter sets injected into a list of insertion points.

    ``points`` are modules whose forward output is the residual stream after a block's FFN
    (e.g. ``BertLayer.output``); a forward hook on each adds the active adapters' output.
    ``dim`` and ``bottleneck`` are one size for every point, or one per point (two-tower
    backbones whose towers differ in width); a point whose output is a tuple is adapted on its
    first element (the hidden states).
    """

    kind = "adapter"

    def __init__(
        self,
        points: Sequence[nn.Module],
        dim: int | Sequence[int],
        bottleneck: int | Sequence[int],
        init_std: float = 0.02,
        zero_init_up: bool = True,
    ) -> None:
        super().__init__()
        n = len(points)
        self.dims = [dim] * n if isinstance(dim, int) else list(dim)
        self.bottlenecks = [bottleneck] * n if isinstance(bottleneck, int) else list(bottleneck)
        if len(self.dims) != n or len(self.bottlenecks) != n:
            raise ValueError(f"{n} insertion points need {n} dims and bottlenecks")
        if min(self.bottlenecks, default=1) < 1:
            raise ValueError(f"adapter bottleneck must be >= 1, got {bottleneck}")
        self.dim, self.bottleneck = self.dims[0] if n else 0, self.bottlenecks[0] if n else 0
        self.init_std, self.zero_init_up = init_std, zero_init_up
        self.num_points = n
        self._hooks = [
            point.register_forward_hook(self._make_hook(i)) for i, point in enumerate(points)
        ]

    def _new_set(self, name: str) -> nn.Module:
        return nn.ModuleList(
            BottleneckAdapter(d, r) for d, r in zip(self.dims, self.bottlenecks, strict=True)
        )

    def reset_set(self, name: str) -> None:
        for adapter in self._get(name):
            adapter.reset(self.init_std, self.zero_init_up)

    @staticmethod
    def unit_groups(keys: Iterable[str]) -> list[dict[str, int]]:
        points = sorted(
            {k.removesuffix(".down.weight") for k in keys if k.endswith(".down.weight")}
        )
        return [{f"{p}.down.weight": 0, f"{p}.down.bias": 0, f"{p}.up.weight": 1} for p in points]

    def _make_hook(self, index: int):
        def hook(_module: nn.Module, _inputs: object, output: torch.Tensor) -> torch.Tensor:
            active = self._active
            if not active.names:
                return output
            if isinstance(output, tuple):  # (hidden states, attentions, ...)
                return (hook(_module, _inputs, output[0]), *output[1:])
            delta = sum(self.sets[n][index](output) for n in active.names)
            return output + active.weight() * delta

        return hook
