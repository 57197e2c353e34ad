"""FedDAT's local step vs a FedAvg-adapter step on the same batch, real default backbone.

Times one optimiser step (forward, loss, backward, clip, AdamW; dropout on, as in training) on the
same batch of client 0 of the default benchmark (fmnist-domain, batch 32, minilm-mobilenet):

* ``fedavg``            -- one forward through A_s, CE, one backward, one step (the unit);
* ``feddat``            -- fedmm's fast path: both paths in ONE forward of 2B rows (A_s rows,
                           DAT rows), the frozen first block below the first adapter once, one
                           backward of L_s + L_DAT, one step (``layout = batched-prefix``);
* ``feddat-batched``    -- the same without sharing the first block;
* ``feddat-2fwd``       -- two forwards of B rows (DAT, A_s), one backward, one step;
* ``feddat-reference``  -- the literal reference: 3 forwards, 2 backwards, 2 steps.

Variants are interleaved (rotating order) for ``--repeat`` rounds after a warm-up; the median
per variant and the ratio to ``fedavg``'s median are printed, with the forward+backward FLOPs of
each variant counted by ``torch.utils.flop_counter`` (the ratio a perfectly efficient
implementation would reach).

    .venv/bin/python benchmarks/feddat_step.py [--repeat 20] [--set device=cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from machine import add_set_option, facts
from torch.utils.flop_counter import FlopCounterMode

from fedmm.config import FedmmConfig, parse_set
from fedmm.methods import ClientContext, get_method
from fedmm.methods.feddat import (
    CLIENT,
    GLOBAL,
    feddat_logits,
    feddat_losses,
    reference_step,
)
from fedmm.methods.losses import task_loss
from fedmm.methods.state import to_torch
from fedmm.runtime import get_runtime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    add_set_option(parser)
    args = parser.parse_args()
    print(facts("start"), flush=True)
    cfg = FedmmConfig().with_overrides({"method": "feddat", **parse_set(args.set)})
    method, rt = get_method(cfg), get_runtime(cfg)
    model, dc = rt.model, cfg.feddat
    steps = cfg.train.local_steps
    ctx = ClientContext(cfg, model, rt.client_split(0, "train"), rt.client_split(0, "test"),
                        {}, 1, 0, steps, steps * cfg.fed.rounds)  # fmt: skip
    method.prepare(model)
    method.load(ctx, to_torch(method.init_global(model)))
    with torch.no_grad():  # trained-looking adapters (W_up != 0): the cost does not depend on it
        for name in (GLOBAL, CLIENT):
            for p in model.peft.parameters_of(name):
                p.add_(0.01 * torch.randn_like(p))
    model.train()
    batch = ctx.train.batch(torch.arange(cfg.train.batch_size), ctx.device)
    feats, ids, mask, labels = batch
    shared = [*model.visual_proj.parameters(), *model.head.parameters()]
    a_s, a_c = model.peft.parameters_of(GLOBAL), model.peft.parameters_of(CLIENT)
    opt_avg = ctx.optimizer([a_s, shared])
    opt_dat = ctx.optimizer([a_s, a_c, shared])
    opt_s, opt_c = ctx.optimizer([a_s, shared]), ctx.optimizer([a_c])

    def fedavg() -> None:
        with model.active(GLOBAL):
            ctx.step(opt_avg, task_loss(model(feats, ids, mask), labels))

    def feddat(layout: str):
        def step() -> None:
            z_s, z_dat = feddat_logits(model, feats, ids, mask, dc.dat_combine, layout)
            loss_s, loss_dat = feddat_losses(z_s, z_dat, labels, dc)
            ctx.step(opt_dat, loss_s + loss_dat)

        return step

    def reference() -> None:
        reference_step(model, opt_s, opt_c, batch, dc)

    variants = {
        "fedavg": fedavg,
        "feddat": feddat("batched-prefix"),
        "feddat-batched": feddat("batched"),
        "feddat-2fwd": feddat("two-forward"),
        "feddat-reference": reference,
    }
    flops = {}
    for name, fn in variants.items():
        with FlopCounterMode(display=False) as counter:
            fn()
        flops[name] = counter.get_total_flops()
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for rep in range(args.warmup + args.repeat):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            if ctx.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            variants[name]()
            if ctx.device.type == "cuda":
                torch.cuda.synchronize()
            if rep >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    print(f"device {ctx.device}, torch threads {torch.get_num_threads()}, batch "
          f"{cfg.train.batch_size}, text tokens {ids.shape[1]}, visual tokens {feats.shape[1]}, "
          f"peft {cfg.peft.type}; {args.repeat} interleaved repetitions")  # fmt: skip
    base, base_flops = statistics.median(times["fedavg"]), flops["fedavg"]
    print(f"{'variant':>17} {'median ms':>9} {'min ms':>8} {'ratio':>6} {'GFLOP':>7} "
          f"{'FLOP ratio':>10}")  # fmt: skip
    for name in variants:
        med = statistics.median(times[name])
        print(f"{name:>17} {1e3 * med:>9.1f} {1e3 * min(times[name]):>8.1f} {med / base:>6.2f} "
              f"{flops[name] / 1e9:>7.2f} {flops[name] / base_flops:>10.2f}")  # fmt: skip
    ratio = statistics.median(times["feddat"]) / base
    print(f"FedDAT step / FedAvg step = {ratio:.2f} (target <= 1.5: "
          f"{'met' if ratio <= 1.5 else 'NOT met'}); reference 3-pass / FedAvg = "
          f"{statistics.median(times['feddat-reference']) / base:.2f}")  # fmt: skip
    print(facts("end"))


if __name__ == "__main__":
    main()
