"""Hugging Face families (vilt, clip, siglip, blip) from tiny random configs: no download, ever.

One 2-round Flower simulation (FedAvg then FedDAT) per family through the CLI; the wire carries
only PEFT / projection / head tensors for every PEFT type a family serves; offline honesty;
checkpointing, accumulation and bf16 keep the training maths.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import bound_method, run_federation, server_msg
from flwr.app import Context, Message, MessageType, RecordDict
from test_serverapp import InProcessGrid

from fedmm import results
from fedmm.backbones import build_model
from fedmm.backbones.hf_families import FAMILIES, TINY
from fedmm.cli import main
from fedmm.config import ConfigError, FedmmConfig
from fedmm.federation import clientapp, messages
from fedmm.methods.context import ClientContext, supervised_update
from fedmm.peft import AdapterBank, LoraBank
from fedmm.runtime import get_runtime

FAMILY_NAMES = ["vilt", "clip", "siglip", "blip"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny ops are dominated by thread-pool wake-ups on a busy machine: one thread, restored."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def hf_cfg(tiny_cfg: FedmmConfig, family: str, **extra) -> FedmmConfig:
    base = {"model.backbone": family, "model.hf_path": TINY, "train.threads": 1}
    return tiny_cfg.with_overrides({**base, **extra})


def test_two_round_flower_simulation_of_vilt_fedavg_and_feddat(tiny_cfg, capsys):
    """The whole path, Ray included, for ViLT (FedDAT's backbone)."""
    cfg = hf_cfg(tiny_cfg, "vilt")
    args = ["run", "--method", "fedavg,feddat", "--rounds", "2", "--clients", "3",
            "--out", cfg.out_dir]  # fmt: skip
    for key in ("model.backbone", "model.hf_path", "model.image_size", "data.data_dir",
                "data.train_per_client", "data.test_per_client", "train.local_steps",
                "train.batch_size", "train.threads", "cache_dir", "progress"):  # fmt: skip
        args += ["--set", f"{key}={cfg.to_flat()[key]}"]
    assert main(args) == 0
    assert "backbone vilt" in capsys.readouterr().out
    runs = json.loads((Path(cfg.out_dir) / "results.json").read_text())["runs"]
    runs = {r["method"]: r for r in runs}
    assert set(runs) == {"fedavg", "feddat"}
    for run in runs.values():
        assert [h["round"] for h in run["history"]] == [1, 2]
        for h in run["history"]:
            assert h["failures"] == 0 and h["bytes_up"] > 0
            assert all(s["steps"] == cfg.train.local_steps for s in h["train"].values())
        assert all(0.0 <= v <= 1.0 for v in run["final"].values())
    assert runs["feddat"]["history"][0]["bytes_up"] < runs["fedavg"]["history"][0]["bytes_up"]


class CheckingGrid:
    """The round loop's grid, in-process (tests/test_serverapp.py): every TRAIN reply's update
    must hold exactly the method's upload parts, no backbone tensor, fp32 only."""

    def __init__(self, cfg: FedmmConfig, n: int) -> None:
        self.cfg, self.uploads = cfg, 0
        self.contexts = {
            100 + i: Context(run_id=1, node_id=100 + i, state=RecordDict(), run_config={},
                             node_config={"partition-id": i, "num-partitions": n})
            for i in range(n)
        }  # fmt: skip

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, msgs, *, timeout=None):
        replies = []
        for msg in msgs:
            train = msg.metadata.message_type == MessageType.TRAIN
            reply = clientapp.dispatch(msg, self.contexts[msg.metadata.dst_node_id])
            if train:
                check_upload(self.cfg, reply)
                self.uploads += 1
            replies.append(reply)
        return replies


def check_upload(cfg: FedmmConfig, reply: Message) -> None:
    update = reply.content[messages.UPDATE]
    method, model = bound_method(cfg), get_runtime(cfg).model
    expected = set(method.upload_spec(model))
    assert set(update.keys()) == expected
    frozen = model.frozen_state_keys()
    assert frozen and not any(k.split("/", 1)[1] in frozen or k.startswith("hf") for k in expected)
    assert all(a.numpy().dtype == np.float32 for a in update.values())


