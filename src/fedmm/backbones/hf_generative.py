"""Hugging Face generative vision-language models by name (``AutoModelForImageTextToText``).

``model.backbone`` names the family, ``model.hf_path`` where its weights come from (as for the
classification families, ``fedmm.backbones.hf``): a hub name (default: the family's
``hub_default``), read from the local Hugging Face cache only unless ``model.hf_download = true``
(and ``HF_HUB_OFFLINE`` is not set; a site allows that with ``allow-download``); or a local
directory holding the model, its processor and tokenizer (a site's ``model-dir``).

    family      transformers model (model_type)                 connector (part ``proj``)
    smolvlm     Idefics3 / SmolVLM (idefics3, smolvlm)          model.connector (pixel shuffle + linear)
    qwen2-vl    Qwen2-VL / Qwen2.5-VL (qwen2_vl, qwen2_5_vl)    model.visual.merger (patch merger MLP)
    llava       LLaVA-1.5 (llava)                               model.multi_modal_projector (MLP)
    llava-next  LLaVA-NeXT / LLaVA-1.6 (llava_next)             model.multi_modal_projector (MLP)
    paligemma   PaliGemma (paligemma; Gemma licence)            model.multi_modal_projector (linear)

What trains and travels: the PEFT sets on the language model (LoRA by default on every decoder
layer's q, k, v, o, gate, up and down projections -- regexes over module paths, so the vision
tower's projections are never matched; or bottleneck adapters after each decoder layer) and the
family's own connector, trained in full from its pretrained weights (part ``proj``; reset to those
weights, never to random ones).  The vision tower, the embeddings and the language model are
frozen.  Prompt tuning and BitFit are refused.

Images go through the family's image processor (its own resize and normalisation): the processed
``pixel_values`` of a record are its cached "features", ``(N, ...)`` of one shape per record.
SmolVLM/Idefics3 runs without image splitting (one global image per record, resized to the
processor's ``max_image_size``); Qwen2-VL's images are first resized to a square of side
``model.image_size`` (its processor keeps aspect ratios and sizes to multiples of 28, so a fixed
square gives every record the same patch grid); LLaVA-NeXT's too (its any-resolution tiling picks
the grid pinpoint that fits each image's size and adds one crop per tile beside the base image,
so a fixed square gives every record the same crop count, ``image_sizes`` and image-token count;
its learned ``image_newline`` stays frozen).  A record's prompt is the family's chat template
(PaliGemma: ``<image>…<bos>question\\n``) with the image expanded by the family's processor; a
text-only record's prompt has no image tokens at all and no pixels are passed for it.

Training is ``fedmm.generation``'s: next-token loss on the answer and the end-of-turn token only
(label -100 elsewhere), through the family's own forward (which puts the connector's image
features at the image tokens; Qwen2-VL: with its multimodal rotary positions).  Evaluation:
batched greedy decoding with the KV cache and left padding, at most ``eval.max_new_tokens`` new
tokens, stopping at the end-of-turn token -- the loop is the family's ``generate`` (it owns the
family's position bookkeeping, e.g. Qwen2-VL's rope deltas), called with ``do_sample=False``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedmm.backbones.fusion import VLModel
from fedmm.backbones.generative import ChatTokenizer, OneLanguageModel, _check_not_classifier
from fedmm.config import ConfigError
from fedmm.peft.build import PeftTarget, build_bank
from fedmm.sections import AdapterConfig, ModelConfig, PeftConfig

log = logging.getLogger(__name__)

# LoRA's default targets, full-matched against module paths inside the language model
DECODER = r"layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
NO_PROMPT = (
    "the family's own forward places the image features at its image tokens of input_ids; "
    "prompt embeddings prepended to the sequence would bypass it -- use lora or adapter"
)
NO_BITFIT = (
    "the decoders of these families have (almost) no biases to tune (Llama, Gemma: none; Qwen2: "
    "q/k/v only) -- use lora or adapter"
)


@dataclass(frozen=True)
class GenerativeFamily:
    """One family of ``AutoModelForImageTextToText`` models."""

    name: str
    model_types: tuple[str, ...]  # config.model_type values this family loads
    hub_default: str
    lm_path: str  # the language model (decoder layers under ``<lm_path>.layers``)
    connector: str  # the trainable image-to-LM connector (part ``proj``)
    end_of_turn: tuple[str, ...] = ()  # the answer's end token, first found (else eos_token)
    licence: str = ""
    lora_targets: str = DECODER  # regexes over module paths of the language model (lm_path)


FAMILIES: dict[str, GenerativeFamily] = {
    "smolvlm": GenerativeFamily(
        "smolvlm", ("idefics3", "smolvlm"), "HuggingFaceTB/SmolVLM-256M-Instruct",
        "model.text_model", "model.connector", ("<end_of_utterance>",),
    ),
    "qwen2-vl": GenerativeFamily(
        "qwen2-vl", ("qwen2_vl", "qwen2_5_vl"), "Qwen/Qwen2-VL-2B-Instruct",
        "model.language_model", "model.visual.merger", ("<|im_end|>",),
    ),
    "llava": GenerativeFamily(
        "llava", ("llava",), "llava-hf/llava-1.5-7b-hf", "model.language_model",
        "model.multi_modal_projector",
    ),
    "llava-next": GenerativeFamily(
        "llava-next", ("llava_next",), "llava-hf/llava-v1.6-mistral-7b-hf",
        "model.language_model", "model.multi_modal_projector",
    ),
    "paligemma": GenerativeFamily(
        "paligemma", ("paligemma",), "google/paligemma-3b-mix-224", "model.language_model",
        "model.multi_modal_projector", (),
        "Gemma Terms of Use (accept them on the hub before downloading the weights)",
    ),
}  # fmt: skip


SQUARE = ("qwen2-vl", "llava-next")  # images resized to a model.image_size square first


# ---------------------------------------------------------------------- loading
def _offline_env() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}


def load_generative(family: GenerativeFamily, model_cfg: ModelConfig):
    """``(model, processor)`` of ``family`` from ``model.hf_path`` (or the family's default):
    a local directory, or a hub name from the local cache (downloads only with
    ``model.hf_download``).  ``RuntimeError`` naming the source when it cannot be loaded, or
    when it holds another family's model."""
    import transformers

    if model_cfg.hf_path == "tiny-random":  # the classification families' test config
        raise ConfigError(f"backbone {family.name}: model.hf_path='tiny-random' names no model "
                          "here; give a local directory or a hub name")  # fmt: skip
    source = model_cfg.hf_path or family.hub_default
    offline = _offline_env() or not model_cfg.hf_download
    try:  # never code from the model's repository: the families are transformers' own classes
        model = transformers.AutoModelForImageTextToText.from_pretrained(
            source, local_files_only=offline, dtype=torch.float32, trust_remote_code=False
        )
        processor = transformers.AutoProcessor.from_pretrained(
            source, local_files_only=offline, trust_remote_code=False
        )
    except (OSError, ValueError) as exc:
        if Path(source).expanduser().is_dir():
            raise RuntimeError(
                f"backbone {family.name}: cannot load the model and processor from the "
                f"directory {source}: {exc}"
            ) from exc
        why = ("HF_HUB_OFFLINE is set" if _offline_env() else
               "downloads are off (model.hf_download = false)" if offline else
               "the download failed")  # fmt: skip
        raise RuntimeError(
            f"backbone {family.name}: {source!r} is neither a local directory nor in the local "
            f"Hugging Face cache, and {why}. Download it once with `huggingface-cli download "
            f"{source} --local-dir DIR` and pass --set model.hf_path=DIR (or allow downloads "
            f"with --set model.hf_download=true on a machine with network access). "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    kind = model.config.model_type
    if kind not in family.model_types:
        raise RuntimeError(
            f"backbone {family.name}: {source} holds a {kind!r} model; this family loads "
            f"{', '.join(family.model_types)} (choose the backbone of that family)"
        )
    return model.eval(), processor


def _rgb(image: np.ndarray, square: int = 0):
    """uint8 ``(H, W)`` or ``(H, W, 3)`` -> an RGB PIL image (resized to ``square`` if > 0)."""
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(image)).convert("RGB")
    return img.resize((square, square), Image.BICUBIC) if square else img


def _submodule(root: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        root = getattr(root, part)
    return root


# ---------------------------------------------------------------------- the model
class HFGenerativeVLModel(OneLanguageModel, VLModel):
    """A frozen ``AutoModelForImageTextToText`` with named PEFT sets and a trainable connector.

    ``feats`` are the processor's ``pixel_values`` per record; ``input_ids`` carry the family's
    image tokens for the rows that have an image (``prompt_ids``).  ``forward`` returns the
    next-token logits ``(B, L, V)`` of every position; ``generate`` greedy answers.
    """

    generative = True

    def __init__(
        self,
        family: GenerativeFamily,
        model_cfg: ModelConfig,
        adapter_cfg: AdapterConfig,
        peft_cfg: PeftConfig | None = None,
    ) -> None:
        super().__init__()
        self.family, self.backbone_name, self.model_cfg = family, family.name, model_cfg
        self.hf, self.processor = load_generative(family, model_cfg)
        if family.name == "smolvlm":  # one global image per record: a fixed token count
            self.processor.image_processor.do_image_splitting = False
        for p in self.hf.parameters():
            p.requires_grad_(False)
        self.vision_id = f"{family.name}:{model_cfg.hf_path or family.hub_default}"
        config = self.hf.config
        text_cfg = config.get_text_config()
        self.hidden_size = text_cfg.hidden_size
        self.context = int(getattr(text_cfg, "max_position_embeddings", 0) or 0)
        self.image_token_id = int(config.image_token_id)
        tok = self.processor.tokenizer
        vocab = tok.get_vocab()
        end = next((vocab[t] for t in family.end_of_turn if t in vocab), tok.eos_token_id)
        pad = tok.pad_token_id if tok.pad_token_id is not None else end
        self.chat = ChatTokenizer(
            encode=lambda text: tok.encode(text, add_special_tokens=False),
            decode=lambda ids: tok.decode(ids, skip_special_tokens=True),
            prompt=lambda q: ([], self.prompt_ids(q, None)[0]), eos_id=int(end), pad_id=int(pad),
        )  # fmt: skip
        lm = self._decoder = _submodule(self.hf, family.lm_path)
        layers = list(lm.layers)
        # PEFT searches the language model only: the vision tower and the connector are outside
        # it (and PEFT's injection freezes the rest of the module it is given, not the connector)
        self.peft = build_bank(peft_cfg or PeftConfig(), adapter_cfg, PeftTarget(
            lm, layers, [self.hidden_size] * len(layers), None, None,
            family.lora_targets, NO_PROMPT, family.name,
        ))  # fmt: skip
        self.visual_proj = _submodule(self.hf, family.connector)  # trained in full
        for p in self.visual_proj.parameters():
            p.requires_grad_(True)
        self._pretrained_proj = {k: v.clone() for k, v in self.visual_proj.state_dict().items()}
        self.head = nn.Module()  # no task head: the LM's own output layer answers
        self.active_task = ""
        self.num_answers = 0
        # a fixed square: one patch grid (qwen2-vl) / one tile count (llava-next) per record
        self._square = model_cfg.image_size if family.name in SQUARE else 0
        # the per-record pixel shape (of a blank image's pixels: measured, never fed)
        blank = np.zeros((model_cfg.image_size,) * 2, np.uint8)
        self._pixel_shape = tuple(self.encode_images(blank[None]).shape[1:])
        with_image, text_only = self.prompt_ids("", np.zeros((8, 8), np.uint8)), self.prompt_ids(
            "", None)  # fmt: skip
        self.image_tokens = len(with_image[0]) - len(text_only[0])

    # ------------------------------------------------------------------ VLModel interface
    def decoder(self) -> nn.Module:
        return self._decoder

    def frozen_modules(self) -> list[nn.Module]:
        return [self.hf]  # eval mode always (its dropout stays off); the connector trains

    def set_backbone_dropout(self, p: float) -> None:
        if p != -1:
            raise ConfigError(
                f"model.backbone_dropout={p} has no effect on the generative backbone "
                f"{self.backbone_name!r}: its frozen model runs in eval mode; leave it -1"
            )

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        raise ConfigError(
            f"backbone {self.backbone_name!r} is generative: its tasks have text targets "
            "(--set data.task_kind=generate), not a label list"
        )

    def visual_token_shape(self) -> tuple[int, ...]:
        return self._pixel_shape

    @property
    def device(self) -> torch.device:
        return next(self.visual_proj.parameters()).device

    def frozen_state_keys(self) -> set[str]:
        proj = f"hf.{self.family.connector}."
        return {f"hf.{k}" for k in self.hf.state_dict()
                if "lora_" not in k and not f"hf.{k}".startswith(proj)}  # fmt: skip

    def reset_trainable(self, seed: int) -> None:
        """The connector back to its pretrained weights; every PEFT set reset by ``seed``."""
        import zlib

        self.visual_proj.load_state_dict(self._pretrained_proj)
        with torch.random.fork_rng(devices=[]):
            for name in sorted(self.peft.sets):
                torch.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
                self.peft.reset_set(name)

    # ------------------------------------------------------------------ images and prompts
    def _per_record(self, out) -> torch.Tensor:
        """The image processor's output as one tensor per record ``(N, *pixel_shape)``."""
        pixels = out["pixel_values"]
        if self.family.name == "smolvlm":  # (N, crops=1, 3, H, W)
            return pixels[:, 0]
        if self.family.name == "qwen2-vl":  # (N·P, C·T·p·p), every record the same grid
            grid = out["image_grid_thw"]
            return pixels.view(len(grid), int(grid[0].prod()), -1)
        return pixels  # llava-next: (N, 1 + tiles, 3, H, W), one square size for every record

    @torch.no_grad()
    def encode_images(self, images: np.ndarray, batch_size: int = 64) -> torch.Tensor:
        """uint8 ``(N, H, W[, 3])`` -> the family processor's pixels ``(N, *pixel_shape)``."""
        out = []
        for start in range(0, len(images), batch_size):
            batch = [_rgb(img, self._square) for img in images[start : start + batch_size]]
            if self.family.name == "smolvlm":  # a flat list would be one record's images
                batch = [[img] for img in batch]
            out.append(
                self._per_record(self.processor.image_processor(images=batch, return_tensors="pt"))
            )
        return torch.cat(out)

    def prompt_ids(self, question: str, image: np.ndarray | None) -> tuple[list[int], int]:
        """``(ids, text tokens)``: the record's prompt ending where the answer starts, its image
        expanded into the family's image tokens by the processor (none when ``image`` is None);
        ``text tokens`` is the prompt's length without them."""
        proc = self.processor
        if self.family.name == "paligemma":  # no chat template: <image>… <bos> prefix \n
            text = proc.tokenizer.bos_token + question + "\n"
            plain = proc.tokenizer.encode(text, add_special_tokens=False)
            if image is None:
                return plain, len(plain)
            ids = proc(text=[question], images=[_rgb(image)])["input_ids"][0]
            return list(ids), len(plain)
        content = [{"type": "text", "text": question}]
        plain_text = proc.apply_chat_template([{"role": "user", "content": content}],
                                              add_generation_prompt=True, tokenize=False)  # fmt: skip
        plain = proc.tokenizer.encode(plain_text, add_special_tokens=False)
        if image is None:
            return plain, len(plain)
        text = proc.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, *content]}],
            add_generation_prompt=True, tokenize=False,
        )  # fmt: skip
        enc = proc(text=[text], images=[_rgb(image, self._square)], add_special_tokens=False)
        return list(enc["input_ids"][0]), len(plain)

    def _vision_inputs(self, feats: torch.Tensor, ids: torch.Tensor) -> dict:
        """The family's keyword inputs for the rows of ``ids`` that hold image tokens."""
        present = (ids == self.image_token_id).any(1)
        kwargs: dict = {}
        if self.family.name == "qwen2-vl":
            kwargs["mm_token_type_ids"] = (ids == self.image_token_id).int()
        if self.family.name == "paligemma":
            # every position causal (type 1): without token types PaliGemma's forward attends
            # bidirectionally over an unpadded row but causally over a padded one (transformers
            # 5.23); PaliGemma's own prefix-LM mask would need the prompt's end, which forward
            # does not see
            kwargs["token_type_ids"] = torch.ones_like(ids)
        if not bool(present.any()):
            return kwargs
        pixels = feats[present].to(self.device)
        if self.family.name == "smolvlm":
            return {**kwargs, "pixel_values": pixels[:, None]}
        if self.family.name == "qwen2-vl":
            g = int(round(pixels.shape[1] ** 0.5))
            if g * g != pixels.shape[1]:
                raise RuntimeError(f"qwen2-vl: {pixels.shape[1]} patches are not a square grid")
            grid = torch.tensor([[1, g, g]] * len(pixels), device=self.device)
            return {**kwargs, "pixel_values": pixels.flatten(0, 1), "image_grid_thw": grid}
        if self.family.name == "llava-next":  # every image was resized to the same square
            sizes = torch.tensor([[self._square, self._square]] * len(pixels), device=self.device)
            return {**kwargs, "pixel_values": pixels, "image_sizes": sizes}
        return {**kwargs, "pixel_values": pixels}

    # ------------------------------------------------------------------ forward / generate
    def forward(
        self, feats: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """Next-token logits ``(B, L, V)`` at every position of ``input_ids``; with ``keep``
        (bool ``(B, L)``) only at the kept positions, ``(N, V)`` in row-major order (the output
        layer then runs at the answer positions only: ``methods.losses.supervised_loss``)."""
        mask = attention_mask[:, : input_ids.shape[1]]  # a presence column block, if any, dropped
        extra = self._vision_inputs(feats, input_ids)
        hidden = self.hf.model(
            input_ids=input_ids, attention_mask=mask, use_cache=False, **extra
        ).last_hidden_state
        logits = self.hf.lm_head(hidden if keep is None else hidden[keep])
        cap = getattr(self.hf.config.get_text_config(), "final_logit_softcapping", None)
        if cap is not None:  # PaliGemma 2 (Gemma 2), as its own forward does
            logits = torch.tanh(logits / cap) * cap
        return logits

    @torch.no_grad()
    def generate(
        self, feats: torch.Tensor, prompts: list[list[int]], max_new_tokens: int
    ) -> list[list[int]]:
        """Greedy decoding of every prompt, left-padded into one batch (the family's
        ``generate`` with its KV cache); a row stops at ``eos_id`` (not returned) or after
        ``max_new_tokens`` tokens."""
        ids, mask = self.left_padded(prompts, max_new_tokens)
        width = ids.shape[1]
        out = self.hf.generate(
            input_ids=ids, attention_mask=mask, **self._vision_inputs(feats, ids),
            max_new_tokens=max_new_tokens, min_new_tokens=0, do_sample=False, num_beams=1,
            use_cache=True, eos_token_id=self.chat.eos_id, pad_token_id=self.chat.pad_id,
        )[:, width:].tolist()  # fmt: skip
        rows = []
        for row in out:
            rows.append(row[: row.index(self.chat.eos_id)] if self.chat.eos_id in row else row)
        return rows


# ---------------------------------------------------------------------- builders
def builder(name: str):
    family = FAMILIES[name]

    def build(model_cfg, adapter_cfg, num_answers, peft_cfg=None) -> HFGenerativeVLModel:
        _check_not_classifier(name, num_answers)
        return HFGenerativeVLModel(family, model_cfg, adapter_cfg, peft_cfg)

    return build


def _register() -> None:
    from fedmm.backbones import MODEL_BUILDERS, UNSUPPORTED_PEFT

    for name in FAMILIES:
        MODEL_BUILDERS[name] = builder(name)
        UNSUPPORTED_PEFT[name] = {"prompt": NO_PROMPT, "bitfit": NO_BITFIT}


_register()
