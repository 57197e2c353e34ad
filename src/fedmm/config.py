"""Run configuration: nested dataclasses, loadable from TOML and from flat ``key=value`` overrides.

Every option has a default, so ``FedmmConfig()`` is a complete, runnable configuration.  Flat keys
are ``section.field`` (``train.lr``, ``fed.rounds``, ``feddat.temperature``); top-level fields
(``method``, ``seed``, ``out_dir``, ...) have no section.  The same flat form is what Flower's
``run_config`` holds (``[tool.flwr.app.config]`` in pyproject.toml), so one parser serves the CLI,
TOML files and ``flwr run``.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration key or value that fedmm cannot use; the message says what is valid."""


@dataclass
class ModelConfig:
    """The backbone and the trainable parts around it."""

    backbone: str = "minilm-mobilenet"  # registry name, see fedmm.backbones
    image_size: int = 96  # images are resized to this square size before the vision tower
    grid: int = 3  # visual tokens: the vision grid is average-pooled to at most grid x grid
    max_text_len: int = 24  # text tokens, [CLS] and [SEP] included
    head_hidden: int = 256  # hidden width of the task head MLP
    dropout: float = 0.1  # dropout in the head
    # Hugging Face families (vilt | clip | siglip | blip, see docs/backbones.md): where to load from
    hf_path: str = ""  # hub name, local dir or "tiny-random"; "" = the family's default
    hf_download: bool = False  # may fetch hf_path from the hub (else local files/cache only)
    gradient_checkpointing: bool = False  # recompute backbone activations in backward (less memory)


@dataclass
class AdapterConfig:
    """Bottleneck adapter ``A(h) = W_up ReLU(W_down h + b_down) + b_up`` after every FFN."""

    reduction_factor: int = 8  # bottleneck r = d // reduction_factor (ignored when bottleneck > 0)
    bottleneck: int = 0  # explicit r; 0 means "use reduction_factor"
    init_std: float = 0.02  # W_down ~ N(0, init_std)
    zero_init_up: bool = True  # W_up = 0 so the adapter is the identity at init (open choice)


@dataclass
class PeftConfig:
    """Which PEFT type the methods train (every method uses the same type and size)."""

    type: str = "adapter"  # adapter | lora | prompt | bitfit
    lora_r: int = 0  # LoRA rank; 0 = the rank whose size matches one adapter set (equal budget)
    lora_alpha: float = 16.0  # LoRA scaling alpha / r
    lora_targets: str = "query,value"  # linear layers of the text transformer, by last name
    prompt_length: int = 20  # prompt tokens prepended to the joint sequence


@dataclass
class TrainConfig:
    """Local optimisation, identical for every method (same steps, same schedule)."""

    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 32
    local_steps: int = 15  # optimiser steps per client per round, for every method
    schedule: str = "cosine"  # cosine | linear | constant, over the whole run (never restarted)
    warmup_frac: float = 0.05  # fraction of all steps spent in linear warm-up
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    eval_batch_size: int = 256
    threads: int = 0  # torch intra-op threads in each client process; 0 = all cores
    precision: str = "fp32"  # fp32 | bf16 (torch.autocast where the device supports bf16)
    accumulation: int = 1  # micro-batches per optimiser step: effective batch = batch_size x this


@dataclass
class FedConfig:
    """The federation: rounds, clients, sampling, server weighting."""

    rounds: int = 5
    clients: int = 5  # number of clients (SuperNodes) in the benchmark
    fraction: float = 1.0  # fraction of clients sampled for training each round
    min_clients: int = 1  # fewest replies a training round needs to aggregate
    weighting: str = "samples"  # samples | uniform: server average weights
    round_timeout: float = 0.0  # seconds to wait for replies; 0 = wait for all
    eval_every: int = 1  # evaluate every N rounds and always after the last; 1 = every round
    eval_fraction: float = 1.0  # fraction of clients evaluated (seeded sample; last round: all)
    compression: str = "none"  # none | fp16 | int8: encoding of the uploaded update


@dataclass
class FedDATConfig:
    """FedDAT hyper-parameters (Chen et al. 2024); defaults are the reference's."""

    temperature: float = 3.0  # T of the mutual distillation
    alpha: float = 0.5  # weight of the task loss in L_s (global adapter)
    beta: float = 0.5  # weight of the task loss in L_DAT (client adapter)
    dat_combine: str = "average"  # average | sum: how A_c and frozen A_s combine in the DAT
    federate_head: bool = False  # open choice: the reference keeps the head personal


@dataclass
class FedProxConfig:
    """FedProx (Li et al. 2020)."""

    mu: float = 0.01  # proximal weight μ; 0 reduces FedProx to FedAvg


@dataclass
class FedAdamConfig:
    """FedAdam (Reddi et al. 2021): Adam on the server over the averaged client update."""

    server_lr: float = 0.01  # η
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3  # adaptivity / stability constant τ


