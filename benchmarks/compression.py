"""Accuracy and bytes of update compression (``fed.compression`` = none, fp16, int8).

Runs the default benchmark (fmnist-domain, default config: 5 clients, 5 rounds, seed 0) once per
encoding, each into its own directory, and prints the final accuracy per view, the bytes one
client uploads per round, and each run's engine overhead (rounds after the first).

    .venv/bin/python benchmarks/compression.py [--method fedavg] [--out runs/bench-compression]
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from machine import add_set_option, facts

from fedmm import results
from fedmm.config import FedmmConfig, parse_set
from fedmm.engine import run_method


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="fedavg")
    parser.add_argument("--compression", default="none,fp16,int8")
    parser.add_argument("--out", default="runs/bench-compression")
    add_set_option(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(facts("start"))
    rows = []
    for comp in args.compression.split(","):
        cfg = FedmmConfig().with_overrides({
            "method": args.method, "fed.compression": comp, "progress": False,
            "out_dir": str(Path(args.out) / comp), **parse_set(args.set),
        })  # fmt: skip
        run = run_method(cfg)
        hist = run["history"]
        up = [t["bytes_up"] for h in hist for t in h["train"].values()]
        steady = [results.engine_overhead(h) for h in hist[1:]]
        overhead = 1 - sum(r["client"] for r in steady) / sum(r["wall"] for r in steady)
        rows.append((comp, run["final"], sum(up) / len(up), overhead))
        print(facts(f"after {comp}"), flush=True)
    base = rows[0][2]
    views = list(rows[0][1])
    print(f"\n{args.method}, {FedmmConfig().data.benchmark} defaults "
          f"{' '.join(args.set)}".rstrip())  # fmt: skip
    print(f"{'compression':>11} " + " ".join(f"{v:>12}" for v in views)
          + f" {'KB up/client/round':>19} {'vs none':>7} {'engine overhead':>15}")  # fmt: skip
    for comp, final, up, overhead in rows:
        print(f"{comp:>11} " + " ".join(f"{100 * final.get(v, float('nan')):>12.1f}" for v in views)
              + f" {up / 1e3:>19.1f} {up / base:>7.3f} {100 * overhead:>14.1f}%")  # fmt: skip


if __name__ == "__main__":
    main()
