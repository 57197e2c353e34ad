"""Tiny random Hugging Face generative VLMs saved to a directory, built offline (no download).

For each family: the ``transformers`` config with tiny sizes (2 decoder layers, width 32), the
model with random weights, a byte-level BPE tokenizer built with ``tokenizers`` (the 256 byte
symbols and the family's special tokens; no merges), the family's own image processor with a
small image size, and a minimal chat template; ``model.hf_path`` can then name the directory.
"""

from __future__ import annotations

from pathlib import Path

import torch

TEMPLATE = (
    "{% for m in messages %}<|user|>{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    "<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def byte_tokenizer(specials: list[str], eos: str, pad: str = "<pad>", bos: str = "<s>"):
    """A ``PreTrainedTokenizerFast`` over the 256 byte-level symbols plus ``specials``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate([pad, bos, eos, *sorted(alphabet)])}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token=pad, bos_token=bos, eos_token=eos)
    tok.add_special_tokens({"additional_special_tokens": specials})
    return tok


def _text(vocab: int, **extra) -> dict:
    return dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **extra,
    )


def _vision(**extra) -> dict:
    return dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, **extra
    )


def _vocab(tok) -> int:
    return len(tok) + (-len(tok)) % 8


def build_smolvlm(root: Path) -> None:
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
    )

    tok = byte_tokenizer(
        [
            "<fake_token_around_image>",
            "<image>",
            "<end_of_utterance>",
            "<global-img>",
            "<|user|>",
            "<|end|>",
            "<|assistant|>",
        ],
        eos="<end_of_utterance>",
    )
    image_proc = Idefics3ImageProcessor(  # splitting on, as SmolVLM's own: fedmm turns it off
        size={"longest_edge": 64}, max_image_size={"longest_edge": 32}, do_image_splitting=True
    )
    config = Idefics3Config(
        vision_config=_vision(image_size=32, patch_size=8),
        scale_factor=2,
        text_config=_text(_vocab(tok), model_type="llama"),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        tie_word_embeddings=False,
    )
    proc = Idefics3Processor(image_proc, tok, image_seq_len=4, chat_template=TEMPLATE)
    _save(root, Idefics3ForConditionalGeneration, config, proc)


def build_qwen2_vl(root: Path, v25: bool = False) -> None:
    """Qwen2-VL, or with ``v25`` Qwen2.5-VL (windowed vision attention, SwiGLU vision MLP)."""
    import transformers
    from transformers import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    name = "Qwen2_5_VL" if v25 else "Qwen2VL"
    tok = byte_tokenizer(
        [
            "<|vision_start|>",
            "<|vision_end|>",
            "<|image_pad|>",
            "<|video_pad|>",
            "<|im_end|>",
            "<|user|>",
            "<|end|>",
            "<|assistant|>",
        ],
        eos="<|endoftext|>",
    )
    ids = tok.convert_tokens_to_ids
    pix = dict(
        patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=8 * 8, max_pixels=32 * 32
    )
    vision = dict(depth=2, hidden_size=32, num_heads=2, patch_size=4, spatial_merge_size=2,
                  temporal_patch_size=2)  # fmt: skip
    if v25:
        vision |= dict(intermediate_size=64, out_hidden_size=32, window_size=16,
                       fullatt_block_indexes=[1])  # fmt: skip
    else:
        vision |= dict(embed_dim=32, mlp_ratio=2)
    config = getattr(transformers, f"{name}Config")(
        text_config=_text(
            _vocab(tok), rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1]}
        ),
        vision_config=vision,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    template = TEMPLATE.replace("<image>", "<|vision_start|><|image_pad|><|vision_end|>")
    proc = getattr(transformers, f"{name}Processor")(
        Qwen2VLImageProcessor(**pix), tok, Qwen2VLVideoProcessor(**pix), chat_template=template
    )
    _save(root, getattr(transformers, f"{name}ForConditionalGeneration"), config, proc)


def build_llava(root: Path, next_: bool = False) -> None:
    """LLaVA-1.5, or with ``next_`` LLaVA-NeXT: the same parts with any-resolution tiling over
    small grid pinpoints (a 32-px square image is the base image plus one 32x32 tile: 2 crops)."""
    import transformers

    name = "LlavaNext" if next_ else "Llava"
    tok = byte_tokenizer(["<image>", "<|user|>", "<|end|>", "<|assistant|>"], eos="</s>")
    pinpoints = {"image_grid_pinpoints": [[32, 32], [32, 64], [64, 32], [64, 64]]} if next_ else {}
    config = getattr(transformers, f"{name}Config")(
        vision_config=dict(
            model_type="clip_vision_model",
            **_vision(image_size=32, patch_size=8, projection_dim=32),
        ),
        text_config=_text(_vocab(tok), model_type="llama"),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        **pinpoints,
    )
    image_proc = getattr(
        transformers, "LlavaNextImageProcessor" if next_ else "CLIPImageProcessor"
    )(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, **pinpoints)
    proc = getattr(transformers, f"{name}Processor")(
        image_proc,
        tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        chat_template=TEMPLATE,
        num_additional_image_tokens=1,
    )
    _save(root, getattr(transformers, f"{name}ForConditionalGeneration"), config, proc)


def build_paligemma(root: Path) -> None:
    from transformers import (
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipImageProcessor,
    )

    tok = byte_tokenizer(["<image>"], eos="<eos>", bos="<bos>")
    config = PaliGemmaConfig(
        vision_config=dict(
            model_type="siglip_vision_model",
            **_vision(image_size=32, patch_size=8),
            projection_dim=32,
        ),
        text_config=dict(model_type="gemma", head_dim=8, **_text(_vocab(tok))),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        projection_dim=32,
    )
    config.text_config.num_image_tokens = 16
    image_proc = SiglipImageProcessor(size={"height": 32, "width": 32}, image_seq_length=16)
    proc = PaliGemmaProcessor(image_proc, tok)
    _save(root, PaliGemmaForConditionalGeneration, config, proc)


def _save(root: Path, cls, config, proc) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        model = cls(config)
    root.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(root)
    proc.save_pretrained(root)


BUILDERS = {"smolvlm": build_smolvlm, "qwen2-vl": build_qwen2_vl,
    "qwen2.5-vl": lambda root: build_qwen2_vl(root, v25=True), "llava": build_llava,
    "llava-next": lambda root: build_llava(root, next_=True), "paligemma": build_paligemma}  # fmt: skip
