"""Secure aggregation's cost: seconds and bytes per round with and without SecAgg+.

For each K in ``--sites`` (default 3, 10, 50) simulated sites, every site sampled
(``fed.fraction = 1``), runs FedAvg with the tiny backbone on fmnist-domain twice -- plain and
``fed.secure_aggregation = secagg+`` (defaults: t = a strict majority, every site a neighbour of
every other, c = 1, 24-bit quantization, modulus 2^64) -- through fedmm's own round loop and
ClientApp in this one process (an in-process grid: no Ray, no gRPC, so the figures are the
protocol's and the model's work, not the transport's).  Rounds 1..R-1 train only
(``fed.eval_every`` > R), so a round's seconds are training + aggregation; the last round's
evaluation is not counted.  CPU seconds per round (this process: the server and every site) are
those of rounds 2..R-1 -- on a shared machine they are steadier than wall seconds.  Frozen
features are encoded once before the timed runs.

Prints per K and mode: mean seconds per round (wall), Σ site seconds in the training replies,
the server's aggregation seconds (with SecAgg+: unmasking), MB of tensors up (masked inputs or
float32 updates) and down (the global state), and SecAgg+'s key-exchange bytes (public keys,
encrypted shares, survivor lists, shares; Flower's records, values counted by length).

``--accuracy``: also FedAvg on fmnist-domain with the default backbone, 5 rounds, plain vs
SecAgg+, and the final ``shared`` accuracy of each (expected equal within the quantization).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/secagg.py [--sites 3,10,50] [--rounds 3]
                                                           [--accuracy]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time

from flwr.app import Context, RecordDict
from machine import add_set_option, facts

from fedmm.config import FedmmConfig, parse_set
from fedmm.engine import prepare, rehearsal_sites
from fedmm.federation import clientapp, serverapp


class InProcessGrid:
    """Each message to its node's ClientApp handler (``clientapp.dispatch``), in this process."""

    def __init__(self, cfg: FedmmConfig) -> None:
        self.sites = rehearsal_sites(cfg)
        self.contexts = {
            1000 + i: Context(run_id=1, node_id=1000 + i, state=RecordDict(), run_config={},
                              node_config={"partition-id": i})
            for i in range(cfg.fed.clients)
        }  # fmt: skip

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        return [clientapp.dispatch(m, self.contexts[m.metadata.dst_node_id], self.sites)
                for m in messages]  # fmt: skip


