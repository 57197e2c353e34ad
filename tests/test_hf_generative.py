"""Hugging Face generative VLMs by name (issue 27): SmolVLM/Idefics3, Qwen2-VL, LLaVA, LLaVA-NeXT,
PaliGemma, each as a tiny random model saved to a directory with an offline tokenizer and the
family's own processor (``hf_vlm_tiny``; no download) -- prompts and image tokens, answer-only
labels, cached left-padded greedy decoding against full recomputation, learning, and a 2-round
FedAvg whose uploads hold only the PEFT set and the family's connector."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_federation
from hf_vlm_tiny import BUILDERS
from test_generative import RecordingGrid
from test_serverapp import InProcessGrid

from fedmm.config import ConfigError, FedmmConfig
from fedmm.engine import rehearsal_sites
from fedmm.generation import IGNORE, token_loss
from fedmm.methods.losses import supervised_loss
from fedmm.runtime import get_runtime

pytestmark = pytest.mark.usefixtures("flower_task_identity")
FAMILIES = list(BUILDERS)  # the tiny models; qwen2.5-vl is loaded by backbone qwen2-vl
BACKBONE = {"qwen2.5-vl": "qwen2-vl"}


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf_vlm")
    dirs = {}
    for name, build in BUILDERS.items():
        build(root / name)
        dirs[name] = root / name
    return dirs


def family_cfg(tiny_cfg, tiny_dirs, family: str, **extra) -> FedmmConfig:
    return tiny_cfg.with_overrides({
        "model.backbone": BACKBONE.get(family, family), "model.hf_path": str(tiny_dirs[family]),
        "model.image_size": 32, "data.task_kind": "generate", "peft.type": "lora",
        "model.max_text_len": 96, "data.train_per_client": 8, "data.test_per_client": 4,
        "train.local_steps": 2, "train.batch_size": 4, "eval.max_new_tokens": 4, **extra,
    })  # fmt: skip


def federate(cfg: FedmmConfig) -> tuple[RecordingGrid, dict]:
    """A federation of ``cfg``'s ``fed.clients`` sites in process, recording the uploads; each
    site loads its own copy of the weights (model-dir), as `fedmm run` sets it up."""
    n = cfg.fed.clients
    grid = RecordingGrid(n, cfg.out_dir)
    InProcessGrid.__init__(grid, n, sites={
        k: {"state-dir": f"{cfg.out_dir}/client_state/site-{k}", "model-dir": site["model-dir"]}
        for k, site in rehearsal_sites(cfg).items()
    })  # fmt: skip
    return grid, run_federation(grid, cfg)


@pytest.mark.parametrize("family", FAMILIES)
def test_prompts_labels_and_text_only_records(tiny_cfg, tiny_dirs, family):
    runtime = get_runtime(family_cfg(tiny_cfg, tiny_dirs, family))
    model, split = runtime.model, runtime.client_split(0, "train")
    chat = model.chat
    assert model.image_tokens > 0 and split.feats.shape[1:] == model.visual_token_shape()
    assert len(split.feats) == len(split) == 8
    if family == "smolvlm":  # one global image of max_image_size, no crops: 4 tokens + 3 marks
        assert model.visual_token_shape() == (3, 32, 32) and model.image_tokens == 4 + 3
    if family == "llava-next":  # a 32-px square: the base image and one 32x32 tile, every record
        assert model.visual_token_shape() == (2, 3, 32, 32)
    for i in range(len(split)):
        ids = split.input_ids[i, : int(split.prompt_lens[i])]
        assert int((ids == model.image_token_id).sum()) > 0  # the image, expanded
        labelled = (split.labels[i] != IGNORE).nonzero().flatten()
        answer = chat.encode(split.references[i])
        assert split.labels[i, labelled].tolist() == [*answer, chat.eos_id]
        assert split.input_ids[i, labelled + 1].tolist() == [*answer, chat.eos_id]
        assert int(labelled[0]) == int(split.prompt_lens[i]) - 1
    # a record without an image: no image token at all, and no pixels passed for it
    with_image, n_text = model.prompt_ids("what is shown?", np.zeros((28, 28), np.uint8))
    text_only, n_text_only = model.prompt_ids("what is shown?", None)
    assert model.image_token_id not in text_only and n_text == n_text_only == len(text_only)
    assert len(with_image) - len(text_only) == model.image_tokens
    assert model._vision_inputs(split.feats[:1], torch.tensor([text_only])).get(
        "pixel_values") is None  # fmt: skip


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_left_padded_decoding_equals_full_recomputation(tiny_cfg, tiny_dirs, family):
    """Greedy tokens of a left-padded batch (one row with an image, one without, of different
    lengths) through the KV cache == argmax of the full forward pass, one unpadded row at a time."""
    runtime = get_runtime(family_cfg(tiny_cfg, tiny_dirs, family))
    model, split = runtime.model, runtime.client_split(0, "test")
    model.peft.ensure_sets(["s"])
    torch.manual_seed(0)
    for p in model.peft.set_module("s").parameters():  # non-trivial LoRA: B is 0 at init
        p.data.normal_(0, 0.5)
    text_only, _ = model.prompt_ids("a longer question without any image?", None)
    prompts = [split.prompts(torch.tensor([0]))[0], text_only]
    feats = split.feats[:2].float()
    with model.active("s"):
        cached = model.generate(feats, prompts, 3)
        for row, prompt in enumerate(prompts):
            ids = torch.tensor([prompt])
            expect = []
            for _ in range(3):
                with torch.no_grad():
                    logits = model(feats[row : row + 1], ids, torch.ones_like(ids))
                token = int(logits[0, -1].argmax())
                if token == model.chat.eos_id:
                    break
                expect.append(token)
                ids = torch.cat([ids, torch.tensor([[token]])], 1)
            assert cached[row] == expect, (row, cached[row], expect)


@pytest.mark.parametrize("family,peft", [(f, "lora") for f in FAMILIES] + [("qwen2-vl", "adapter")])
def test_peft_and_connector_learn_the_answers(tiny_cfg, tiny_dirs, family, peft):
    """A few Adam steps on the PEFT set and the connector lower the answer loss of a batch
    (gradients reach both; the frozen model does not move)."""
    runtime = get_runtime(family_cfg(tiny_cfg, tiny_dirs, family, **{"peft.type": peft}))
    model, split = runtime.model, runtime.client_split(0, "train")
    feats, ids, mask, labels = split.batch(torch.arange(4), torch.device("cpu"))
    model.peft.ensure_sets(["s"])
    model.reset_trainable(0)
    frozen = {k: v.clone() for k, v in model.hf.state_dict().items()
              if f"hf.{k}" in model.frozen_state_keys()}  # fmt: skip
    proj0 = {k: v.clone() for k, v in model.visual_proj.state_dict().items()}
    params = [*model.peft.set_module("s").parameters(), *model.visual_proj.parameters()]
    opt = torch.optim.Adam(params, lr=1e-2)
    with model.active("s"):
        first = float(token_loss(model(feats, ids, mask), labels))
        keep = labels[:, : ids.shape[1]] != IGNORE  # the output layer at the answers only
        with torch.no_grad():
            assert torch.allclose(model(feats, ids, mask, keep=keep), model(feats, ids, mask)[keep],
                                  atol=1e-5)  # fmt: skip
            assert torch.isclose(supervised_loss(model, feats, ids, mask, labels),
                                 torch.tensor(first), atol=1e-5)  # fmt: skip
        for _ in range(8):
            opt.zero_grad()
            token_loss(model(feats, ids, mask), labels).backward()
            opt.step()
        last = float(token_loss(model(feats, ids, mask), labels))
    assert last < first - 0.1, (first, last)
    assert any(not torch.equal(v, model.visual_proj.state_dict()[k]) for k, v in proj0.items())
    after = model.hf.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in frozen.items())
    model.reset_trainable(0)  # the connector goes back to its pretrained weights
    assert all(torch.equal(v, model.visual_proj.state_dict()[k]) for k, v in proj0.items())


@pytest.mark.parametrize("family", FAMILIES)
def test_fedavg_two_rounds_sends_only_the_peft_set_and_connector(tiny_cfg, tiny_dirs, family):
    cfg = family_cfg(
        tiny_cfg, tiny_dirs, family, method="fedavg", **{"fed.clients": 2, "fed.rounds": 2}
    )
    model = get_runtime(cfg).model
    proj = {f"proj/{k}": tuple(v.shape) for k, v in model.visual_proj.state_dict().items()}
    grid, record = federate(cfg)
    assert [h["round"] for h in record["history"]] == [1, 2]
    assert record["final"] and all(0.0 <= v <= 1.0 for v in record["final"].values())
    summary = (Path(cfg.out_dir) / "summary.md").read_text()
    assert "Generated answers" in summary
    assert len(grid.uploads) == 4  # 2 clients x 2 rounds
    for upload in grid.uploads:
        assert {k.split("/", 1)[0] for k in upload} == {"proj", "adapter.global_adapter"}
        assert {k: tuple(v.shape) for k, v in upload.items() if k.startswith("proj/")} == proj
        lora = [k for k in upload if k.startswith("adapter.")]
        assert len(lora) == 2 * 2 * 7 and all(".lora_A." in k or ".lora_B." in k for k in lora)
    # on the 7 projections of the 2 decoder layers of the language model, nowhere else
    assert model.peft.paths == sorted(f"layers.{i}.{p}" for i in range(2) for p in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))  # fmt: skip


@pytest.mark.parametrize("method", ["feddat", "ditto"])
def test_feddat_and_ditto_run_two_rounds_on_a_family_and_send_only_the_shared_set(
    tiny_cfg, tiny_dirs, method
):
    """FedDAT's client adapter A_c and Ditto's personal copy stay at the site: each upload holds
    the shared PEFT set and the connector only."""
    cfg = family_cfg(
        tiny_cfg, tiny_dirs, "llava", method=method, **{"fed.clients": 2, "fed.rounds": 2}
    )
    grid, record = federate(cfg)
    assert [h["round"] for h in record["history"]] == [1, 2]
    assert "personal" in record["final"]
    assert len(grid.uploads) == 4
    for upload in grid.uploads:
        assert {k.split("/", 1)[0] for k in upload} == {"proj", "adapter.global_adapter"}


@pytest.mark.parametrize("family", ["llava", "qwen2-vl"])
def test_fedper_keeps_the_last_decoder_layers_peft_set_at_the_site(tiny_cfg, tiny_dirs, family):
    """FedPer on a family (fedper.personal=top, k=1): the LoRA tensors of the last decoder layer
    never leave the site; the first layer's and the connector are federated."""
    cfg = family_cfg(tiny_cfg, tiny_dirs, family, method="fedper", **{
        "fed.clients": 2, "fed.rounds": 2, "fedper.personal": "top", "fedper.personal_layers": 1,
    })  # fmt: skip
    from conftest import bound_method

    model = get_runtime(cfg).model
    shared = bound_method(cfg).init_global(model)  # the server's θ_B: its sets exist from here
    layers = model.peft_layers("global_adapter")
    assert model.num_layers == 2 and set(layers.values()) == {0, 1}
    federated = {f"adapter.global_adapter/{k}" for k, j in layers.items() if j == 0}
    assert {k for k in shared if k.startswith("adapter.")} == federated
    grid, record = federate(cfg)
    assert [h["round"] for h in record["history"]] == [1, 2]
    assert "shared+head" in record["final"] and "shared" not in record["final"]
    assert len(grid.uploads) == 4
    for upload in grid.uploads:
        assert {k for k in upload if k.startswith("adapter.")} == federated
        assert any(k.startswith("proj/") for k in upload)


