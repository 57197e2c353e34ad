"""FedPIA's invariants: permutation symmetry, exact recovery, FedAvg as the identity case."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmm.config import ConfigError
from fedmm.methods import Reply, get_method
from fedmm.methods.base import get_parts, load_parts, to_numpy, to_torch, weighted_average
from fedmm.methods.fedpia import ADAPTER, adapter_layers, align, permute
from fedmm.runtime import get_runtime


@pytest.fixture()
def pia(tiny_cfg):
    cfg = tiny_cfg.with_overrides({"method": "fedpia", "adapter.zero_init_up": False})
    method = get_method(cfg)
    model = get_runtime(cfg).model
    state = method.init_global(model)
    return cfg, method, model, state


def random_perms(state, rng):
    out = state
    for layer in adapter_layers(state):
        out = permute(out, layer, rng.permutation(len(state[f"{layer}.down.bias"])))
    return out


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
    recovered = align(shuffled, state)
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
    method = get_method(cfg.with_overrides({"fedpia.anchor": anchor}))
    rng = np.random.default_rng(4)
    replies = [Reply(i, random_perms(state, rng), 10 + i) for i in range(3)]
    merged = method.aggregate(state, replies)
    if anchor != "global":  # the result is the adapter up to a permutation of its units
        merged = align(merged, state)
    assert all(np.allclose(merged[k], state[k], atol=1e-6) for k in state)
    plain = weighted_average(replies, "samples")
    assert not all(np.allclose(plain[k], state[k]) for k in state if k.startswith(ADAPTER))


def test_client_integrates_local_and_aligned_global(pia):
    cfg, method, model, state = pia
    for lam, expect in ((1.0, "local"), (0.0, "global")):
        m = get_method(
            cfg.with_overrides({"fedpia.lam": lam, "train.lr": 0.0, "train.warmup_frac": 0.0})
        )
        local = random_perms({k: v + 0.5 for k, v in state.items()}, np.random.default_rng(5))
        from fedmm.methods.base import ClientContext

        rt = get_runtime(cfg)
        ctx = ClientContext(cfg.with_overrides({"train.lr": 0.0}), model, rt.client_split(0, "train"),
                            rt.client_split(0, "test"), {f"personal.{k}": torch.from_numpy(v) for k, v in local.items()},
                            2, 0, 1, 2)  # fmt: skip
        upload = to_numpy(
            m.client_train(ctx, to_torch(state))
        )  # lr 0: the upload is the start point
        target = local if expect == "local" else align(state, local)
        assert all(np.allclose(upload[k], target[k], atol=1e-6) for k in upload), expect


def test_bad_options_are_rejected(tiny_cfg):
    with pytest.raises(ConfigError, match="anchor"):
        get_method(tiny_cfg.with_overrides({"method": "fedpia", "fedpia.anchor": "median"}))


def test_get_parts_keys_match_the_alignment_layout(pia):
    _, _, model, state = pia
    assert adapter_layers(state) == [f"{ADAPTER}/{i}" for i in range(len(model.text.encoder.layer))]
    assert set(state) == set(get_parts(model, ("adapter.global_adapter", "proj", "head")))
