"""Token packing (fedmm.backbones.packing): the frozen layers' per-position work on the real
tokens only computes the padded model's function, values and gradients, and is used exactly
where it draws no other random numbers."""

from __future__ import annotations

import pytest
import torch

from fedmm.backbones.packing import PackedBertLayer
from fedmm.methods.feddat import CLIENT, FROZEN, GLOBAL, feddat_logits
from fedmm.runtime import Runtime


@pytest.fixture()
def counted(monkeypatch):
    """The number of packed layer forwards so far: ``counted()``."""
    calls = []
    real = PackedBertLayer._packed

    def spy(self, *args):
        calls.append(1)
        return real(self, *args)

    monkeypatch.setattr(PackedBertLayer, "_packed", spy)
    return lambda: len(calls)


def model_and_batch(cfg, n=8):
    """The tiny model with trained-looking adapters (two sets) and a batch with padding."""
    rt = Runtime(cfg.with_overrides({"adapter.zero_init_up": False}))  # its own model
    model = rt.model
    model.peft.ensure_sets(["a", "b"])
    with torch.no_grad():
        for name in ("a", "b"):
            for p in model.peft.parameters_of(name):
                p.add_(0.05 * torch.randn_like(p))
    feats, ids, mask, labels = rt.client_split(0, "train").batch(torch.arange(n), "cpu")
    assert not bool(mask.all()), "the test needs padding in the batch"
    return model, (feats, ids, mask), labels


def trainable(model):
    params = [*model.peft.parameters_of("a"), *model.visual_proj.parameters(),
              *model.head.parameters()]  # fmt: skip
    for p in params:
        p.requires_grad_(True)
    return params


def forward_and_grads(model, batch, labels, params, pack):
    model.pack_tokens = pack
    torch.manual_seed(3)  # the head's own dropout (model.dropout) draws the same masks
    with model.active("a"):
        logits = model(*batch)
    loss = torch.nn.functional.cross_entropy(logits, labels)
    return logits.detach(), torch.autograd.grad(loss, params)


@pytest.mark.parametrize("mode", ["eval", "train-without-dropout", "bf16-eval"])
def test_packed_layers_give_the_padded_values_and_gradients(tiny_cfg, counted, mode):
    model, batch, labels = model_and_batch(tiny_cfg)
    if mode == "train-without-dropout":
        model.set_backbone_dropout(0.0)
        model.train()
    else:
        model.eval()
    # bf16 as train.precision=bf16 runs it: frozen weights stored in bf16, under autocast
    bf16 = mode == "bf16-eval" and model.store_frozen_in(torch.bfloat16)
    tol = {"atol": 2e-2, "rtol": 2e-2} if bf16 else {"atol": 1e-5, "rtol": 1e-4}
    params = trainable(model)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(bf16)):
        padded, padded_grads = forward_and_grads(model, batch, labels, params, pack=False)
        assert counted() == 0
        packed, packed_grads = forward_and_grads(model, batch, labels, params, pack=True)
    assert counted() == len(model.text.encoder.layer)  # every layer packed, once
    assert torch.allclose(packed.float(), padded.float(), atol=tol["atol"])
    for g, ref in zip(packed_grads, padded_grads, strict=True):
        assert torch.allclose(g, ref, **tol)
    assert any(g.abs().sum() > 0 for g in packed_grads[: len(model.peft.parameters_of("a"))])


def test_a_training_forward_with_the_backbones_dropout_stays_padded(tiny_cfg, counted):
    """At the default ``model.backbone_dropout`` the masks are drawn over every position, as
    they were before packing: the same seed gives the same output, bit for bit."""
    model, batch, _ = model_and_batch(tiny_cfg)
    model.train()
    outs = []
    for pack in (False, True):
        model.pack_tokens = pack
        torch.manual_seed(7)
        with model.active("a"):
            outs.append(model(*batch).detach())
    assert counted() == 0
    assert torch.equal(outs[0], outs[1])


def test_row_blocks_pack_only_over_repeated_rows(tiny_cfg, counted):
    """FedDAT's batched step repeats the batch in each row block: packed, and the same logits as
    two plain forwards.  Blocks over different rows would chunk the packed tokens wrongly: such
    a forward runs padded."""
    model, (feats, ids, mask), _ = model_and_batch(tiny_cfg)
    model.peft.ensure_sets([GLOBAL, CLIENT, FROZEN])
    model.eval()
    layers = len(model.text.encoder.layer)
    z_s, z_dat = feddat_logits(model, feats, ids, mask, "average", "batched-prefix")
    assert counted() == layers
    ref_s, ref_dat = feddat_logits(model, feats, ids, mask, "average", "two-forward")
    assert torch.allclose(z_s, ref_s, atol=1e-5) and torch.allclose(z_dat, ref_dat, atol=1e-5)

    before = counted()
    other = torch.argsort(mask.sum(1), stable=True)  # block 2: other rows, other masks
    assert not torch.equal(mask, mask[other])
    with model.peft.row_blocks([("a",), ("b",)], "average"):
        z = model(*(torch.cat([x, x[other]]) for x in (feats, ids, mask)))
    assert counted() == before  # not packed
    with model.active("b"):
        ref = model(feats[other], ids[other], mask[other])
    assert torch.allclose(z[feats.shape[0] :], ref, atol=1e-5)
