"""FedDAT's fast path (one batched forward, one backward, one step) against the literal reference
(three forwards, two backwards, two optimiser steps per batch)."""

from __future__ import annotations

import pytest
import torch
from conftest import bound_method

from fedmm.methods import ClientContext
from fedmm.methods.feddat import (
    CLIENT,
    FROZEN,
    GLOBAL,
    LAYOUTS,
    feddat_logits,
    feddat_losses,
    prefix_block,
    reference_step,
)
from fedmm.methods.state import to_torch
from fedmm.runtime import get_runtime


def loaded(cfg):
    """A FedDAT client model after round-1 loading, with a non-trivial A_s and A_c."""
    method = bound_method(cfg)
    rt = get_runtime(cfg)
    steps = cfg.train.local_steps
    ctx = ClientContext(cfg, rt.model, rt.client_split(0, "train"), rt.client_split(0, "test"),
                        {}, 1, 0, steps, steps * cfg.fed.rounds)  # fmt: skip
    method.prepare(rt.model)
    method.load(ctx, to_torch(method.init_global(rt.model)))
    with torch.no_grad():  # A_c differs from A_s, so the two paths differ
        for p in rt.model.peft.parameters_of(CLIENT):
            p.add_(0.05 * torch.randn_like(p))
    rt.model.eval()  # dropout off: every layout must compute the same function
    return rt.model, ctx


@pytest.mark.parametrize("combine", ["average", "sum"])
def test_fast_path_gives_the_two_forward_gradients_for_every_trainable_part(tiny_cfg, combine):
    cfg = tiny_cfg.with_overrides(
        {"method": "feddat", "adapter.zero_init_up": False, "feddat.dat_combine": combine}
    )
    model, ctx = loaded(cfg)
    assert prefix_block(model) is model.text.encoder.layer[0]
    feats, ids, mask, labels = ctx.train.batch(torch.arange(8), ctx.device)
    params = [
        *model.peft.parameters_of(GLOBAL), *model.peft.parameters_of(CLIENT),
        *model.visual_proj.parameters(), *model.head.parameters(),
    ]  # fmt: skip
    for p in params:
        p.requires_grad_(True)
    results = {}
    for layout in LAYOUTS:
        z_s, z_dat = feddat_logits(model, feats, ids, mask, combine, layout)
        loss_s, loss_dat = feddat_losses(z_s, z_dat, labels, cfg.feddat)
        results[layout] = (z_s, z_dat, torch.autograd.grad(loss_s + loss_dat, params))
    ref_s, ref_dat, ref_grads = results["two-forward"]
    for layout in ("batched", "batched-prefix"):
        z_s, z_dat, grads = results[layout]
        assert torch.allclose(z_s, ref_s, atol=1e-5) and torch.allclose(z_dat, ref_dat, atol=1e-5)
        for g, ref in zip(grads, ref_grads):
            assert torch.allclose(g, ref, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(ref_s, ref_dat)  # the two paths are really different models


def reference_then_fast(model, frozen, batches, feddat_cfg, fast_losses):
    """``(A_s + A_c, their start, their values after the reference)``: from the same start,
    ``batches`` through ``reference_step`` (two AdamW optimisers), then -- the parameters left
    where this fast path takes them -- through ``fast_losses(batch) -> (loss_s, loss_dat)`` with
    one backward and one AdamW step over both sets; ``frozen`` (projection, head) not trained."""
    for p in frozen:
        p.requires_grad_(False)
    a_s, a_c = model.peft.parameters_of(GLOBAL), model.peft.parameters_of(CLIENT)
    for p in a_s + a_c:
        p.requires_grad_(True)
    start = [p.detach().clone() for p in a_s + a_c]
    opt_s, opt_c = torch.optim.AdamW(a_s, lr=1e-2), torch.optim.AdamW(a_c, lr=1e-2)
    for batch in batches:
        reference_step(model, opt_s, opt_c, batch, feddat_cfg)
    reference = [p.detach().clone() for p in a_s + a_c]
    with torch.no_grad():
        for p, s in zip(a_s + a_c, start):
            p.copy_(s)
    opt = torch.optim.AdamW([{"params": a_s}, {"params": a_c}], lr=1e-2)
    for batch in batches:
        loss_s, loss_dat = fast_losses(batch)
        opt.zero_grad(set_to_none=True)
        (loss_s + loss_dat).backward()
        opt.step()
    return a_s + a_c, start, reference


@pytest.mark.parametrize("peft_type", ["adapter", "lora"])
def test_fast_path_follows_the_literal_three_pass_reference_step_for_step(tiny_cfg, peft_type):
    """Compared: A_s and A_c after 3 steps.  Projection and head frozen (the reference steps them
    between its passes, so pass 3 would see other parameters than pass 1), dropout off, no
    gradient clipping (the reference clips each of its two steps separately); AdamW is
    per-parameter, so one step over {A_s, A_c} equals one step over A_s and one over A_c."""
    cfg = tiny_cfg.with_overrides(
        {"method": "feddat", "adapter.zero_init_up": False, "peft.type": peft_type}
    )
    model, ctx = loaded(cfg)
    batches = [ctx.train.batch(torch.arange(8 * i, 8 * i + 8), ctx.device) for i in range(3)]

    def fast_losses(batch):
        feats, ids, mask, labels = batch
        z_s, z_dat = feddat_logits(model, feats, ids, mask, cfg.feddat.dat_combine)
        return feddat_losses(z_s, z_dat, labels, cfg.feddat)

    frozen = [*model.visual_proj.parameters(), *model.head.parameters()]
    params, start, reference = reference_then_fast(model, frozen, batches, cfg.feddat, fast_losses)
    moved = 0
    for p, ref, s in zip(params, reference, start):
        assert torch.allclose(p.detach(), ref, atol=1e-5, rtol=1e-4)
        moved += not torch.equal(ref, s)
    assert moved >= len(reference) // 2
    assert not any(p.requires_grad for p in model.peft.parameters_of(FROZEN))
