"""Site settings: what belongs to a site, set by its operator, never by the server.

A SuperNode's operator passes them with Flower's ``--node-config`` (space-separated
``key=value``, strings quoted as TOML wants them)::

    flower-supernode ... --node-config 'data-dir="/srv/fedmm/site" state-dir="/var/lib/fedmm"
                                        dp-clip-norm=1.0 dp-noise-multiplier=0.8 dp-max-epsilon=8'

In a simulation (``fedmm run``) fedmm generates them per client (``engine.py``).

=======================  ==========  ===========================================================
key                      default     meaning
=======================  ==========  ===========================================================
``data-dir``             (required)  this site's data: a site directory (``schema.json``,
                                     ``train.jsonl``, ``test.jsonl``, images; ``fedmm split``
                                     writes them); with ``partition-id``, the files of a central
                                     benchmark to rehearse (fmnist-*: the Fashion-MNIST dir;
                                     "" = the benchmark's default search)
``state-dir``            see below   the site's own directory ``<state-dir>/<site>/``: client
                                     state (private models), the privacy ledger and evaluation
                                     counts (``privacy/<sha256 of the data>.json``, one per
                                     training data set over every run), audit log
                                     (``audit.jsonl``), default feature cache (``cache/``);
                                     "" = ``$XDG_STATE_HOME/fedmm`` (``~/.local/state``)
``cache-dir``            ""          encoded-feature cache; "" = ``<state root>/cache`` (the site's
                                     own directory, see ``consent.site_root``; a rehearsed
                                     partition: ``$XDG_CACHE_HOME/fedmm``)
``device``               auto        auto | cpu | cuda | cuda:N
``threads``              0           torch intra-op threads; 0 = all cores
``dp-clip-norm``         0           privacy floor: clip the update to at most this L2 norm
                                     (0 = no floor); the client uses min(run's, floor)
``dp-noise-multiplier``  0           privacy floor: at least this σ; the client uses
                                     max(run's, floor)
``dp-max-epsilon``       0           privacy budget: refuse to train once ε (at ``dp-delta``)
                                     would exceed it; 0 = no budget.  One budget per site and
                                     training data set over every run, seed, method and PEFT
                                     type (``privacy.py``): a server cannot reset it
``dp-delta``             1e-5        δ of the reported ε
``dp-mode``              update      what the clip norm C bounds, how ε is accounted
                                     (``privacy.py``): ``update`` = the site's whole update is
                                     clipped to C and noised once per round; protects the
                                     site's whole data (any change of it) against the server
                                     and the wire; ε of a Gaussian of sensitivity 2C per round.
                                     ``record`` = DP-SGD with Opacus (``dpsgd.py``): each
                                     example's gradient clipped to C, noise in every local step,
                                     Poisson-sampled batches; protects one record; ε of T
                                     Poisson-sampled Gaussian steps per round.  FedAvg, FedProx,
                                     FedAdam, FedYogi, FedAvgM, FedPer, local with adapter or
                                     LoRA; other methods / PEFT types are refused
``dp-evaluation``        withhold    with DP on: ``withhold`` = evaluation replies carry no score
                                     (scores are outside ε); ``exact`` = exact scores, knowingly
                                     outside the accounted ε
``max-evaluations-per-   -1 (auto)   evaluations this site answers per run id, counted on
run``                                disk; beyond, it refuses with the reason.  auto = 1000 with
                                     DP on (fed.eval_every=1 for hundreds of rounds stays
                                     inside it; a server asking in a loop does not), no limit
                                     without DP; 0 = no limit
``max-evaluations-per-   -1 (auto)   evaluations of one global state (sha256 of the received
state``                              arrays) over every run; auto = 1 with DP on (the server
                                     learns each state's score once), no limit without DP (a
                                     rerun or resumed round re-evaluates identical states);
                                     0 = no limit
``min-val-rows``         20          fewest training records a run may hold out as this site's
                                     validation split (``data.val_frac``, early stopping); a
                                     smaller split is refused: its score would tell the server
                                     about a handful of records it chose the share of.  Above
                                     the site's row count: no validation scores at all
``model-dir``            ""          local Hugging Face weights for the run's model family
                                     (instead of the run's ``model.hf_path``)
``partition-id``         (none)      rehearsal only: this node is client K of a central
                                     benchmark (Flower's simulation sets it)
``accept-methods``       ""          methods this site runs, comma-separated ("" = all)
``accept-peft``          ""          PEFT types this site trains, comma-separated ("" = all)
``accept-models``        builtin     models this site runs: ``builtin`` (fedmm's backbones with
                                     their own weights), backbone names, hub ids ``org/name``,
                                     ``*`` (any hub id); never a path (local weights: model-dir)
``allow-download``       false       may a run fetch weights (``model.hf_download = true``)
``require-secure-        false       refuse every message of a run without
aggregation``                        ``fed.secure_aggregation`` (the server would see this
                                     site's update in the clear; docs/secure-aggregation.md)
``max-rounds``           1000        largest ``fed.rounds`` this site joins
``max-local-steps``      10000       largest ``train.local_steps`` x ``train.accumulation``
``max-batch-size``       512         largest ``train.batch_size`` / ``train.eval_batch_size`` /
                                     ``eval.generate_batch_size``
``max-image-size``       1024        largest ``model.image_size`` (pixels per side)
``max-text-len``         512         largest ``model.max_text_len`` (tokens)
``max-width``            8192        largest ``model.head_hidden``, ``peft.lora_r``,
                                     ``adapter.bottleneck``, ``peft.prompt_length`` and TAP's
                                     ``teacher_steps`` / ``distill_steps`` are bounded by
                                     ``max-local-steps`` (checked before any model is built)
``max-trainable-params`` 100000000   most trainable values of the run's model (the global state
                                     the server sends, then the built model)
=======================  ==========  ===========================================================

What a site accepts and its caps are checked before anything is read (``federation/consent.py``).

The stricter-of rule (``effective_dp``): a site that sets a floor always clips and noises at
least that much, whatever the run asks; a run may ask for more privacy, never less.  In both
``dp-mode`` values the clip norm and σ are those of ``effective_dp``; the mode is the site's alone.

With DP on (either mode), no exact data-dependent value leaves with a training reply: the
pre-clip norm (``dp-norm``, ``dp-scale``), the training loss and a method's ``stat.*`` scores are
withheld; the reply carries C, σ, the mode and the ε spent.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from fedmm.config import ConfigError, FedmmConfig
from fedmm.sections import DPConfig

FLOWER_KEYS = {"num-partitions"}  # set by Flower's simulation; fedmm does not need it


@dataclass(frozen=True)
class SiteSettings:
    """One site's own settings (see the module docstring for each key)."""

    data_dir: str = ""
    state_dir: str = ""
    cache_dir: str = ""
    device: str = "auto"
    threads: int = 0
    dp_clip_norm: float = 0.0
    dp_noise_multiplier: float = 0.0
    dp_max_epsilon: float = 0.0
    dp_delta: float = 1e-5
    dp_mode: str = "update"  # update | record: what the clip norm bounds (privacy.py, dpsgd.py)
    dp_evaluation: str = "withhold"  # withhold | exact: evaluation metrics under DP
    max_evaluations_per_run: int = -1  # -1 = auto: 1000 with DP on, else none; 0 = no limit
    max_evaluations_per_state: int = -1  # -1 = auto: 1 with DP on, else none; 0 = no limit
    min_val_rows: int = 20  # fewest records of a validation split this site scores (early stop)
    model_dir: str = ""
    partition_id: int = -1  # -1: a site directory, not a rehearsed partition
    # consent (federation/consent.py): what this site runs, checked before anything is read
    accept_methods: str = ""
    accept_peft: str = ""
    accept_models: str = "builtin"
    allow_download: bool = False
    require_secure_aggregation: bool = False
    max_rounds: int = 1000
    max_local_steps: int = 10_000
    max_batch_size: int = 512
    max_image_size: int = 1024
    max_text_len: int = 512
    max_width: int = 8192
    max_trainable_params: int = 100_000_000

    def __post_init__(self) -> None:
        for name in ("dp_clip_norm", "dp_noise_multiplier", "dp_max_epsilon"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"site setting {node_key(name)} must be >= 0, got {value}")
        if not 0 < self.dp_delta < 1:
            raise ConfigError(f"site setting dp-delta must be in (0, 1), got {self.dp_delta}")
        if self.threads < 0:
            raise ConfigError(f"site setting threads must be >= 0, got {self.threads}")
        if self.min_val_rows < 1:
            raise ConfigError(f"site setting min-val-rows must be >= 1, got {self.min_val_rows}")
        if self.dp_noise_multiplier > 0 and self.dp_clip_norm <= 0:
            raise ConfigError(
                "site setting dp-noise-multiplier needs dp-clip-norm > 0 (noise is scaled by it)"
            )
        check_privacy_settings(self)
        from fedmm.federation.consent import check_settings

        check_settings(self)

    @property
    def rehearsal(self) -> bool:
        """True when this node is a partition of a central benchmark (``partition-id``)."""
        return self.partition_id >= 0

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> SiteSettings:
        """Parse Flower's node config; an unknown key is an error naming the valid ones."""
        known = {node_key(f.name): f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, raw in node_config.items():
            if key in FLOWER_KEYS:
                continue
            if key not in known:
                raise ConfigError(
                    f"unknown site setting {key!r} in the SuperNode's --node-config; valid: "
                    + ", ".join(sorted(known))
                )
            f = known[key]
            kind = type(getattr(cls, f.name))
            try:
                if kind is bool:  # bool("false") is True: parse the words
                    values[f.name] = _bool(key, raw)
                else:
                    values[f.name] = kind(raw) if kind is not int else int(str(raw))
            except ValueError:
                raise ConfigError(
                    f"site setting {key} expects a {kind.__name__}, got {raw!r}"
                ) from None
        return cls(**values)

    def to_node_config(self) -> dict[str, Any]:
        """The non-default settings as ``--node-config`` keys (for fedmm's own launchers)."""
        default = SiteSettings()
        return {
            node_key(f.name): getattr(self, f.name)
            for f in fields(self)
            if getattr(self, f.name) != getattr(default, f.name)
        }

    def apply(self, cfg: FedmmConfig) -> FedmmConfig:
        """The run's experiment ``cfg`` completed with this site's paths, device and threads."""
        updates: dict[str, Any] = {
            "data.data_dir": self.data_dir, "cache_dir": self.cache_dir, "device": self.device,
            "train.threads": self.threads,
        }  # fmt: skip
        if self.model_dir:
            updates["model.hf_path"] = self.model_dir
        return cfg.with_overrides(updates)

    def state_root(self, site_name: str) -> Path:
        """Where this site keeps client state and its privacy ledger."""
        if self.state_dir:  # one directory per site inside it: two sites never share one
            return Path(self.state_dir) / site_name
        base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        return Path(base) / "fedmm" / site_name

    def effective_dp(self, requested: DPConfig) -> DPConfig:
        """The stricter of the run's request and this site's floor: the smaller positive clip
        norm and the larger noise multiplier."""
        clips = [c for c in (requested.clip_norm, self.dp_clip_norm) if c > 0]
        clip = min(clips) if clips else 0.0
        sigma = max(requested.noise_multiplier, self.dp_noise_multiplier) if clip > 0 else 0.0
        return replace(requested, clip_norm=clip, noise_multiplier=sigma)


def _bool(key: str, raw: Any) -> bool:
    """A boolean site setting: a TOML bool, or true/false (also 1/0, yes/no) as text."""
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise ConfigError(f"site setting {key} expects true or false, got {raw!r}")


def check_privacy_settings(settings: SiteSettings) -> None:
    """``dp-mode``, ``dp-evaluation`` and the evaluation limits in range (``ConfigError``)."""
    for name, choices in (("dp_mode", ("update", "record")), ("dp_evaluation", DP_EVALUATION)):
        if getattr(settings, name) not in choices:
            raise ConfigError(f"site setting {node_key(name)} must be one of {choices}, got "
                              f"{getattr(settings, name)!r}")  # fmt: skip
    for name in ("max_evaluations_per_run", "max_evaluations_per_state"):
        if getattr(settings, name) < -1:
            raise ConfigError(f"site setting {node_key(name)} must be >= -1 (-1 = auto, 0 = no "
                              f"limit), got {getattr(settings, name)}")  # fmt: skip


DP_EVALUATION = ("withhold", "exact")


def node_key(field_name: str) -> str:
    return field_name.replace("_", "-")


def node_config_arg(settings: Mapping[str, Any]) -> str:
    """``--node-config`` text: ``key=value`` pairs, strings quoted as TOML wants them."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

    return " ".join(f"{k}={value(v)}" for k, v in settings.items())


__all__ = ["SiteSettings", "node_config_arg", "node_key"]