def task_identity() -> None:
    """Messages outside a running Flower process need a task identity (the runtime sets one)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def config(k: int, secure: bool, args: argparse.Namespace, out: str) -> FedmmConfig:
    return FedmmConfig().with_overrides({
        "method": "fedavg", "model.backbone": "tiny", "data.benchmark": "fmnist-domain",
        "fed.clients": k, "fed.rounds": args.rounds, "fed.eval_every": args.rounds + 1,
        "train.local_steps": args.steps, "train.batch_size": 16,
        "data.train_per_client": 40, "data.test_per_client": 20,
        "fed.secure_aggregation": "secagg+" if secure else "off",
        "cache_dir": args.cache_dir, "out_dir": out, "progress": False, "device": "cpu",
        **parse_set(args.set),
    })  # fmt: skip


def prewarm(cfg: FedmmConfig) -> None:
    from fedmm.runtime import get_runtime

    rt = get_runtime(cfg)
    for i in range(len(rt.benchmark.clients)):
        rt.client_split(i, "train"), rt.client_split(i, "test")


def measure(cfg: FedmmConfig) -> dict:
    cfg = prepare(cfg)
    cpu: list[float] = []  # this process's CPU seconds at the end of each round
    record = serverapp.run_federation(InProcessGrid(cfg), cfg,
                                      lambda entry: cpu.append(time.process_time()))  # fmt: skip
    # CPU seconds of the rounds after the first and before the last (no query, no evaluation):
    # server and every site run in this process, so this is the round's whole compute
    cpu_round = statistics.mean(b - a for a, b in zip(cpu[:-2], cpu[1:-1])) if len(cpu) > 2 else 0
    timed = record["history"][:-1] or record["history"]  # the last round also evaluates
    mean = lambda f: statistics.mean(f(h) for h in timed)  # noqa: E731
    return {
        "seconds": mean(lambda h: h["seconds"]),
        "cpu": cpu_round,
        "site_seconds": mean(lambda h: sum(t.get("seconds", 0.0) for t in h["train"].values())),
        "server_seconds": mean(lambda h: h["server_seconds"]),
        "mb_up": mean(lambda h: h["bytes_up"]) / 2**20,
        "mb_down": mean(lambda h: h["bytes_down"]) / 2**20,
        "kx_up": mean(lambda h: h.get("secagg", {}).get("bytes_up", 0)) / 2**10,
        "kx_down": mean(lambda h: h.get("secagg", {}).get("bytes_down", 0)) / 2**10,
        "skipped": sum(bool(h.get("skipped")) for h in record["history"]),
        "final": record["final"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", default="3,10,50")
    parser.add_argument("--rounds", type=int, default=3)  # >= 3 for CPU seconds
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--accuracy", action="store_true")
    parser.add_argument("--cache-dir", default="")
    add_set_option(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    task_identity()
    print(facts("secagg"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in [int(x) for x in args.sites.split(",")]:
            prewarm(config(k, False, args, f"{tmp}/warm{k}"))
            for secure in (False, True):
                t0 = time.perf_counter()
                m = measure(config(k, secure, args, f"{tmp}/{k}-{secure}"))
                rows.append((k, "secagg+" if secure else "plain", m))
                print(f"  K={k} {'secagg+' if secure else 'plain'}: {time.perf_counter() - t0:.0f}s "
                      "for the run", flush=True)  # fmt: skip
        print(f"\nFedAvg, tiny backbone, fmnist-domain, every site sampled, "
              f"{args.steps} local steps; mean of rounds 1..{args.rounds - 1} (training only)")  # fmt: skip
        print("| sites | mode | s / round | CPU s / round | Σ site s | server s | MB up | MB down "
              "| key exchange KB up / down |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|---|")
        for k, mode, m in rows:
            kx = f"{m['kx_up']:.1f} / {m['kx_down']:.1f}" if mode != "plain" else "—"
            print(
                f"| {k} | {mode} | {m['seconds']:.2f} | {m['cpu']:.2f} | {m['site_seconds']:.2f} | "
                f"{m['server_seconds']:.3f} | {m['mb_up']:.2f} | {m['mb_down']:.2f} | {kx} |"
            )
        for k in sorted({r[0] for r in rows}):
            plain, secure = (r[2] for r in rows if r[0] == k)
            print(f"K={k}: SecAgg+ x{secure['seconds'] / plain['seconds']:.2f} seconds, "
                  f"x{secure['cpu'] / max(plain['cpu'], 1e-9):.2f} CPU seconds, "
                  f"x{(secure['mb_up'] + secure['kx_up'] / 1024) / plain['mb_up']:.2f} bytes up; "
                  f"skipped rounds {secure['skipped']}")  # fmt: skip
        if args.accuracy:
            finals = {}
            for secure in (False, True):
                cfg = FedmmConfig().with_overrides({
                    "method": "fedavg", "data.benchmark": "fmnist-domain", "fed.rounds": 5,
                    "fed.secure_aggregation": "secagg+" if secure else "off",
                    "cache_dir": args.cache_dir, "out_dir": f"{tmp}/acc-{secure}",
                    "progress": False,
                })  # fmt: skip
                finals[secure] = measure(cfg)["final"]["shared"]
            print(f"\nfmnist-domain, FedAvg (default backbone), 5 rounds, shared accuracy: plain "
                  f"{100 * finals[False]:.2f} %, SecAgg+ {100 * finals[True]:.2f} %, difference "
                  f"{100 * (finals[True] - finals[False]):+.2f} points")  # fmt: skip
        print(facts("secagg end"))


if __name__ == "__main__":
    main()
