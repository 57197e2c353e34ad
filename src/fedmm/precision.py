"""``train.precision``: fp32, bf16, or ``auto`` (bf16 where the device computes it natively).

``auto`` resolves per device: bf16 on a CUDA device with bf16 (``torch.cuda.is_bf16_supported``) or
on a CPU whose ``/proc/cpuinfo`` flags include ``amx_bf16`` or ``avx512_bf16``; fp32 elsewhere,
where bf16 is emulated and slower than fp32 (measured 2.6x slower on an AVX512 Xeon without them,
docs/benchmarks.md's step profile; 25x slower on an AVX2 AMD EPYC, docs/performance.md). An
explicit ``bf16`` there runs emulated, with a warning (``emulated_bf16``). A bf16 run stores the
frozen backbone's matmul weights in bf16 once (``FusionVLModel.store_frozen_in``, done by
``fedmm.runtime``) and runs the forward under
``torch.autocast``; the trainable PEFT sets, projection and head stay fp32 master weights, and
everything sent stays fp32. Measured speed: docs/performance.md.
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import torch

from fedmm.config import ConfigError
from fedmm.spec import PRECISIONS  # train.precision's choices, declared once

BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of native bf16 matmuls


@functools.cache  # read once per process: ``auto`` is resolved at every step's autocast
def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags (the ``flags`` line of ``/proc/cpuinfo``, Linux); None where that
    file cannot be read (another OS)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        return None
    return frozenset()


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 matmuls natively: a CUDA device with bf16
    (``torch.cuda.is_bf16_supported``), or a CPU whose flags (``cpu_flags``) have ``amx_bf16`` or
    ``avx512_bf16`` (where ``/proc/cpuinfo`` cannot be read: torch's own AMX / AVX512-BF16
    probes).  Elsewhere bf16 is emulated -- measured 2.6× *slower* than fp32 on an AVX512 Xeon
    without them (docs/benchmarks.md, step profile) -- so ``auto`` keeps fp32 there."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        flags = cpu_flags()
        if flags is not None:
            return any(flag in flags for flag in BF16_CPU_FLAGS)
        cpu = torch.cpu
        return any(getattr(cpu, probe, lambda: False)()
                   for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))  # fmt: skip
    return False


EMULATED_BF16 = (
    "train.precision=bf16 on a CPU without native bf16 (its /proc/cpuinfo flags have neither "
    "amx_bf16 nor avx512_bf16): bf16 is emulated here, measured 2.6x (AVX512 Xeon) to 25x (AVX2 "
    "AMD EPYC) slower per step than fp32 (docs/performance.md); use train.precision=auto or fp32"
)


def emulated_bf16(precision: str, device: torch.device) -> bool:
    """Whether ``precision`` runs bf16 on a CPU that emulates it (``native_bf16`` false): only an
    explicit ``bf16``, since ``auto`` resolves to fp32 there.  ``fedmm.runtime`` warns with
    ``EMULATED_BF16`` when this holds; it runs anyway (the user asked for bf16)."""
    return (device.type == "cpu" and resolve_precision(precision, device) == "bf16"
            and not native_bf16(device))  # fmt: skip


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
    if device.type == "cpu":
        return _cpu_bf16()
    return torch.autocast(device.type, dtype=torch.bfloat16)


@contextlib.contextmanager
def _cpu_bf16():
    """bf16 autocast on the CPU with attention on SDPA's math backend: torch's fused CPU kernel
    (chosen when attention dropout is 0) made a bf16 FedAvg step 2.1x slower than the math
    backend on an AMX Xeon, while in fp32 the two were equal (docs/performance.md)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with torch.autocast("cpu", dtype=torch.bfloat16), sdpa_kernel(SDPBackend.MATH):
        yield


def stores_bf16(precision: str, device: torch.device) -> bool:
    """Whether a model for ``precision`` on ``device`` keeps its frozen backbone in bf16: the
    precision resolves to bf16 and the device can autocast to it (``autocast_for`` runs a CUDA
    device without bf16 in fp32, so its weights stay fp32)."""
    if resolve_precision(precision, device) != "bf16":
        return False
    return device.type != "cuda" or torch.cuda.is_bf16_supported()
