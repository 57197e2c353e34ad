"""A deployed round vs a simulated round on the same sites, side by side in one run.

Splits the default benchmark into ``--clients`` site directories (``fedmm split``), then runs the
same experiment (``--method``, ``--rounds``, default model) three ways and prints each round's
wall time (``results.json`` ``history[*].seconds``) and the ratio to the simulation:

* ``simulation``       -- ``fedmm run --sites`` (one process serves every site's messages);
* ``deployed, warm``   -- ``fedmm deploy --sites`` (TLS SuperLink, one ``fedmm site`` per site)
                          with the sites' warm worker (deploy/supernode_process.py, the default);
* ``deployed, cold``   -- the same with ``warm-worker = false``: a fresh ClientApp process per
                          message, as before the warm worker (``--no-cold`` leaves it out).

Every site gets ``train.threads = cores / sites`` in all three (``fedmm deploy``'s own default
on a shared host), so the three differ only in how messages reach the sites' code.

    .venv/bin/python benchmarks/deployed_round.py [--method fedavg] [--rounds 2] [--clients 3]
        [--no-cold] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from machine import add_set_option, facts

from fedmm.cli import main as fedmm
from fedmm.config import FedmmConfig, parse_set


def rounds(out: Path) -> list[float]:
    run = json.loads((out / "results.json").read_text())["runs"][0]
    return [float(h["seconds"]) for h in run["history"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="fedavg")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--no-cold", action="store_true", help="leave out the per-message mode")
    add_set_option(parser)
    args = parser.parse_args()
    print(facts("start"), flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="fedmm-deployed-round-"))
    sites = tmp / "sites"
    split = ["split", "--benchmark", "fmnist-domain", "--clients", str(args.clients),
             "--out", str(sites)]  # fmt: skip
    if fedmm(split):
        raise SystemExit("fedmm split failed")
    threads = max(1, (os.cpu_count() or 1) // args.clients)
    overrides = {"method": args.method, "fed.rounds": args.rounds, "fed.clients": args.clients,
                 "train.threads": threads, "progress": False, **parse_set(args.set)}  # fmt: skip
    base = FedmmConfig().with_overrides(overrides)
    from fedmm.deploy.launch import deploy_and_run
    from fedmm.engine import run_method

    modes = ["simulation", "deployed, warm"] + ([] if args.no_cold else ["deployed, cold"])
    walls: dict[str, list[float]] = {}
    total: dict[str, float] = {}
    for mode in modes:
        out = tmp / mode.replace(", ", "-")
        t0 = time.perf_counter()
        if mode == "simulation":
            run_method(base.with_overrides({"data.benchmark": "sites", "data.data_dir": str(sites),
                                            "out_dir": str(out)}))  # fmt: skip
        else:
            cfg = base.with_overrides({"data.benchmark": "sites", "data.data_dir": str(sites),
                                       "out_dir": str(out)})  # fmt: skip
            deploy_and_run(cfg, tmp / f"work-{out.name}", timeout=3600,
                           warm_worker=mode.endswith("warm"))  # fmt: skip
        total[mode] = time.perf_counter() - t0
        walls[mode] = rounds(out)
        print(f"{mode}: rounds {', '.join(f'{w:.1f}' for w in walls[mode])} s; whole "
              f"{total[mode]:.0f} s  [{facts()}]", flush=True)  # fmt: skip
    sim = walls["simulation"]
    print(f"\n{args.method}, {args.clients} sites, {args.rounds} rounds, threads per site "
          f"{threads}; seconds per round and the ratio to the simulation's round")  # fmt: skip
    print("| mode | " + " | ".join(f"round {i + 1}" for i in range(len(sim)))
          + " | ratio (mean) | whole command |")  # fmt: skip
    print("|---" * (len(sim) + 3) + "|")
    for mode in modes:
        w = walls[mode]
        ratio = sum(w) / sum(sim)
        print(f"| {mode} | " + " | ".join(f"{x:.1f}" for x in w)
              + f" | {ratio:.2f} | {total[mode]:.0f} s |")  # fmt: skip
    print(facts("end"))


if __name__ == "__main__":
    main()
