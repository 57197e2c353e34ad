"""From flags to validated configs: precedence (defaults < --config < flags < --set), every option
and name checked, and the data read, before anything runs (a refusal exits 2)."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedmm.config import FLAG_KEYS, SITES, ConfigError, FedmmConfig, load_toml, parse_set
from fedmm.spec import METHOD_SPECS
from fedmm.validate import validate_config


def resolve_config(
    args: argparse.Namespace, variants: dict | None = None
) -> tuple[list[FedmmConfig], list[str]]:
    """(one config per benchmark, methods), every name and option validated.  ``variants``
    (``fedmm bench``: name -> ``bench.Variant``): method names that stand for a method with
    options of their own, each validated with those options."""
    from fedmm.data import FIXED_CLIENTS

    overrides: dict = {}
    if args.config:
        overrides.update(load_toml(args.config))
    for flag, key in FLAG_KEYS.items():
        value = getattr(args, flag, None)
        if value is not None:
            overrides[key] = value
    if getattr(args, "sites", None):
        if getattr(args, "benchmark", None):
            raise ConfigError("give either --sites DIR or --benchmark NAME, not both")
        overrides["data.benchmark"], overrides["data.data_dir"] = SITES, args.sites
    overrides.update(parse_set(args.set))
    methods_arg = args.method if args.method is not None else overrides.pop("method", "fedavg")
    overrides.pop("method", None)
    bench_arg = str(overrides.pop("data.benchmark", FedmmConfig().data.benchmark))
    benchmarks = [b.strip() for b in bench_arg.split(",") if b.strip()]
    methods = [m.strip() for m in str(methods_arg).split(",") if m.strip()]
    if len(benchmarks) != 1 and args.command == "run":
        raise ConfigError("fedmm run takes one --benchmark; use fedmm bench for several")
    if "train.local_steps" in overrides and "train.local_epochs" in overrides:
        raise ConfigError(
            "train.local_steps and train.local_epochs are both set: a round's budget is one or "
            "the other (steps for every client, or epochs over each client's data); remove one"
        )
    cfgs = []
    for bench in benchmarks:
        budget = {} if bench not in USER_DATA else user_data_budget(overrides)
        cfg = FedmmConfig().with_overrides({**budget, **overrides, "data.benchmark": bench})
        if bench in FIXED_CLIENTS and "fed.clients" not in overrides:
            cfg = cfg.with_overrides(
                {"fed.clients": FIXED_CLIENTS[bench]}
            )  # part of its definition
        if variants is not None:
            unknown = [m for m in methods if m not in METHOD_SPECS and m not in variants]
            if unknown:
                raise ConfigError(f"unknown method or variant {unknown[0]!r}; methods: "
                                  f"{', '.join(METHOD_SPECS)}; variants: {', '.join(variants)}")  # fmt: skip
        plain = [m for m in methods if m not in (variants or {})]
        if plain or not methods:
            validate(cfg, plain)
        for name in methods:
            if name in (variants or {}):
                v = variants[name]
                try:
                    vcfg = cfg.with_overrides({**v.overrides, "variant": name})
                except ConfigError as exc:
                    raise ConfigError(f"variant {name!r}: {exc}") from exc
                validate(vcfg, [v.method])
        cfgs.append(cfg)
    if not cfgs:
        raise ConfigError("--benchmark is empty")
    return cfgs, methods


# a user's own data (a jsonl directory, site directories): trained long enough to learn unless
# the command says otherwise (README, "Your own data"; docs/user-guide.md, "Training budget")
USER_DATA = ("jsonl", SITES)
USER_DATA_BUDGET = {"train.local_epochs": 1.0, "fed.rounds": 20}


def user_data_budget(overrides: dict) -> dict:
    """The budget ``fedmm run`` / ``bench`` / ``deploy`` give a user's data (``USER_DATA``) where
    the command sets none: 1 local epoch per round (each client's data once, whatever its size)
    for 20 rounds.  A budget the command states -- ``train.local_steps`` or
    ``train.local_epochs``, ``fed.rounds`` -- is kept; the built-in benchmarks keep their
    declared defaults (15 steps, 5 rounds), so their stored results stay comparable."""
    budget = {}
    if "train.local_steps" not in overrides and "train.local_epochs" not in overrides:
        budget["train.local_epochs"] = USER_DATA_BUDGET["train.local_epochs"]
    if "fed.rounds" not in overrides:
        budget["fed.rounds"] = USER_DATA_BUDGET["fed.rounds"]
    return budget


def validate(cfg: FedmmConfig, methods: list[str]) -> None:
    """Every option checked before anything starts (``fedmm.validate.validate_config``)."""
    validate_config(cfg, methods)


def site_options(args: argparse.Namespace) -> dict:
    """``--site KEY=VALUE`` settings, checked now (unknown keys, types, ranges)."""
    from fedmm.federation.site import SiteSettings

    site = parse_set(getattr(args, "site", []) or [])
    SiteSettings.from_node_config(site)
    return site


def check_data(cfg: FedmmConfig):
    """The run's data exists and reads (site directories and their schema, or the benchmark);
    returns the benchmark (None for site directories: each site reads its own)."""
    from fedmm.data import load_benchmark, sites
    from fedmm.data.schema import SCHEMA_FILE, read_schema

    try:
        if cfg.data.benchmark == SITES:
            roots = sites.list_sites(Path(cfg.data.data_dir))
            schema = read_schema(Path(cfg.data.data_dir) / SCHEMA_FILE)
            for root in roots:
                if read_schema(root / SCHEMA_FILE).sha256() != schema.sha256():
                    raise ConfigError(f"{root / SCHEMA_FILE} differs from "
                                      f"{Path(cfg.data.data_dir) / SCHEMA_FILE}")  # fmt: skip
            return None
        return load_benchmark(cfg)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
