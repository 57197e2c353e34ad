"""PEFT types as named, composable sets: ``adapter`` (bottleneck), ``lora``, ``prompt``, ``bitfit``.

``PEFT_TYPES`` maps each name (declared as ``peft.type``'s choices, ``fedmm.spec.PEFT_TYPE_NAMES``)
to its class (its ``combines`` and ``unit_groups`` say which methods it can serve); a backbone
builds the configured type's bank on its frozen modules with ``fedmm.peft.build.build_bank``
(one set of formulas for the fusion backbone and the Hugging Face families).
"""

from fedmm.peft.adapter import AdapterBank, BottleneckAdapter
from fedmm.peft.base import COMBINES, Activation, PeftBank
from fedmm.peft.bitfit import BitFitBank
from fedmm.peft.lora import LoraBank
from fedmm.peft.prompt import PromptBank
from fedmm.spec import PEFT_TYPE_NAMES

PEFT_TYPES: dict[str, type[PeftBank]] = {
    "adapter": AdapterBank,
    "lora": LoraBank,
    "prompt": PromptBank,
    "bitfit": BitFitBank,
}
if tuple(PEFT_TYPES) != PEFT_TYPE_NAMES:  # one PEFT type: one class here, one name in fedmm.spec
    raise ImportError(f"fedmm.peft implements {tuple(PEFT_TYPES)}, fedmm.spec declares "
                      f"{PEFT_TYPE_NAMES}: add the type to both")  # fmt: skip

__all__ = [
    "COMBINES", "PEFT_TYPES", "Activation", "AdapterBank", "BitFitBank", "BottleneckAdapter",
    "LoraBank", "PeftBank", "PromptBank",
]  # fmt: skip