@pytest.mark.usefixtures("flower_task_identity")
@pytest.mark.parametrize("family", ["clip", "siglip", "blip"])
def test_two_round_federation_fedavg_and_feddat_through_the_round_loop(tiny_cfg, family):
    """ServerApp round loop + ClientApp handler, in-process (no Ray), for the other families."""
    for method in ("fedavg", "feddat"):
        cfg = hf_cfg(tiny_cfg, family, method=method).resolved()
        grid = CheckingGrid(cfg, 3)
        record = run_federation(grid, cfg)
        assert [h["round"] for h in record["history"]] == [1, 2] and grid.uploads == 6
        for h in record["history"]:
            assert h["failures"] == 0 and h["bytes_up"] > 0
            assert all(s["steps"] == cfg.train.local_steps for s in h["train"].values())
        assert set(results.scored_views(record)) == set(bound_method(cfg).views)


def train_reply(cfg: FedmmConfig) -> Message:
    """One client's round-1 training reply, in-process (as tests/test_messages.py does)."""
    context = Context(run_id=1, node_id=100, node_config={"partition-id": 0, "num-partitions": 3},
                      state=RecordDict(), run_config={})  # fmt: skip
    global_np = bound_method(cfg).init_global(get_runtime(cfg).model)
    msg = Message(server_msg(cfg, global_np, 1), 100, MessageType.TRAIN)
    return clientapp.handle(msg, context, train=True)


PEFT_CASES = [(f, "lora") for f in FAMILY_NAMES] + [("vilt", "prompt"), ("blip", "bitfit"), ("siglip", "bitfit")]  # fmt: skip


@pytest.mark.usefixtures("flower_task_identity")
@pytest.mark.parametrize("family,peft_type", PEFT_CASES)
def test_feddat_upload_holds_only_trainable_tensors(tiny_cfg, family, peft_type):
    cfg = hf_cfg(tiny_cfg, family, method="feddat", **{"peft.type": peft_type})
    check_upload(cfg, train_reply(cfg))


@pytest.mark.parametrize("family", ["clip", "siglip", "blip"])
def test_prompt_tuning_on_a_two_tower_family_is_refused_before_any_run(tiny_cfg, family, capsys):
    out = Path(tiny_cfg.out_dir) / "never"
    args = ["run", "--method", "fedavg", "--peft", "prompt", "--out", str(out),
            "--set", f"model.backbone={family}", "--set", f"model.hf_path={TINY}"]  # fmt: skip
    assert main(args) == 2
    assert "not available on backbone" in capsys.readouterr().err
    assert not out.exists()


