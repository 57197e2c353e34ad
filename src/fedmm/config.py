"""Run configuration: nested dataclasses, loadable from TOML and from flat ``key=value`` overrides.

Every option has a default, so ``FedmmConfig()`` is a complete, runnable configuration.  Flat keys
are ``section.field`` (``train.lr``, ``fed.rounds``, ``feddat.temperature``); top-level fields
(``method``, ``seed``, ``out_dir``, ...) have no section.  The same flat form is what Flower's
``run_config`` holds (``[tool.flwr.app.config]`` in pyproject.toml), so one parser serves the CLI,
TOML files and ``flwr run``.

The core sections' dataclasses are ``fedmm.sections``'s, the method sections' ``fedmm.spec``'s; here
they are put together, read and written, and every set of keys the rest of fedmm uses is
derived from their declarations.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmm.sections import (
    AdapterConfig,
    DataConfig,
    DPConfig,
    EvalConfig,
    FedConfig,
    ModelConfig,
    PeftConfig,
    TrainConfig,
    ValidateConfig,
)
from fedmm.spec import (
    DISPLAY,
    EXPERIMENT,
    SERVER,
    SITE,
    method_sections,
    option,
)  # fmt: skip


class ConfigError(ValueError):
    """A configuration key or value that fedmm cannot use; the message says what is valid."""


SITES = "sites"  # data.benchmark of a federation of site directories


@dataclass
class FedmmConfig:
    """Everything one fedmm run needs."""

    method: str = option("fedavg", help="the method (fedmm list)")
    # a name for this configuration of the method in results (run key, table rows): "" = the
    # method's name; ``fedmm bench``'s ablations set it (``feddat-fedhead``, ...)
    variant: str = option(
        "",
        scope=SERVER,
        help="the run's name for this configuration of the method; \"\" = the method's",
    )
    seed: int = option(0, "[0, inf)", help="run seed", flag="seed")
    out_dir: str = option(
        "runs/latest", scope=SERVER, affects_results=False, help="output directory", flag="out"
    )
    cache_dir: str = option(
        "",
        scope=SITE,
        affects_results=False,
        help='frozen-feature cache; "" = $XDG_CACHE_HOME/fedmm or ~/.cache/fedmm',
    )
    # where a site computes, not what: it may change when a run resumes and leaves a finished
    # bench cell finished
    device: str = option(
        "auto", scope=SITE, affects_results=False, help="auto | cpu | cuda | cuda:N"
    )
    progress: bool = option(True, scope=DISPLAY, affects_results=False, help="progress bars")
    # experiment tracking (fedmm.tracking): local files unless MLFLOW_TRACKING_URI says otherwise
    track: str = option(
        "",
        choices=("", "tensorboard", "mlflow"),
        scope=DISPLAY,
        affects_results=False,
        help="log every round to TensorBoard (<out>/tensorboard/) or MLflow (<out>/mlflow.db, "
        'or MLFLOW_TRACKING_URI); "" = no tracking',
        flag="track",
    )
    model: ModelConfig = field(default_factory=ModelConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fed: FedConfig = field(default_factory=FedConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    dp: DPConfig = field(default_factory=DPConfig)
    resume: bool = option(
        False,
        scope=SERVER,
        affects_results=False,
        help="continue from <out_dir>'s server checkpoint of this run, if there is one",
    )
    # each method's own options, one section per method that has any (``cfg.feddat``, ...): the
    # dataclasses are declared on the ground floor (``fedmm.spec.METHOD_SPECS``)
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


def _method_defaults() -> dict[str, Any]:
    return {name: options() for name, options in method_sections().items()}


# ---------------------------------------------------------------------- derived from the declarations
def declared_fields() -> dict[str, dataclasses.Field]:
    """Every option's dataclass field by flat key (``train.lr``, ``feddat.temperature``): the
    declarations (``fedmm.spec.option``) every derived set below reads."""
    out: dict[str, dataclasses.Field] = {}
    for f in dataclasses.fields(FedmmConfig):
        if f.name == "methods":
            continue
        if isinstance(f.default_factory, type) and dataclasses.is_dataclass(f.default_factory):
            out |= {f"{f.name}.{sub.name}": sub for sub in dataclasses.fields(f.default_factory)}
        else:
            out[f.name] = f
    for section, options in method_sections().items():
        out |= {f"{section}.{sub.name}": sub for sub in dataclasses.fields(options)}
    return out


_UNDECLARED = {"scope": EXPERIMENT, "affects_results": True, "operational": False, "flag": ""}


def keys_where(**metadata: Any) -> frozenset[str]:
    """The flat keys whose declaration has every given ``metadata`` value (``scope="site"``)."""
    return frozenset(
        key for key, f in declared_fields().items()
        if all(f.metadata.get(name, _UNDECLARED[name]) == value for name, value in metadata.items())
    )  # fmt: skip


# Options that belong to a site (a SuperNode's operator sets them with --node-config, see
# fedmm.federation.site) or to the server process itself (and how a run is shown).  They never
# travel in a server message: whoever submits a run decides the experiment, not which files a site
# reads or writes, on which device it computes or how private its uploads are (the run's dp.* is a
# request; the site's floor wins, see federation/site.py).
SITE_KEYS = keys_where(scope=SITE)
SERVER_KEYS = keys_where(scope=SERVER) | keys_where(scope=DISPLAY)
# where things are and how they are shown, not what is computed: they may differ between an
# interrupted and a resuming process, and between a finished bench cell and its rerun
MAY_DIFFER = keys_where(affects_results=False)
# server options a resumed run may change: how long to wait, how few replies suffice, how
# evaluation is sampled -- not what a client computes
OPERATIONAL = keys_where(operational=True)
# ``fedmm run`` flag -> the option it sets
FLAG_KEYS = {
    f.metadata["flag"]: key for key, f in declared_fields().items() if f.metadata.get("flag")
}


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
    return keys_where(scope=EXPERIMENT)


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
