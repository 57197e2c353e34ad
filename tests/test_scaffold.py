"""SCAFFOLD's defining behaviours: one client is FedAvg; c − c_i enters the local step; option II's
control variate is the local gradient; the server averages y and adds Σ Δc_i / N to c."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import bound_method

from fedmm.config import ConfigError
from fedmm.methods import ClientContext, Reply
from fedmm.methods.state import to_numpy, to_torch
from fedmm.runtime import get_runtime


def ctx_for(cfg, kept, rnd, index=0):
    rt = get_runtime(cfg)
    steps = cfg.train.local_steps
    return ClientContext(cfg, rt.model, rt.client_split(index, "train"),
                         rt.client_split(index, "test"), kept, rnd, index, steps,
                         steps * cfg.fed.rounds)  # fmt: skip


def one_client_run(cfg, rounds):
    """``rounds`` rounds of client 0 alone, the server aggregating its reply in between."""
    method = bound_method(cfg)
    global_np = method.init_global(get_runtime(cfg).model)
    kept, uploads = {}, []
    for rnd in range(1, rounds + 1):
        update = method.client_train(ctx_for(cfg, kept, rnd), to_torch(global_np))
        kept = update.keep
        uploads.append(to_numpy(update.upload))
        global_np = method.aggregate(global_np, [Reply(0, uploads[-1], 10)])
    return uploads, global_np


def test_scaffold_with_one_client_is_fedavg(tiny_cfg):
    """One client: c = c_i after every round, so the correction is 0 and SCAFFOLD (with fedmm's
    AdamW, option I) takes FedAvg's steps, round after round -- bit for bit while c = c_i
    exactly (rounds 1-2); later c and c_i differ by float32 rounding of c + Δc (1 ulp)."""
    cfg = tiny_cfg.with_overrides({"fed.rounds": 3, "fed.clients": 1})
    scaffold = cfg.with_overrides({"method": "scaffold", "scaffold.optimizer": "adamw",
                                   "scaffold.variant": "I"})  # fmt: skip
    got, global_s = one_client_run(scaffold, 3)
    want, global_f = one_client_run(cfg.with_overrides({"method": "fedavg"}), 3)
    for rnd, (a, b) in enumerate(zip(got, want), 1):
        for key in b:
            if rnd <= 2:
                np.testing.assert_array_equal(a[key], b[key], err_msg=f"round {rnd}: {key}")
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-8, err_msg=key)
        assert set(a) - set(b) == {f"dc/{k}" for k in b}  # plus the control-variate change
    assert any(np.abs(v).sum() > 0 for k, v in global_s.items() if k.startswith("c/"))
    for key in global_f:
        np.testing.assert_allclose(global_s[key], global_f[key], rtol=1e-5, atol=1e-8)


def plain_sgd(cfg):
    """One full-batch SGD step without clipping or dropout: y = x − η (g + c − c_i) exactly."""
    n = len(get_runtime(cfg).client_split(0, "train"))
    return cfg.with_overrides({
        "method": "scaffold", "train.local_steps": 1, "train.batch_size": n, "fed.rounds": 1,
        "train.grad_clip": 0.0, "model.dropout": 0.0, "train.warmup_frac": 0.0,
        "scaffold.local_lr": 0.1, "adapter.zero_init_up": False,
    })  # fmt: skip


def test_the_correction_c_minus_c_i_enters_the_local_step(tiny_cfg):
    cfg = plain_sgd(tiny_cfg)
    method = bound_method(cfg)
    x = to_torch(method.init_global(get_runtime(cfg).model))
    plain = method.client_train(ctx_for(cfg, {}, 1), x).upload
    rng = np.random.default_rng(0)
    delta = {k: torch.from_numpy(rng.normal(size=v.shape).astype(np.float32))
             for k, v in x.items() if not k.startswith("c/")}  # fmt: skip
    kept = {f"c_i/{k}": v for k, v in delta.items()}  # c = 0, c_i = δ: the step adds η δ
    moved = method.client_train(ctx_for(cfg, kept, 1), x).upload
    for key, d in delta.items():
        torch.testing.assert_close(moved[key] - plain[key], 0.1 * d, rtol=1e-3, atol=1e-5)


def gradient(cfg, x, train_mode: bool):
    """∇ of the task loss at ``x`` over the full training batch, by hand: in train mode through
    ``ctx.steps`` (the step's own batch order and dropout masks), or in eval mode."""
    from fedmm.methods.context import model_groups
    from fedmm.methods.losses import task_loss
    from fedmm.methods.state import part_module

    method, model = bound_method(cfg), get_runtime(cfg).model
    ctx = ctx_for(cfg, {}, 1)
    method.prepare(model)
    method.load(ctx, x)
    params = {f"{part}/{name}": p for part in ("adapter.global_adapter", "proj", "head")
              for name, p in part_module(model, part).named_parameters()}  # fmt: skip
    opt = ctx.optimizer(model_groups(model, "global_adapter"), kind="sgd", lr=0.1)
    with model.active("global_adapter"):
        if train_mode:
            batch = next(iter(ctx.steps(opt)))
        else:
            model.eval()
            batch = ctx.train.batch(torch.arange(len(ctx.train)), ctx.device)
        loss = task_loss(model(*batch[:3]), batch[3])
    return dict(zip(params, torch.autograd.grad(loss, list(params.values()))))


def test_option_two_control_variate_is_the_local_gradient(tiny_cfg):
    """One full-batch SGD step from c = c_i = 0: option II's c_i⁺ = (x − y)/η is the step's
    gradient ∇f_i(x); option I's is ∇f_i(x) computed directly (dropout off)."""
    cfg = plain_sgd(tiny_cfg)
    x = to_torch(bound_method(cfg).init_global(get_runtime(cfg).model))
    two = bound_method(cfg).client_train(ctx_for(cfg, {}, 1), x)
    one = bound_method(cfg.with_overrides({"scaffold.variant": "I"})).client_train(
        ctx_for(cfg, {}, 1), x
    )
    in_step, at_x = gradient(cfg, x, train_mode=True), gradient(cfg, x, train_mode=False)
    assert sum(float(g.norm()) for g in in_step.values()) > 0
    for key in in_step:
        torch.testing.assert_close(two.keep[f"c_i/{key}"], in_step[key], rtol=1e-3, atol=1e-5)
        torch.testing.assert_close(two.upload[f"dc/{key}"], two.keep[f"c_i/{key}"])  # c_i was 0
        torch.testing.assert_close(one.keep[f"c_i/{key}"], at_x[key], rtol=1e-4, atol=1e-7)


def test_server_averages_models_and_adds_the_mean_control_change_over_all_clients(tiny_cfg):
    cfg = tiny_cfg.with_overrides({"method": "scaffold", "fed.clients": 4})
    method = bound_method(cfg)
    x = {"proj/weight": np.zeros(2, np.float32), "c/proj/weight": np.ones(2, np.float32)}
    replies = [
        Reply(0, {"proj/weight": np.array([1.0, 2.0], np.float32),
                  "dc/proj/weight": np.array([4.0, 0.0], np.float32)}, 1),
        Reply(1, {"proj/weight": np.array([3.0, 2.0], np.float32),
                  "dc/proj/weight": np.array([0.0, 8.0], np.float32)}, 3),
    ]  # fmt: skip
    new = method.aggregate(x, replies)
    np.testing.assert_allclose(new["proj/weight"], [2.5, 2.0])  # weighted by samples, η_g = 1
    np.testing.assert_allclose(new["c/proj/weight"], [1 + 4 / 4, 1 + 8 / 4])  # Σ Δc / N, N = 4
    half = bound_method(cfg.with_overrides({"scaffold.server_lr": 0.5})).aggregate(x, replies)
    np.testing.assert_allclose(half["proj/weight"], [1.25, 1.0])


def test_adamw_with_option_two_is_refused(tiny_cfg):
    with pytest.raises(ConfigError, match="scaffold.variant=I"):
        bound_method(tiny_cfg.with_overrides({"method": "scaffold", "scaffold.optimizer": "adamw"}))
