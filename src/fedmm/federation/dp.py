"""Client-side differential privacy of the upload: clip the update, add Gaussian noise.

Local DP in the style of DP-FedAvg (McMahan et al., ICLR 2018) applied by each client to what it
sends, so the server (and anyone on the wire) only ever sees a noised update:

    Δ   = θ_k − θ^t                                   (over every uploaded tensor, as one vector)
    Δ̃   = Δ · min(1, C / ‖Δ‖₂)                       (dp.clip_norm = C)
    θ̃_k = θ^t + Δ̃ + N(0, (σ C)² I)                   (dp.noise_multiplier = σ)

A key the global state lacks has θ^t = 0 there.  ``dp.clip_norm = 0`` turns DP off (the upload is
untouched); σ = 0 with a large C returns the plain upload (tested).  The noise comes from the
operating system's entropy, never from the run seed: a server that knows the seed could otherwise
subtract it.  The privacy accounting (ε, δ over rounds) is not done here; results.json reports C
and σ so it can be done afterwards.

Why not Flower's ``LocalDpMod``: it is configured once when the ClientApp is built, while fedmm's
config arrives with each message, and it needs the reply's ArrayRecord keys to equal the global
record's, which is not true for methods that keep parts private (FedDAT, FedPer).
"""

from __future__ import annotations

import numpy as np

from fedmm.sections import DPConfig


def l2_norm(arrays: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in arrays.values())))


def privatize(
    upload: dict[str, np.ndarray], global_state: dict[str, np.ndarray], cfg: DPConfig,
    rng: np.random.Generator | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, float]]:  # fmt: skip
    """The DP upload and its statistics ``{"dp-norm": ‖Δ‖₂, "dp-scale": min(1, C/‖Δ‖₂)}``."""
    if cfg.clip_norm <= 0:
        return upload, {}
    if cfg.noise_multiplier < 0:
        raise ValueError(f"dp.noise_multiplier must be >= 0, got {cfg.noise_multiplier}")
    rng = rng if rng is not None else np.random.default_rng()  # OS entropy: see the docstring
    base = {k: global_state.get(k, np.zeros_like(v)).astype(np.float64) for k, v in upload.items()}
    delta = {k: v.astype(np.float64) - base[k] for k, v in upload.items()}
    norm = l2_norm(delta)
    scale = min(1.0, cfg.clip_norm / norm) if norm > 0 else 1.0
    std = cfg.noise_multiplier * cfg.clip_norm
    out = {}
    for k, d in delta.items():
        noisy = d * scale + (rng.normal(0.0, std, size=d.shape) if std > 0 else 0.0)
        out[k] = (base[k] + noisy).astype(upload[k].dtype)
    return out, {"dp-norm": norm, "dp-scale": scale}
