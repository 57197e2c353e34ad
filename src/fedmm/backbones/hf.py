"""Hugging Face vision-language backbones by family name: ViLT, CLIP, SigLIP, BLIP.

``model.backbone`` names the family, ``model.hf_path`` where its weights come from:

* a hub name (default: the family's ``hub_default``) -- loaded from the local Hugging Face cache
  only, unless ``model.hf_download = true`` (and ``HF_HUB_OFFLINE`` is not set); a model that is
  not there is a clear error telling how to download it, never a hanging download;
* a local directory (``huggingface-cli download NAME --local-dir DIR``) with the model, its
  tokenizer and its image processor;
* ``tiny-random``: the family's architecture from a tiny config (2 layers, width 32, 32-px images)
  with random weights and an offline hashing tokenizer -- for tests; never for real runs.

Every family is a ``VLModel`` with the default backbone's contract: the whole ``transformers``
model is frozen; the trainable parts are the named PEFT sets (``model.peft``), ``visual_proj``
(the ``proj`` part on the wire: a linear map of the family's fused features) and the task head(s).

    family  fusion -> features f                                         visual_proj
    vilt    single stream [text ; image patches] -> [pooler ; mean H_text ; mean H_image]   3d -> d
    clip    dual encoder: image e_i, text e_t (projected) -> [e_i ; e_t ; e_i ⊙ e_t]         3p -> p
    siglip  dual encoder: image e_i (MAP head), text e_t (last token) -> [e_i ; e_t ; e_i ⊙ e_t]
    blip    image-grounded text encoder (text cross-attends to image states, as BLIP's ITM)
            -> [H_cls ; mean H_text ; image [CLS]]                                   2d_t+d_v -> d_t

Adapters sit after every block's FFN on the residual stream (both towers of two-tower families);
LoRA targets are per family (``FAMILIES[...].lora_targets``, regexes over full module paths, so a
vision and a text ``q_proj`` are never confused).  Images: ``encode_images`` only resizes and
normalises (the family's image processor's mean/std and rescale factor) and cuts patches -- the
towers hold PEFT modules, so nothing more can be cached.  Text: the family's tokenizer.
A record without an image has the image masked out (ViLT: its visual tokens; BLIP: the
cross-attention keys are zeroed; CLIP/SigLIP: e_i = 0): no image is made up.

This module holds the models; the families (torch-free) are ``hf_families``'s, loading and the
the PEFT sets ``fedmm.peft.build``'s.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedmm.backbones.checkpointing import enable_checkpointing
from fedmm.backbones.fusion import VLModel, masked_mean
from fedmm.backbones.hf_families import FAMILIES, Family
from fedmm.backbones.hf_loading import load_family
from fedmm.config import ConfigError
from fedmm.peft import PromptBank
from fedmm.peft.build import PeftTarget, build_bank
from fedmm.sections import AdapterConfig, ModelConfig, PeftConfig


# ---------------------------------------------------------------------- the models
class HFVLModel(VLModel):
    """What the four families share: loading, freezing, PEFT, pixels as cached 'features'.

    ``encode_images`` returns the normalised pixels cut into patches, ``(N, P, 3·p·p)`` with
    ``P = (S/p)²`` (S = ``model.image_size``; p = patch size): the
    towers carry PEFT modules, so resizing and normalising is all the frozen, cacheable work.
    Subclasses set the adapter insertion points and implement ``fuse``.
    """

    family: Family

    def __init__(
        self,
        model_cfg: ModelConfig,
        adapter_cfg: AdapterConfig,
        num_answers: int | dict[str, int],
        peft_cfg: PeftConfig | None = None,
    ) -> None:
        super().__init__()
        self.backbone_name = self.family.name
        self.model_cfg = model_cfg
        loaded = load_family(self.family, model_cfg)
        self.hf = loaded.model
        for p in self.hf.parameters():
            p.requires_grad_(False)
        self.tokenizer, self.pad_id = loaded.tokenize, loaded.pad_id
        self.register_buffer("image_mean", torch.tensor(loaded.image_mean).view(1, 3, 1, 1), False)
        self.register_buffer("image_std", torch.tensor(loaded.image_std).view(1, 3, 1, 1), False)
        self.rescale = loaded.rescale
        vision_cfg = getattr(self.hf.config, "vision_config", self.hf.config)
        self.patch, self.native_size = int(vision_cfg.patch_size), int(vision_cfg.image_size)
        self.image_size = model_cfg.image_size
        if self.image_size <= 0 or self.image_size % self.patch:
            raise ConfigError(
                f"model.image_size={self.image_size} must be a positive multiple of "
                f"{self.family.name}'s patch size {self.patch} (its native size: "
                f"{self.native_size})"
            )
        points, dims = self.adapter_points()
        self.peft = build_bank(peft_cfg or PeftConfig(), adapter_cfg, PeftTarget(
            self.hf, points, dims, self.word_embeddings(), self.bitfit_scope(),
            self.family.lora_targets, self.family.no_prompt, self.family.name,
        ))  # fmt: skip
        in_dim, self.hidden_size = self.fused_dims()
        self.visual_proj = nn.Linear(in_dim, self.hidden_size)
        self._init_heads(self.hidden_size, model_cfg, num_answers)
        if model_cfg.gradient_checkpointing:
            enable_checkpointing(self.hf, self.peft)

    # ------------------------------------------------------------------ per family
    def adapter_points(self) -> tuple[list[nn.Module], list[int]]:
        raise NotImplementedError

    def fused_dims(self) -> tuple[int, int]:
        """``(width of fuse's output, width of the projected features the head reads)``."""
        raise NotImplementedError

    def word_embeddings(self) -> nn.Embedding | None:
        return None

    def bitfit_scope(self) -> nn.Module | None:
        """The modules whose biases BitFit tunes (None: the whole model)."""
        return None

    def fuse(
        self, pixels: torch.Tensor, present: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Fused features ``(B, in_dim)`` of images ``pixels`` (rows with ``present`` 0 have no
        image) and text ``ids``/``mask``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ shared
    @property
    def interpolate(self) -> bool:
        return self.image_size != self.native_size

    def visual_token_shape(self) -> tuple[int, int]:
        return ((self.image_size // self.patch) ** 2, 3 * self.patch * self.patch)

    def frozen_modules(self) -> list[nn.Module]:
        return []  # the families' towers have no batch norm; their dropout is 0 by default

    def backbone_tower(self) -> nn.Module:
        return self.hf

    @torch.no_grad()
    def encode_images(self, images: np.ndarray, batch_size: int = 128) -> torch.Tensor:
        """uint8 ``(N, H, W)`` or ``(N, H, W, 3)`` -> normalised patches ``(N, P, 3·p·p)``."""
        out = []
        for start in range(0, len(images), batch_size):
            x = _to_float_rgb(images[start : start + batch_size]) * (255.0 * self.rescale)
            if x.shape[-2:] != (self.image_size, self.image_size):
                x = F.interpolate(x, size=(self.image_size,) * 2, mode="bilinear",
                                  align_corners=False, antialias=True)  # fmt: skip
            x = (x - self.image_mean.cpu()) / self.image_std.cpu()
            out.append(self._patchify(x))
        return torch.cat(out) if out else torch.empty(0, *self.visual_token_shape())

    def _patchify(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p = self.patch
        x = x.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // p) * (w // p), c * p * p)

    def _unpatchify(self, feats: torch.Tensor) -> torch.Tensor:
        b, p, g = feats.shape[0], self.patch, self.image_size // self.patch
        x = feats.reshape(b, g, g, 3, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, 3, g * p, g * p)

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tokenizer(texts, self.model_cfg.max_text_len)

    def forward(
        self, feats: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        n_text, n_vis = input_ids.shape[1], feats.shape[1]
        if attention_mask.shape[1] == n_text + n_vis:  # rows without an image: visual part 0
            present = attention_mask[:, n_text:].amax(1) > 0
            attention_mask = attention_mask[:, :n_text]
        else:
            present = torch.ones(len(input_ids), dtype=torch.bool, device=input_ids.device)
        pixels = self._unpatchify(feats.to(self.image_mean.dtype))
        fused = self.fuse(pixels, present, input_ids, attention_mask)
        return self.task_head()(self.visual_proj(fused))

    def frozen_state_keys(self) -> set[str]:
        """Names of backbone tensors (never to be sent anywhere)."""
        return {f"hf.{k}" for k in self.hf.state_dict() if "lora_" not in k}

    def _rows(self, fn: Callable[[torch.Tensor], torch.Tensor], pixels, present) -> torch.Tensor:
        """``fn`` on the rows with an image; zeros elsewhere (no image is made up)."""
        if bool(present.all()):
            return fn(pixels)
        rows = present.nonzero().squeeze(1)
        if len(rows) == 0:
            probe = fn(pixels[:1])  # the output shape/dtype; never used as data
            return probe.new_zeros(len(pixels), *probe.shape[1:])
        out = fn(pixels[rows])
        full = out.new_zeros(len(pixels), *out.shape[1:])
        return full.index_copy(0, rows, out)


class ViltVLModel(HFVLModel):
    """ViLT (Kim et al., 2021): one transformer over ``[text ; image [CLS] ; patches]``.

    Adapters after each layer's FFN (``ViltLayer.output``, residual added); LoRA default
    ``query,value`` (single stream: unambiguous); prompt tokens are prepended to the text part
    (positions and type 0 as text).  The visual embedding of a fixed-size square image is ViLT's
    own (patch conv + interpolated position + type embeddings), computed here rather than by
    ``visual_embed``, which samples patches at random.
    """

    family = FAMILIES["vilt"]

    def __init__(self, model_cfg, adapter_cfg, num_answers, peft_cfg=None) -> None:
        super().__init__(model_cfg, adapter_cfg, num_answers, peft_cfg)
        if isinstance(self.peft, PromptBank):
            limit = self.hf.config.max_position_embeddings
            if self.peft.length + model_cfg.max_text_len > limit:
                raise ConfigError(
                    f"vilt: peft.prompt_length + model.max_text_len must be <= {limit} (its "
                    f"text position embeddings), got {self.peft.length} + "
                    f"{model_cfg.max_text_len}; e.g. --set peft.prompt_length="
                    f"{max(1, limit - model_cfg.max_text_len)}"
                )

    def adapter_points(self):
        d = self.hf.config.hidden_size
        return [layer.output for layer in self.hf.encoder.layer], [d] * len(self.hf.encoder.layer)

    def fused_dims(self):
        d = self.hf.config.hidden_size
        return 3 * d, d

    def word_embeddings(self):
        return self.hf.embeddings.text_embeddings.word_embeddings

    def _image_embeds(self, pixels: torch.Tensor) -> torch.Tensor:
        emb = self.hf.embeddings
        x = emb.patch_embeddings(pixels)  # (B, d, gh, gw)
        b, d, gh, gw = x.shape
        g0 = self.hf.config.image_size // self.hf.config.patch_size
        pos = emb.position_embeddings
        spatial = pos[:, 1:].transpose(1, 2).reshape(1, d, g0, g0)
        if (gh, gw) != (g0, g0):
            spatial = F.interpolate(spatial, size=(gh, gw), mode="bilinear", align_corners=True)
        x = x.flatten(2).transpose(1, 2) + spatial.flatten(2).transpose(1, 2)
        cls = (emb.cls_token + pos[:, :1]).expand(b, -1, -1)
        return emb.dropout(torch.cat([cls, x], 1))

    def fuse(self, pixels, present, ids, mask):
        b, n_text = ids.shape
        image = self._image_embeds(pixels)
        vis_mask = present[:, None].to(mask.dtype).expand(-1, image.shape[1])
        text = self.hf.embeddings.text_embeddings.word_embeddings(ids)
        prompts = self.peft.prompt_tokens()
        n_p = 0 if prompts is None else prompts.shape[0]
        if prompts is not None:
            text = torch.cat([prompts.to(text.dtype).unsqueeze(0).expand(b, -1, -1), text], 1)
            mask = torch.cat([mask.new_ones(b, n_p), mask], 1)
        hidden = self.hf(
            inputs_embeds=text, attention_mask=mask, image_embeds=image, pixel_mask=vis_mask
        ).last_hidden_state[:, n_p:]
        return torch.cat(
            [
                self.hf.pooler(hidden),  # tanh(W·H_[CLS]), ViLT's own pooled output
                masked_mean(hidden[:, :n_text], mask[:, n_p:]),
                masked_mean(hidden[:, n_text:], vis_mask),
            ],
            -1,
        )


class DualVLModel(HFVLModel):
    """CLIP / SigLIP: image and text towers, fused after pooling: ``[e_i ; e_t ; e_i ⊙ e_t]``.

    CLIP: ``e`` are the projected pooled embeddings (image [CLS], text end-of-text token).
    SigLIP: ``e_i`` is the vision tower's attention-pooling head output, ``e_t`` the text head's
    output at the last position; text is re-padded to ``model.max_text_len`` and run without an
    attention mask, as SigLIP was trained.  Adapters after every encoder layer of both towers.
    """

    def adapter_points(self):
        points, dims = [], []
        for tower in (self.hf.vision_model, self.hf.text_model):
            layers = _find(tower, "encoder").layers
            points += list(layers)
            dims += [tower.config.hidden_size] * len(layers)
        return points, dims

    def _embed_dims(self) -> tuple[int, int]:
        if hasattr(self.hf, "visual_projection"):
            return self.hf.visual_projection.out_features, self.hf.text_projection.out_features
        text_head = getattr(_find(self.hf.text_model, "head"), "out_features", None)
        return (
            self.hf.vision_model.config.hidden_size,
            text_head or self.hf.text_model.config.hidden_size,
        )

    def fused_dims(self):
        di, dt = self._embed_dims()
        return di + dt + (di if di == dt else 0), max(di, dt)

    def _image(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.hf.vision_model(pixel_values=pixels, interpolate_pos_encoding=self.interpolate)
        pooled = out.pooler_output
        proj = getattr(self.hf, "visual_projection", None)
        return proj(pooled) if proj is not None else pooled

    def _text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.family.name == "siglip":
            width = self.model_cfg.max_text_len
            ids = F.pad(ids, (0, width - ids.shape[1]), value=self.pad_id)
            pooled = self.hf.text_model(input_ids=ids).pooler_output
        else:
            pooled = self.hf.text_model(input_ids=ids, attention_mask=mask).pooler_output
        proj = getattr(self.hf, "text_projection", None)
        return proj(pooled) if proj is not None else pooled

    def fuse(self, pixels, present, ids, mask):
        e_i = self._rows(self._image, pixels, present)
        e_t = self._text(ids, mask)
        parts = [e_i, e_t.to(e_i.dtype)]
        if e_i.shape[-1] == e_t.shape[-1]:
            parts.append(e_i * parts[1])
        return torch.cat(parts, -1)


class ClipVLModel(DualVLModel):
    family = FAMILIES["clip"]


class SiglipVLModel(DualVLModel):
    family = FAMILIES["siglip"]


class BlipVLModel(HFVLModel):
    """BLIP's image-grounded text encoder (the ITM branch of ``BlipForImageTextRetrieval``).

    The ViT encodes the image; the BERT text encoder cross-attends to the image states in every
    layer.  Adapters after every ViT layer (residual after the MLP) and after every text layer's
    FFN output (``BlipTextLayer.output``, residual + LayerNorm, as BERT).  A row without an
    image has its image states zeroed and masked, so its cross-attention sees no image.
    """

    family = FAMILIES["blip"]

    def adapter_points(self):
        vision = list(self.hf.vision_model.encoder.layers)
        text = [layer.output for layer in self.hf.text_encoder.encoder.layer]
        dv, dt = self.hf.config.vision_config.hidden_size, self.hf.config.text_config.hidden_size
        return vision + text, [dv] * len(vision) + [dt] * len(text)

    def fused_dims(self):
        dv, dt = self.hf.config.vision_config.hidden_size, self.hf.config.text_config.hidden_size
        return 2 * dt + dv, dt

    def bitfit_scope(self):  # not the unused ITM / contrastive heads
        return nn.ModuleList([self.hf.vision_model, self.hf.text_encoder])

    def fuse(self, pixels, present, ids, mask):
        def image_states(px: torch.Tensor) -> torch.Tensor:
            return self.hf.vision_model(
                pixel_values=px, interpolate_pos_encoding=self.interpolate
            ).last_hidden_state

        states = self._rows(image_states, pixels, present)
        enc_mask = present[:, None].to(mask.dtype).expand(-1, states.shape[1])
        hidden = self.hf.text_encoder(
            input_ids=ids, attention_mask=mask, encoder_hidden_states=states,
            encoder_attention_mask=enc_mask,
        ).last_hidden_state  # fmt: skip
        return torch.cat(
            [hidden[:, 0], masked_mean(hidden, mask), states[:, 0].to(hidden.dtype)], -1
        )


MODEL_CLASSES: dict[str, type[HFVLModel]] = {
    "vilt": ViltVLModel,
    "clip": ClipVLModel,
    "siglip": SiglipVLModel,
    "blip": BlipVLModel,
}


def _find(module: nn.Module, name: str) -> nn.Module:
    """``module.<name>`` or, for wrappers (``CLIPTextModel.text_model``), the first nested one."""
    if hasattr(module, name):
        return getattr(module, name)
    for child in module.children():
        if hasattr(child, name):
            return getattr(child, name)
    raise AttributeError(f"{type(module).__name__} has no {name}")


def _to_float_rgb(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(N, H, W[, 3])`` -> float ``(N, 3, H, W)`` in [0, 1]."""
    x = torch.as_tensor(np.ascontiguousarray(images)).float() / 255.0
    if x.ndim == 3:
        return x.unsqueeze(1).expand(-1, 3, -1, -1)
    if x.ndim == 4 and x.shape[-1] in (1, 3):
        x = x.permute(0, 3, 1, 2)
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    raise ValueError(f"images must be (N,H,W) or (N,H,W,3) uint8, got shape {tuple(x.shape)}")


def _register() -> None:
    from fedmm.backbones import MODEL_BUILDERS, UNSUPPORTED_PEFT

    for name, cls in MODEL_CLASSES.items():
        MODEL_BUILDERS[name] = cls
        if cls.family.no_prompt:
            UNSUPPORTED_PEFT[name] = {"prompt": cls.family.no_prompt}


_register()