def test_hub_name_without_network_is_a_clear_error_and_never_attempted(tiny_cfg, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("fedmm tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for download in ("false", "true"):  # HF_HUB_OFFLINE wins over model.hf_download
        cfg = tiny_cfg.with_overrides({"model.backbone": "vilt", "model.hf_download": download,
                                       "model.hf_path": "fedmm-tests/no-such-vilt"})  # fmt: skip
        with pytest.raises(RuntimeError) as err:
            build_model(cfg.model, cfg.adapter, 10, cfg.peft)
        msg = str(err.value)
        assert "huggingface-cli download fedmm-tests/no-such-vilt --local-dir" in msg
        assert "model.hf_path=DIR" in msg and "HF_HUB_OFFLINE" in msg
    monkeypatch.delenv("HF_HUB_OFFLINE")
    cfg = tiny_cfg.with_overrides({"model.backbone": "clip"})  # default hub name, downloads off
    with pytest.raises(RuntimeError, match="hf_download = false") as err:
        build_model(cfg.model, cfg.adapter, 10, cfg.peft)
    assert f"huggingface-cli download {FAMILIES['clip'].hub_default} " in str(err.value)


def test_cli_reports_missing_weights_before_any_run(tiny_cfg, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = Path(tiny_cfg.out_dir) / "never"
    args = ["run", "--method", "fedavg", "--out", str(out), "--set", "model.backbone=siglip",
            "--set", f"data.data_dir={tiny_cfg.data.data_dir}", "--set", "model.hf_download=true",
            "--set", "data.train_per_client=10", "--set", "data.test_per_client=10"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"huggingface-cli download {FAMILIES['siglip'].hub_default} --local-dir" in err
    assert "HF_HUB_OFFLINE is set" in err and not out.exists()


def test_local_directory_uses_the_familys_tokenizer_and_image_processor(tiny_cfg, tmp_path):
    from transformers import BertTokenizer, ViltImageProcessor, ViltModel

    from fedmm.backbones.hf_families import _tiny_vilt

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "what", "is", "in", "the", "image"]
    vocab = {w: i for i, w in enumerate(words + [f"w{i}" for i in range(100)])}
    local = tmp_path / "vilt-local"
    BertTokenizer(vocab=vocab).save_pretrained(local)
    ViltImageProcessor(image_mean=[0.1, 0.2, 0.3], image_std=[0.5, 0.5, 0.5]).save_pretrained(local)
    ViltModel(_tiny_vilt()).save_pretrained(local)
    cfg = tiny_cfg.with_overrides({"model.backbone": "vilt", "model.hf_path": str(local)})
    model = build_model(cfg.model, cfg.adapter, 10, cfg.peft)
    ids, mask = model.tokenize(["What is in the image"])
    assert ids[0, :7].tolist() == [2, 5, 6, 7, 8, 9, 3] and mask.sum() == 7  # [CLS] ... [SEP]
    assert torch.allclose(model.image_mean.flatten(), torch.tensor([0.1, 0.2, 0.3]))
    feats = model.encode_images(np.zeros((2, 28, 28), dtype=np.uint8))
    assert feats.shape == (2, *model.visual_token_shape())
    model.peft.ensure_sets(["a"])
    with model.active("a"):
        assert model(feats, ids.expand(2, -1), mask.expand(2, -1)).shape == (2, 10)
    with pytest.raises(RuntimeError, match="cannot load .* from the directory"):
        bad = cfg.with_overrides({"model.hf_path": str(tmp_path)})  # no model there
        build_model(bad.model, bad.adapter, 10, bad.peft)


def test_lora_targets_both_towers_by_default_and_one_tower_by_regex(tiny_cfg):
    cfg = hf_cfg(tiny_cfg, "clip", **{"peft.type": "lora"})
    model = build_model(cfg.model, cfg.adapter, 10, cfg.peft)
    assert isinstance(model.peft, LoraBank)
    towers = {p.split(".")[0] for p in model.peft.paths}
    assert towers == {"vision_model", "text_model"}
    assert {p.rsplit(".", 1)[1] for p in model.peft.paths} == {"q_proj", "v_proj"}
    cfg = cfg.with_overrides({"peft.lora_targets": r"vision_model\..*\.q_proj"})
    model = build_model(cfg.model, cfg.adapter, 10, cfg.peft)
    assert model.peft.paths and all(p.startswith("vision_model") for p in model.peft.paths)
    model.peft.ensure_sets(["a"])  # peft injected exactly these layers, nothing in the text tower
    injected = {n for n, _ in model.hf.named_modules() if n.endswith("lora_A")}
    assert injected == {f"{p}.lora_A" for p in model.peft.paths}
    # BLIP: the vision tower's fused qkv and the text encoder's self-attention query/value
    cfg = hf_cfg(tiny_cfg, "blip", **{"peft.type": "lora"})
    paths = build_model(cfg.model, cfg.adapter, 10, cfg.peft).peft.paths
    assert {p.rsplit(".", 1)[1] for p in paths} == {"qkv", "query", "value"}
    assert not any("crossattention" in p for p in paths)


def test_adapters_sit_after_the_ffn_of_every_block_of_both_towers(tiny_cfg):
    cfg = hf_cfg(tiny_cfg, "blip")
    model = build_model(cfg.model, cfg.adapter, 10, cfg.peft)
    assert isinstance(model.peft, AdapterBank) and model.peft.num_points == 4  # 2 ViT + 2 text
    # per-point widths: a bank over towers of different widths
    bank = AdapterBank([torch.nn.Linear(4, 8), torch.nn.Linear(4, 6)], [8, 6], [2, 3])
    bank.add_set("a")
    assert [a.down.weight.shape for a in bank.sets["a"]] == [(2, 8), (3, 6)]


def _ctx(cfg: FedmmConfig) -> ClientContext:
    runtime = get_runtime(cfg)
    train, test = runtime.client_split(0, "train"), runtime.client_split(0, "test")
    return ClientContext(cfg, runtime.model, train, test, {}, 1, 0, cfg.train.local_steps, 10)


def test_accumulation_matches_the_large_batch_and_counts_optimiser_steps(tiny_cfg):
    base = hf_cfg(tiny_cfg, "vilt", **{"model.dropout": 0.0, "train.local_steps": 2,
                                       "peft.type": "lora"})  # fmt: skip
    states = []
    for bs, k in ((8, 1), (4, 2)):
        cfg = base.with_overrides({"train.batch_size": bs, "train.accumulation": k})
        ctx = _ctx(cfg)
        ctx.model.peft.ensure_sets(["x"])
        ctx.model.reset_trainable(0)
        supervised_update(ctx, "x")
        assert ctx.stats["steps"] == 2
        states.append({k: v.clone() for k, v in ctx.model.peft.state_dict_of("x").items()})
    for key in states[0]:
        assert torch.allclose(states[0][key], states[1][key], atol=1e-5), key


def test_bf16_autocast_trains_in_bf16_and_keeps_fp32_parameters(tiny_cfg):
    cfg = hf_cfg(tiny_cfg, "clip", **{"train.precision": "bf16", "train.local_steps": 1})
    ctx = _ctx(cfg)
    ctx.model.peft.ensure_sets(["x"])
    seen = []
    handle = ctx.model.visual_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    supervised_update(ctx, "x")
    handle.remove()
    assert seen == [torch.bfloat16]
    assert all(p.dtype == torch.float32 for p in ctx.model.peft.parameters_of("x"))
    with pytest.raises(ConfigError, match="train.precision"):
        bound_method(cfg.with_overrides({"train.precision": "fp8"}))


@pytest.mark.parametrize(
    "backbone,peft_type",
    [
        ("vilt", "lora"),
        ("vilt", "adapter"),
        ("tiny", "adapter"),
        ("blip", "adapter"),
        ("clip", "lora"),
    ],
)
def test_gradient_checkpointing_replays_the_active_sets_of_each_forward(
    tiny_cfg, backbone, peft_type
):
    """FedDAT's pattern: two forwards under different active sets, one backward."""
    grads = []
    for ckpt in (False, True):
        cfg = hf_cfg(tiny_cfg, backbone, **{"peft.type": peft_type, "model.dropout": 0.0,
                                            "model.gradient_checkpointing": ckpt})  # fmt: skip
        model = build_model(cfg.model, cfg.adapter, 10, cfg.peft)
        model.peft.ensure_sets(["c", "s"])
        model.reset_trainable(0)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            for p in model.peft.parameters():  # away from the identity init
                torch.nn.init.normal_(p, std=0.2)
            for p in model.peft.parameters():
                p.requires_grad_(True)
            model.train()  # (the tiny backbone has dropout: same masks in both runs)
            feats = model.encode_images(np.arange(4 * 32 * 32, dtype=np.uint8).reshape(4, 32, 32))
            ids, mask = model.tokenize(["a b", "c d e", "f", "g h"])
            with model.active("c", "s", combine="average"):
                z_dat = model(feats, ids, mask)
            with model.active("s"):
                z_s = model(feats, ids, mask)
            (z_dat.square().mean() + (z_s * torch.arange(10.0)).mean()).backward()
        grads.append([p.grad.clone() for p in model.peft.parameters()])
    for a, b in zip(*grads):  # (without the replay, torch's checkpoint raises or grads differ)
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_a_row_without_its_image_never_sees_pixels(tiny_cfg, family):
    """The (B, L + T_img) mask hides the image: that row's logits ignore its placeholder."""
    cfg = hf_cfg(tiny_cfg, family, **{"model.dropout": 0.0})
    model = build_model(cfg.model, cfg.adapter, 10, cfg.peft).eval()
    model.peft.ensure_sets(["a"])
    rng = np.random.default_rng(0)
    feats = model.encode_images(rng.integers(0, 255, (3, 32, 32, 3), dtype=np.uint8))
    ids, mask = model.tokenize(["a red bar", "what is it", "b"])
    full = torch.cat([mask, torch.tensor([1, 0, 1])[:, None].expand(-1, feats.shape[1])], 1)
    other = feats.clone()
    other[1] = torch.randn_like(other[1])
    with torch.no_grad(), model.active("a"):
        z, z_other = model(feats, ids, full), model(other, ids, full)
        z_seen = model(other, ids, torch.ones_like(full))
    assert torch.allclose(z[1], z_other[1], atol=1e-5)
    assert not torch.allclose(z[1], z_seen[1], atol=1e-5)  # with the mask on, pixels matter


@pytest.mark.usefixtures("flower_task_identity")
@pytest.mark.parametrize("family", ["vilt", "blip"])
def test_tap_on_task_and_modality_heterogeneity_with_every_memory_option(tiny_cfg, family):
    """TAP on fmnist-task (text-only and image-only clients), checkpointing + bf16 + accumulation."""
    cfg = hf_cfg(tiny_cfg, family, **{
        "method": "tap", "data.benchmark": "fmnist-task", "fed.clients": 6, "fed.rounds": 1,
        "tap.teacher_steps": 1, "tap.distill_steps": 1, "train.local_steps": 2,
        "model.gradient_checkpointing": True, "train.precision": "bf16", "train.accumulation": 2,
    }).resolved()  # fmt: skip
    grid = InProcessGrid(6)
    record = run_federation(grid, cfg)
    assert record["history"][0]["failures"] == 0
    assert all(s["steps"] == 2 for s in record["history"][0]["train"].values())
