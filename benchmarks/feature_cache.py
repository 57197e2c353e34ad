"""The frozen-feature cache on the default demo: cold vs warm, and what recomputing would cost.

The default backbone's vision tower (MobileNetV2) has no PEFT modules inside, so its grid
features never change: ``fedmm.runtime`` computes them once per client split and caches them in
memory (per process) and on disk (``cache_dir``, keyed by backbone, image size, grid, benchmark,
data options, number of clients and split), shared by every round, method and seed.  This script
uses a fresh cache directory and times, for all clients of the default benchmark (fmnist-domain,
5 clients x 400 train / 150 test images):

* cold:        encode every split through MobileNetV2 and write the cache;
* warm (disk): a new runtime (as a new Ray worker or a later run sees it) reads the cache;
* warm (memory): the same runtime again (every later round in one worker);

and, for scale, one round's client compute of FedAvg (every client: 15 local steps + evaluation,
in-process).  Recomputing features every round would add the cold time to every round.

    .venv/bin/python benchmarks/feature_cache.py [--set key=value ...]
"""

from __future__ import annotations

import argparse
import tempfile
import time

from machine import add_set_option, facts

from fedmm.config import FedmmConfig, parse_set
from fedmm.methods import ClientContext, get_method
from fedmm.methods.state import to_torch
from fedmm.runtime import Runtime


def encode_all(rt: Runtime) -> float:
    t0 = time.perf_counter()
    for i in range(len(rt.benchmark.clients)):
        rt.client_split(i, "train"), rt.client_split(i, "test")
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_set_option(parser)
    args = parser.parse_args()
    print(facts("start"), flush=True)
    cache = tempfile.mkdtemp(prefix="fedmm-cache-")
    cfg = FedmmConfig().with_overrides({"cache_dir": cache, **parse_set(args.set)})
    cold_rt = Runtime(cfg)
    n_images = sum(len(c.train) + len(c.test) for c in cold_rt.benchmark.clients)
    cold = encode_all(cold_rt)
    memory = encode_all(cold_rt)
    warm_rt = Runtime(cfg)  # empty in-memory cache, same disk cache
    disk = encode_all(warm_rt)

    method = get_method(cfg)  # fedavg: one round of every client's work, in-process
    global_state = to_torch(method.init_global(warm_rt.model))
    steps = cfg.train.local_steps
    t0 = time.perf_counter()
    for i in range(len(warm_rt.benchmark.clients)):
        ctx = ClientContext(cfg, warm_rt.model, warm_rt.client_split(i, "train"),
                            warm_rt.client_split(i, "test"), {}, 1, i, steps,
                            steps * cfg.fed.rounds)  # fmt: skip
        method.client_train(ctx, global_state)
        method.client_evaluate(ctx, global_state)
    round_compute = time.perf_counter() - t0
    rounds = cfg.fed.rounds
    print(f"{len(warm_rt.benchmark.clients)} clients, {n_images} images "
          f"({cfg.model.backbone}, {cfg.model.image_size}px, grid {cfg.model.grid})")  # fmt: skip
    print(f"cold (MobileNetV2 + write): {cold:8.2f} s   ({1e3 * cold / n_images:.2f} ms/image)")
    print(f"warm, disk cache:           {disk:8.2f} s   -> {cold / disk:.0f}x faster than cold")
    print(f"warm, in memory:            {memory:8.4f} s")
    print(f"one {cfg.method} round of client compute (all clients, train + eval): "
          f"{round_compute:.1f} s")  # fmt: skip
    print(f"a {rounds}-round run: client compute {rounds * round_compute:.0f} s; features "
          f"recomputed every round would add {rounds * cold:.0f} s "
          f"(+{100 * cold / round_compute:.0f}% per round); cold cache once: +{cold:.0f} s; "
          f"warm cache: +{disk:.1f} s")  # fmt: skip
    print(facts("end"))


if __name__ == "__main__":
    main()
