"""FedYogi: the server step matches a hand-computed Yogi update, and differs from FedAdam's."""

from __future__ import annotations

import numpy as np
from conftest import bound_method

from fedmm.methods import Reply


def test_fedyogi_server_step_matches_a_hand_computed_update(tiny_cfg):
    cfg = tiny_cfg.with_overrides({"method": "fedyogi", "fedyogi.server_lr": 0.1,
                                   "fedyogi.beta1": 0.9, "fedyogi.beta2": 0.99,
                                   "fedyogi.tau": 1e-3})  # fmt: skip
    method = bound_method(cfg)
    theta = {"w": np.array([1.0, -1.0, 0.5], dtype=np.float32)}
    avg1 = np.array([1.5, -1.0, 0.3], dtype=np.float32)
    new = method.aggregate(theta, [Reply(0, {"w": avg1}, 5)])
    # round 1, by hand: Δ = avg − θ; m = 0.1 Δ; v = 0 − 0.01 Δ² sign(0 − Δ²) = 0.01 Δ²
    d1 = avg1.astype(np.float64) - theta["w"]
    m1, v1 = 0.1 * d1, 0.01 * d1**2
    w1 = theta["w"] + 0.1 * m1 / (np.sqrt(v1) + 1e-3)
    np.testing.assert_allclose(new["w"], w1, rtol=1e-6)
    # round 2: a small change -- Yogi shrinks v by at most 0.01 Δ² (Adam would decay it by 0.99)
    avg2 = (new["w"] + np.array([0.01, 0.2, 0.0])).astype(np.float32)
    newer = method.aggregate(new, [Reply(0, {"w": avg2}, 5)])
    d2 = avg2.astype(np.float64) - new["w"]
    m2 = 0.9 * m1 + 0.1 * d2
    v2 = v1 - 0.01 * d2**2 * np.sign(v1 - d2**2)
    np.testing.assert_allclose(newer["w"], new["w"] + 0.1 * m2 / (np.sqrt(v2) + 1e-3), rtol=1e-6)
    adam_v2 = 0.99 * v1 + 0.01 * d2**2
    assert not np.allclose(v2, adam_v2)  # the Yogi update is not Adam's
