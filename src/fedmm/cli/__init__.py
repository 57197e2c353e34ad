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
4 = failed while running (an error after a run started: out of memory, a site or a process of the
deployment failing, the deployment's ``--timeout``); what finished is in the output directory.
The drill (``fedmm deploy --drill``) and ``fedmm site audit`` exit 1 for a difference or a broken
chain.

The commands, by concern: ``parser`` (flags), ``options`` (flags -> validated configs),
``commands`` (run, bench, split, list), ``deploy`` (deploy, certs, site).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

from fedmm.cli.commands import EXIT_FAILED, EXIT_REFUSED, cmd_bench, cmd_list, cmd_run, cmd_split
from fedmm.cli.deploy import cmd_certs, cmd_deploy, cmd_site
from fedmm.cli.parser import build_parser
from fedmm.config import ConfigError


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
    except (ConfigError, FileNotFoundError) as exc:  # refused: checked before anything ran
        print(f"fedmm: error: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except (RuntimeError, TimeoutError) as exc:  # e.g. out of memory, a site or process failing
        print(f"fedmm: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
