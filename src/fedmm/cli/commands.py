"""The simulation's commands: ``fedmm run`` (and ``--resume``), ``fedmm bench``, ``fedmm split``,
``fedmm list``; the exit status a run's health gives."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedmm import results
from fedmm.bench import VARIANTS, cell_config, cell_key, parse_variant, run_bench
from fedmm.cli.options import check_data, resolve_config, site_options
from fedmm.config import (
    MAY_DIFFER,
    OPERATIONAL,
    ConfigError,
    FedmmConfig,
    declared_fields,
    parse_set,
)
from fedmm.runkey import RunKey
from fedmm.spec import BACKBONE_NAMES, EXPERIMENT, METHOD_SPECS, PEFT_TYPE_NAMES, VIEW_KINDS


def cmd_list() -> None:
    """Print what fedmm offers, from the declarations alone (``fedmm.spec``): loads no torch."""
    from fedmm.data import BENCHMARKS

    print("methods:   ", ", ".join(METHOD_SPECS))
    print("bench variants (fedmm bench --method NAME):")
    for name, v in VARIANTS.items():
        sets = ", ".join(f"{k}={val}" for k, val in v.overrides.items())
        print(f"  {name:<18} {v.method} with {sets}: {v.isolates}")
    print("views (by kind, the same for every method):")
    for kind, meaning in VIEW_KINDS.items():
        print(f"  {kind:<12} {meaning}")
    extras = [f"{name} {view} ({meaning})" for name, spec in METHOD_SPECS.items()
              for view, meaning in spec.extras.items()]  # fmt: skip
    print("  + method extras:", ", ".join(extras))
    print("benchmarks:", ", ".join(sorted(BENCHMARKS)))
    print("backbones: ", ", ".join(BACKBONE_NAMES))
    print("peft types:", ", ".join(PEFT_TYPE_NAMES))
    print("config keys (--set key=value):")
    declared = declared_fields()  # every option's range or choices, help and scope
    for key, value in FedmmConfig().to_flat().items():
        meta = declared[key].metadata
        scope = meta.get("scope", EXPERIMENT)
        note = " ".join(x for x in (
            meta.get("interval", ""), "|".join(meta.get("choices", ())), meta.get("help", ""),
            "" if scope == EXPERIMENT else f"[{scope}]",
        ) if x)  # fmt: skip
        print(f"  {key} = {value!r}" + (f"  # {note}" if note else ""))


def cmd_run(args: argparse.Namespace) -> int:
    from fedmm.backbones.hf_loading import check_source
    from fedmm.engine import run_method

    if args.resume:
        return cmd_resume(args)
    cfgs, methods = resolve_config(args)
    cfg = cfgs[0]
    out = Path(cfg.out_dir)
    site = site_options(args)
    try:
        # missing or bad data fails here, with install instructions, before any run; so do
        # Hugging Face weights that are not on this machine
        benchmark = check_data(cfg)
        check_source(cfg.model)
        results.load(out)  # an unreadable results.json is reported, never overwritten
    except (ValueError, FileNotFoundError) as exc:
        raise ConfigError(str(exc)) from exc
    t = cfg.train
    budget = (f"{t.local_epochs:g} local epoch(s)" if t.local_epochs > 0
              else f"{t.local_steps} local steps")  # fmt: skip
    print(f"fedmm: {', '.join(methods)} on {cfg.data.benchmark} ({cfg.fed.clients} clients, "
          f"{cfg.fed.rounds} rounds of {budget}, backbone {cfg.model.backbone}, seed {cfg.seed}) "
          f"-> {out}/", flush=True)  # fmt: skip
    print_notes(benchmark)
    if cfg.train.precision == "auto":
        from fedmm.methods.precision import resolve_precision
        from fedmm.runtime import resolve_device

        device = resolve_device(cfg.device)
        print(f"train.precision=auto: {resolve_precision('auto', device)} on this machine's "
              f"{device} (each site resolves it for its own device; results.json records it "
              "per client as train.<client>.bf16)", flush=True)  # fmt: skip
    for method in methods:
        run_method(cfg.with_overrides({"method": method}), site)
    data = results.write_reports(out)
    keys = {RunKey.of_config(cfg.with_overrides({"method": m})) for m in methods}
    data["runs"] = [r for r in data["runs"] if results.run_key(r) in keys]
    print()
    print(results.summary_table(data))
    print(
        f"\nresults: {out / 'results.json'}  table: {out / 'summary.md'}  plot: {out / 'curves.png'}"
    )
    return health_exit(data["runs"], args.allow_partial)


def print_notes(benchmark) -> None:
    """What the loader did to the data (read, normalised, dropped, unseen), before the run."""
    if benchmark is None:  # site directories: each site reports its own (results.json)
        return
    lines = results.loader_notes_lines(benchmark.notes)
    if benchmark.excluded:
        lines.append("clients left out of every mean (data.allow_empty_clients): " + ", ".join(
            f"{c} ({why})" for c, why in benchmark.excluded.items()))  # fmt: skip
    if lines:
        print("data: " + "\n      ".join(lines), flush=True)


# exit status (the package's docstring): refused before anything ran (an unknown name, an option
# out of range, unusable data); the runs finished but trained or evaluated nothing (or only
# partly, without --allow-partial); an error after a run started (e.g. out of memory)
EXIT_REFUSED = 2
EXIT_UNHEALTHY = 3
EXIT_FAILED = 4


def health_exit(runs: list[dict], allow_partial: bool) -> int:
    """0 when every run trained and evaluated (partial runs too, with ``allow_partial``); else
    say why on stderr and return ``EXIT_UNHEALTHY``."""
    problems = [p for r in runs if (p := results.unhealthy(r, allow_partial))]
    if not runs:
        problems = ["no run was recorded"]
    for problem in problems:
        print(f"fedmm: error: {problem}", file=sys.stderr)
    return EXIT_UNHEALTHY if problems else 0


def resumable(out: Path, engine: str, overrides: dict) -> list[FedmmConfig]:
    """The runs checkpointed under ``out`` that ran on ``engine`` (simulation / deployment), each
    with its own options; ``overrides`` may change only locations and operational options."""
    from fedmm.federation import checkpoint

    allowed = MAY_DIFFER | OPERATIONAL
    refused = sorted(k for k in overrides if k.replace("-", "_") not in allowed)
    if refused:
        raise ConfigError(
            f"a resumed run keeps its own options; --set may change only {', '.join(sorted(allowed))}"
            f" (got {', '.join(refused)})"
        )
    runs = checkpoint.find_runs(out)
    if not runs:
        raise ConfigError(f"nothing to resume: no server checkpoints under {out}/checkpoints")
    other = {"simulation": "fedmm run --resume", "deployment": "fedmm deploy --resume"}
    cfgs = []
    for cfg, record in runs:
        ran = record.get("engine", "simulation")
        if ran != engine:
            raise ConfigError(
                f"{cfg.method} (seed {cfg.seed}) in {out} ran as a {ran}; resume it where it ran: "
                f"{other[ran]} {out}"
            )
        cfgs.append(cfg.with_overrides({"out_dir": str(out), **overrides, "resume": True}))
    return cfgs


def cmd_resume(args: argparse.Namespace) -> int:
    """Continue every run checkpointed under ``--resume DIR`` with the options it was made with
    (``--set`` may change only locations and operational options, see checkpoint.py)."""
    from fedmm.engine import run_method

    out = Path(args.resume)
    cfgs = resumable(out, "simulation", parse_set(args.set))
    site = site_options(args)  # the simulated sites' own settings are not the run's: give again
    for cfg in cfgs:
        print(f"fedmm: resuming {cfg.method} on {cfg.data.benchmark} (seed {cfg.seed}) in {out}/",
              flush=True)  # fmt: skip
        run_method(cfg, site)
    data = results.write_reports(out)
    print()
    print(results.summary_table(data))
    keys = {RunKey.of_config(c) for c in cfgs}
    return health_exit([r for r in data["runs"] if results.run_key(r) in keys],
                       getattr(args, "allow_partial", False))  # fmt: skip


def cmd_split(args: argparse.Namespace) -> int:
    from fedmm.data import load_benchmark
    from fedmm.data.schema import SCHEMA_FILE
    from fedmm.data.site_split import check_split_dir, write_sites

    cfgs, _ = resolve_config(args)
    if len(cfgs) != 1:
        raise ConfigError("fedmm split takes one --benchmark")
    out = Path(args.out)
    try:
        check_split_dir(out)  # before building the benchmark, which may take a while
        bench = load_benchmark(cfgs[0])
        sites = write_sites(bench, out)
    except (ValueError, FileExistsError) as exc:
        raise ConfigError(str(exc)) from exc
    for site, c in zip(sites, bench.clients):
        print(f"{site}  {c.client_id}  task {c.task or bench.name}  {len(c.train)} train  "
              f"{len(c.test)} test")  # fmt: skip
    print(f"schema: {out / SCHEMA_FILE}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from fedmm.data import load_benchmark

    extra = dict(parse_variant(text) for text in args.variant)
    cfgs, methods = resolve_config(args, VARIANTS | extra)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError as exc:
        raise ConfigError(f"--seeds expects comma-separated integers, got {args.seeds!r}") from exc
    if not seeds:
        raise ConfigError("--seeds is empty")
    out = Path(cfgs[0].out_dir)
    try:
        # missing or bad data fails here, before any cell runs
        benchmarks = [load_benchmark(cell_config(c, methods[0], seeds[0], out, extra))
                      for c in cfgs]  # fmt: skip
    except (ValueError, FileNotFoundError) as exc:
        raise ConfigError(str(exc)) from exc
    cells = len(methods) * len(cfgs) * len(seeds)
    print(f"fedmm bench: {len(methods)} methods x {len(cfgs)} benchmarks x {len(seeds)} seeds "
          f"= {cells} cells -> {out}/", flush=True)  # fmt: skip
    for benchmark in benchmarks:
        print(f"{benchmark.name}:", flush=True)
        print_notes(benchmark)
    if args.until_plateau:
        from fedmm.bench import PlateauRule, run_until_plateau

        if not (args.plateau_tol > 0 and 0 < args.plateau_frac <= 1):
            raise ConfigError("--plateau-tol must be > 0 and --plateau-frac in (0, 1]")
        rule = PlateauRule(args.plateau_tol, args.plateau_frac)
        summary = run_until_plateau(cfgs, methods, seeds, out, extra, args.target_accuracy,
                                    rule, args.max_rounds)  # fmt: skip
        for b in summary["budgets"]:
            print(f"{b['rounds']} rounds ({out / b['dir']}): "
                  + ("every curve flat" if not b["still_rising"]
                     else "still rising: " + "; ".join(b["still_rising"])))  # fmt: skip
        print(
            f"rule: {summary['rule']}; "
            + (
                f"all flat at {summary['final_rounds']} rounds"
                if summary["plateaued"]
                else f"NOT all flat by --max-rounds {args.max_rounds}"
            )
            + f"; {out}/plateau.json"
        )
        out = out / f"rounds-{summary['final_rounds']}"
        cfgs = [c.with_overrides({"fed.rounds": summary["final_rounds"]}) for c in cfgs]
        done, cells = {"ran": summary["ran"]}, cells * len(summary["budgets"])
    else:
        done = run_bench(cfgs, methods, seeds, out, extra, args.target_accuracy)
    print(f"\n{done['ran']} cells ran, {cells - done['ran']} were already complete")
    print((out / "report.md").read_text())
    print(f"bench: {out / 'bench.json'}  report: {out / 'report.md'}  plots: "
          f"{out / 'bench_curves.png'}, {out / 'bench_bytes.png'}")  # fmt: skip
    keys = {cell_key(m, cfg.peft.type, cfg.data.benchmark, s, extra) for cfg in cfgs
            for m in methods for s in seeds}  # fmt: skip
    runs = [r for r in results.load(out)["runs"] if results.run_key(r) in keys]
    for r in runs:
        print(f"{results.label(r)} on {r['benchmark']} seed {r['seed']}: {results.health_line(r)}")
    return health_exit(runs, args.allow_partial)
