"""Bottleneck adapters: identity at init, named sets, combinations, state by name."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedmm.backbones import build_model
from fedmm.peft import AdapterBank
from fedmm.sections import AdapterConfig, ModelConfig


def tiny_model(**adapter):
    return build_model(ModelConfig(backbone="tiny", image_size=32), AdapterConfig(**adapter), 7)


def inputs(model, n=4):
    torch.manual_seed(0)
    feats = torch.randn(n, 4, 16)
    ids, mask = model.tokenize(["is this a bag?"] * n)
    return feats, ids, mask


def test_zero_up_init_leaves_output_unchanged():
    model = tiny_model().eval()
    model.peft.ensure_sets(["a", "b"])
    x = inputs(model)
    base = model(*x)
    for names, combine in ((("a",), "single"), (("a", "b"), "average"), (("a", "b"), "sum")):
        with model.active(*names, combine=combine):
            assert torch.equal(model(*x), base)


def test_nonzero_adapter_changes_output_and_inactive_set_does_not():
    model = tiny_model(zero_init_up=False).eval()
    model.peft.ensure_sets(["a"])
    x = inputs(model)
    base = model(*x)
    with model.active("a"):
        assert not torch.allclose(model(*x), base)
    assert torch.equal(model(*x), base)  # deactivated again after the context


def test_bottleneck_size_is_a_real_option():
    assert tiny_model(reduction_factor=4).peft.bottleneck == 32 // 4
    assert tiny_model(bottleneck=5).peft.bottleneck == 5
    model = tiny_model(bottleneck=5)
    model.peft.ensure_sets(["a"])
    assert model.peft.state_dict_of("a")["0.down.weight"].shape == (5, 32)


def test_average_and_sum_combine_set_outputs():
    point = nn.Identity()
    bank = AdapterBank([point], dim=6, bottleneck=3, zero_init_up=False)
    bank.ensure_sets(["a", "b"])
    h = torch.randn(2, 6)
    da, db = bank.sets["a"][0](h), bank.sets["b"][0](h)
    with bank.active("a", "b", combine="average"):
        assert torch.allclose(point(h), h + (da + db) / 2)
    with bank.active("a", "b", combine="sum"):
        assert torch.allclose(point(h), h + da + db)
    with bank.active("b"):
        assert torch.allclose(point(h), h + db)


def test_state_by_name_roundtrip_and_strictness():
    model = tiny_model(zero_init_up=False)
    model.peft.ensure_sets(["a", "b"])
    state = model.peft.state_dict_of("a")
    model.peft.load_set_state("b", state)
    for k, v in model.peft.state_dict_of("b").items():
        assert torch.equal(v, state[k])
    with pytest.raises(RuntimeError):
        model.peft.load_set_state("b", {k: v[..., :1] for k, v in state.items()})
    with pytest.raises(KeyError, match="no adapter set"):
        model.peft.state_dict_of("missing")
    with pytest.raises(ValueError, match="single"):
        model.peft.activate("a", "b", combine="single")


def test_backbone_is_frozen_and_only_peft_proj_head_train():
    model = tiny_model()
    model.peft.ensure_sets(["a"])
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"peft", "visual_proj", "head"}
