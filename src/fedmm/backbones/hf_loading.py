"""Loading a Hugging Face family's model, tokenizer and image processor (local cache, a directory,
or ``tiny-random``) and the fail-fast check of where the weights come from (``check_source``)."""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fedmm.backbones.hf_families import FAMILIES, TINY, Family
from fedmm.config import ConfigError
from fedmm.sections import ModelConfig

Tokenize = Callable[[list[str], int], tuple[torch.Tensor, torch.Tensor]]


# ---------------------------------------------------------------------- loading
def _env_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}


def hash_tokenizer(vocab: int, bos: int, eos: int) -> Tokenize:
    """Offline stand-in for tests: ``[bos] words [eos]``, word ids by CRC32, pad 0."""

    def tokenize(texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.zeros(len(texts), max_len, dtype=torch.long)
        mask = torch.zeros(len(texts), max_len, dtype=torch.long)
        for i, text in enumerate(texts):
            words = [4 + zlib.crc32(w.encode()) % (vocab - 4) for w in text.lower().split()]
            row = [bos, *words[: max_len - 2], eos]
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return ids, mask

    return tokenize


def hf_tokenizer(tok) -> Tokenize:
    def tokenize(texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        enc = tok(list(texts), padding="max_length", truncation=True, max_length=max_len,
                  return_tensors="pt")  # fmt: skip
        mask = enc.get("attention_mask")
        if mask is None:  # SigLIP's tokenizer returns none: pad positions by the pad id
            mask = (enc["input_ids"] != tok.pad_token_id).long()
        return enc["input_ids"], mask

    return tokenize


@dataclass
class Loaded:
    model: nn.Module
    tokenize: Tokenize
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    rescale: float = 1 / 255
    pad_id: int = 0


def _missing_message(family: Family, source: str, why: str) -> str:
    return (
        f"backbone {family.name}: {source!r} is neither a local directory nor in the local "
        f"Hugging Face cache, and {why}. Download it once with "
        f"`huggingface-cli download {source} --local-dir DIR` and pass "
        f"--set model.hf_path=DIR (or allow downloads with --set model.hf_download=true on a "
        f"machine with network access)."
    )


def check_source(model_cfg: ModelConfig) -> None:
    """Fail fast (``ConfigError``, before any run) when a family's weights cannot be found
    without a download that is not allowed; loads nothing."""
    family = FAMILIES.get(model_cfg.backbone)
    source = model_cfg.hf_path or (family.hub_default if family else "")
    if family is None or source == TINY:
        return
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"backbone {family.name}: {source} has no config.json")
        return
    if model_cfg.hf_download and not _env_offline():
        return
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(source, "config.json")
    except ValueError:  # not a valid repo id either
        cached = None
    if not isinstance(cached, str):
        why = (
            "HF_HUB_OFFLINE is set"
            if _env_offline()
            else ("downloads are off (model.hf_download = false)")
        )
        raise ConfigError(_missing_message(family, source, why))


def load_family(family: Family, model_cfg: ModelConfig) -> Loaded:
    """The frozen ``transformers`` model, tokenizer and image normalisation of ``family``."""
    import transformers

    cls = getattr(transformers, family.hf_class)
    source = model_cfg.hf_path or family.hub_default
    if source == TINY:
        config = family.tiny_config()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1234)
            model = cls(config)
        text_cfg = getattr(config, "text_config", config)
        tokenize = hash_tokenizer(
            text_cfg.vocab_size,
            getattr(text_cfg, "bos_token_id", None) or 1,
            getattr(text_cfg, "eos_token_id", None) or 2,
        )
        return Loaded(model, tokenize, family.image_mean, family.image_std)
    offline = _env_offline() or not model_cfg.hf_download
    local = Path(source).expanduser().is_dir()
    try:
        model = cls.from_pretrained(source, local_files_only=offline)
        tok = transformers.AutoTokenizer.from_pretrained(source, local_files_only=offline)
        proc = transformers.AutoImageProcessor.from_pretrained(source, local_files_only=offline)
    except ImportError as exc:  # e.g. SigLIP's sentencepiece tokenizer
        raise RuntimeError(
            f"backbone {family.name}: loading {source!r} needs a missing package: {exc}"
        ) from exc
    except (OSError, ValueError) as exc:
        if local:
            raise RuntimeError(
                f"backbone {family.name}: cannot load the model, tokenizer and image processor "
                f"from the directory {source}: {exc}"
            ) from exc
        why = (
            "HF_HUB_OFFLINE is set"
            if _env_offline()
            else "downloads are off (model.hf_download = false)"
            if offline
            else "the download failed"
        )
        raise RuntimeError(
            f"{_missing_message(family, source, why)} ({type(exc).__name__}: {exc})"
        ) from exc
    mean = tuple(getattr(proc, "image_mean", None) or family.image_mean)
    std = tuple(getattr(proc, "image_std", None) or family.image_std)
    rescale = float(getattr(proc, "rescale_factor", None) or 1 / 255)
    return Loaded(model, hf_tokenizer(tok), mean, std, rescale, tok.pad_token_id or 0)
