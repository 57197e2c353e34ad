"""``fedmm``'s argument parser: every subcommand and flag (the options themselves: ``fedmm list``)."""

from __future__ import annotations

import argparse

from fedmm.config import FLAG_KEYS, declared_fields


def flag_options() -> tuple[tuple[tuple[str, ...], dict], ...]:
    """The flags that set one option each (``FLAG_KEYS``: declared with ``flag=`` beside the
    option, fedmm.spec), with the option's help, choices and default."""
    declared = declared_fields()
    out = []
    for flag, key in FLAG_KEYS.items():
        meta, default = declared[key].metadata, declared[key].default
        choices = f": {', '.join(meta['choices'])}" if meta.get("choices") else ""
        kwargs = {"help": f"{meta['help']}{choices} (default: {default})"}
        if type(default) is int:
            kwargs["type"] = int
        out.append(((f"--{flag}",), kwargs))
    return tuple(out)


# ``fedmm run``'s options, in --help's order: (flags, add_argument keywords); ``bench`` and
# ``deploy`` take the same ones less those they do not use
RUN_OPTIONS: tuple[tuple[tuple[str, ...], dict], ...] = (
    (("--method",), dict(default=None, help="method name(s), comma-separated (default: fedavg)")),
    *flag_options(),
    (("--config",), dict(help="TOML file with options (tables = sections)")),
    (("--set",), dict(action="append", default=[], metavar="KEY=VALUE",
                      help="override any option, e.g. --set train.lr=5e-4 (repeatable)")),
    (("--sites",), dict(metavar="DIR",
                        help="site directories under DIR (fedmm split writes them): one client "
                        "each, reading only its own directory")),
    (("--site",), dict(action="append", default=[], metavar="KEY=VALUE",
                       help="a site setting given to every simulated site, e.g. --site "
                       "dp-clip-norm=1.0 (docs/deployment.md: site settings)")),
    (("-v", "--verbose"), dict(action="store_true", help="debug logging")),
    (("--resume",), dict(metavar="DIR", help="continue the interrupted runs checkpointed under "
                         "DIR (their own options)")),
    (("--allow-partial",), dict(action="store_true",
                                help="exit 0 also when some client-rounds did not train or "
                                "evaluate (a run that trained or evaluated nothing always exits 3)")),
)  # fmt: skip


def add_run_options(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """Add ``RUN_OPTIONS`` to ``parser``, except those whose dest is in ``skip``."""
    for flags, kwargs in RUN_OPTIONS:
        if flags[-1].removeprefix("--").replace("-", "_") not in skip:
            parser.add_argument(*flags, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedmm", description="``fedmm`` command line.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="federated finetuning of one or more methods")
    add_run_options(run)
    bench = sub.add_parser("bench", help="methods x benchmarks x seeds into one report (resumable)")
    add_run_options(bench, skip=("seed", "resume", "sites", "site"))  # the same options as `run`
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
    add_run_options(deploy, skip=("method", "resume", "site"))
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
        "remove the site's feature cache and/or client state (docs/deployment.md: retention).",
    )  # fmt: skip
    site.add_argument("action", nargs="?", choices=("audit", "purge"),
                      help="audit | purge (default: run the site)")  # fmt: skip
    site.add_argument("dir", nargs="?", metavar="DIR",
                      help="audit: the site's state root holding audit.jsonl, or the file")  # fmt: skip
    site.add_argument("--config", help="the site's TOML file (docs/deployment.md: step 5)")
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
