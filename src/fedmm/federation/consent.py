"""A site's consent: which experiments this site runs, decided at the site before anything is read.

A server message is a request.  Before a site builds a model, reads a record or writes a file it
checks the run's experiment against its own settings (``federation/site.py``):

* **what it accepts**: ``accept-methods``, ``accept-peft`` (comma-separated; "" = all) and
  ``accept-models`` -- ``builtin`` (default: fedmm's registered backbones with their own weights,
  i.e. ``model.hf_path`` "" or ``tiny-random``), backbone names, Hugging Face hub ids ``org/name``
  (letters, digits, ``. _ -``; no ``..``) or ``*`` (any well-formed hub id).  A local path from the
  server is never used: a site's weights are its ``model-dir`` (with ``model-dir`` set, the run's
  ``model.hf_path`` is replaced by it and never read).  ``allow-download`` (default false):
  without it, ``model.hf_download = true`` is refused;
* **caps** (``max-rounds``, ``max-local-steps``, ``max-batch-size``, ``max-image-size``,
  ``max-text-len``, ``max-trainable-params``) that bound what a run may cost the site in memory
  and time;
* **the same validator the CLI runs** (``fedmm.validate.validate_config``) on the experiment as
  the site would run it.

A refusal is a ``NotAccepted`` (a ``RefusedMessage``) whose text names the option, the run's
value and the site's limit, built from experiment values and site settings only (no path): it
may leave the site as it is.

Names that become path components (the schema's name, ``site.json``'s name, a client id, a run
id) go through ``safe_name`` first.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedmm.config import ConfigError, FedmmConfig
from fedmm.federation.messages import RefusedMessage
from fedmm.sections import PeftConfig
from fedmm.spec import BACKBONE_NAMES, HF_GENERATIVE_BACKBONE_NAMES, METHOD_SPECS, PEFT_TYPE_NAMES

BUILTIN = "builtin"  # accept-models: fedmm's registered backbones with their own weights
ANY_HUB_ID = "*"  # accept-models: any well-formed hub id
TINY = "tiny-random"  # model.hf_path of a family's tiny random config (no weights, no download)
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")
SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
MAX_NAME = 64  # characters of a name used as a path component


class NotAccepted(RefusedMessage):
    """An experiment this site does not consent to run; nothing was read or written."""


# ---------------------------------------------------------------------- names in paths
def safe_name(name: str) -> str:
    """``name`` as one path component: itself when it is 1..64 characters of ``[A-Za-z0-9._-]``
    not starting with a dot; otherwise **mapped**: every other character becomes ``-``, leading
    dots are dropped, it is cut to 55 characters and ``-<first 8 hex of sha256(name)>`` is
    appended, so two different names never share a directory (``"../x"`` -> ``"x-<hash>"``,
    ``""`` -> ``"-<hash>"``).  Used for the schema's and ``site.json``'s names and client ids,
    which come from files an operator wrote; run ids from a server are refused instead
    (``check_run_id``)."""
    if len(name) <= MAX_NAME and SAFE_NAME.fullmatch(name):
        return name
    body = re.sub(r"[^A-Za-z0-9._-]+", "-", name).lstrip(".")[: MAX_NAME - 9]
    return f"{body}-{hashlib.sha256(name.encode('utf-8')).hexdigest()[:8]}"


def check_run_id(run_id: str) -> str:
    """The server's run id, refused (``RefusedMessage``) unless it is 1..64 letters and digits:
    it names the directory of this run's client state."""
    if not (0 < len(run_id) <= MAX_NAME and run_id.isascii() and run_id.isalnum()):
        raise RefusedMessage(
            f"malformed run id {run_id[:80]!r}: a run id is 1..{MAX_NAME} ASCII letters and digits"
        )
    return run_id


