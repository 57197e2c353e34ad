"""The deployment's commands: ``fedmm deploy`` (``--resume``, ``--drill``), ``fedmm certs`` and
``fedmm site`` (run, ``audit``, ``purge``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedmm import results
from fedmm.cli.commands import health_exit, resumable
from fedmm.cli.options import check_data, resolve_config
from fedmm.config import ConfigError, FedmmConfig, parse_set


def cmd_deploy_resume(args: argparse.Namespace) -> int:
    """``fedmm deploy --resume DIR``: every deployed run checkpointed under DIR, on the same
    deployment (its work directory: certificates, the SuperLink's database, each site's state)."""
    from fedmm.deploy import launch

    out, runs = Path(args.resume), []
    for cfg in resumable(out, "deployment", parse_set(args.set)):
        workdir = Path(args.workdir or out / "deployment")
        print(f"fedmm deploy: resuming {cfg.method} (seed {cfg.seed}) in {out}/ on the deployment "
              f"in {workdir}/", flush=True)  # fmt: skip
        runs.append(launch.deploy_and_run(cfg, workdir, timeout=args.timeout))
    print(results.summary_table(results.write_reports(out)))
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
    print(results.summary_table(results.write_reports(cfg.out_dir)))
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
