"""FedPIA's invariants: permutation symmetry, exact recovery, FedAvg as the identity case --
for bottleneck adapters (hidden units) and LoRA (rank axis) alike."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import bound_method

from fedmm.config import ConfigError
from fedmm.methods import Reply
from fedmm.methods.aggregation import weighted_average
from fedmm.methods.fedpia import ADAPTER, FedPIAConfig, align, permute, unit_groups
from fedmm.methods.state import get_parts, load_parts, to_numpy, to_torch
from fedmm.runtime import get_runtime


@pytest.fixture(params=["adapter", "lora"])
def pia(tiny_cfg, request):
    cfg = tiny_cfg.with_overrides(
        {"method": "fedpia", "adapter.zero_init_up": False, "peft.type": request.param,
         "peft.lora_r": 6}
    )  # fmt: skip
    method = bound_method(cfg)
    model = get_runtime(cfg).model
    state = method.init_global(model)
    rng = np.random.default_rng(0)  # LoRA's B starts at zero: make every rank component distinct
    state = {k: v + 0.1 * rng.standard_normal(v.shape).astype(np.float32) if "lora_B" in k else v
             for k, v in state.items()}  # fmt: skip
    return cfg, method, model, state


def random_perms(state, rng, peft_type=None):
    peft_type = peft_type or ("lora" if any("lora_A" in k for k in state) else "adapter")
    out = state
    for group in unit_groups(state, peft_type):
        key, axis = next(iter(group.items()))
        out = permute(out, group, rng.permutation(state[key].shape[axis]))
    return out


def realign(state, anchor, **options):
    peft_type = "lora" if any("lora_A" in k for k in state) else "adapter"
    return align(state, anchor, FedPIAConfig(**options), peft_type)


def test_permuting_hidden_units_leaves_the_model_output_unchanged(pia):
    _, _, model, state = pia
    model.eval()
    feats = torch.randn(3, 4, 16)
    ids, mask = model.tokenize(["is it a coat or a bag?"] * 3)
    load_parts(model, to_torch(state))
    with model.active("global_adapter"):
        before = model(feats, ids, mask)
        load_parts(model, to_torch(random_perms(state, np.random.default_rng(1))))
        after = model(feats, ids, mask)
    assert torch.allclose(before, after, atol=1e-5)


def test_a_randomly_permuted_copy_is_recovered_exactly(pia):
    _, _, _, state = pia
    shuffled = random_perms(state, np.random.default_rng(2))
    assert any(not np.array_equal(shuffled[k], state[k]) for k in state)
    recovered = realign(shuffled, state)
    for k in state:
        assert np.array_equal(recovered[k], state[k]), k


def test_identity_alignment_reduces_the_server_step_to_fedavg(pia):
    _, method, _, state = pia
    rng = np.random.default_rng(3)
    replies = [
        Reply(
            i,
            {
                k: v + 1e-4 * rng.standard_normal(v.shape).astype(np.float32)
                for k, v in state.items()
            },
            n,
        )
        for i, n in enumerate((10, 30, 60))
    ]  # small perturbations of the anchor: the optimal assignment is the identity
    merged = method.aggregate(state, replies)
    expected = weighted_average(replies, "samples")
    assert all(np.allclose(merged[k], expected[k]) for k in state)


@pytest.mark.parametrize("anchor", ["global", "largest", "fedavg"])
def test_merging_permuted_copies_of_one_adapter_returns_it(pia, anchor):
    cfg, _, _, state = pia
    method = bound_method(cfg.with_overrides({"fedpia.anchor": anchor}))
    rng = np.random.default_rng(4)
    replies = [Reply(i, random_perms(state, rng), 10 + i) for i in range(3)]
    merged = method.aggregate(state, replies)
    if anchor != "global":  # the result is the adapter up to a permutation of its units
        merged = realign(merged, state)
    assert all(np.allclose(merged[k], state[k], atol=1e-6) for k in state)
    plain = weighted_average(replies, "samples")
    assert not all(np.allclose(plain[k], state[k]) for k in state if k.startswith(ADAPTER))


def test_client_integrates_local_and_aligned_global(pia):
    cfg, method, model, state = pia
    for lam, expect in ((1.0, "local"), (0.0, "global")):
        m = bound_method(
            cfg.with_overrides({"fedpia.lam": lam, "train.lr": 0.0, "train.warmup_frac": 0.0})
        )
        local = random_perms({k: v + 0.5 for k, v in state.items()}, np.random.default_rng(5))
        from fedmm.methods.context import ClientContext

        rt = get_runtime(cfg)
        ctx = ClientContext(cfg.with_overrides({"train.lr": 0.0}), model, rt.client_split(0, "train"),
                            rt.client_split(0, "test"), {f"personal:{k}": torch.from_numpy(v) for k, v in local.items()},
                            2, 0, 1, 2)  # fmt: skip
        upload = to_numpy(
            m.client_train(ctx, to_torch(state)).upload
        )  # lr 0: the upload is the start point
        target = local if expect == "local" else realign(state, local)
        assert all(np.allclose(upload[k], target[k], atol=1e-6) for k in upload), expect


def test_bad_options_are_rejected(tiny_cfg):
    with pytest.raises(ConfigError, match="anchor"):
        bound_method(tiny_cfg.with_overrides({"method": "fedpia", "fedpia.anchor": "median"}))


def test_get_parts_keys_match_the_alignment_layout(pia):
    cfg, _, model, state = pia
    groups = unit_groups(state, cfg.peft.type)
    per_layer = 1 if cfg.peft.type == "adapter" else 2  # LoRA: query and value
    assert len(groups) == per_layer * len(model.text.encoder.layer)
    unit_free = {k for k in state if k.endswith(".up.bias")}  # b_up: no hidden-unit axis
    assert set().union(*groups) == {k for k in state if k.startswith(ADAPTER)} - unit_free
    assert set(state) == set(get_parts(model, ("adapter.global_adapter", "proj", "head")))


@pytest.mark.parametrize("options", [{"solver": "emd"}, {"cost": "cosine"}])
def test_other_exact_solvers_and_costs_recover_a_permuted_copy(pia, options):
    _, _, _, state = pia
    shuffled = random_perms(state, np.random.default_rng(6))
    recovered = realign(shuffled, state, **options)
    assert all(np.allclose(recovered[k], state[k]) for k in state)


def test_sinkhorn_gives_a_soft_plan_that_sharpens_as_the_regulariser_shrinks(pia):
    _, _, _, state = pia
    shuffled = random_perms(state, np.random.default_rng(7))
    errors = []
    for reg in (1.0, 0.01):
        soft = realign(shuffled, state, solver="sinkhorn", reg=reg)
        errors.append(sum(float(np.abs(soft[k] - state[k]).sum()) for k in state))
    assert errors[1] < errors[0]
    assert errors[1] < 0.05 * sum(float(np.abs(shuffled[k] - state[k]).sum()) for k in state)


@pytest.mark.parametrize("peft_type", ["prompt", "bitfit"])
def test_fedpia_refuses_peft_types_without_hidden_units(tiny_cfg, peft_type):
    with pytest.raises(ConfigError, match=f"peft.type '{peft_type}' has none"):
        bound_method(tiny_cfg.with_overrides({"method": "fedpia", "peft.type": peft_type}))


def test_bad_solver_is_rejected(tiny_cfg):
    with pytest.raises(ConfigError, match="solver"):
        bound_method(tiny_cfg.with_overrides({"method": "fedpia", "fedpia.solver": "hungarian"}))
