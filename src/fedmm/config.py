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


SITES = "sites"  # data.benchmark of a federation of site directories


@dataclass
class ModelConfig:
    """The backbone and the trainable parts around it."""

    backbone: str = "minilm-mobilenet"  # registry name, see fedmm.backbones
    image_size: int = 96  # images are resized to this square size before the vision tower
    grid: int = 3  # visual tokens: the vision grid is average-pooled to at most grid x grid
    max_text_len: int = 24  # text tokens, [CLS] and [SEP] included
    head_hidden: int = 256  # hidden width of the task head MLP
    dropout: float = 0.1  # dropout in the head
    # dropout inside the frozen backbone's transformer while training (hidden and attention
    # dropout; docs/performance.md): -1 = the backbone's own rates (MiniLM: 0.1, today's
    # behaviour), 0 = off (no dropout masks: measured faster, accuracy effect not yet measured)
    backbone_dropout: float = -1.0
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
    # fp32 | bf16 | auto (bf16 where the device has native bf16 -- CUDA, or a CPU with AMX /
    # AVX512-BF16 -- else fp32; each site resolves it, results record it per client).  bf16: the
    # frozen backbone's matmul weights stored once in bf16, autocast, the trainable PEFT sets,
    # projection and head kept in fp32 (docs/performance.md).  Default fp32 until the parity
    # runs (fp32 vs bf16, 3 seeds, two benchmarks) are done on an idle machine.
    precision: str = "fp32"
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
    # secure aggregation (federation/secagg.py, docs/secure-aggregation.md): off | secagg+ (Bell
    # et al. 2020): the server learns only the sum of the sampled sites' uploads
    secure_aggregation: str = "off"
    secagg_threshold: int = 0  # t of the t-of-n Shamir shares; 0 = a strict majority of n
    secagg_neighbours: int = 0  # k other sites each site masks with (even); 0 = every sampled site
    secagg_clip: float = 1.0  # clipping range c: each uploaded Δ value is clipped to [-c, c]
    secagg_quantization_bits: int = 24  # Δ ∈ [-c, c] quantized to integers in [0, 2^bits]
    secagg_modulus_bits: int = 64  # masked sums are taken mod 2^bits (sent as uint32 if ≤ 32)


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
    # a name for this configuration of the method in results (run key, table rows): "" = the
    # method's name; ``fedmm bench``'s ablations set it (``feddat-fedhead``, ...)
    variant: str = ""
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
    data: DataConfig = field(default_factory=DataConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    dp: DPConfig = field(default_factory=DPConfig)
    resume: bool = False  # continue from <out_dir>'s server checkpoint of this run, if there is one
    # each method's own options, one section per method that has any (``cfg.feddat``, ...): the
    # dataclasses live in the method modules and are registered with them (``method_sections``)
    methods: dict[str, Any] = field(default_factory=lambda: _method_defaults(), repr=False)

    def __getattr__(self, name: str) -> Any:
        """``cfg.feddat`` etc.: a method's options section (only called for names that are not
        regular fields)."""
        sections = self.__dict__.get("methods")
        if sections is not None and name in sections:
            return sections[name]
        raise AttributeError(f"{type(self).__name__} has no option section {name!r}")

    def sections(self) -> dict[str, Any]:
        """Every options section by name: the core ones (``train``, ``fed``, ...) and each
        method's (``feddat``, ``fedpia``, ...)."""
        core = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if dataclasses.is_dataclass(getattr(self, f.name))}  # fmt: skip
        return core | dict(self.methods)

    # ------------------------------------------------------------------ flat views
    def to_flat(self) -> dict[str, Any]:
        """``{"method": ..., "train.lr": ..., ...}``: every option, one level deep."""
        flat: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "methods":
                continue
            if dataclasses.is_dataclass(value):
                for sub in dataclasses.fields(value):
                    flat[f"{f.name}.{sub.name}"] = getattr(value, sub.name)
            else:
                flat[f.name] = value
        for section, value in self.methods.items():
            for sub in dataclasses.fields(value):
                flat[f"{section}.{sub.name}"] = getattr(value, sub.name)
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
            methods={name: dataclasses.replace(v) for name, v in self.methods.items()},
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
                setattr(cfg.sections()[section], name, value)
            else:
                setattr(cfg, key, value)
        return cfg


# ---------------------------------------------------------------------- method options
_METHOD_SECTIONS: dict[str, type] = {}


