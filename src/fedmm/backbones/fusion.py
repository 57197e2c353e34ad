"""Single-stream vision-language fusion around a frozen vision tower and a frozen text transformer.

    image ──frozen vision tower──> grid features F ∈ R^{g²×C}   (cached: no PEFT inside)
          ──visual projection P (trainable)──> visual tokens V = F·Pᵀ ∈ R^{g²×d}
    text  ──frozen word embeddings──> T ∈ R^{L×d}
    [P ;] [T ; V] + position + modality-type embeddings ──frozen transformer layers (+ PEFT)──> H
    logits = head_task([H_cls ; mean(H_text) ; mean(H_visual) ; mean(V)])

A record without an image (a text-only client) has its visual tokens masked out of attention and
out of both visual means (which are then 0): no made-up image is ever fed as data.  A record
without text holds [CLS] [SEP] only.  Multi-task benchmarks get one head per task (``VLModel``).

(P: learned prompt tokens, with ``peft.type = "prompt"`` only.)

The transformer runs over the joint sequence, as ViLT does (single-stream fusion): text tokens
attend to image tokens in every layer, so adapters after each FFN adapt the fusion itself.  The
head sees the fused states ([CLS], mean text-token and mean visual-token outputs) **and** the
pooled projected image feature before fusion, mean(V): with the frozen attention only slowly
re-routed by adapters, this direct image path lets the head use the image from the first step
(a [CLS]-only head learned markedly slower on VQA-RAD; see docs/results/vqa_rad_probe.json).

Frozen: the vision tower, the embeddings and every transformer weight.  Trainable: the named
PEFT sets (``model.peft``, of type ``peft.type``: adapter, LoRA, prompt or BitFit), the visual
projection and the head.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedmm.backbones.packing import pack_layers
from fedmm.peft import PeftBank
from fedmm.peft.build import PeftTarget, build_bank
from fedmm.sections import AdapterConfig, ModelConfig, PeftConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Tokenizer = Callable[[list[str], int], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Backbone:
    """The frozen parts of a vision-language backbone, as a registry builder returns them.

    ``vision`` maps normalised images ``(B, 3, H, W)`` to a feature grid ``(B, C, h, w)``;
    ``text`` is a Hugging Face BERT-style encoder (``embeddings.word_embeddings``, accepts
    ``inputs_embeds`` and ``token_type_ids``); ``adapter_points`` are the modules after whose
    output an adapter is added (one per transformer block, after the FFN's residual add).
    """

    name: str
    vision: nn.Module
    vision_dim: int
    text: nn.Module
    tokenizer: Tokenizer
    adapter_points: list[nn.Module]


def make_head(in_dim: int, model_cfg: ModelConfig, num_outputs: int) -> nn.Sequential:
    """The task head MLP on pooled features: LayerNorm → Linear → GELU → Dropout → Linear."""
    return nn.Sequential(
        nn.LayerNorm(in_dim),  # the pooled parts differ in scale (fused states vs. projection)
        nn.Linear(in_dim, model_cfg.head_hidden),
        nn.GELU(),
        nn.Dropout(model_cfg.dropout),
        nn.Linear(model_cfg.head_hidden, num_outputs),
    )


class VLModel(nn.Module):
    """What every fedmm model shares, whatever its backbone.

    Subclasses set ``peft`` (a ``PeftBank``), ``visual_proj`` (the trainable projection) and call
    ``_init_heads``; they implement ``encode_images`` (the frozen, cacheable image work),
    ``tokenize``, ``forward(feats, input_ids, attention_mask)``, ``frozen_modules`` and
    ``visual_token_shape``.

    Heads: one head for a single-task benchmark (``head`` is the MLP), or one head per task
    (``head`` is a ``ModuleDict`` keyed by task name; ``set_task`` picks the head ``forward``
    uses).  The part ``head`` in states holds every task's head.
    """

    peft: PeftBank
    visual_proj: nn.Module

    def _init_heads(
        self, in_dim: int, model_cfg: ModelConfig, num_answers: int | dict[str, int]
    ) -> None:
        if isinstance(num_answers, dict):
            if not num_answers:
                raise ValueError("a multi-task model needs at least one task")
            self.head = nn.ModuleDict(
                {t: make_head(in_dim, model_cfg, n) for t, n in num_answers.items()}
            )
            self.active_task = next(iter(num_answers))
        else:
            self.head = make_head(in_dim, model_cfg, num_answers)
            self.active_task = ""
        self.num_answers = num_answers

    @property
    def multitask(self) -> bool:
        return isinstance(self.head, nn.ModuleDict)

    def set_task(self, task: str) -> None:
        """Make ``task``'s head the one ``forward`` uses ("" on a single-task model)."""
        if self.multitask:
            if task not in self.head:
                raise KeyError(f"no head for task {task!r}; tasks: {list(self.head)}")
            self.active_task = task
        elif task:
            raise KeyError(f"single-task model has no head for task {task!r}")

    def task_head(self) -> nn.Module:
        return self.head[self.active_task] if self.multitask else self.head

    def frozen_modules(self) -> list[nn.Module]:
        """The frozen towers (kept in eval mode: batch-norm statistics never move)."""
        return []

    def backbone_tower(self) -> nn.Module:
        """The frozen transformer that runs in train mode during local steps (its dropout is
        ``model.backbone_dropout``'s); the frozen vision tower is always in eval mode."""
        raise NotImplementedError

    def set_backbone_dropout(self, p: float) -> None:
        """``model.backbone_dropout``: every ``nn.Dropout`` of ``backbone_tower()`` (hidden and
        attention dropout; Hugging Face's BERT reads its attention rate from that module too)
        gets rate ``p``; ``-1`` leaves the backbone's own rates.  The head's dropout
        (``model.dropout``) is not touched.  Raises ``ValueError`` for ``p`` outside {-1} ∪
        [0, 1)."""
        if p == -1:
            return
        if not 0 <= p < 1:
            raise ValueError(f"model.backbone_dropout must be -1 or in [0, 1), got {p}")
        for module in self.backbone_tower().modules():
            if isinstance(module, nn.Dropout):
                module.p = float(p)

    def train(self, mode: bool = True) -> VLModel:
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()
        return self

    def reset_trainable(self, seed: int) -> None:
        """Deterministically re-initialise every trainable part (same seed -> same init).

        Each PEFT set draws from its own stream, seeded by (seed, set name): a set's initial
        value does not depend on which other sets the model happens to hold (one process serves
        several methods, and each adds its own sets)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for module in (self.visual_proj, self.head):
                for layer in module.modules():
                    if isinstance(layer, nn.Linear | nn.LayerNorm):
                        layer.reset_parameters()
            for name in sorted(self.peft.sets):
                torch.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
                self.peft.reset_set(name)

    @contextlib.contextmanager
    def active(self, *names: str, combine: str = "single") -> Iterator[None]:
        with self.peft.active(*names, combine=combine):
            yield


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` ``(B, T, d)`` over the rows where ``mask`` ``(B, T)`` is 1 (0 if none)."""
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp(min=1.0)


class GridVision:
    """The frozen vision tower's grid features, shared by the fusion and the generative models:
    ``self.vision`` (a CNN giving ``(N, C, h, w)``), ``self.visual_proj`` (trainable, on the
    model's device), ``self.model_cfg`` (``image_size``, ``grid``) and ``self._token_shape``."""

    def visual_token_shape(self) -> tuple[int, int]:
        """``(visual tokens, channels)`` of ``encode_images``' output for one image."""
        if self._token_shape is None:
            size = self.model_cfg.image_size
            probe = self.encode_images(np.zeros((1, size, size, 3), dtype=np.uint8))
            self._token_shape = (probe.shape[1], probe.shape[2])
        return self._token_shape

    @torch.no_grad()
    def encode_images(self, images: np.ndarray, batch_size: int = 128) -> torch.Tensor:
        """uint8 images ``(N, H, W)`` or ``(N, H, W, 3)`` -> visual grid features ``(N, g², C)``.

        This is the frozen, PEFT-free part of the image path, so callers cache its output.
        """
        self.vision.eval()
        device = next(self.visual_proj.parameters()).device  # the model's device
        out = []
        for start in range(0, len(images), batch_size):
            pixels = preprocess_images(
                images[start : start + batch_size], self.model_cfg.image_size
            )
            grid = self.vision(pixels.to(device))
            g = self.model_cfg.grid
            if g > 0 and (grid.shape[-1] > g or grid.shape[-2] > g):
                grid = F.adaptive_avg_pool2d(grid, (min(g, grid.shape[-2]), min(g, grid.shape[-1])))
            out.append(grid.flatten(2).transpose(1, 2).float().cpu())
        return torch.cat(out) if out else torch.empty(0)


class FusionVLModel(GridVision, VLModel):
    """Frozen backbone + named PEFT sets + trainable visual projection + task head(s)."""

    def __init__(
        self,
        backbone: Backbone,
        num_answers: int | dict[str, int],
        model_cfg: ModelConfig,
        adapter_cfg: AdapterConfig,
        peft_cfg: PeftConfig | None = None,
    ) -> None:
        super().__init__()
        self.backbone_name = backbone.name
        self.model_cfg = model_cfg
        self.vision = backbone.vision
        self.text = backbone.text
        self.tokenizer = backbone.tokenizer
        for p in list(self.vision.parameters()) + list(self.text.parameters()):
            p.requires_grad_(False)
        d = self.text.config.hidden_size
        self.hidden_size = d
        points = backbone.adapter_points
        self.peft = build_bank(peft_cfg or PeftConfig(), adapter_cfg, PeftTarget(
            self.text, points, [d] * len(points), self.text.embeddings.word_embeddings,
            name=backbone.name,
        ))  # fmt: skip
        self.visual_proj = nn.Linear(backbone.vision_dim, d)
        self._init_heads(4 * d, model_cfg, num_answers)
        self._token_shape: tuple[int, int] | None = None
        # token packing (fedmm.backbones.packing): the layers' per-position work on the real
        # tokens only, where it changes nothing but float rounding; off: every layer padded
        self.pack_tokens = True
        layers = getattr(getattr(self.text, "encoder", None), "layer", None)
        self._packed_layers = pack_layers(layers) if layers is not None else []

    # ------------------------------------------------------------------ frozen towers
    def frozen_modules(self) -> list[nn.Module]:
        return [self.vision]

    def backbone_tower(self) -> nn.Module:
        return self.text

    @torch.no_grad()
    def store_frozen_in(self, dtype: torch.dtype) -> int:
        """Store the frozen text transformer's matmul weights (every frozen ``nn.Linear`` and
        ``nn.Embedding`` weight, not LoRA's) in ``dtype`` once, for ``train.precision = bf16``:
        under bf16 autocast a frozen fp32 weight is cast again at every call (autocast caches
        casts of trainable leaves only), which costs a copy of the backbone per forward.  Biases,
        LayerNorms, the vision tower (its features are cached in fp32/fp16 whatever the run's
        precision) and every trainable part stay fp32; PEFT sets made later are fp32 too
        (``PeftBank.add_set``).  After this the model must run under autocast.  Returns the
        number of tensors converted."""
        n = 0
        for name, module in self.text.named_modules():
            if "lora_" in name or not isinstance(module, nn.Linear | nn.Embedding):
                continue
            weight = module.weight
            if weight.requires_grad or weight.dtype == dtype:
                continue
            weight.data = weight.data.to(dtype)  # same Parameter: any reference stays valid
            n += 1
        return n

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tokenizer(texts, self.model_cfg.max_text_len)

    # ------------------------------------------------------------------ forward
    def forward(
        self, feats: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        text_emb = self.text.embeddings.word_embeddings(input_ids)
        visual = self.visual_proj(feats.to(text_emb.dtype))
        b, n_text, n_vis = input_ids.shape[0], input_ids.shape[1], visual.shape[1]
        if attention_mask.shape[1] == n_text + n_vis:  # rows without an image mask V out
            attention_mask, vis_mask = attention_mask[:, :n_text], attention_mask[:, n_text:]
        else:
            vis_mask = attention_mask.new_ones(b, n_vis)
        parts, masks = [text_emb, visual], [attention_mask, vis_mask]
        types = [torch.zeros_like(input_ids), input_ids.new_ones(b, n_vis)]
        prompts = self.peft.prompt_tokens()
        n_p = 0 if prompts is None else prompts.shape[0]
        if prompts is not None:  # prompt tuning: [P ; T ; V]
            parts.insert(0, prompts.to(text_emb.dtype).unsqueeze(0).expand(b, -1, -1))
            masks.insert(0, attention_mask.new_ones(b, n_p))
            types.insert(0, input_ids.new_zeros(b, n_p))
        joint_mask = torch.cat(masks, 1)
        with self._packing(joint_mask):
            hidden = self.text(
                inputs_embeds=torch.cat(parts, 1),
                attention_mask=joint_mask,
                token_type_ids=torch.cat(types, 1),
            ).last_hidden_state[:, n_p:]
        pooled = torch.cat(
            [
                hidden[:, 0],
                masked_mean(hidden[:, :n_text], attention_mask),
                masked_mean(hidden[:, n_text:], vis_mask),
                masked_mean(visual, vis_mask),
            ],
            dim=-1,
        )
        return self.task_head()(pooled)

    @contextlib.contextmanager
    def _packing(self, joint_mask: torch.Tensor) -> Iterator[None]:
        """Let the packed layers pack this forward (``pack_tokens``), unless row blocks are
        active over rows that do not repeat (packed rows are chunked by block: each block must
        hold the same tokens)."""
        pack = self.pack_tokens and bool(self._packed_layers)
        blocks = self.peft.row_block_count
        if pack and blocks > 1:
            chunks = joint_mask.chunk(blocks)
            pack = all(c.shape == chunks[0].shape and torch.equal(c, chunks[0]) for c in chunks)
        for layer in self._packed_layers:
            layer.pack = pack
        try:
            yield
        finally:
            for layer in self._packed_layers:
                layer.pack = False

    # ------------------------------------------------------------------ trainable state
    def frozen_state_keys(self) -> set[str]:
        """Names of backbone tensors (never to be sent anywhere)."""
        keys = {f"vision.{k}" for k in self.vision.state_dict()}
        return keys | {f"text.{k}" for k in self.text.state_dict() if "lora_" not in k}


def preprocess_images(images: np.ndarray, size: int) -> torch.Tensor:
    """uint8 ``(N, H, W[, 3])`` -> ImageNet-normalised float ``(N, 3, size, size)``."""
    x = torch.as_tensor(np.ascontiguousarray(images)).float() / 255.0
    if x.ndim == 3:
        x = x.unsqueeze(1).expand(-1, 3, -1, -1)
    elif x.ndim == 4 and x.shape[-1] in (1, 3):
        x = x.permute(0, 3, 1, 2)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
    else:
        raise ValueError(f"images must be (N,H,W) or (N,H,W,3) uint8, got shape {tuple(x.shape)}")
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std