@dataclass
class DittoConfig:
    """Ditto (Li et al. 2021): personal models pulled towards the global one."""

    lam: float = 0.1  # λ of the proximal pull ‖v_k − θ‖²; 0 = independent personal models


@dataclass
class FedPIAConfig:
    """FedPIA (Saha et al. 2025) -- a reconstruction: the paper has no public code."""

    anchor: str = "global"  # global (previous global adapter) | fedavg (plain average) | largest
    lam: float = 0.5  # client integration: L <- lam * L + (1 - lam) * aligned global
    iterations: int = 1  # server alignment passes; > 1 re-anchors on the merged result
    cost: str = "sqeuclidean"  # unit matching cost: sqeuclidean | cosine (1 - cosine similarity)
    solver: str = "exact"  # exact (scipy assignment) | emd (POT ot.emd) | sinkhorn (POT, soft plan)
    reg: float = 0.05  # Sinkhorn entropic regularisation, relative to the mean cost


@dataclass
class TAPConfig:
    """TAP (Lee et al. 2025): modality-task-pair modules, adaptive replacement, distillation."""

    val_frac: float = 0.15  # held-out share of each client's training data for replacement
    margin: float = 0.01  # replace when global score > personal score * (1 + margin)
    combine: str = "sum"  # how a client's modality/task modules combine: sum | average
    teacher_steps: int = 15  # stage 2: local finetuning steps of the global model (teacher)
    distill_steps: int = 15  # stage 2: distillation steps into the personalised model
    distill_lr: float = 2e-4  # stage 2 learning rate (cosine over its own steps)
    temperature: float = 2.0  # T of the stage-2 distillation
    lam: float = 1.0  # λ: task loss + λ·T²·KL(teacher ‖ student)


@dataclass
class DataConfig:
    """Which benchmark and how much of it each client holds."""

    benchmark: str = "fmnist-domain"
    data_dir: str = ""  # where the benchmark's files are; "" = the benchmark's default search
    train_per_client: int = 400
    test_per_client: int = 150
    split_seed: int = 0  # the data split is fixed by this seed, independent of the run seed
    test_split: str = "standard"  # VQA-RAD: standard (official testset) | image-disjoint
    alpha: float = 0.5  # Dirichlet concentration of the label-skew partitions (smaller = more skew)
    dirichlet_by: str = "answer"  # vqa-rad-dirichlet: answer | organ, the skewed label per image
    clients_by: str = "column"  # jsonl: column (the records' `client`) | iid | dirichlet
    skip_missing_images: bool = False  # jsonl: drop records with a missing or unreadable image
    normalize_answers: bool = True  # jsonl: strip, collapse spaces, lower-case every answer
    allow_empty_clients: bool = False  # keep clients with 0 train or 0 test rows, out of every mean
    # the server's copy of the task schema (schema.json, shared like the CA certificate); ""
    # = derived from the benchmark by the process that starts a rehearsal (fedmm run)
    schema: str = ""


@dataclass
class ValidateConfig:
    """Server-side checks of every training reply before aggregation (federation/validation.py).

    Shapes, dtypes, keys and finiteness are always checked against the method's declared upload;
    these are the bounds that have no exact expected value."""

    max_examples: int = 1_000_000  # largest num-examples one client may claim (weights the average)
    max_upload_mb: float = 0.0  # bound on one upload's tensor bytes; 0 = the declared upload's size


@dataclass
class DPConfig:
    """Client-side differential privacy of the upload (federation/dp.py): clip, then add noise."""

    clip_norm: float = 0.0  # C: the update Δ = θ_k − θ^t is scaled to ‖Δ‖₂ ≤ C; 0 = DP off
    noise_multiplier: float = 0.0  # σ: adds N(0, (σC)²) to every uploaded coordinate