@pytest.mark.parametrize("family", ["llava", "qwen2-vl"])
def test_fedpia_permutation_invariance_and_two_rounds_on_a_family(tiny_cfg, tiny_dirs, family):
    """FedPIA's symmetry on a family's decoder: permuting the rank components of every LoRA
    module (B·P, Pᵀ·A) leaves the logits unchanged, a permutation of A alone does not, alignment
    recovers the permuted set exactly; and a 2-round federation sends the shared set only."""
    from conftest import bound_method
    from test_fedpia import random_perms

    from fedmm.methods.fedpia import FedPIAConfig, align
    from fedmm.methods.state import load_parts, to_torch

    cfg = family_cfg(tiny_cfg, tiny_dirs, family, method="fedpia", **{
        "fed.clients": 2, "fed.rounds": 2, "peft.lora_r": 4,
    })  # fmt: skip
    runtime, method = get_runtime(cfg), bound_method(cfg)
    model = runtime.model
    rng = np.random.default_rng(3)  # LoRA's B starts at zero: make every rank component act
    state = {k: v + 0.1 * rng.standard_normal(v.shape).astype(np.float32) if "lora_B" in k else v
             for k, v in method.init_global(model).items()}  # fmt: skip
    shuffled = random_perms(state, np.random.default_rng(4), "lora")
    assert any(not np.array_equal(shuffled[k], state[k]) for k in state)
    feats, ids, mask, _ = runtime.client_split(0, "train").batch(torch.arange(4), model.device)
    with torch.no_grad(), model.active("global_adapter"):
        load_parts(model, to_torch(state))
        before = model(feats, ids, mask)
        load_parts(model, to_torch(shuffled))
        after = model(feats, ids, mask)
        load_parts(model, to_torch({k: v[::-1].copy() if "lora_A" in k else v
                                    for k, v in state.items()}))  # fmt: skip
        unpaired = model(feats, ids, mask)
    assert torch.allclose(before, after, atol=1e-5)
    assert not torch.allclose(before, unpaired, atol=1e-4)
    recovered = align(shuffled, state, FedPIAConfig(), "lora")
    assert all(np.array_equal(recovered[k], state[k]) for k in state)
    grid, record = federate(cfg)
    assert [h["round"] for h in record["history"]] == [1, 2]
    assert {"shared", "personal"} <= set(record["final"])
    for upload in grid.uploads:
        assert {k.split("/", 1)[0] for k in upload} == {"proj", "adapter.global_adapter"}


