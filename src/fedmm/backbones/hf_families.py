"""The Hugging Face families fedmm knows (ViLT, CLIP, SigLIP, BLIP): what to load, the default LoRA
targets, why a PEFT type is refused, a tiny config for tests.  Imports neither torch nor
``transformers`` (a tiny config imports ``transformers`` when it is built); the models are
``fedmm.backbones.hf``'s."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

TINY = "tiny-random"
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)


# ---------------------------------------------------------------------- families
@dataclass(frozen=True)
class Family:
    """One ``transformers`` family: what to load, where LoRA goes by default, a tiny config."""

    name: str
    hf_class: str  # the transformers class loaded from hf_path
    hub_default: str  # hf_path when it is ""
    lora_targets: str  # default peft.lora_targets (comma-separated; regexes over module paths)
    image_mean: tuple[float, float, float]  # used by tiny-random (real: the image processor's)
    image_std: tuple[float, float, float]
    tiny_config: Callable[[], object]
    no_prompt: str = ""  # why prompt tuning is refused ("" = supported)


def _tiny_layers(**extra) -> dict:
    return dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2,
                **extra)  # fmt: skip


def _tiny_text(eos: int) -> dict:
    return _tiny_layers(vocab_size=512, max_position_embeddings=64, pad_token_id=0,
                        bos_token_id=1, eos_token_id=eos)  # fmt: skip


def _tiny_vilt():
    from transformers import ViltConfig

    return ViltConfig(**_tiny_layers(), vocab_size=512, max_position_embeddings=64, image_size=32,
                      patch_size=16, pad_token_id=0)  # fmt: skip


def _tiny_clip():
    from transformers import CLIPConfig

    return CLIPConfig(text_config=_tiny_text(eos=3), projection_dim=16,
                      vision_config=_tiny_layers(image_size=32, patch_size=16))  # fmt: skip


def _tiny_siglip():
    from transformers import SiglipConfig

    return SiglipConfig(text_config=_tiny_text(eos=2),
                        vision_config=_tiny_layers(image_size=32, patch_size=16))  # fmt: skip


def _tiny_blip():
    from transformers import BlipConfig

    return BlipConfig(text_config={**_tiny_text(eos=2), "sep_token_id": 2}, projection_dim=16,
                      image_text_hidden_size=16,
                      vision_config=_tiny_layers(image_size=32, patch_size=16))  # fmt: skip


TWO_TOWER_QV = r"(vision|text)_model\.(.*\.)?encoder\.layers\.\d+\.self_attn\.(q|v)_proj"
NO_JOINT_SEQUENCE = (
    "prompt tokens are prepended to a joint text+image sequence, which this family does not "
    "have (two towers); use adapter, lora or bitfit, or the single-stream vilt"
)
FAMILIES: dict[str, Family] = {
    "vilt": Family("vilt", "ViltModel", "dandelin/vilt-b32-mlm", "query,value",
                   HALF, HALF, _tiny_vilt),
    "clip": Family("clip", "CLIPModel", "openai/clip-vit-base-patch32", TWO_TOWER_QV,
                   OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, _tiny_clip, NO_JOINT_SEQUENCE),
    "siglip": Family("siglip", "SiglipModel", "google/siglip-base-patch16-224", TWO_TOWER_QV,
                     HALF, HALF, _tiny_siglip, NO_JOINT_SEQUENCE),
    "blip": Family(
        "blip", "BlipForImageTextRetrieval", "Salesforce/blip-itm-base-coco",
        r"vision_model\.encoder\.layers\.\d+\.self_attn\.qkv,"
        r"text_encoder\.encoder\.layer\.\d+\.attention\.self\.(query|value)",
        OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, _tiny_blip, NO_JOINT_SEQUENCE,
    ),
}  # fmt: skip