# ---------------------------------------------------------------------- the site's settings
def csv(text: str) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``."""
    return [x.strip() for x in text.split(",") if x.strip()]


CAPS = {  # site setting field -> (what it bounds, for messages)
    "max_rounds": "fed.rounds",
    "max_local_steps": "train.local_steps x train.accumulation (micro-batches per round)",
    "max_batch_size": "train.batch_size, train.eval_batch_size and eval.generate_batch_size",
    "max_image_size": "model.image_size",
    "max_text_len": "model.max_text_len",
    "max_width": "model.head_hidden, peft.lora_r, adapter.bottleneck, peft.prompt_length",
    "max_trainable_params": "the trainable values of the run's model",
}


def check_settings(settings: Any) -> None:
    """The consent settings of a ``SiteSettings`` are usable; ``ConfigError`` naming the setting
    otherwise (called by ``SiteSettings.__post_init__``)."""
    for field_name in CAPS:
        value = getattr(settings, field_name)
        if value < 1:
            key = field_name.replace("_", "-")
            raise ConfigError(f"site setting {key} must be >= 1, got {value}")
    for key, value, valid in (
        ("accept-methods", settings.accept_methods, list(METHOD_SPECS)),
        ("accept-peft", settings.accept_peft, list(PEFT_TYPE_NAMES)),
    ):
        unknown = [x for x in csv(value) if x not in valid]
        if unknown:
            raise ConfigError(f"site setting {key}: unknown {unknown[0]!r}; choices: "
                              f"{', '.join(valid)} (\"\" = all)")  # fmt: skip
    models = csv(settings.accept_models)
    if not models:
        raise ConfigError(
            f'site setting accept-models is empty; give "{BUILTIN}" (fedmm\'s backbones), '
            f'backbone names, hub ids, or "{ANY_HUB_ID}" (any hub id)'
        )
    names = set(BACKBONE_NAMES)
    for entry in models:
        if entry not in (BUILTIN, ANY_HUB_ID) and entry not in names and not is_hub_id(entry):
            raise ConfigError(
                f"site setting accept-models: {entry!r} is neither {BUILTIN!r}, {ANY_HUB_ID!r}, a "
                f"backbone ({', '.join(sorted(names))}) nor a hub id (organisation and name of "
                "letters, digits and . _ - joined by one slash; local weights are the site's "
                "model-dir)"
            )


def is_hub_id(name: str) -> bool:
    """Whether ``name`` is a well-formed Hugging Face hub id ``org/name`` (no ``..``, no path,
    no URL, no ``~``)."""
    return bool(HUB_ID.fullmatch(name)) and ".." not in name


# ---------------------------------------------------------------------- the experiment
def refuse(option: str, value: Any, why: str) -> NotAccepted:
    return NotAccepted(f"this site does not accept {option}={value!r}: {why}")


def check_model(cfg: FedmmConfig, settings: Any) -> None:
    """The run's model against ``accept-models``, ``allow-download`` and ``model-dir``."""
    model = cfg.model
    if model.hf_download and not settings.allow_download:
        raise refuse("model.hf_download", True, "this site loads weights it already holds "
                     "(site setting allow-download=false)")  # fmt: skip
    accepted = csv(settings.accept_models)
    if settings.model_dir:  # the site's own weights replace whatever the run names
        source = ""
    elif model.hf_path in ("", TINY):
        source = ""
    elif is_hub_id(model.hf_path):
        source = model.hf_path
    else:
        raise refuse("model.hf_path", model.hf_path, "a server names a model by its backbone or "
                     "a hub id (organisation and name joined by one slash), never by a path or "
                     "URL; a site's local weights are its own setting model-dir")  # fmt: skip
    if source:
        if source not in accepted and ANY_HUB_ID not in accepted:
            raise refuse("model.hf_path", source, "not among this site's accept-models "
                         f"({', '.join(accepted)})")  # fmt: skip
        if Path(source).exists():  # Hugging Face would load a local directory of that name
            raise refuse("model.hf_path", source, "a directory of that name exists where this "
                         "site runs, and would be loaded instead of the hub model")  # fmt: skip
        return
    if model.backbone in HF_GENERATIVE_BACKBONE_NAMES and not settings.model_dir:
        # a Hugging Face VLM family's hub default (up to 7 B parameters, from the site's cache)
        # is not fedmm's own weights: the site names the family, builtin does not admit it
        if model.backbone not in accepted:
            raise refuse("model.backbone", model.backbone, "a Hugging Face VLM family's default "
                         "checkpoint is loaded only where accept-models names the family "
                         f"(this site: {', '.join(accepted)}), or from the site's model-dir")  # fmt: skip
        return
    if BUILTIN not in accepted and model.backbone not in accepted:
        raise refuse("model.backbone", model.backbone, "not among this site's accept-models "
                     f"({', '.join(accepted)})")  # fmt: skip


def check_steps(cfg: FedmmConfig, steps: int, settings: Any) -> None:
    """A training round's ``steps`` (``sections.steps_per_round`` of this site's rows) times
    ``train.accumulation`` against ``max-local-steps``: with ``train.local_epochs`` the count
    is known only once the site has read its data (``check_caps`` checks ``train.local_steps``
    before)."""
    micro = steps * cfg.train.accumulation
    if micro > settings.max_local_steps:
        raise refuse("train.local_epochs", cfg.train.local_epochs,
                     f"{steps} steps x train.accumulation={cfg.train.accumulation} on this "
                     f"site's data = {micro} micro-batches per round; this site's limit is "
                     f"max-local-steps={settings.max_local_steps}")  # fmt: skip


