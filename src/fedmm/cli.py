"""``fedmm`` command line.

    fedmm run [--benchmark NAME] [--method NAME[,NAME...]] [--peft TYPE] [--rounds N]
              [--clients K] [--seed S] [--out DIR] [--config FILE.toml] [--set key=value ...]
    fedmm bench [--benchmark NAME[,NAME...]] [--method ...] [--seeds 0,1,2] [--out DIR] [...]
              # methods x benchmarks x seeds -> bench.json, report.md, plots (resumable)
    fedmm run --sites DIR [--site KEY=VALUE ...]   # one simulated client per site directory
    fedmm run --resume DIR   # continue every interrupted run checkpointed under DIR
    fedmm certs --out DIR [--supernodes N] [--hosts H,...]   # TLS + SuperNode auth keys
    fedmm deploy [run options] [--workdir DIR] [--kill-node K --kill-after-round R] [--drill]
    fedmm deploy --resume DIR   # continue a deployed run on its deployment
              # SuperLink + one SuperNode per client as OS processes (TLS, auth), then `flwr run`
    fedmm split --benchmark NAME [--clients K] --out DIR [--config FILE.toml] [--set key=value ...]
              # one site directory per client + the task schema (fedmm.data.sites)
    fedmm site --config site.toml   # a site: its SuperNode from its settings, kept up
    fedmm app-hash [DIR]  # the app hash a site pins in trusted-apps (deploy/trust.py)
    fedmm site audit DIR|--config site.toml   # what left the site, when, to whom; chain verified
    fedmm site purge --config site.toml [--what cache|state|all]   # remove derived data
    fedmm list            # methods, benchmarks, backbones, config keys with defaults

Precedence: defaults < --config file < the flags above < --set.

Exit status: 0 = done; 2 = refused before anything ran (an unknown name, an option out of its
range -- every option is checked first, ``fedmm.validate`` --, data that cannot be used);
3 = ran, but a run trained nothing or evaluated nothing, or (without ``--allow-partial``) some
client-rounds did not train or evaluate (the health line of each run says which).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import warnings
from pathlib import Path

from fedmm.config import SITES, ConfigError, FedmmConfig, load_toml, parse_set
from fedmm.runkey import RunKey

FLAG_KEYS = {"benchmark": "data.benchmark", "peft": "peft.type", "rounds": "fed.rounds",
             "clients": "fed.clients", "seed": "seed", "out": "out_dir", "track": "track"}  # fmt: skip


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
    run.add_argument("--track", choices=("tensorboard", "mlflow"),
                     help="log every round to TensorBoard (<out>/tensorboard/) or MLflow "
                     "(<out>/mlflow.db, or MLFLOW_TRACKING_URI); default: no tracking")  # fmt: skip
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override any option, e.g. --set train.lr=5e-4 (repeatable)")  # fmt: skip
    run.add_argument("--sites", metavar="DIR",
                     help="site directories under DIR (fedmm split writes them): one client each, "
                     "reading only its own directory")  # fmt: skip
    run.add_argument("--site", action="append", default=[], metavar="KEY=VALUE",
                     help="a site setting given to every simulated site, e.g. --site "
                     "dp-clip-norm=1.0 (README: site settings)")  # fmt: skip
    run.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    run.add_argument("--resume", metavar="DIR",
                     help="continue the interrupted runs checkpointed under DIR (their own options)")  # fmt: skip
    run.add_argument("--allow-partial", action="store_true",
                     help="exit 0 also when some client-rounds did not train or evaluate (a run "
                          "that trained or evaluated nothing always exits 3)")  # fmt: skip
    bench = sub.add_parser("bench", help="methods x benchmarks x seeds into one report (resumable)")
    for action in run._actions[1:]:  # the same options as `run` ...
        if action.dest not in ("seed", "resume", "sites", "site"):
            bench._add_action(action)
    bench.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: 0,1,2)")
    bench.add_argument("--variant", action="append", default=[],
                       metavar="NAME=METHOD:KEY=VALUE,...",
                       help="a named configuration of a method, usable in --method like the "
                            "built-in ablations (fedmm list shows them)")  # fmt: skip
    bench.add_argument("--target-accuracy", type=float, default=None, metavar="PCT",
                       help="accuracy (%%) of the report's time-to-accuracy table (default: the "
                            "lowest final mean among the methods, per view kind)")  # fmt: skip
    bench.add_argument("--until-plateau", action="store_true",
                       help="double --rounds (one budget for every method, each budget in "
                            "OUT/rounds-R) until every method's curves have flattened")  # fmt: skip
    bench.add_argument(
        "--max-rounds",
        type=int,
        default=80,
        help="--until-plateau stops doubling beyond this (default: 80)",
    )
    bench.add_argument("--plateau-tol", type=float, default=0.5, metavar="PT",
                       help="flat: gain below PT points over the last --plateau-frac of the "
                            "rounds (default: 0.5)")  # fmt: skip
    bench.add_argument(
        "--plateau-frac",
        type=float,
        default=0.2,
        help="the share of rounds the gain is measured over (default: 0.2)",
    )
    certs = sub.add_parser("certs", help="TLS certificates + SuperNode auth keys for a deployment")
    certs.add_argument("--out", default="certificates", help="directory (default: certificates)")
    certs.add_argument("--supernodes", type=int, default=2, help="auth key pairs (default: 2)")
    certs.add_argument("--hosts", default="localhost,127.0.0.1,::1",
                       help="SuperLink host names/IPs the certificate is valid for")  # fmt: skip
    deploy = sub.add_parser(
        "deploy", help="run on a local deployment: SuperLink + SuperNodes as processes, TLS, auth"
    )
    for action in run._actions[1:]:
        if action.dest not in ("method", "resume", "site"):
            deploy._add_action(action)
    deploy.add_argument("--method", help="method name (default: fedavg)")
    deploy.add_argument("--workdir", default="", help="certificates, logs, Flower homes "
                        "(default: <out>/deployment)")  # fmt: skip
    deploy.add_argument("--kill-node", type=int, default=None, metavar="K",
                        help="fault drill: SIGKILL SuperNode K after --kill-after-round")  # fmt: skip
    deploy.add_argument("--kill-after-round", type=int, default=1, metavar="R")
    deploy.add_argument("--timeout", type=float, default=3600.0, help="seconds for the whole run")
    deploy.add_argument("--drill", action="store_true",
                        help="fault drill: kill a site mid-round and restart it, kill the "
                        "ServerApp, kill and restart the SuperLink, resume; then compare with an "
                        "uninterrupted simulation of the same sites (exit 1 if they differ)")  # fmt: skip
    deploy.add_argument("--resume", metavar="DIR",
                        help="continue the deployed runs checkpointed under DIR on the same "
                        "deployment (their own options; --set may change operational ones)")  # fmt: skip
    split = sub.add_parser(
        "split", help="write a benchmark as site directories (one per client) + schema.json"
    )
    split.add_argument("--benchmark", help="benchmark name (default: fmnist-domain)")
    split.add_argument("--clients", type=int, help="number of clients (default: 5)")
    split.add_argument("--out", required=True, help="directory for the site directories")
    split.add_argument("--config", help="TOML file with options (tables = sections)")
    split.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override any option, e.g. --set data.train_per_client=100")  # fmt: skip
    split.set_defaults(method=None)
    site = sub.add_parser(
        "site", help="run this site's SuperNode from its settings and keep it up (restarts); "
        "audit: print and verify its audit log; purge: remove its cache and client state",
        description="fedmm site --config site.toml: run the site. fedmm site audit DIR (or "
        "--config): print the audit log in DIR (the site's state root) and verify its hash "
        "chain (exit 1 naming the first broken line). fedmm site purge --config site.toml: "
        "remove the site's feature cache and/or client state (README: retention).",
    )  # fmt: skip
    site.add_argument("action", nargs="?", choices=("audit", "purge"),
                      help="audit | purge (default: run the site)")  # fmt: skip
    site.add_argument("dir", nargs="?", metavar="DIR",
                      help="audit: the site's state root holding audit.jsonl, or the file")  # fmt: skip
    site.add_argument("--config", help="the site's TOML file (README: a site)")
    site.add_argument("--what", choices=("cache", "state", "all"), default="all",
                      help="purge: the feature cache, the client state, or both (default: all)")  # fmt: skip
    site.add_argument("--also-delete-privacy-ledger-and-audit-log", action="store_true",
                      dest="records",
                      help="purge: ALSO delete the privacy ledgers of its data (the site then "
                      "accounts ε from zero) and the audit log (its record of what left); not by "
                      "default")  # fmt: skip
    app_hash = sub.add_parser(
        "app-hash", help="the app hash of a fedmm project, for a site's trusted-apps (site.toml)"
    )
    app_hash.add_argument("dir", nargs="?", default=".",
                          help="the project directory `flwr run DIR` submits (default: .)")  # fmt: skip
    sub.add_parser("list", help="list methods, benchmarks, backbones and config keys")
    return parser


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
    cfgs = []
    for bench in benchmarks:
        cfg = FedmmConfig().with_overrides({**overrides, "data.benchmark": bench})
        if bench in FIXED_CLIENTS and "fed.clients" not in overrides:
            cfg = cfg.with_overrides(
                {"fed.clients": FIXED_CLIENTS[bench]}
            )  # part of its definition
        if variants is not None:
            from fedmm.methods import METHODS

            unknown = [m for m in methods if m not in METHODS and m not in variants]
            if unknown:
                raise ConfigError(f"unknown method or variant {unknown[0]!r}; methods: "
                                  f"{', '.join(METHODS)}; variants: {', '.join(variants)}")  # fmt: skip
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


def validate(cfg: FedmmConfig, methods: list[str]) -> None:
    """Every option checked before anything starts (``fedmm.validate.validate_config``)."""
    from fedmm.validate import validate_config

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

    try:
        if cfg.data.benchmark == SITES:
            roots = sites.list_sites(Path(cfg.data.data_dir))
            schema = sites.read_schema(Path(cfg.data.data_dir) / sites.SCHEMA_FILE)
            for root in roots:
                if sites.read_schema(root / sites.SCHEMA_FILE).sha256() != schema.sha256():
                    raise ConfigError(f"{root / sites.SCHEMA_FILE} differs from "
                                      f"{Path(cfg.data.data_dir) / sites.SCHEMA_FILE}")  # fmt: skip
            return None
        return load_benchmark(cfg)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def cmd_list() -> None:
    from fedmm.backbones import backbone_names
    from fedmm.bench import VARIANTS
    from fedmm.data import BENCHMARKS
    from fedmm.methods import METHODS
    from fedmm.methods.base import VIEW_KINDS
    from fedmm.peft import PEFT_TYPES

    print("methods:   ", ", ".join(METHODS))
    print("bench variants (fedmm bench --method NAME):")
    for name, v in VARIANTS.items():
        sets = ", ".join(f"{k}={val}" for k, val in v.overrides.items())
        print(f"  {name:<18} {v.method} with {sets}: {v.isolates}")
    print("views (by kind, the same for every method):")
    for kind, meaning in VIEW_KINDS.items():
        print(f"  {kind:<12} {meaning}")
    print("  + method extras: FedDAT client (A_c alone), TAP distilled (stage 2)")
    print("benchmarks:", ", ".join(sorted(BENCHMARKS)))
    print("backbones: ", ", ".join(backbone_names()))
    print("peft types:", ", ".join(PEFT_TYPES))
    print("config keys (--set key=value):")
    cfg = FedmmConfig()
    helps = {  # a method's options carry their valid values and help beside the method
        f"{name}.{f.name}": " ".join(
            x
            for x in (
                f.metadata.get("interval", ""),
                "|".join(f.metadata.get("choices", ())),
                f.metadata.get("help", ""),
            )
            if x
        )  # fmt: skip
        for name, section in cfg.methods.items()
        for f in dataclasses.fields(section)
    }
    for key, value in cfg.to_flat().items():
        note = f"  # {helps[key]}" if helps.get(key) else ""
        print(f"  {key} = {value!r}{note}")


def cmd_run(args: argparse.Namespace) -> int:
    from fedmm import results
    from fedmm.backbones.hf import check_source
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
    print(f"fedmm: {', '.join(methods)} on {cfg.data.benchmark} ({cfg.fed.clients} clients, "
          f"{cfg.fed.rounds} rounds, backbone {cfg.model.backbone}, seed {cfg.seed}) -> {out}/", flush=True)  # fmt: skip
    print_notes(benchmark)
    if cfg.train.precision == "auto":
        from fedmm.methods.base import resolve_precision
        from fedmm.runtime import resolve_device

        device = resolve_device(cfg.device)
        print(f"train.precision=auto: {resolve_precision('auto', device)} on this machine's "
              f"{device} (each site resolves it for its own device; results.json records it "
              "per client as train.<client>.bf16)", flush=True)  # fmt: skip
    for method in methods:
        run_method(cfg.with_overrides({"method": method}), site)
    data = results.load(out)
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
    from fedmm import results

    if benchmark is None:  # site directories: each site reports its own (results.json)
        return
    lines = results.loader_notes_lines(benchmark.notes)
    if benchmark.excluded:
        lines.append("clients left out of every mean (data.allow_empty_clients): " + ", ".join(
            f"{c} ({why})" for c, why in benchmark.excluded.items()))  # fmt: skip
    if lines:
        print("data: " + "\n      ".join(lines), flush=True)


# the runs finished but trained or evaluated nothing (or only partly, without --allow-partial)
EXIT_UNHEALTHY = 3


def health_exit(runs: list[dict], allow_partial: bool) -> int:
    """0 when every run trained and evaluated (partial runs too, with ``allow_partial``); else
    say why on stderr and return ``EXIT_UNHEALTHY``."""
    from fedmm import results

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

    allowed = checkpoint.MAY_DIFFER | checkpoint.OPERATIONAL
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
    from fedmm import results
    from fedmm.engine import run_method

    out = Path(args.resume)
    cfgs = resumable(out, "simulation", parse_set(args.set))
    site = site_options(args)  # the simulated sites' own settings are not the run's: give again
    for cfg in cfgs:
        print(f"fedmm: resuming {cfg.method} on {cfg.data.benchmark} (seed {cfg.seed}) in {out}/",
              flush=True)  # fmt: skip
        run_method(cfg, site)
    data = results.load(out)
    print()
    print(results.summary_table(data))
    keys = {RunKey.of_config(c) for c in cfgs}
    return health_exit([r for r in data["runs"] if results.run_key(r) in keys],
                       getattr(args, "allow_partial", False))  # fmt: skip


def cmd_deploy_resume(args: argparse.Namespace) -> int:
    """``fedmm deploy --resume DIR``: every deployed run checkpointed under DIR, on the same
    deployment (its work directory: certificates, the SuperLink's database, each site's state)."""
    from fedmm import results
    from fedmm.deploy import launch

    out, runs = Path(args.resume), []
    for cfg in resumable(out, "deployment", parse_set(args.set)):
        workdir = Path(args.workdir or out / "deployment")
        print(f"fedmm deploy: resuming {cfg.method} (seed {cfg.seed}) in {out}/ on the deployment "
              f"in {workdir}/", flush=True)  # fmt: skip
        runs.append(launch.deploy_and_run(cfg, workdir, timeout=args.timeout))
    print(results.summary_table(results.load(out)))
    return health_exit(runs, getattr(args, "allow_partial", False))


def cmd_certs(args: argparse.Namespace) -> int:
    from fedmm.deploy import certs

    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    paths = certs.generate(args.out, args.supernodes, hosts)
    print(f"CA: {paths['ca_cert']}  SuperLink: {paths['server_cert']}, {paths['server_key']}")
    for private, public in paths["supernode_keys"]:
        print(f"SuperNode key: {private} (stays on the site)  register: {public}")
    return 0


def cmd_drill(cfg: FedmmConfig, workdir: Path, timeout: float) -> int:
    """``fedmm deploy --drill``: launch.drill, then the same run uninterrupted in a simulation."""
    import time

    from fedmm.deploy import launch
    from fedmm.engine import run_method

    if cfg.train.threads == 0:  # the same thread count on both sides: the same float sums
        cfg = cfg.with_overrides({"train.threads": 1})
    began = time.monotonic()
    done = launch.drill(cfg, workdir, timeout=timeout, emit=lambda m: print(m, flush=True))
    calm = run_method(cfg.with_overrides({"out_dir": str(Path(cfg.out_dir) / "uninterrupted")}))
    accuracy = loss = 0.0
    for d, u in zip(done["run"]["history"], calm["history"], strict=True):
        for client, views in u["clients"].items():
            for view, acc in views.items():
                accuracy = max(accuracy, abs(d["clients"].get(client, {}).get(view, -1.0) - acc))
        for client, train in u.get("train", {}).items():
            other = d.get("train", {}).get(client, {}).get("loss", float("inf"))
            loss = max(loss, abs(other - train.get("loss", 0.0)))
    for what, sec in done["seconds"].items():
        print(f"drill: {what.replace('_', ' ')}: {sec:.0f} s")
    print(f"drill: largest difference to the uninterrupted run: accuracy {accuracy:.2e}, "
          f"training loss {loss:.2e}")  # fmt: skip
    print(f"drill: {time.monotonic() - began:.0f} s in all")
    return 0 if accuracy <= 1e-6 and loss <= 1e-6 else 1


def cmd_deploy(args: argparse.Namespace) -> int:
    if args.resume:
        return cmd_deploy_resume(args)
    from fedmm import results
    from fedmm.deploy import launch

    cfgs, methods = resolve_config(args)
    if len(methods) != 1:
        raise ConfigError("fedmm deploy runs one --method")
    cfg = cfgs[0].with_overrides({"method": methods[0]}).resolved()
    if not get_method_federated(cfg):
        raise ConfigError(f"{cfg.method} runs without Flower; use fedmm run")
    check_data(cfg)
    from fedmm.engine import prepare

    cfg = prepare(cfg)  # the schema and the number of sites, once
    n_sites = cfg.fed.clients
    if args.kill_node is not None and not 0 <= args.kill_node < n_sites:
        raise ConfigError(
            f"--kill-node must be a site index in [0, {n_sites}), got {args.kill_node}"
        )
    if args.drill and (n_sites < 2 or cfg.fed.rounds < 2):
        raise ConfigError("--drill needs at least 2 sites and --rounds >= 2 (it kills site 1 "
                          "while round 2 is out)")  # fmt: skip
    workdir = Path(args.workdir or Path(cfg.out_dir) / "deployment")
    print(f"fedmm deploy: {cfg.method} on {cfg.data.benchmark}, one SuperNode per site "
          f"(TLS, node auth) -> {cfg.out_dir}/; logs in {workdir}/", flush=True)  # fmt: skip
    if args.drill:
        return cmd_drill(cfg, workdir, args.timeout)
    run = launch.deploy_and_run(cfg, workdir, args.kill_node, args.kill_after_round, args.timeout)
    print(results.summary_table(results.load(cfg.out_dir)))
    return health_exit([run], getattr(args, "allow_partial", False))


def site_settings_of(path: str):
    """The site settings in a ``fedmm site`` TOML file (``[settings]``)."""
    from fedmm.deploy.site import SiteConfig
    from fedmm.federation.site import SiteSettings

    return SiteSettings.from_node_config(SiteConfig.load(path).settings)


def cmd_site(args: argparse.Namespace) -> int:
    """``fedmm site``: run the site (``--config``), or ``audit`` / ``purge`` it."""
    if args.action is None:
        if not args.config or args.dir:
            raise ConfigError("fedmm site runs a site from its settings: fedmm site --config "
                              "site.toml (or: fedmm site audit DIR, fedmm site purge --config "
                              "site.toml)")  # fmt: skip
        from fedmm.deploy.site import SiteConfig, run_site

        return run_site(SiteConfig.load(args.config), emit=lambda m: print(m, flush=True),
                        subreaper=True)  # fmt: skip
    if args.action == "audit":
        return cmd_site_audit(args)
    if args.dir or not args.config:
        raise ConfigError("fedmm site purge needs the site's file: fedmm site purge --config "
                          "site.toml [--what cache|state|all]")  # fmt: skip
    from fedmm.federation import retention

    settings = site_settings_of(args.config)
    try:
        removed = retention.purge(settings, args.what, args.records)
    except (ValueError, OSError) as exc:
        raise ConfigError(f"fedmm site purge: {exc}") from exc
    for path in removed:
        print(f"removed {path}")
    kept = "" if args.records else " (privacy ledger and audit log kept)"
    print(f"fedmm site purge: {len(removed)} item(s) removed{kept}")
    return 0


def cmd_site_audit(args: argparse.Namespace) -> int:
    """Print the audit log readably and verify its chain: 0 when it holds, 1 naming the first
    broken line."""
    from fedmm.federation import audit, consent

    if bool(args.dir) == bool(args.config):
        raise ConfigError("fedmm site audit takes the site's state root (fedmm site audit DIR) or "
                          "its file (fedmm site audit --config site.toml), one of them")  # fmt: skip
    if args.dir:
        path = Path(args.dir)
        path = path / audit.AUDIT_FILE if path.is_dir() else path
    else:
        path = consent.site_root(site_settings_of(args.config)) / audit.AUDIT_FILE
    if not path.is_file():
        raise ConfigError(f"no audit log at {path} (a site writes it when it handles its first "
                          "message; DIR is the site's state root, <state-dir>/<site>)")  # fmt: skip
    entries, problem = audit.verify(path)
    for entry in entries:
        print(audit.describe(entry))
    if problem:
        print(f"fedmm: error: {path}: {problem}; entries from there on cannot be trusted",
              file=sys.stderr)  # fmt: skip
        return 1
    sent = sum(1 for e in entries if e.get("kind") == "sent" and e.get("reply") == "ok")
    print(f"{path}: chain intact, {len(entries)} entries ({sent} replies sent), head "
          f"{audit.head(path)} (keep it elsewhere: lines cut off the end leave a valid chain)")  # fmt: skip
    return 0


def get_method_federated(cfg: FedmmConfig) -> bool:
    from fedmm.methods import get_method

    return get_method(cfg).federated


def cmd_split(args: argparse.Namespace) -> int:
    from fedmm.data import load_benchmark
    from fedmm.data.sites import SCHEMA_FILE, check_split_dir, write_sites

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
    from fedmm.bench import VARIANTS, cell_config, cell_key, parse_variant, run_bench
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
    from fedmm import results

    keys = {cell_key(m, cfg.peft.type, cfg.data.benchmark, s, extra) for cfg in cfgs
            for m in methods for s in seeds}  # fmt: skip
    runs = [r for r in results.load(out)["runs"] if results.run_key(r) in keys]
    for r in runs:
        print(f"{results.label(r)} on {r['benchmark']} seed {r['seed']}: {results.health_line(r)}")
    return health_exit(runs, args.allow_partial)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if getattr(args, "verbose", False) else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.setLevel(level)  # Flower's logger is DEBUG and propagates: filter at the handler
    if not getattr(args, "verbose", False):
        # Flower's INFO lines and Ray's set-up chatter are not the user's business, Flower's
        # warnings (a deprecation notice among them) are; Flower sets its logger's level when
        # imported, so import it before overriding that
        import flwr.common.logger  # noqa: F401

        logging.getLogger("flwr").setLevel(logging.WARNING)
        os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
        warnings.filterwarnings("ignore", category=FutureWarning, module="ray")
    warnings.filterwarnings("ignore", category=UserWarning, module="transformers")
    try:
        if args.command == "list":
            cmd_list()
            return 0
        if args.command == "bench":
            return cmd_bench(args)
        if args.command == "certs":
            return cmd_certs(args)
        if args.command == "deploy":
            return cmd_deploy(args)
        if args.command == "site":
            return cmd_site(args)
        if args.command == "app-hash":
            from fedmm.deploy.trust import describe_app

            print(describe_app(args.dir))
            return 0
        if args.command == "split":
            return cmd_split(args)
        return cmd_run(args)
    except (ConfigError, FileNotFoundError, TimeoutError, RuntimeError) as exc:
        print(f"fedmm: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
