"""Engine overhead of Flower simulation rounds: ``(round wall time − Σ client seconds) / wall``.

Every training and evaluation reply carries the client's own seconds (``results.json``,
``history[*].train`` / ``.eval``); what is left of a round's wall time is the engine's: Flower's
message passing, Ray, (de)serialisation, the server's loop and aggregation.  Steady state =
rounds after the first (round 1 also builds the model in the Ray worker and loads features).

    .venv/bin/python benchmarks/engine_overhead.py                       # runs the default demo config (fedavg)
    .venv/bin/python benchmarks/engine_overhead.py --method fedavg,feddat
    .venv/bin/python benchmarks/engine_overhead.py --results runs/demo/results.json   # no run
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

from machine import add_set_option, facts

from fedmm import results
from fedmm.config import FedmmConfig


def report(run: dict) -> float:
    rows = [results.engine_overhead(h) for h in run["history"]]
    print(f"{run['method']} ({run['benchmark']}, {run['config']['fed.clients']} clients, "
          f"{run['history'][0]['sampled']} sampled)")  # fmt: skip
    print(f"{'round':>5} {'wall s':>8} {'clients s':>9} {'engine s':>8} {'overhead':>8}")
    for h, r in zip(run["history"], rows):
        print(f"{h['round']:>5} {r['wall']:>8.2f} {r['client']:>9.2f} "
              f"{r['wall'] - r['client']:>8.2f} {100 * r['overhead']:>7.1f}%")  # fmt: skip
    steady = rows[1:] or rows
    wall = sum(r["wall"] for r in steady)
    share = (wall - sum(r["client"] for r in steady)) / wall
    print(f"steady state (rounds 2..{len(rows)}): engine overhead {100 * share:.1f}% of round time "
          f"(target <= 5%: {'met' if share <= 0.05 else 'NOT met'})")  # fmt: skip
    return share


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--results", nargs="*", help="results.json files to read instead of running"
    )
    parser.add_argument("--method", default="fedavg")
    add_set_option(parser)
    args = parser.parse_args()
    print(facts("start"))
    runs = []
    if args.results:
        for path in args.results:
            runs += json.loads(Path(path).read_text())["runs"]
    else:
        from fedmm.config import parse_set
        from fedmm.engine import run_method

        logging.basicConfig(level=logging.WARNING)
        out = tempfile.mkdtemp(prefix="fedmm-overhead-")
        for method in args.method.split(","):
            cfg = FedmmConfig().with_overrides(
                {"method": method, "out_dir": out, "progress": False, **parse_set(args.set)}
            )
            runs.append(run_method(cfg))
    for run in runs:
        report(run)
    print(facts("end"))


if __name__ == "__main__":
    main()