def check_val_rows(cfg: FedmmConfig, rows: int, settings: Any) -> None:
    """The run's validation split (``data.val_frac`` of this site's training records, early
    stopping) holds at least ``min-val-rows`` records: the score of a smaller one is a probe of
    a few records whose share the server chose (a hostile-server review, 2026-12-06)."""
    if rows < settings.min_val_rows:
        raise refuse("data.val_frac", cfg.data.val_frac,
                     f"it holds out {rows} of this site's training records as the validation "
                     f"split; this site scores none smaller than min-val-rows="
                     f"{settings.min_val_rows}")  # fmt: skip


def check_caps(cfg: FedmmConfig, settings: Any) -> None:
    """Every cap of the site against the run's options (no model is built)."""
    t = cfg.train
    checks = [
        ("fed.rounds", cfg.fed.rounds, "max-rounds", settings.max_rounds),
        ("train.batch_size", t.batch_size, "max-batch-size", settings.max_batch_size),
        ("train.eval_batch_size", t.eval_batch_size, "max-batch-size", settings.max_batch_size),
        ("eval.generate_batch_size", cfg.eval.generate_batch_size, "max-batch-size",
         settings.max_batch_size),
        ("model.image_size", cfg.model.image_size, "max-image-size", settings.max_image_size),
        ("model.max_text_len", cfg.model.max_text_len, "max-text-len", settings.max_text_len),
        # a generative target's tokens widen every encoded row as the prompt's do
        ("train.max_target_tokens", t.max_target_tokens, "max-text-len", settings.max_text_len),
    ]  # fmt: skip
    for option in ("model.head_hidden", "peft.lora_r", "adapter.bottleneck", "peft.prompt_length"):
        section, name = option.split(".")
        checks.append((option, getattr(getattr(cfg, section), name), "max-width",
                       settings.max_width))  # fmt: skip
    tap = getattr(cfg, "tap", None)  # TAP's own local steps: the same budget as a round's
    for name in ("teacher_steps", "distill_steps") if tap is not None else ():
        checks.append((f"tap.{name}", getattr(tap, name), "max-local-steps",
                       settings.max_local_steps))  # fmt: skip
    if t.local_epochs <= 0:  # a budget in epochs: checked once the site knows its rows
        checks.append(("train.local_steps x train.accumulation", t.local_steps * t.accumulation,
                       "max-local-steps", settings.max_local_steps))  # fmt: skip
    for option, value, key, limit in checks:
        if not isinstance(value, int) or value > limit:
            raise refuse(option, value, f"this site's limit is {key}={limit}")
    check_lora_targets(cfg)


LORA_PATTERN = re.compile(r"[A-Za-z0-9_.\\*+?^$|\[\]-]{1,200}")  # no groups, no repetition counts
MAX_LORA_TARGETS, MAX_QUANTIFIERS = 32, 4


def check_lora_targets(cfg: FedmmConfig) -> None:
    """``peft.lora_targets`` from a server: regular expressions this site will run over its
    module names, so only ones whose matching time is bounded: no groups or repetition counts
    (``(.|.)*Z`` backtracks exponentially: hours per name), at most ``MAX_QUANTIFIERS``
    ``*`` / ``+`` / ``?`` each (polynomial in the name's length, a few million steps at most),
    200 characters and ``MAX_LORA_TARGETS`` entries."""

    spec = cfg.peft.lora_targets
    if cfg.peft.type != "lora" or spec == PeftConfig().lora_targets:
        return
    targets = csv(spec)
    if len(targets) > MAX_LORA_TARGETS:
        raise refuse("peft.lora_targets", f"{len(targets)} entries",
                     f"at most {MAX_LORA_TARGETS} entries")  # fmt: skip
    for target in targets:
        quantifiers = sum(target.count(q) for q in "*+?")
        if not LORA_PATTERN.fullmatch(target) or quantifiers > MAX_QUANTIFIERS:
            raise refuse("peft.lora_targets", target[:60], "a target is a module name or a "
                         "regular expression without groups or repetition counts, with at most "
                         f"{MAX_QUANTIFIERS} of * + ? (its matching time must be bounded)")  # fmt: skip


