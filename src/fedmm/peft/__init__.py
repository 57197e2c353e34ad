"""PEFT types as named, composable sets: ``adapter`` (bottleneck), ``lora``, ``prompt``, ``bitfit``.

``build_bank`` makes the configured type's bank on a frozen backbone; ``PEFT_TYPES`` maps each
name to its class (its ``combines`` and ``unit_groups`` say which methods it can serve).
"""

from fedmm.peft.adapter import AdapterBank, BottleneckAdapter
from fedmm.peft.base import COMBINES, Activation, PeftBank
from fedmm.peft.bitfit import BitFitBank
from fedmm.peft.lora import LoraBank
from fedmm.peft.prompt import PromptBank

PEFT_TYPES: dict[str, type[PeftBank]] = {
    "adapter": AdapterBank,
    "lora": LoraBank,
    "prompt": PromptBank,
    "bitfit": BitFitBank,
}

__all__ = [
    "COMBINES", "PEFT_TYPES", "Activation", "AdapterBank", "BitFitBank", "BottleneckAdapter",
    "LoraBank", "PeftBank", "PromptBank",
]  # fmt: skip
