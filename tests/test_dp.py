"""Client-side DP: the uploaded delta is clipped to ‖Δ‖₂ ≤ C before noise, noise is applied, and
σ = 0 with a large C is exactly the plain upload; C, σ and ε are reported in results.json, the
exact pre-clip norm is not (tests/test_privacy_budget.py: the budget, the modes, evaluation)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import run_federation
from flwr.app import MessageType
from test_messages import make_context, send
from test_serverapp import InProcessGrid

from fedmm.federation import dp, messages
from fedmm.sections import DPConfig

pytestmark = pytest.mark.usefixtures("flower_task_identity")


def delta_norm(upload, global_np):
    return dp.l2_norm({k: upload[k].astype(np.float64) - global_np[k] for k in upload})


def test_privatize_clips_then_adds_noise():
    rng = np.random.default_rng(0)
    base = {"a": rng.normal(size=(50, 40)).astype(np.float32), "b": np.zeros(30, np.float32)}
    upload = {k: v + rng.normal(size=v.shape).astype(np.float32) for k, v in base.items()}
    norm = delta_norm(upload, base)
    clipped, stats = dp.privatize(upload, base, DPConfig(clip_norm=1.0, noise_multiplier=0.0))
    assert delta_norm(clipped, base) == pytest.approx(1.0, rel=1e-5)
    assert stats == {"dp-norm": pytest.approx(norm), "dp-scale": pytest.approx(1.0 / norm)}
    noisy, _ = dp.privatize(upload, base, DPConfig(clip_norm=1.0, noise_multiplier=2.0))
    noise = np.concatenate([(noisy[k].astype(np.float64) - clipped[k]).ravel() for k in base])
    assert noise.std() == pytest.approx(2.0 * 1.0, rel=0.05)  # N(0, (σC)²) per coordinate
    same, _ = dp.privatize(upload, base, DPConfig(clip_norm=1e9, noise_multiplier=0.0))
    assert all(np.array_equal(same[k], upload[k]) for k in upload)
    off, stats = dp.privatize(upload, base, DPConfig())
    assert off is upload and stats == {}


def test_client_upload_with_dp_through_the_clientapp(tiny_cfg):
    cfg = tiny_cfg.with_overrides({"method": "fedavg"})
    plain, global_np = send(cfg, make_context(0), MessageType.TRAIN, 1)
    plain_up = messages.from_record(plain.content[messages.UPDATE])
    assert delta_norm(plain_up, global_np) > 0.05  # training moved the model

    clip = 0.05
    clipped, _ = send(
        cfg.with_overrides({"dp.clip_norm": clip}), make_context(0), MessageType.TRAIN, 1, global_np
    )
    up = messages.from_record(clipped.content[messages.UPDATE])
    assert delta_norm(up, global_np) <= clip * (1 + 1e-4)
    m = clipped.content[messages.METRICS]
    assert "dp-norm" not in m and "dp-scale" not in m and "loss" not in m  # exact: withheld
    assert m["dp-clip-norm"] == clip and "dp-epsilon" not in m  # σ = 0: ε = ∞, not sent

    noisy_cfg = cfg.with_overrides({"dp.clip_norm": clip, "dp.noise_multiplier": 1.0})
    noisy, _ = send(noisy_cfg, make_context(0), MessageType.TRAIN, 1, global_np)
    noisy_up = messages.from_record(noisy.content[messages.UPDATE])
    assert delta_norm(noisy_up, up) > 10 * clip  # σC = 0.05 per coordinate over many coordinates

    loose_cfg = cfg.with_overrides({"dp.clip_norm": 1e9})
    loose, _ = send(loose_cfg, make_context(0), MessageType.TRAIN, 1, global_np)
    loose_up = messages.from_record(loose.content[messages.UPDATE])
    assert all(np.array_equal(loose_up[k], plain_up[k]) for k in plain_up)


def test_dp_settings_and_norms_are_reported_in_results(tiny_cfg):
    cfg = tiny_cfg.with_overrides({"method": "fedavg", "fed.rounds": 1,
                                   "dp.clip_norm": 0.1, "dp.noise_multiplier": 0.5})  # fmt: skip
    record = run_federation(InProcessGrid(3), cfg)
    assert record["privacy"] == {"dp_clip_norm": 0.1, "dp_noise_multiplier": 0.5}
    for stats in record["history"][0]["train"].values():
        assert stats["dp-clip-norm"] == 0.1 and stats["dp-noise-multiplier"] == 0.5
        assert stats["dp-mode"] == 0 and stats["dp-epsilon"] > 0 and "dp-norm" not in stats
    for stats in record["history"][0]["eval"].values():  # DP on: scores withheld
        assert stats["scores-withheld"] == 1