def check_trainable(count: int, what: str, settings: Any) -> None:
    """``count`` trainable values (of ``what``) within ``max-trainable-params``."""
    if count > settings.max_trainable_params:
        raise NotAccepted(
            f"this site does not accept a run with {count} trainable values ({what}): its limit "
            f"is max-trainable-params={settings.max_trainable_params}"
        )


def check_consent(
    experiment: FedmmConfig, settings: Any, global_arrays: Mapping[str, Any] | None = None
) -> None:
    """Refuse (``NotAccepted``) an experiment this site does not run; reads and writes nothing
    but what the CLI's validator reads (a backbone's own config, never data).

    ``global_arrays``: the global state the server sent (its values are counted against
    ``max-trainable-params`` before any model is built)."""
    methods, pefts = csv(settings.accept_methods), csv(settings.accept_peft)
    if methods and experiment.method not in methods:
        raise refuse("method", experiment.method, f"this site accepts {', '.join(methods)} "
                     "(site setting accept-methods)")  # fmt: skip
    if pefts and experiment.peft.type not in pefts:
        raise refuse("peft.type", experiment.peft.type, f"this site accepts {', '.join(pefts)} "
                     "(site setting accept-peft)")  # fmt: skip
    if settings.require_secure_aggregation and experiment.fed.secure_aggregation == "off":
        raise refuse("fed.secure_aggregation", "off", "this site requires secure aggregation "
                     "(site setting require-secure-aggregation=true); run with "
                     "fed.secure_aggregation=secagg+")  # fmt: skip
    check_model(experiment, settings)
    check_caps(experiment, settings)
    if global_arrays:
        size = sum(int(getattr(v, "size", 0)) for v in global_arrays.values())
        check_trainable(size, "the global state the server sent", settings)
    run = settings.apply(experiment)
    key = run.to_json()
    if key in _VALID:  # a process serves many messages of one run: validated once
        return
    from fedmm.validate import validate_config

    try:  # the CLI's own checks, on the run as this site would run it
        validate_config(run, [experiment.method])
    except ConfigError as exc:
        raise NotAccepted(f"the run's options are invalid at this site: {exc}") from None
    _VALID.add(key)


_VALID: set[str] = set()  # runs (as this site runs them) that passed validate_config


# ---------------------------------------------------------------------- where a site is
def site_directory_problem(data_dir: Path) -> str | None:
    """Why ``data_dir`` is not one site's directory (None when it is one): a site directory
    holds ``train.jsonl``; a directory of site directories (a split's root) is named as such."""
    if (data_dir / "train.jsonl").is_file():
        return None
    if not data_dir.is_dir():
        return f"data-dir {data_dir} is not a directory"
    below = sorted(p.name for p in data_dir.iterdir()
                   if p.is_dir() and (p / "train.jsonl").is_file())  # fmt: skip
    if below:
        shown = ", ".join(below[:10]) + (f" and {len(below) - 10} more" if len(below) > 10 else "")
        return (f"data-dir {data_dir} holds site directories {shown}; point data-dir at one of "
                "them (a site serves its own directory only)")  # fmt: skip
    return (f"data-dir {data_dir} is not a site directory: it has no train.jsonl (`fedmm split` "
            "writes site directories)")  # fmt: skip


def site_name(settings: Any) -> str:
    """The site's name as a path component (``safe_name``): for a site directory (``data-dir``
    holds ``train.jsonl``; also in a simulation of site directories, where Flower sets a
    partition-id too) ``site.json``'s name, else the directory's name -- the name its client
    state is kept under; ``partition-K`` for a rehearsed partition of a central benchmark;
    ``site`` without a data-dir."""
    from fedmm.data.sites import read_site_info

    data_dir = Path(settings.data_dir)
    if settings.data_dir and (data_dir / "train.jsonl").is_file():
        return safe_name(read_site_info(data_dir).name)
    if settings.rehearsal:
        return f"partition-{settings.partition_id}"
    return safe_name(read_site_info(data_dir).name if settings.data_dir else "site")


def site_root(settings: Any) -> Path:
    """The site's own directory for what it derives and records: ``audit.jsonl``, the default
    feature cache (``cache/``) and, for a site directory, the client state of its runs."""
    return settings.state_root(site_name(settings))


def default_cache_dir(settings: Any) -> Path:
    """Where a site caches encoded features when ``cache-dir`` is unset: under its own root."""
    return site_root(settings) / "cache"


__all__ = ["NotAccepted", "check_consent", "check_run_id", "check_settings", "check_trainable",
           "default_cache_dir", "is_hub_id", "safe_name", "site_directory_problem", "site_name",
           "site_root"]  # fmt: skip
