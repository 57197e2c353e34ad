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

Row blocks (FedDAT's fast path): ``bank.row_blocks([("a",), ("b", "c")], combine=...)`` makes one
forward over a batch of ``2B`` rows apply set ``a`` to rows ``[0, B)`` and the combination of ``b``
and ``c`` to rows ``[B, 2B)`` -- two models in one batched pass.  When the first insertion point
receives only ``B`` rows (the caller computed the frozen prefix below it once), its output is
duplicated first, so both blocks share that prefix (and its gradient is the sum of both).

Hidden-unit symmetry (FedPIA): permuting the r hidden units -- rows of W_down and b_down and
columns of W_up together -- leaves ``A`` unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import nn

from fedmm.peft.base import Activation, PeftBank


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
        self.points = list(points)  # plain list: the backbone owns these modules
        self._blocks: tuple[Activation, ...] = ()  # row blocks (``row_blocks``); () = off
        self._shared_prefix = False
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

    @contextlib.contextmanager
    def row_blocks(
        self,
        blocks: Sequence[Sequence[str]],
        combine: str = "average",
        prefix_block: nn.Module | None = None,
    ) -> Iterator[None]:
        """Split the batch into ``len(blocks)`` equal row blocks, each with its own active sets
        (``combine`` for blocks of several sets) -- several models in one batched forward.

        ``prefix_block``: the module enclosing the first insertion point (a transformer block
        whose inputs no PEFT set touches).  Its inputs are cut to the first block's rows, so the
        frozen computation below the first adapter runs once, and the first insertion point
        hands a copy of its output to every block (autograd sums the blocks' gradients there).
        The caller repeats the same rows in every block.
        """
        if combine not in ("average", "sum"):
            raise ValueError(f"row blocks combine by average or sum, not {combine!r}")
        for names in blocks:
            for name in names:
                self._get(name)
        n = len(blocks)
        handles = []
        if prefix_block is not None and n > 1:
            if not any(m is self.points[0] for m in prefix_block.modules()):
                raise ValueError("prefix_block must enclose the first insertion point")

            def cut(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
                rows = args[0].shape[0]
                if rows % n:
                    raise ValueError(f"{rows} rows do not split into {n} row blocks")

                def first(x: object) -> object:
                    if isinstance(x, torch.Tensor) and x.dim() and x.shape[0] == rows:
                        return x[: rows // n]
                    return x

                return tuple(map(first, args)), {k: first(v) for k, v in kwargs.items()}

            handles.append(prefix_block.register_forward_pre_hook(cut, with_kwargs=True))
        previous = self._blocks, self._shared_prefix
        self._blocks = tuple(
            Activation(tuple(names), combine if len(names) > 1 else "single") for names in blocks
        )
        self._shared_prefix = prefix_block is not None and n > 1
        try:
            yield
        finally:
            self._blocks, self._shared_prefix = previous
            for handle in handles:
                handle.remove()

    @property
    def row_block_count(self) -> int:
        return len(self._blocks)

    def _apply_blocks(self, index: int, output: torch.Tensor) -> torch.Tensor:
        blocks = self._blocks
        if index == 0 and self._shared_prefix:
            parts: Sequence[torch.Tensor] = (output,) * len(blocks)
        else:
            if output.shape[0] % len(blocks):
                raise ValueError(f"{output.shape[0]} rows do not split into {len(blocks)} blocks")
            parts = output.chunk(len(blocks), dim=0)
        out = []
        for part, active in zip(parts, blocks):
            if active.names:
                delta = sum(self.sets[n][index](part) for n in active.names)
                part = part + active.weight() * delta
            out.append(part)
        return torch.cat(out, dim=0)

    def _make_hook(self, index: int):
        def hook(_module: nn.Module, _inputs: object, output: torch.Tensor) -> torch.Tensor:
            if isinstance(output, tuple):  # (hidden states, attentions, ...)
                return (hook(_module, _inputs, output[0]), *output[1:])
            if self._blocks:
                return self._apply_blocks(index, output)
            active = self._active
            if not active.names:
                return output
            delta = sum(self.sets[n][index](output) for n in active.names)
            return output + active.weight() * delta

        return hook
