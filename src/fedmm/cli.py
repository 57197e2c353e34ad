"""``fedmm`` command line.

    fedmm run [--benchmark NAME] [--method NAME[,NAME...]] [--peft TYPE] [--rounds N]
              [--clients K] [--seed S] [--out DIR] [--config FILE.toml] [--set key=value ...]
    fedmm bench [--benchmark NAME[,NAME...]] [--method ...] [--seeds 0,1,2] [--out DIR] [...]
              # methods x benchmarks x seeds -> bench.json, report.md, plots (resumable)
    fedmm list            # methods, benchmarks, backbones, config keys with defaults

Precedence: defaults < --config file < the flags above < --set.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

from fedmm.config import ConfigError, FedmmConfig, load_toml, parse_set

FLAG_KEYS = {"benchmark": "data.benchmark", "peft": "peft.type", "rounds": "fed.rounds",
             "clients": "fed.clients", "seed": "seed", "out": "out_dir"}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedmm", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="federated finetuning of one or more methods")
    run.add_argument("--benchmark", help="benchmark name (default: fmnist-domain)")
    run.add_argument(
        "--method", default=None, help="method name(s), comma-separated (default: fedavg)"
    )
    run.add_argument("--peft", help="PEFT type: adapter, lora, prompt, bitfit (default: adapter)")
    run.add_argument("--rounds", type=int, help="federated rounds (default: 5)")
    run.add_argument("--clients", type=int, help="number of clients (default: 5)")
    run.add_argument("--seed", type=int, help="run seed (default: 0)")
    run.add_argument("--out", help="output directory (default: runs/latest)")
    run.add_argument("--config", help="TOML file with options (tables = sections)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override any option, e.g. --set train.lr=5e-4 (repeatable)")  # fmt: skip
    run.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    bench = sub.add_parser("bench", help="methods x benchmarks x seeds into one report (resumable)")
    for action in run._actions[1:]:  # the same options as `run` ...
        if action.dest not in ("seed",):
            bench._add_action(action)
    bench.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: 0,1,2)")
    sub.add_parser("list", help="list methods, benchmarks, backbones and config keys")
    return parser


def resolve_config(args: argparse.Namespace) -> tuple[list[FedmmConfig], list[str]]:
    """(one config per benchmark, methods), every name and option validated."""
    from fedmm.data import FIXED_CLIENTS

    overrides: dict = {}
    if args.config:
        overrides.update(load_toml(args.config))
    for flag, key in FLAG_KEYS.items():
        value = getattr(args, flag, None)
        if value is not None:
            overrides[key] = value
    overrides.update(parse_set(args.set))
    methods_arg = args.method if args.method is not None else overrides.pop("method", "fedavg")
    overrides.pop("method", None)
    bench_arg = str(overrides.pop("data.benchmark", FedmmConfig().data.benchmark))
    benchmarks = [b.strip() for b in bench_arg.split(",") if b.strip()]
    methods = [m.strip() for m in str(methods_arg).split(",") if m.strip()]
    if len(benchmarks) != 1 and args.command == "run":
        raise ConfigError("fedmm run takes one --benchmark; use fedmm bench for several")
    cfgs = []
    for bench in benchmarks:
        cfg = FedmmConfig().with_overrides({**overrides, "data.benchmark": bench})
        if bench in FIXED_CLIENTS and "fed.clients" not in overrides:
            cfg = cfg.with_overrides(
                {"fed.clients": FIXED_CLIENTS[bench]}
            )  # part of its definition
        validate(cfg, methods)
        cfgs.append(cfg)
    if not cfgs:
        raise ConfigError("--benchmark is empty")
    return cfgs, methods


def validate(cfg: FedmmConfig, methods: list[str]) -> None:
    from fedmm.backbones import BACKBONES
    from fedmm.data import BENCHMARKS
    from fedmm.methods import METHODS

    if not methods:
        raise ConfigError(f"--method is empty; choices: {', '.join(METHODS)}")
    for m in methods:
        if m not in METHODS:
            raise ConfigError(f"unknown method {m!r}; choices: {', '.join(METHODS)}")
        METHODS[m](cfg.with_overrides({"method": m}))  # method x PEFT x options, before any run
    if cfg.data.benchmark not in BENCHMARKS:
        raise ConfigError(
            f"unknown benchmark {cfg.data.benchmark!r}; choices: {', '.join(sorted(BENCHMARKS))}"
        )
    if cfg.model.backbone not in BACKBONES:
        raise ConfigError(
            f"unknown backbone {cfg.model.backbone!r}; choices: {', '.join(sorted(BACKBONES))}"
        )
    if cfg.fed.rounds < 1 or cfg.fed.clients < 1:
        raise ConfigError("--rounds and --clients must be >= 1")
    if not 0 < cfg.fed.fraction <= 1:
        raise ConfigError(f"fed.fraction must be in (0, 1], got {cfg.fed.fraction}")
    if cfg.fed.eval_every < 1 or not 0 < cfg.fed.eval_fraction <= 1:
        raise ConfigError(
            f"fed.eval_every must be >= 1 and fed.eval_fraction in (0, 1], got "
            f"{cfg.fed.eval_every} and {cfg.fed.eval_fraction}"
        )
    from fedmm.federation.messages import check_compression

    check_compression(cfg.fed.compression)
    if cfg.train.local_steps < 1 or cfg.train.batch_size < 1:
        raise ConfigError("train.local_steps and train.batch_size must be >= 1")


def cmd_list() -> None:
    from fedmm.backbones import BACKBONES
    from fedmm.data import BENCHMARKS
    from fedmm.methods import METHODS
    from fedmm.peft import PEFT_TYPES

    print("methods:   ", ", ".join(METHODS))
    print("benchmarks:", ", ".join(sorted(BENCHMARKS)))
    print("backbones: ", ", ".join(sorted(BACKBONES)))
    print("peft types:", ", ".join(PEFT_TYPES))
    print("config keys (--set key=value):")
    for key, value in FedmmConfig().to_flat().items():
        print(f"  {key} = {value!r}")


def cmd_run(args: argparse.Namespace) -> int:
    from fedmm import results
    from fedmm.data import load_benchmark
    from fedmm.engine import run_method

    cfgs, methods = resolve_config(args)
    cfg = cfgs[0]
    out = Path(cfg.out_dir)
    try:
        load_benchmark(cfg)  # missing data fails here, with install instructions, before any run
        results.load(out)  # an unreadable results.json is reported, never overwritten
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    print(f"fedmm: {', '.join(methods)} on {cfg.data.benchmark} ({cfg.fed.clients} clients, "
          f"{cfg.fed.rounds} rounds, backbone {cfg.model.backbone}, seed {cfg.seed}) -> {out}/", flush=True)  # fmt: skip
    for method in methods:
        run_method(cfg.with_overrides({"method": method}))
    data = results.load(out)
    data["runs"] = [
        r for r in data["runs"]
        if r["method"] in methods and r["seed"] == cfg.seed
        and r.get("peft", "adapter") == cfg.peft.type and r["benchmark"] == cfg.data.benchmark
    ]  # fmt: skip
    print()
    print(results.summary_table(data))
    print(
        f"\nresults: {out / 'results.json'}  table: {out / 'summary.md'}  plot: {out / 'curves.png'}"
    )
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from fedmm.bench import cell_config, run_bench
    from fedmm.data import load_benchmark

    cfgs, methods = resolve_config(args)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError as exc:
        raise ConfigError(f"--seeds expects comma-separated integers, got {args.seeds!r}") from exc
    if not seeds:
        raise ConfigError("--seeds is empty")
    out = Path(cfgs[0].out_dir)
    try:
        for cfg in cfgs:  # missing data fails here, before any cell runs
            load_benchmark(cell_config(cfg, methods[0], seeds[0], out))
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    cells = len(methods) * len(cfgs) * len(seeds)
    print(f"fedmm bench: {len(methods)} methods x {len(cfgs)} benchmarks x {len(seeds)} seeds "
          f"= {cells} cells -> {out}/", flush=True)  # fmt: skip
    done = run_bench(cfgs, methods, seeds, out)
    print(f"\n{done['ran']} cells ran, {cells - done['ran']} were already complete")
    print((out / "report.md").read_text())
    print(f"bench: {out / 'bench.json'}  report: {out / 'report.md'}  plots: "
          f"{out / 'bench_curves.png'}, {out / 'bench_bytes.png'}")  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if getattr(args, "verbose", False) else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.setLevel(level)  # Flower's logger is DEBUG and propagates: filter at the handler
    if not getattr(args, "verbose", False):
        # run_simulation's deprecation notice and Ray's set-up chatter are not the user's business;
        # Flower sets its logger's level when imported, so import it before overriding that
        import flwr.common.logger  # noqa: F401

        logging.getLogger("flwr").setLevel(logging.ERROR)
        os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
        warnings.filterwarnings("ignore", category=FutureWarning, module="ray")
    warnings.filterwarnings("ignore", category=UserWarning, module="transformers")
    try:
        if args.command == "list":
            cmd_list()
            return 0
        if args.command == "bench":
            return cmd_bench(args)
        return cmd_run(args)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"fedmm: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
