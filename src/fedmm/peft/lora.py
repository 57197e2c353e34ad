"""LoRA (Hu et al., 2022) as named sets, through Hugging Face ``peft``.

For a frozen linear layer ``y = W x + b`` a LoRA set adds a low-rank update

    y = W x + b + (α / r) · B A x,     A ∈ R^{r×in}, B ∈ R^{out×r}

(``peft.lora_r`` = r, ``peft.lora_alpha`` = α).  ``peft`` injects its ``lora.Linear`` layers into
the modules named by ``peft.lora_targets``: comma-separated entries, each a last name component
(e.g. ``query,value``) or, when it holds a regex character, a regular expression matched against
the full module path (e.g. ``vision_model.*q_proj``: unambiguous on two-tower backbones whose
towers reuse names; no commas inside one); every set is
one ``peft`` adapter name on those layers (A ~ Kaiming-uniform, B = 0: the set starts as the
identity).  fedmm drives the layers' active adapters and scalings itself rather than through
``set_adapter`` (which also flips ``requires_grad`` -- FedDAT's frozen copy must stay frozen):

    single:  W + s·B_a A_a         average: W + (1/n) Σ_i s·B_i A_i      sum: W + Σ_i s·B_i A_i

FedDAT with LoRA: the Dual-Adapter Teacher is the average of two LoRA deltas.  FedPIA with LoRA:
``B A = Σ_j B[:, j] A[j, :]`` is unchanged when the r rank components are permuted -- rows of A
with columns of B -- so the rank axis aligns exactly like an adapter's hidden units.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable

from torch import nn

from fedmm.config import ConfigError
from fedmm.peft.base import PeftBank


def lora_rank_for_budget(text: nn.Module, targets: list[str], budget: int) -> int:
    """The rank whose parameter count on ``targets`` comes closest to ``budget`` (at least 1)."""
    per_rank = sum(m.in_features + m.out_features for m in _targets(text, targets).values())
    return max(1, round(budget / per_rank))


_REGEX_CHARS = set("\\.*+?[](){}|^$")


def _is_regex(target: str) -> bool:
    return any(c in _REGEX_CHARS for c in target)


def _matches(name: str, targets: list[str]) -> bool:
    return any(
        re.fullmatch(t, name) if _is_regex(t) else name.rsplit(".", 1)[-1] == t for t in targets
    )


def _targets(text: nn.Module, targets: list[str]) -> dict[str, nn.Linear]:
    found = {
        name: m
        for name, m in text.named_modules()
        if isinstance(m, nn.Linear) and _matches(name, targets)
    }
    if not found:
        names = sorted(
            {n.rsplit(".", 1)[-1] for n, m in text.named_modules() if isinstance(m, nn.Linear)}
        )
        raise ConfigError(
            f"peft.lora_targets {','.join(targets)!r} matches no linear layer of the text "
            f"transformer; its linear layers are named: {', '.join(names)}"
        )
    return found


class LoraBank(PeftBank):
    """Named LoRA sets on the linear layers ``targets`` of ``text`` (injected by ``peft``)."""

    kind = "lora"

    def __init__(self, text: nn.Module, targets: list[str], r: int, alpha: float) -> None:
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {r}")
        self.targets, self.r, self.alpha = list(targets), r, alpha
        self.paths = sorted(_targets(text, self.targets))
        self._text = [text]  # not a submodule: the backbone is owned by the model
        self._layers: list[nn.Module] = []
        self._scaling: dict[str, float] = {}

    def _new_set(self, name: str) -> nn.Module:
        from peft import LoraConfig, inject_adapter_in_model

        text = self._text[0]
        # regex entries: hand peft the exact paths found (one full-match pattern), so peft and
        # fedmm can never disagree on which layers a set covers
        targets = (
            "|".join(re.escape(p) for p in self.paths)
            if any(_is_regex(t) for t in self.targets)
            else self.targets
        )
        config = LoraConfig(
            r=self.r, lora_alpha=self.alpha, lora_dropout=0.0, bias="none",
            target_modules=targets, init_lora_weights=True,
        )  # fmt: skip
        with warnings.catch_warnings():  # several adapters on one model is the point here
            warnings.filterwarnings("ignore", message=".*multiple adapters.*")
            inject_adapter_in_model(config, text, adapter_name=name)
        modules = dict(text.named_modules())
        self._layers = [modules[p] for p in self.paths]
        self._scaling[name] = float(self._layers[0].scaling[name])
        container = nn.ModuleDict()
        for i, layer in enumerate(self._layers):
            container[str(i)] = nn.ModuleDict(
                {"lora_A": layer.lora_A[name], "lora_B": layer.lora_B[name]}
            )
        self._apply_activation()
        return container

    def reset_set(self, name: str) -> None:
        for layer in self._layers:
            layer.reset_lora_parameters(name, True)

    @staticmethod
    def unit_groups(keys: Iterable[str]) -> list[dict[str, int]]:
        mods = sorted(
            {k.removesuffix(".lora_A.weight") for k in keys if k.endswith(".lora_A.weight")}
        )
        return [{f"{m}.lora_A.weight": 0, f"{m}.lora_B.weight": 1} for m in mods]

    def _apply_activation(self) -> None:
        active = self._active
        for layer in self._layers:
            layer._active_adapter = list(active.names)
            for name, base in self._scaling.items():
                layer.scaling[name] = base * active.weight()