def register_section(name: str, options: type) -> None:
    """Register a method's options dataclass as config section ``name`` (``methods.register``
    does this for a method's ``options``); every ``FedmmConfig`` made afterwards has it."""
    if name in {f.name for f in dataclasses.fields(FedmmConfig)}:
        raise ValueError(f"option section {name!r} is a core section of FedmmConfig")
    known = _METHOD_SECTIONS.get(name)
    if known is not None and known is not options:
        raise ValueError(f"option section {name!r} is registered twice ({known.__qualname__}, "
                         f"{options.__qualname__})")  # fmt: skip
    _METHOD_SECTIONS[name] = options


def method_sections() -> dict[str, type]:
    """Every registered method options section (importing the method registry first)."""
    import fedmm.methods  # noqa: F401 -- its modules register their sections on import

    return dict(_METHOD_SECTIONS)


def _method_defaults() -> dict[str, Any]:
    return {name: options() for name, options in method_sections().items()}


def option(default: Any, interval: str = "", *, choices: tuple = (), help: str = "") -> Any:
    """A dataclass field of an options section with what ``validate_config`` checks:
    ``interval`` like ``"(0, inf)"`` or ``"[0, 1]"`` (numbers; round brackets exclude the bound)
    or ``choices`` (strings), and ``help`` (shown by ``fedmm list``)."""
    return field(default=default, metadata={"interval": interval, "choices": tuple(choices),
                                            "help": help})  # fmt: skip


def parse_interval(text: str) -> tuple[float, float, bool, bool]:
    """``"(0, inf)"`` -> ``(0.0, inf, True, True)``: (low, high, low open, high open)."""
    lo, hi = (float(x) for x in text[1:-1].split(","))
    return lo, hi, text[0] == "(", text[-1] == ")"


# ---------------------------------------------------------------------- site vs run
# Options that belong to a site (a SuperNode's operator sets them with --node-config, see
# fedmm.federation.site) or to the server process itself.  They never travel in a server message:
# whoever submits a run decides the experiment, not which files a site reads or writes, on which
# device it computes or how private its uploads are (the run's dp.* is a request; the site's
# floor wins, see federation/site.py).
SITE_KEYS = frozenset({"data.data_dir", "cache_dir", "device", "train.threads"})
SERVER_KEYS = frozenset(
    {"out_dir", "progress", "resume", "variant", "data.schema", "fed.round_timeout",
     "fed.min_clients", "fed.eval_every", "fed.eval_fraction", "validate.max_examples", "validate.max_upload_mb"}
)  # fmt: skip


def run_name(cfg: FedmmConfig, benchmark: str | None = None) -> str:
    """``<method>[~<variant>]-<peft>-<benchmark>-seed<S>``: a run's name in file names
    (checkpoints, client state).  ``benchmark``: the schema's name where it differs from
    ``data.benchmark`` (site directories)."""
    method = f"{cfg.method}~{cfg.variant}" if cfg.variant else cfg.method
    return f"{method}-{cfg.peft.type}-{benchmark or cfg.data.benchmark}-seed{cfg.seed}"


def experiment_keys() -> frozenset[str]:
    """The allowlist of what a server message may carry: every option of the experiment (method,
    PEFT, model id, hyper-parameters, schedule, rounds, compression, the run's DP request, the
    data options of a rehearsed central benchmark) -- never a path, device or thread count."""
    return frozenset(FedmmConfig().to_flat()) - SITE_KEYS - SERVER_KEYS


def experiment_of(cfg: FedmmConfig) -> dict[str, Any]:
    """The flat experiment options of ``cfg`` (``experiment_keys``), for a server message."""
    keys = experiment_keys()
    return {k: v for k, v in cfg.to_flat().items() if k in keys}


FLWR_APP_CONFIG_HEADER = (
    "[tool.flwr.app.config]\n"
    "# generated from fedmm's config dataclasses by `python scripts/flwr_app_config.py --write`:\n"
    "# every fedmm option (see `fedmm list`); override with\n"
    "# flwr run --run-config \"fed.rounds=3 out_dir='/abs/dir'\"\n"
)


def flwr_app_config() -> str:
    """The ``[tool.flwr.app.config]`` tables of pyproject.toml, generated from the dataclasses:
    Flower's ``flwr run --run-config`` accepts only keys declared there (flwr's
    ``fuse_dicts(check_keys=True)``), so every option -- each method's too -- must be listed.
    ``tests/test_config_cli.py`` checks pyproject.toml holds exactly this text."""
    flat = FedmmConfig().to_flat()
    lines = [FLWR_APP_CONFIG_HEADER.rstrip("\n")]
    lines += [f"{k} = {json.dumps(v)}" for k, v in flat.items() if "." not in k]
    section = None
    for key, value in flat.items():
        if "." not in key:
            continue
        name, option_name = key.split(".", 1)
        if name != section:
            lines += ["", f"[tool.flwr.app.config.{name}]"]
            section = name
        lines.append(f"{option_name} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


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
