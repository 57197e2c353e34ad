"""PEFT types as named sets: identity at init, combination rules, state by name, frozen backbone."""

from __future__ import annotations

import pytest
import torch
from conftest import bound_method

from fedmm.backbones import build_model
from fedmm.config import ConfigError
from fedmm.sections import AdapterConfig, ModelConfig, PeftConfig

TYPES = ["adapter", "lora", "prompt", "bitfit"]


def tiny_model(peft_type: str, **peft):
    cfg = PeftConfig(type=peft_type, **peft)
    return build_model(ModelConfig(backbone="tiny", image_size=32), AdapterConfig(), 7, cfg)


def inputs(model):
    torch.manual_seed(0)
    ids, mask = model.tokenize(["is it a coat or a bag?", "what item is shown?"])
    return torch.randn(2, 4, 16), ids, mask


def randomise(model, name, scale=0.2):
    with torch.no_grad():
        for p in model.peft.parameters_of(name):
            p.add_(scale * torch.randn_like(p))


@pytest.mark.parametrize("peft_type", ["adapter", "lora", "bitfit"])
def test_a_fresh_set_leaves_the_model_output_unchanged(peft_type):
    model = tiny_model(peft_type).eval()
    model.peft.ensure_sets(["a"])
    x = inputs(model)
    with torch.no_grad():
        base = model(*x)
        with model.active("a"):
            assert torch.allclose(model(*x), base, atol=1e-6)
        randomise(model, "a")
        with model.active("a"):
            assert not torch.allclose(model(*x), base, atol=1e-4)
        assert torch.equal(model(*x), base)  # nothing active: the frozen backbone again


@pytest.mark.parametrize("peft_type", TYPES)
def test_state_by_name_round_trips_and_sets_are_independent(peft_type):
    model = tiny_model(peft_type).eval()
    model.peft.ensure_sets(["a", "b"])
    randomise(model, "a")
    x = inputs(model)
    with torch.no_grad(), model.active("a"):
        out_a = model(*x)
    model.peft.load_set_state("b", model.peft.state_dict_of("a"))
    with torch.no_grad(), model.active("b"):
        assert torch.allclose(model(*x), out_a, atol=1e-6)
    with pytest.raises(KeyError, match="no .* set 'missing'"):
        model.peft.state_dict_of("missing")


@pytest.mark.parametrize("peft_type", ["lora", "bitfit"])
def test_average_of_two_sets_is_half_their_summed_delta(peft_type):
    """LoRA and BitFit are additive deltas on a frozen layer: average = ½ sum, exactly, per layer."""
    model = tiny_model(peft_type).eval()
    model.peft.ensure_sets(["a", "b"])
    randomise(model, "a")
    randomise(model, "b")
    layer = model.text.encoder.layer[0].attention.self.query
    h = torch.randn(3, 32)
    with torch.no_grad():
        base = layer(h)
        with model.active("a", "b", combine="sum"):
            summed = layer(h) - base
        with model.active("a", "b", combine="average"):
            averaged = layer(h) - base
        with model.active("a"):
            da = layer(h) - base
        with model.active("b"):
            db = layer(h) - base
    assert torch.allclose(summed, da + db, atol=1e-5)
    assert torch.allclose(averaged, 0.5 * (da + db), atol=1e-5)


def test_prompt_sets_average_their_tokens_and_refuse_sum():
    model = tiny_model("prompt", prompt_length=5).eval()
    model.peft.ensure_sets(["a", "b", "mean"])
    state = {
        "tokens": 0.5
        * (model.peft.state_dict_of("a")["tokens"] + model.peft.state_dict_of("b")["tokens"])
    }
    model.peft.load_set_state("mean", state)
    x = inputs(model)
    with torch.no_grad():
        with model.active("a", "b", combine="average"):
            averaged = model(*x)
        with model.active("mean"):
            assert torch.allclose(averaged, model(*x), atol=1e-6)
        with model.active("a"):
            assert not torch.allclose(averaged, model(*x), atol=1e-4)
    with pytest.raises(ValueError, match="prompt sets combine by"):
        model.peft.activate("a", "b", combine="sum")


@pytest.mark.parametrize("peft_type", TYPES)
def test_only_peft_sets_projection_and_head_are_trainable(peft_type):
    model = tiny_model(peft_type)
    model.peft.ensure_sets(["a"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # LoRA's layers live inside the text transformer (peft injects them) and are listed there first
    owners = {"peft" if "lora_" in n else n.split(".")[0] for n in trainable}
    assert owners == {"peft", "visual_proj", "head"}
    frozen = model.frozen_state_keys()
    assert frozen and not any("lora_" in k for k in frozen)
    assert sum(p.numel() for p in model.peft.parameters_of("a")) > 0


def test_lora_rank_defaults_to_the_adapter_budget_and_targets_are_checked():
    adapter = tiny_model("adapter")
    adapter.peft.ensure_sets(["a"])
    lora = tiny_model("lora")
    lora.peft.ensure_sets(["a"])
    n_adapter, n_lora = adapter.peft.num_params("a"), lora.peft.num_params("a")
    assert abs(n_lora - n_adapter) <= 2 * 2 * 64  # within one rank step (2 layers x q,v x 64)
    assert tiny_model("lora", lora_r=3).peft.r == 3
    with pytest.raises(ConfigError, match="matches no linear layer.*query"):
        tiny_model("lora", lora_targets="q_proj")


def test_unknown_peft_type_and_senseless_combinations_fail_clearly(tiny_cfg):
    with pytest.raises(ConfigError, match="unknown peft.type 'ia3'.*adapter, lora, prompt, bitfit"):
        bound_method(tiny_cfg.with_overrides({"peft.type": "ia3"}))
    with pytest.raises(
        ConfigError, match="dat_combine='sum' is not defined for peft.type 'prompt'"
    ):
        bound_method(tiny_cfg.with_overrides(
            {"method": "feddat", "peft.type": "prompt", "feddat.dat_combine": "sum"}
        ))  # fmt: skip
    with pytest.raises(ConfigError, match="fedpia aligns hidden units"):
        bound_method(tiny_cfg.with_overrides({"method": "fedpia", "peft.type": "bitfit"}))