@pytest.mark.parametrize("family", ["llava", "qwen2-vl"])
def test_tap_pairs_and_stage_two_on_a_family(tiny_cfg, tiny_dirs, family):
    """TAP on a family, on the mixed benchmark (VQA, classification, attributes and text
    classification answered in text, and captions; image+text, image-only and text-only
    clients): 2 rounds and stage 2, every pair scored by generation in every view, and each
    upload holds exactly the client's PEFT sets and, with images, the connector."""
    from collections import Counter

    from fedmm.methods.tap import client_sets

    cfg = family_cfg(tiny_cfg, tiny_dirs, family, method="tap", **{
        "data.benchmark": "fmnist-task-caption", "fed.clients": 7, "fed.rounds": 2,
        "model.max_text_len": 160, "data.train_per_client": 8, "train.max_target_tokens": 64,
        "tap.teacher_steps": 2, "tap.distill_steps": 2,
    })  # fmt: skip
    clients = get_runtime(cfg).benchmark.clients
    grid, record = federate(cfg)
    assert [h["round"] for h in record["history"]] == [1, 2]
    last = record["history"][-1]
    for c in clients:
        assert {"shared", "personal", "distilled"} <= set(last["clients"][c.client_id])
    expected = Counter(
        frozenset({f"adapter.{s}" for s in client_sets(c)} | ({"proj"} if "image" in
                  c.modalities else set()))
        for c in clients for _ in range(2)
    )  # fmt: skip
    assert Counter(frozenset(k.split("/", 1)[0] for k in u) for u in grid.uploads) == expected


def test_prompt_and_bitfit_are_refused_and_a_wrong_family_is_named(tiny_cfg, tiny_dirs):
    from fedmm.methods import get_method

    for peft in ("prompt", "bitfit"):
        with pytest.raises(ConfigError, match="use lora or adapter"):
            get_method(family_cfg(tiny_cfg, tiny_dirs, "llava", **{"peft.type": peft}))
    cfg = family_cfg(tiny_cfg, tiny_dirs, "llava", **{"model.hf_path": str(tiny_dirs["smolvlm"])})
    with pytest.raises(RuntimeError, match="holds a 'idefics3' model"):
        get_runtime(cfg)


def test_a_hub_name_not_in_the_cache_is_a_clear_error(tiny_cfg, tiny_dirs, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tiny_dirs["llava"].parent / "empty-cache"))
    cfg = family_cfg(tiny_cfg, tiny_dirs, "paligemma", **{"model.hf_path": "google/none-such"})
    with pytest.raises(RuntimeError, match="huggingface-cli download google/none-such"):
        get_runtime(cfg)
