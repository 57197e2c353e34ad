"""``train.precision``: fp32, bf16 or ``auto`` (bf16 where the device computes it natively)."""

from __future__ import annotations

import contextlib
import warnings

import torch

from fedmm.config import ConfigError
from fedmm.spec import PRECISIONS  # train.precision's choices, declared once

# ---------------------------------------------------------------------- client helpers


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 matmuls natively: a CUDA device with bf16, or a CPU with
    AMX tiles or AVX512-BF16.  Elsewhere bf16 is emulated -- measured 4× *slower* than fp32 on an
    AVX512 Xeon without them (benchmarks/step_profile.py) -- so ``auto`` keeps fp32 there."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        cpu = torch.cpu
        return any(getattr(cpu, probe, lambda: False)()
                   for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))  # fmt: skip
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``train.precision`` as it runs on ``device``: ``auto`` is ``bf16`` where the device has
    native bf16 (``native_bf16``), else ``fp32``; ``fp32`` and ``bf16`` as given."""
    if precision not in PRECISIONS:
        raise ConfigError(f"train.precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def autocast_for(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` for ``precision = "bf16"`` (fp32 where the device has no bf16,
    with a warning) or ``auto`` on a device with native bf16; nothing for ``fp32``.  Parameters
    and the tensors sent stay fp32."""
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        warnings.warn(f"{device} has no bf16: train.precision=bf16 runs in fp32", stacklevel=2)
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)
