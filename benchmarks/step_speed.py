"""Today's fp32 local step vs the fast fp32 path vs bf16, side by side in one process.

One optimiser step (batch, forward, loss, backward, clip, AdamW; train mode) on the same batch of
client 0 of the default benchmark (fmnist-domain, minilm-mobilenet, batch ``train.batch_size``),
for FedAvg (one adapter set) and FedDAT (fedmm's batched two-path step), and one evaluation
forward (``eval``: FedAvg's model in eval mode, no gradient, one batch of ``train.eval_batch_size``
test records; packing applies there at every ``model.backbone_dropout``), in these variants:

* ``fp32-today``   -- the step as fedmm ran it before docs/performance.md: cached features kept
                      float16 in memory and converted per batch, the frozen backbone's own
                      dropout (MiniLM: 0.1, hidden and attention), the loss read to the host
                      (``float(loss)``) after every step;
* ``fp32-default`` -- this release at its defaults: features converted to float32 once when
                      loaded, no host read per step, the backbone's own dropout (same numerics
                      as ``fp32-today``);
* ``fp32-fast``    -- ``fp32-default`` with ``model.backbone_dropout=0`` (no dropout masks in the
                      frozen backbone, so SDPA's fused kernel instead of its math fallback, and
                      token packing: the layers' per-position work on real tokens only,
                      ``fedmm.backbones.packing``);
* ``fp32-fast-padded`` -- ``fp32-fast`` with packing off (``FusionVLModel.pack_tokens = False``):
                      the dropout's and the packing's shares apart;
* ``bf16-autocast``-- bf16 as before: autocast over fp32 weights (each frozen weight cast at
                      every call); only where the CPU has native bf16 (or ``--bf16 always``);
* ``bf16``         -- ``train.precision=bf16``: the frozen backbone stored once in bf16, fp32
                      master weights of the trainable sets, autocast; backbone dropout as given;
* ``bf16-fast``    -- ``bf16`` with ``model.backbone_dropout=0``;
* ``fp32-compiled``-- ``fp32-fast`` with the model's forward wrapped in ``torch.compile`` (inductor;
                      its backward compiled by AOTAutograd); only with ``--compile``.  Its compile
                      time (the first step of each method, less its median step) is printed.

Each variant has its own model (same weights), built once.  Variants are interleaved in a
rotating order for ``--repeat`` rounds after ``--warmup``; the median per variant of the wall time
and of the process's CPU time (on a shared machine the wall time includes waiting for a core),
examples/s, the ratio to ``fp32-today``'s step and FedDAT's step / FedAvg's of the same variant
are printed, with the machine (``lscpu`` bf16 flags, load average at start and end, threads).

    .venv/bin/python benchmarks/step_speed.py [--repeat 10] [--threads 1] [--bf16 auto]
        [--methods fedavg,feddat] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
from machine import add_set_option, facts

from fedmm.config import FedmmConfig, parse_set
from fedmm.methods import ClientContext, get_method
from fedmm.methods.context import model_groups
from fedmm.methods.feddat import CLIENT, GLOBAL, feddat_logits, feddat_losses
from fedmm.methods.losses import task_loss
from fedmm.methods.state import to_torch
from fedmm.precision import BF16_CPU_FLAGS, cpu_flags, native_bf16
from fedmm.runtime import Runtime

# name -> (config overrides, today's host read + float16 features + no token packing)
VARIANTS: dict[str, tuple[dict, bool]] = {
    "fp32-today": ({}, True),
    "fp32-default": ({}, False),
    "fp32-fast": ({"model.backbone_dropout": 0.0}, False),
    "fp32-fast-padded": ({"model.backbone_dropout": 0.0}, False),
    "bf16-autocast": ({"train.precision": "bf16"}, True),
    "bf16": ({"train.precision": "bf16"}, False),
    "bf16-fast": ({"train.precision": "bf16", "model.backbone_dropout": 0.0}, False),
    "fp32-compiled": ({"model.backbone_dropout": 0.0}, False),
}


def flags_line() -> str:
    flags = cpu_flags()
    if flags is None:
        return "cpu flags: /proc/cpuinfo unreadable"
    found = [f for f in BF16_CPU_FLAGS if f in flags]
    return f"lscpu bf16 flags: {' '.join(found) if found else 'none (no amx_bf16, no avx512_bf16)'}"


def build(name: str, base: dict):
    """``{method: step function}`` of one variant, on its own model."""
    sets, today = VARIANTS[name]
    cfg = FedmmConfig().with_overrides({"method": "feddat", "progress": False, **base, **sets})
    rt = Runtime(cfg)
    model = rt.model
    if name == "bf16-autocast":  # undo the stored-bf16 weights: today's bf16 path
        model.float()
    if today or name.endswith("-padded"):
        model.pack_tokens = False
    if name.endswith("-compiled"):
        model.forward = torch.compile(model.forward)
    steps = cfg.train.local_steps
    train = rt.client_split(0, "train")
    if today:  # float16 in memory, converted per batch (Encoded.batch)
        train.feats = train.feats.half()
    ctx = ClientContext(cfg, model, train, rt.client_split(0, "test"), {}, 1, 0, steps,
                        steps * cfg.fed.rounds)  # fmt: skip
    meth = get_method(cfg)
    meth.prepare(model)
    meth.load(ctx, to_torch(meth.init_global(model)))
    with torch.no_grad():  # trained-looking adapters (W_up != 0): the cost does not depend on it
        for set_name in (GLOBAL, CLIENT):
            for p in model.peft.parameters_of(set_name):
                p.add_(0.01 * torch.randn_like(p))
    model.train()
    idx = torch.arange(cfg.train.batch_size)
    opt_avg = ctx.optimizer(model_groups(model, GLOBAL))
    opt_dat = ctx.optimizer([model.peft.parameters_of(GLOBAL), model.peft.parameters_of(CLIENT),
                             list(model.visual_proj.parameters()),
                             list(model.head.parameters())])  # fmt: skip

    def finish(opt, loss) -> None:
        ctx.step(opt, loss)
        if today:
            float(loss.detach())  # today's per-step host read of the loss
        else:
            ctx._loss_sum = None  # the benchmark never flushes: keep the sum from growing

    def fedavg() -> None:
        with model.active(GLOBAL), ctx.autocast():
            feats, ids, mask, labels = train.batch(idx, ctx.device)
            loss = task_loss(model(feats, ids, mask), labels)
        finish(opt_avg, loss)

    def feddat() -> None:
        with ctx.autocast():
            feats, ids, mask, labels = train.batch(idx, ctx.device)
            z_s, z_dat = feddat_logits(model, feats, ids, mask, cfg.feddat.dat_combine)
            loss_s, loss_dat = feddat_losses(z_s, z_dat, labels, cfg.feddat)
        finish(opt_dat, loss_s + loss_dat)

    test = rt.client_split(0, "test")
    if today:
        test.feats = test.feats.half()
    eval_idx = torch.arange(min(cfg.train.eval_batch_size, len(test.labels)))

    def evaluate() -> None:
        model.eval()
        with torch.no_grad(), model.active(GLOBAL), ctx.autocast():
            model(*test.batch(eval_idx, ctx.device)[:3])
        model.train()

    sizes = {"fedavg": cfg.train.batch_size, "feddat": cfg.train.batch_size, "eval": len(eval_idx)}
    return {"fedavg": fedavg, "feddat": feddat, "eval": evaluate}, cfg, sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 1)))
    parser.add_argument("--methods", default="fedavg,feddat,eval")
    parser.add_argument("--bf16", choices=("auto", "always", "never"), default="auto",
                        help="bf16 variants: where the CPU has native bf16 (auto), always, never")  # fmt: skip
    parser.add_argument("--compile", action="store_true",
                        help="add fp32-compiled (torch.compile of the forward) and time its compile")  # fmt: skip
    add_set_option(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(facts("start"), flush=True)
    print(flags_line(), flush=True)
    base = {"train.threads": args.threads, **parse_set(args.set)}
    names = ["fp32-today", "fp32-default", "fp32-fast", "fp32-fast-padded"]
    cpu = torch.device("cpu")
    if args.bf16 == "always" or (args.bf16 == "auto" and native_bf16(cpu)):
        names += ["bf16-autocast", "bf16", "bf16-fast"]
    else:
        print("bf16 variants left out: this CPU has no native bf16 (emulated bf16 is slower)")
    if args.compile:
        names.append("fp32-compiled")
    methods = args.methods.split(",")
    steps: dict[tuple[str, str], Callable[[], None]] = {}
    cfg = None
    for name in names:
        fns, cfg, sizes = build(name, base)
        for method in methods:
            steps[(name, method)] = fns[method]
    keys = list(steps)
    wall: dict[tuple[str, str], list[float]] = {k: [] for k in keys}
    first_call: dict[tuple[str, str], float] = {}
    for key in keys:  # compiled variants compile here, timed; the others take their first step
        t0 = time.perf_counter()
        steps[key]()
        first_call[key] = time.perf_counter() - t0
    cpu_s: dict[tuple[str, str], list[float]] = {k: [] for k in keys}
    for rep in range(args.warmup + args.repeat):
        order = keys[rep % len(keys) :] + keys[: rep % len(keys)]
        for key in order:
            t0, c0 = time.perf_counter(), time.process_time()
            steps[key]()
            if rep >= args.warmup:
                wall[key].append(time.perf_counter() - t0)
                cpu_s[key].append(time.process_time() - c0)
    bs = cfg.train.batch_size
    print(f"\ntorch {torch.__version__}, threads {torch.get_num_threads()}, batch {bs} "
          f"(eval {sizes['eval']}), "
          f"{args.repeat} interleaved repetitions (after {args.warmup} warm-up).  wall: elapsed "
          "time; cpu: this process's CPU time (on a loaded machine the wall time includes waiting "
          "for a core, the CPU time does not: read its ratios there)")  # fmt: skip

    def med(table, key):
        return statistics.median(table[key])

    print(f"{'variant':<18} {'method':<7} {'wall ms':>8} {'min ms':>8} {'cpu ms':>8} "
          f"{'examples/s':>10} {'speed-up wall':>13} {'speed-up cpu':>12}   (vs fp32-today, "
          "same method)")  # fmt: skip
    for key in keys:
        w, c, first = med(wall, key), med(cpu_s, key), ("fp32-today", key[1])
        print(f"{key[0]:<18} {key[1]:<7} {1e3 * w:>8.1f} {1e3 * min(wall[key]):>8.1f} "
              f"{1e3 * c:>8.1f} {sizes[key[1]] / w:>10.1f} {med(wall, first) / w:>13.2f} "
              f"{med(cpu_s, first) / c:>12.2f}")  # fmt: skip
    for key in keys:
        if key[0].endswith("-compiled"):
            print(f"compile time {key[0]} {key[1]}: {first_call[key]:.1f} s first step, "
                  f"{first_call[key] - med(wall, key):.1f} s over a compiled step")  # fmt: skip
    print("\nspeed-up over fp32-today, same method (wall / cpu):")
    for name in names:
        row = [f"{m} {med(wall, ('fp32-today', m)) / med(wall, (name, m)):.2f}x / "
               f"{med(cpu_s, ('fp32-today', m)) / med(cpu_s, (name, m)):.2f}x"
               for m in methods]  # fmt: skip
        print(f"  {name:<18} {', '.join(row)}")
    if "fedavg" in methods and "feddat" in methods:
        print("FedDAT step / FedAvg step, same variant (wall / cpu):")
        for name in names:
            print(f"  {name:<18} {med(wall, (name, 'feddat')) / med(wall, (name, 'fedavg')):.2f}"
                  f" / {med(cpu_s, (name, 'feddat')) / med(cpu_s, (name, 'fedavg')):.2f}")  # fmt: skip
    print(flags_line())
    print(facts("end"))


if __name__ == "__main__":
    main()