@dataclass
class FedmmConfig:
    """Everything one fedmm run needs."""

    method: str = "fedavg"
    seed: int = 0
    out_dir: str = "runs/latest"
    cache_dir: str = ""  # frozen-feature cache; "" = $XDG_CACHE_HOME/fedmm or ~/.cache/fedmm
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    progress: bool = True  # progress bars
    model: ModelConfig = field(default_factory=ModelConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fed: FedConfig = field(default_factory=FedConfig)
    feddat: FedDATConfig = field(default_factory=FedDATConfig)
    fedprox: FedProxConfig = field(default_factory=FedProxConfig)
    fedadam: FedAdamConfig = field(default_factory=FedAdamConfig)
    ditto: DittoConfig = field(default_factory=DittoConfig)
    fedpia: FedPIAConfig = field(default_factory=FedPIAConfig)
    tap: TAPConfig = field(default_factory=TAPConfig)
    data: DataConfig = field(default_factory=DataConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    dp: DPConfig = field(default_factory=DPConfig)
    resume: bool = False  # continue from <out_dir>'s server checkpoint of this run, if there is one

    # ------------------------------------------------------------------ flat views
    def to_flat(self) -> dict[str, Any]:
        """``{"method": ..., "train.lr": ..., ...}``: every option, one level deep."""
        flat: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                for sub in dataclasses.fields(value):
                    flat[f"{f.name}.{sub.name}"] = getattr(value, sub.name)
            else:
                flat[f.name] = value
        return flat

    def resolved(self) -> FedmmConfig:
        """Paths made absolute against this process's working directory, so every process of a
        federation (Ray workers, SuperNodes started elsewhere) reads and writes the same files."""
        import os

        updates = {"out_dir": os.path.abspath(self.out_dir)}
        if self.data.schema:
            updates["data.schema"] = os.path.abspath(self.data.schema)
        if self.cache_dir:
            updates["cache_dir"] = os.path.abspath(self.cache_dir)
        if self.data.data_dir:
            updates["data.data_dir"] = os.path.abspath(self.data.data_dir)
        return self.with_overrides(updates)

    def to_json(self) -> str:
        return json.dumps(self.to_flat(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> FedmmConfig:
        return cls().with_overrides(json.loads(text))

    def with_overrides(self, overrides: dict[str, Any]) -> FedmmConfig:
        """A copy with flat ``key -> value`` overrides applied; values may be strings."""
        cfg = dataclasses.replace(
            self,
            **{
                f.name: dataclasses.replace(getattr(self, f.name))
                for f in dataclasses.fields(self)
                if dataclasses.is_dataclass(getattr(self, f.name))
            },
        )
        valid = self.to_flat()
        for key, raw in overrides.items():
            key = key.replace("-", "_")
            if key not in valid:
                raise ConfigError(
                    f"unknown config key {key!r}; valid keys: {', '.join(sorted(valid))}"
                )
            value = _coerce(key, raw, type(valid[key]))
            if "." in key:
                section, name = key.split(".", 1)
                setattr(getattr(cfg, section), name, value)
            else:
                setattr(cfg, key, value)
        return cfg


# ---------------------------------------------------------------------- site vs run
# Options that belong to a site (a SuperNode's operator sets them with --node-config, see
# fedmm.federation.site) or to the server process itself.  They never travel in a server message:
# whoever submits a run decides the experiment, not which files a site reads or writes, on which
# device it computes or how private its uploads are (the run's dp.* is a request; the site's
# floor wins, see federation/site.py).
SITE_KEYS = frozenset({"data.data_dir", "cache_dir", "device", "train.threads"})
SERVER_KEYS = frozenset(
    {"out_dir", "progress", "resume", "data.schema", "fed.round_timeout", "fed.min_clients",
     "fed.eval_every", "fed.eval_fraction", "validate.max_examples", "validate.max_upload_mb"}
)  # fmt: skip


def experiment_keys() -> frozenset[str]:
    """The allowlist of what a server message may carry: every option of the experiment (method,
    PEFT, model id, hyper-parameters, schedule, rounds, compression, the run's DP request, the
    data options of a rehearsed central benchmark) -- never a path, device or thread count."""
    return frozenset(FedmmConfig().to_flat()) - SITE_KEYS - SERVER_KEYS


def experiment_of(cfg: FedmmConfig) -> dict[str, Any]:
    """The flat experiment options of ``cfg`` (``experiment_keys``), for a server message."""
    keys = experiment_keys()
    return {k: v for k, v in cfg.to_flat().items() if k in keys}


def _coerce(key: str, raw: Any, kind: type) -> Any:
    if isinstance(raw, kind) and not (kind is int and isinstance(raw, bool)):
        return raw
    if kind is bool:
        if isinstance(raw, str) and raw.lower() in {"1", "true", "yes", "on"}:
            return True
        if isinstance(raw, str) and raw.lower() in {"0", "false", "no", "off"}:
            return False
        raise ConfigError(f"{key} expects true/false, got {raw!r}")
    try:
        if kind is int and isinstance(raw, float) and raw.is_integer():
            return int(raw)
        if kind is float and isinstance(raw, int | str):
            return float(raw)
        if kind is int and isinstance(raw, str):
            return int(raw)
        if kind is str:
            return str(raw)
    except ValueError:
        pass
    raise ConfigError(f"{key} expects a {kind.__name__}, got {raw!r}")


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}} -> {"train.lr": 1}``."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def load_toml(path: str | Path) -> dict[str, Any]:
    """Flat overrides from a TOML file (tables become ``section.key``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:  # tomllib would raise a bare decoder error, no place
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{data[exc.start]:02x} at column {column}); "
            "save the file as UTF-8"
        ) from None
    try:
        return flatten(tomllib.loads(text))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc


def parse_set(items: list[str]) -> dict[str, str]:
    """``["train.lr=1e-3"] -> {"train.lr": "1e-3"}`` with a clear error on a missing ``=``."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out
