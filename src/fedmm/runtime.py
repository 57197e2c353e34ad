"""Per-process runtime: one model and the encoded client datasets, built once and reused.

What a process loads is its own data only: a site (``data.benchmark = "sites"``) reads its site
directory (``data.data_dir``, set from the site's own settings, ``fedmm.data.sites``); a rehearsal
of a central benchmark builds that benchmark (every client of it) and each node uses its own
partition; the centralised baseline pools every client.  The server builds no ``Runtime``: it
needs the trainable shapes only, from the model config and the task schema (``server_model``).

A Flower simulation actor (or a SuperNode process) serves many ``ClientApp`` calls; rebuilding the
backbone or re-encoding images on every call would dominate the round time.  ``get_runtime``
keeps one ``Runtime`` per (backbone, data) configuration in the process.

Frozen visual features (the vision tower has no PEFT modules inside, so its output never changes)
are computed once per client split and cached in memory and on disk under ``cache_dir``, keyed
by the vision tower's identity and a hash of the pixels (a content key: a site's changed image is
never served stale features), and reused across rounds, methods, seeds and processes -- which
matters in a deployment, where Flower starts a fresh process for every message.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from fedmm.backbones import FusionVLModel, build_model
from fedmm.config import SITES, ConfigError, FedmmConfig
from fedmm.data import Benchmark, RawSplit, load_benchmark
from fedmm.data import sites as site_data
from fedmm.data.schema import SCHEMA_FILE, Schema, read_schema, schema_of
from fedmm.files import atomic_torch_save
from fedmm.precision import EMULATED_BF16, emulated_bf16, stores_bf16

log = logging.getLogger(__name__)


def held_out(n: int, frac: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kept, held_out)`` row indices of a split of ``n`` rows: a seeded permutation, of which
    ``max(1, round(frac · n))`` rows are held out -- never every row (at most ``n − 1``) and none
    of one row.  The same ``(n, frac, seed)`` always gives the same rows."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_out = min(n - 1, max(1, round(frac * n))) if n > 1 and frac > 0 else 0
    return order[n_out:], order[:n_out]


@dataclass
class Encoded:
    """Model inputs of one split: frozen visual features, token ids, labels (all on CPU)."""

    feats: torch.Tensor  # (N, T_img, C) float32, bfloat16 (bf16 runs) or float16 (too large)
    input_ids: torch.Tensor  # (N, L)
    attention_mask: torch.Tensor  # (N, L)
    labels: torch.Tensor  # (N,) long, or (N, K) float 0/1 for a multi-label task
    groups: tuple[str, ...] | None = None  # evaluation group per row (VQA-RAD: closed / open)
    image_present: torch.Tensor | None = None  # (N,) bool; None = every row has its image
    task: str = ""  # the benchmark task of every row ("" = the single task)
    kind: str = "single"  # single | multilabel

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: torch.Tensor) -> Encoded:
        """The rows ``idx`` as a split of their own (same task)."""
        return Encoded(
            self.feats[idx], self.input_ids[idx], self.attention_mask[idx], self.labels[idx],
            None if self.groups is None else tuple(self.groups[i] for i in idx.tolist()),
            None if self.image_present is None else self.image_present[idx],
            self.task, self.kind,
        )  # fmt: skip

    def batch(self, idx: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, ...]:
        """``(feats, input_ids, attention_mask, labels)`` of rows ``idx`` on ``device``.

        Text is trimmed to the longest text in the batch: padding columns cost compute in every
        layer and change nothing (they are masked out of attention and never pooled).  When some
        rows have no image, the mask covers the visual tokens too, ``(B, L + T_img)``: a row
        without its image has them masked out (its ``feats`` are a zero placeholder, never seen).
        """
        mask = self.attention_mask[idx]
        width = max(1, int(mask.sum(1).max())) if len(idx) else mask.shape[1]
        mask = mask[:, :width]
        labels = self.labels[idx]
        if self.kind == "generate":  # next-token labels (N, L): trimmed with the text
            labels = labels[:, :width]
        if self.image_present is not None:
            present = self.image_present[idx].to(mask.dtype)
            mask = torch.cat([mask, present[:, None].expand(-1, self.feats.shape[1])], 1)
        feats = self.feats[idx].to(device)
        return (
            feats.float() if feats.dtype == torch.float16 else feats,  # fp32 / bf16 as stored
            self.input_ids[idx, :width].to(device),
            mask.to(device),
            labels.to(device),
        )


def server_model(cfg: FedmmConfig, schema: Schema) -> FusionVLModel:
    """The model the server holds: built from the model config and the task schema alone (for
    the trainable shapes and the first global state), never from data."""
    return build_model(cfg.model, cfg.adapter, schema.head_sizes(), cfg.peft)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            f"device {name!r} requested but CUDA is not available; use --set device=cpu"
        )
    return torch.device(name)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fedmm"


class Runtime:
    """The model (frozen backbone + trainable parts) and the benchmark's encoded splits."""

    def __init__(self, cfg: FedmmConfig) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        if cfg.train.threads > 0:
            torch.set_num_threads(cfg.train.threads)
        if cfg.data.benchmark == SITES:
            if not cfg.data.data_dir:
                raise RuntimeError(
                    "this site has no data-dir: set it in the SuperNode's --node-config "
                    '(data-dir="/path/to/site", a directory written by fedmm split)'
                )
            root = Path(cfg.data.data_dir)
            self.schema = read_schema(root / SCHEMA_FILE)
            if (root / "train.jsonl").is_file():  # one site: its own records only
                self.benchmark: Benchmark = site_data.load_site(root, cfg, self.schema)
            else:  # every site of a rehearsal pooled (the centralised baseline)
                parts = [site_data.load_site(r, cfg, self.schema)
                         for r in site_data.list_sites(root)]  # fmt: skip
                self.benchmark = replace(parts[0], clients=[c for p in parts for c in p.clients])
        else:
            self.benchmark = load_benchmark(cfg)
            self.schema = schema_of(self.benchmark)
        from fedmm.backbones.generative import LM_CACHE_DIR  # the dequantized LM's cache

        LM_CACHE_DIR.set(Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir())
        self.model: FusionVLModel = build_model(
            cfg.model, cfg.adapter, self.benchmark.head_sizes(), cfg.peft
        ).to(self.device)
        # train.precision = bf16 (or auto on a CPU/GPU with native bf16): the frozen text
        # transformer's matmul weights stored in bf16 once, not cast at every forward
        self.bf16 = stores_bf16(cfg.train.precision, self.device)
        if emulated_bf16(cfg.train.precision, self.device):
            warnings.warn(EMULATED_BF16, stacklevel=2)
        if self.bf16 and isinstance(self.model, FusionVLModel):
            n = self.model.store_frozen_in(torch.bfloat16)
            log.info("train.precision=%s: %d frozen backbone weights stored in bf16",
                     cfg.train.precision, n)  # fmt: skip
        log.info("built model %s (precision %s) for data %s",
                 cfg.model.backbone, "bf16" if self.bf16 else "fp32", cfg.data.benchmark)  # fmt: skip
        self.cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
        self._encoded: dict[str, Encoded] = {}

    def client_split(self, index: int, split: str) -> Encoded:
        """Encoded ``train``, ``test`` or ``val`` split of client ``index``.

        With ``data.val_frac`` = f > 0, ``val`` is a held-out share of the client's training
        records (``held_out``, seeded by ``data.split_seed`` and the client's id, so a site and
        its rehearsal hold out the same rows) and ``train`` is the rest: nothing of ``val`` is
        ever trained on.  Raises ``ConfigError`` for ``val`` when f = 0."""
        clients = self.benchmark.clients
        if not 0 <= index < len(clients):
            raise IndexError(
                f"client index {index} out of range: the benchmark has {len(clients)} clients"
            )
        spec = clients[index]
        frac = self.cfg.data.val_frac
        if split == "val" and frac <= 0:
            raise ConfigError("there is no validation split: set data.val_frac (e.g. 0.1)")
        if split not in ("train", "val") or frac <= 0:
            return self._encode(f"{spec.client_id}/{split}", getattr(spec, split), spec.task)
        name = f"{spec.client_id}/{split}-of-train"
        if name not in self._encoded:
            whole = self._encode(f"{spec.client_id}/train", spec.train, spec.task)
            seed = self.cfg.data.split_seed * 7919 + zlib.crc32(spec.client_id.encode())
            fit, val = held_out(len(whole), frac, seed)
            self._encoded[f"{spec.client_id}/train-of-train"] = whole.subset(fit)
            self._encoded[f"{spec.client_id}/val-of-train"] = whole.subset(val)
            del self._encoded[f"{spec.client_id}/train"]  # the subsets are copies: keep them only
        return self._encoded[name]

    def tasks(self) -> list[str]:
        """The benchmark's tasks (``[""]`` for a single-task benchmark)."""
        return list(self.benchmark.tasks) or [""]

    def pooled_train(self, task: str = "") -> Encoded:
        """The training splits of every client doing ``task``, concatenated (centralised)."""
        parts = [
            self.client_split(i, "train")
            for i, c in enumerate(self.benchmark.clients)
            if c.task == task
        ]
        if not parts:
            raise ValueError(f"no client does task {task!r}")
        tensors = ("feats", "input_ids", "attention_mask", "labels")
        groups = (
            None if any(p.groups is None for p in parts) else sum((p.groups for p in parts), ())
        )
        present = None
        if any(p.image_present is not None for p in parts):
            present = torch.cat([
                torch.ones(len(p), dtype=torch.bool) if p.image_present is None
                else p.image_present for p in parts
            ])  # fmt: skip
        cat = {f: torch.cat([getattr(p, f) for p in parts]) for f in tensors}  # one text width
        return Encoded(**cat, groups=groups, image_present=present, task=task, kind=parts[0].kind)

    def _encode(self, name: str, raw: RawSplit, task: str = "") -> Encoded:
        if name in self._encoded:
            return self._encoded[name]
        kind = self.benchmark.task_kind(task) if task else "single"
        if kind == "generate":  # text targets: fedmm.generation
            self._encoded[name] = self._encode_generative(name, raw, task)
            return self._encoded[name]
        ids, mask = self.model.tokenize(raw.texts)
        groups = None if raw.groups is None else tuple(raw.groups)
        labels = torch.as_tensor(
            raw.labels, dtype=torch.float32 if kind == "multilabel" else torch.long
        )
        present = None
        if raw.images is None:  # no image modality: a zero placeholder that the mask hides
            feats = torch.zeros(len(raw), *self.model.visual_token_shape(),
                                dtype=self.memory_features(torch.zeros(0)).dtype)  # fmt: skip
            present = torch.zeros(len(raw), dtype=torch.bool)
        else:
            feats = self.memory_features(self._visual_features(name, raw))
        enc = Encoded(feats, ids, mask, labels, groups, present, task, kind)
        self._encoded[name] = enc
        return enc

    def _encode_generative(self, name: str, raw: RawSplit, task: str) -> Encoded:
        from fedmm.generation import DEFAULT_PROMPT, encode_generative

        if not getattr(self.model, "generative", False):
            raise ConfigError(
                f"task {task!r} is generative (text targets) but model.backbone="
                f"{self.cfg.model.backbone!r} classifies over a label list; use a generative "
                "backbone (smollm2-mobilenet, docs/generative.md)"
            )
        present = None
        if raw.images is None:
            feats = torch.zeros(len(raw), *self.model.visual_token_shape(), dtype=torch.float16)
            present = torch.zeros(len(raw), dtype=torch.bool)
        else:
            feats = self._visual_features(name, raw)
        spec = self.benchmark.tasks[task]
        return encode_generative(
            self.model, raw, feats, template=spec.prompt or DEFAULT_PROMPT,
            max_text_len=self.cfg.model.max_text_len,
            max_target_tokens=self.cfg.train.max_target_tokens, name=name, task=task,
            present=present, score=spec.score or "vqa",
        )  # fmt: skip

    def memory_features(self, feats: torch.Tensor) -> torch.Tensor:
        """Cached features (float16 on disk) in the dtype a step consumes, converted once here
        rather than per batch: bf16 in a bf16 run (autocast would cast them to bf16 anyway, so
        this changes no value), else float32 while the split's float32 copy is at most
        ``FP32_FEATURES_MAX_BYTES`` (twice float16's memory: 46 KB per record of the default
        3x3 grid of 1280 channels), float16 beyond that (``Encoded.batch`` converts per batch)."""
        if self.bf16:
            return feats.to(torch.bfloat16)
        if feats.numel() * 4 <= FP32_FEATURES_MAX_BYTES:
            return feats.float()
        return feats

    def _visual_features(self, name: str, raw: RawSplit) -> torch.Tensor:
        """Frozen visual features of ``raw``'s images, cached on disk under a content key: the
        vision tower's identity and a hash of the pixels themselves, so the same images share one
        entry wherever they come from, and a changed image never reads a stale one."""
        cfg = self.cfg
        pixels = hashlib.sha256(np.ascontiguousarray(raw.images).tobytes()).hexdigest()
        key_src = "|".join(
            map(str, (getattr(self.model, "vision_id", cfg.model.backbone),
                      cfg.model.image_size, cfg.model.grid,
                      cfg.model.hf_path, raw.images.shape, raw.images.dtype, pixels))
        )  # fmt: skip
        digest = hashlib.sha1(key_src.encode()).hexdigest()[:20]
        path = self.cache_dir / "features" / f"{digest}.pt"
        if path.is_file():
            try:
                feats = torch.load(path, weights_only=True)
                if len(feats) == len(raw):
                    return feats
            except Exception as exc:  # a truncated or foreign file: recompute, never trust it
                log.warning("ignoring unreadable feature cache %s: %s", path, exc)
        feats = self.model.encode_images(raw.images).to(torch.float16)
        try:
            atomic_torch_save(feats, path)
        except OSError as exc:  # read-only home etc.: caching is an optimisation only
            log.warning("could not write feature cache %s: %s", path, exc)
        return feats


_RUNTIMES: dict[str, Runtime] = {}
FP32_FEATURES_MAX_BYTES = 1 << 30  # per split: above this cached features stay float16 in memory


def get_runtime(cfg: FedmmConfig) -> Runtime:
    key = "|".join(
        map(
            str,
            (
                cfg.model,
                cfg.peft,
                cfg.adapter,
                cfg.data,
                cfg.fed.clients,
                cfg.device,
                cfg.cache_dir,
                stores_bf16(cfg.train.precision, resolve_device(cfg.device)),  # weights' dtype
                cfg.train.max_target_tokens,  # the encoded generative targets are cut to it
            ),
        )
    )
    if key not in _RUNTIMES:
        _RUNTIMES.clear()  # one model per process: free the previous configuration's
        _RUNTIMES[key] = Runtime(cfg)
    return _RUNTIMES[key]
