"""BitFit (Ben Zaken et al., 2022) as named sets: only the biases of the frozen transformer train.

Every ``nn.Linear`` and ``nn.LayerNorm`` of the text transformer adds its bias at its output, so
training bias ``b`` is training a delta ``δ`` with ``b + δ``: a set holds one ``δ`` per biased
layer (zero at init: the identity), and a forward hook adds the active sets' deltas to each layer's
output.  That keeps the backbone's own tensors frozen and lets sets combine exactly:

    single:  b + δ_a        average: b + (1/n) Σ_i δ_i        sum: b + Σ_i δ_i

FedDAT with BitFit: the Dual-Adapter Teacher's layer biases are ``b + ½(δ_c + δ̂_s)``.  FedPIA does
not apply: a bias vector has no hidden-unit axis to permute.
"""

from __future__ import annotations

import torch
from torch import nn

from fedmm.peft.base import PeftBank


class BitFitBank(PeftBank):
    kind = "bitfit"

    def __init__(self, text: nn.Module) -> None:
        super().__init__()
        self.layers = [
            (name, m)
            for name, m in text.named_modules()
            if isinstance(m, nn.Linear | nn.LayerNorm)
            and getattr(m, "bias", None) is not None
            # nn.MultiheadAttention reads its out_proj's tensors without calling it: no hook runs
            and not isinstance(m, nn.modules.linear.NonDynamicallyQuantizableLinear)
        ]
        self._hooks = [
            m.register_forward_hook(self._make_hook(i)) for i, (_, m) in enumerate(self.layers)
        ]

    def _new_set(self, name: str) -> nn.Module:
        return nn.ParameterList(nn.Parameter(torch.zeros_like(m.bias)) for _, m in self.layers)

    @torch.no_grad()
    def reset_set(self, name: str) -> None:
        for delta in self._get(name):
            delta.zero_()

    def _make_hook(self, index: int):
        def hook(_module: nn.Module, _inputs: object, output: torch.Tensor) -> torch.Tensor:
            active = self._active
            if not active.names:
                return output
            delta = sum(self.sets[n][index] for n in active.names)
            return output + active.weight() * delta

        return hook
