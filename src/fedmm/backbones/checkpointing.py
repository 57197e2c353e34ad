"""Gradient (activation) checkpointing of a frozen Hugging Face backbone carrying named PEFT sets.

Checkpointing drops a block's activations in the forward pass and recomputes them in the backward
pass.  The recomputation runs the PEFT modules inside the block again (LoRA layers, BitFit and
adapter hooks on sub-modules), and which PEFT sets act is state of the bank (``PeftBank.active``)
that a method changes between forward passes -- FedDAT runs the Dual-Adapter Teacher and then
the global adapter before one backward.  A recomputation under the *current* activation would
silently compute the wrong gradients, so ``context_fn`` captures the activation of each forward
pass and restores it while that pass is recomputed.
"""

from __future__ import annotations

import contextlib

from torch import nn

from fedmm.config import ConfigError
from fedmm.peft import PeftBank


def enable_checkpointing(module: nn.Module, peft: PeftBank) -> None:
    """Turn on non-reentrant activation checkpointing in every block of the HF model ``module``."""
    if not getattr(module, "supports_gradient_checkpointing", False):
        raise ConfigError(
            f"model.gradient_checkpointing: {type(module).__name__} does not support it"
        )

    def context_fn() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        captured = peft._active  # the sets active in this forward pass
        return contextlib.nullcontext(), peft.active(*captured.names, combine=captured.combine)

    kwargs = {"use_reentrant": False, "context_fn": context_fn}
    if hasattr(module, "activation_checkpointing_enable"):  # transformers >= 5
        module.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # transformers also makes the word embeddings' output require grad (reentrant checkpointing
    # needs it); non-reentrant does not, and it breaks in-place embedding sums (BLIP's text)
    if hasattr(module, "disable_input_require_grads"):
        module.disable_input_require_grads()
