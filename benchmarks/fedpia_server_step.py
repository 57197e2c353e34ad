"""FedPIA's server step vs FedAvg's, with 10 and 100 simulated clients.

Builds the default backbone's real trainable state (``minilm-mobilenet``: adapter or LoRA set,
visual projection, head), makes K client uploads from it -- each a copy with its hidden units
randomly permuted in every layer and Gaussian noise added (what heterogeneous clients send: the
same function, units in different orders) -- and times ``method.aggregate`` of FedAvg and FedPIA
(every solver) on the same uploads, best of ``--repeat`` runs.  Prints the times and ratios.

    .venv/bin/python benchmarks/fedpia_server_step.py [--clients 10,100] [--peft adapter|lora]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

from fedmm.backbones import build_model
from fedmm.config import FedmmConfig
from fedmm.methods import Reply, get_method
from fedmm.methods.fedpia import permute, unit_groups


def uploads(state: dict, k: int, peft: str, rng: np.random.Generator) -> list[Reply]:
    out = []
    for i in range(k):
        s = {
            key: v + 0.01 * rng.standard_normal(v.shape).astype(np.float32)
            for key, v in state.items()
        }
        for group in unit_groups(s, peft):
            key, axis = next(iter(group.items()))
            s = permute(s, group, rng.permutation(s[key].shape[axis]))
        out.append(Reply(i, s, int(rng.integers(300, 500))))
    return out


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="10,100")
    parser.add_argument("--peft", default="adapter", choices=("adapter", "lora"))
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    base = FedmmConfig().with_overrides({"peft.type": args.peft, "adapter.zero_init_up": False})
    model = build_model(base.model, base.adapter, 18, base.peft)
    state = get_method(base.with_overrides({"method": "fedpia"})).init_global(model)
    n_params = sum(v.size for v in state.values())
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"peft {args.peft}; global state {n_params:,} parameters "
          f"({sum(v.size for k, v in state.items() if k.startswith('adapter.')):,} in the PEFT set)")  # fmt: skip
    rng = np.random.default_rng(0)
    print(f"{'clients':>7} {'fedavg ms':>10} {'solver':>9} {'fedpia ms':>10} {'ratio':>6}")
    for k in (int(c) for c in args.clients.split(",")):
        replies = uploads(state, k, args.peft, rng)
        fedavg = get_method(base.with_overrides({"method": "fedavg"}))
        t_avg = best_of(lambda m=fedavg, r=replies: m.aggregate(state, r), args.repeat)
        for solver in ("exact", "emd", "sinkhorn"):
            pia = get_method(base.with_overrides({"method": "fedpia", "fedpia.solver": solver}))
            t_pia = best_of(lambda m=pia, r=replies: m.aggregate(state, r), args.repeat)
            print(
                f"{k:>7} {1e3 * t_avg:>10.1f} {solver:>9} {1e3 * t_pia:>10.1f} {t_pia / t_avg:>6.2f}"
            )


if __name__ == "__main__":
    main()
