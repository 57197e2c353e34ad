"""Many simulated clients on one machine: round time vs total clients, peak memory, server step.

For each total K in ``--clients`` (default 20 and 100), runs the first of ``--method`` (default
fedavg); further methods (e.g. fedpia, for its server step) run at the largest K only, on fmnist-domain in Flower's simulation runtime with 10 clients
sampled for training and 10 evaluated per round (``fed.fraction`` = ``fed.eval_fraction`` =
10/K; the last round evaluates all K), so a round's work is the same for every K: round time
must grow with the sampled clients, not with K.  Fashion-MNIST's test set (10,000 images) limits
K x ``data.test_per_client``, so this uses ``data.train_per_client`` = 100 and
``data.test_per_client`` = 50, and ``train.local_steps`` = 5 (``--steps``) to keep a run within
minutes on a shared 2-core machine.  Frozen features are cached in a separate process first (the
warm-cache case every later run sees).  Prints per round: wall time, Σ client seconds, engine
overhead, server seconds (the method's aggregation) and, for the whole run, the peak summed RSS
and PSS of this process and all its descendants (Ray's GCS, raylet, worker).

    .venv/bin/python benchmarks/scale.py [--clients 20,100] [--method fedavg,fedpia] [--rounds 3] [--steps 5]
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import PeakMemory, add_set_option, facts

from fedmm import results
from fedmm.config import FedmmConfig, parse_set

SAMPLED = 10


def config(k: int, method: str, args: argparse.Namespace, out: str) -> FedmmConfig:
    return FedmmConfig().with_overrides({
        "method": method, "fed.clients": k, "fed.rounds": args.rounds,
        "train.local_steps": args.steps,
        "fed.fraction": SAMPLED / k, "fed.eval_fraction": SAMPLED / k,
        "data.train_per_client": 100, "data.test_per_client": 50,
        "cache_dir": args.cache_dir, "out_dir": out, "progress": False, **parse_set(args.set),
    })  # fmt: skip


def prewarm(cfg_json: str) -> None:
    """Encode every client's frozen features into the disk cache (run in a child process)."""
    from fedmm.runtime import get_runtime

    cfg = FedmmConfig.from_json(cfg_json)
    rt = get_runtime(cfg)
    for i in range(len(rt.benchmark.clients)):
        rt.client_split(i, "train"), rt.client_split(i, "test")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="20,100")
    parser.add_argument("--method", default="fedavg")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="train.local_steps")
    parser.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "fedmm-scale"))
    add_set_option(parser)
    parser.add_argument("--prewarm", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.prewarm:
        return prewarm(args.prewarm)
    from fedmm.engine import run_method

    logging.basicConfig(level=logging.WARNING)
    print(facts("start"), flush=True)
    summary = []
    ks = [int(c) for c in args.clients.split(",")]
    for m_index, method in enumerate(args.method.split(",")):
        for k in ks if m_index == 0 else [max(ks)]:
            out = tempfile.mkdtemp(prefix=f"fedmm-scale-{method}-{k}-")
            cfg = config(k, method, args, out)
            t0 = time.perf_counter()
            subprocess.run([sys.executable, __file__, "--prewarm", cfg.resolved().to_json()],
                           check=True)  # fmt: skip
            t_cache = time.perf_counter() - t0
            with PeakMemory(1.0) as mem:
                t0 = time.perf_counter()
                run = run_method(cfg)
                t_run = time.perf_counter() - t0
            hist = run["history"]
            print(f"\n{method}: {k} clients, {hist[0]['sampled']} sampled, rounds {len(hist)}; "
                  f"feature cache filled in {t_cache:.0f} s; run {t_run:.0f} s", flush=True)  # fmt: skip
            print(f"{'round':>5} {'evaluated':>9} {'wall s':>7} {'clients s':>9} "
                  f"{'engine':>6} {'server s':>8} {'server %':>8}")  # fmt: skip
            for h in hist:
                r = results.engine_overhead(h)
                print(f"{h['round']:>5} {h['evaluated']:>9} {r['wall']:>7.1f} {r['client']:>9.1f} "
                      f"{100 * r['overhead']:>5.1f}% {h['server_seconds']:>8.3f} "
                      f"{100 * h['server_seconds'] / r['wall']:>7.2f}%")  # fmt: skip
            steady = [h for h in hist[1:-1]] or hist  # same work per round: 10 train + 10 eval
            wall = sum(h["seconds"] for h in steady) / len(steady)
            client = sum(results.engine_overhead(h)["client"] for h in steady) / len(steady)
            server = sum(h["server_seconds"] for h in steady) / len(steady)
            print(f"steady rounds 2..{len(hist) - 1}: {wall:.1f} s/round, engine overhead "
                  f"{100 * (wall - client) / wall:.1f}%, server step {server:.3f} s "
                  f"({100 * server / wall:.2f}% of the round); peak memory of all processes: "
                  f"RSS {mem.peak_rss / 2**30:.2f} GiB, PSS {mem.peak_pss / 2**30:.2f} GiB "
                  f"({mem.peak_procs} processes)", flush=True)  # fmt: skip
            summary.append((method, k, wall, server, mem.peak_rss, mem.peak_pss, run["final"]))
            print(facts(f"after {method} K={k}"), flush=True)
    print(f"\n{'method':>7} {'K':>4} {'s/round':>8} {'server s':>8} {'RSS GiB':>8} {'PSS GiB':>8}"
          f" {'shared acc':>10}")  # fmt: skip
    for method, k, wall, server, rss, pss, final in summary:
        print(f"{method:>7} {k:>4} {wall:>8.1f} {server:>8.3f} {rss / 2**30:>8.2f} "
              f"{pss / 2**30:>8.2f} {100 * final.get('shared', float('nan')):>10.1f}")  # fmt: skip
    base = {m: w for m, k, w, *_ in summary if k == min(ks)}
    for method, k, wall, *_ in summary:
        if method in base:
            print(f"{method} K={k}: round time {wall / base[method]:.2f}x that at K={min(ks)}")
    print(facts("end"))


if __name__ == "__main__":
    main()
