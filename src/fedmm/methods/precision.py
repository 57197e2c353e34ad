"""``train.precision``: fp32, bf16 or ``auto`` (bf16 where the device computes it natively).

The helpers live in ``fedmm.precision`` (``fedmm.runtime`` needs them to decide the frozen
backbone's storage dtype, below the methods package); the methods import them from here.
"""

from __future__ import annotations

from fedmm.precision import (
    BF16_CPU_FLAGS,
    PRECISIONS,
    autocast_for,
    cpu_flags,
    native_bf16,
    resolve_precision,
    stores_bf16,
)

__all__ = [
    "BF16_CPU_FLAGS",
    "PRECISIONS",
    "autocast_for",
    "cpu_flags",
    "native_bf16",
    "resolve_precision",
    "stores_bf16",
]
