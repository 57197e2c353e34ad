"""FedAvgM: momentum 0 and server learning rate 1 is FedAvg; momentum carries the last step on."""

from __future__ import annotations

import numpy as np
from conftest import bound_method

from fedmm.methods import Reply
from fedmm.methods.aggregation import weighted_average


def replies(rng, theta, n=3):
    return [
        Reply(i, {k: (v + rng.normal(size=v.shape)).astype(np.float32) for k, v in theta.items()},
              10 * (i + 1))
        for i in range(n)
    ]  # fmt: skip


def test_fedavgm_with_momentum_zero_is_fedavg(tiny_cfg):
    rng = np.random.default_rng(0)
    method = bound_method(tiny_cfg.with_overrides({"method": "fedavgm", "fedavgm.momentum": 0.0}))
    theta = {"w": rng.normal(size=(4, 3)).astype(np.float32), "b": np.zeros(3, np.float32)}
    for _ in range(3):  # every round, not only the first
        rs = replies(rng, theta)
        new = method.aggregate(theta, rs)
        expected = weighted_average(rs, tiny_cfg.fed.weighting)
        for key in theta:
            np.testing.assert_array_equal(new[key], expected[key])
        theta = new


def test_fedavgm_step_is_heavy_ball_on_the_pseudo_gradient(tiny_cfg):
    cfg = tiny_cfg.with_overrides({"method": "fedavgm", "fedavgm.momentum": 0.5,
                                   "fedavgm.server_lr": 0.8})  # fmt: skip
    method = bound_method(cfg)
    theta = {"w": np.array([1.0, -1.0], dtype=np.float32)}
    new = method.aggregate(theta, [Reply(0, {"w": np.array([2.0, -1.0], np.float32)}, 5)])
    # Δ₁ = θ − avg = [−1, 0]; v₁ = Δ₁; θ₁ = θ − 0.8 v₁ = [1.8, −1]
    np.testing.assert_allclose(new["w"], [1.8, -1.0], rtol=1e-6)
    again = method.aggregate(new, [Reply(0, {"w": new["w"]}, 5)])  # no client change
    # Δ₂ = 0; v₂ = 0.5 v₁ = [−0.5, 0]; θ₂ = θ₁ − 0.8 v₂ = [2.2, −1]: momentum carries on
    np.testing.assert_allclose(again["w"], [2.2, -1.0], rtol=1e-6)
