"""Where a local step's time goes: ``torch.profiler`` over FedAvg and FedDAT steps.

Profiles ``--steps`` optimiser steps (forward, loss, backward, clip, AdamW; dropout on, as in
training) on one batch of client 0 of the default benchmark (fmnist-domain, minilm-mobilenet,
batch ``train.batch_size``) for each (method, precision) of ``--methods`` x ``--precisions``, and
prints per case: the wall time per step, the top operators by self time, and the share of the
step in each category -- matmul, attention, normalisation, activation/dropout, optimiser
(AdamW + clipping), elementwise arithmetic, data movement (copies, casts, cat/index/reshape)
and other ATen ops; what
no operator accounts for is Python and framework overhead (hooks, autograd bookkeeping).

    .venv/bin/python benchmarks/step_profile.py [--steps 10] [--precisions fp32,bf16]
        [--methods fedavg,feddat] [--top 12] [--set train.threads=1]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from machine import add_set_option, facts
from torch.profiler import ProfilerActivity, profile

from fedmm.config import FedmmConfig, parse_set
from fedmm.methods import ClientContext, get_method
from fedmm.methods.context import model_groups
from fedmm.methods.feddat import CLIENT, GLOBAL, feddat_logits, feddat_losses
from fedmm.methods.losses import task_loss
from fedmm.methods.state import to_torch
from fedmm.runtime import get_runtime

CATEGORIES = (  # first match wins; names are ATen / profiler record names
    ("optimiser", ("adam", "_foreach", "optimizer", "clip_grad", "vector_norm", "zero_grad")),
    ("attention", ("attention", "softmax", "bmm", "baddbmm", "_efficient", "flash")),
    ("matmul", ("addmm", "aten::mm", "matmul", "linear", "mkldnn", "gemm", "aten::dot")),
    ("normalisation", ("layer_norm", "batch_norm", "group_norm")),
    ("activation/dropout", ("gelu", "relu", "dropout", "bernoulli", "tanh", "sigmoid",
                            "threshold")),
    ("elementwise", ("aten::mul", "aten::add", "aten::div", "aten::sub", "aten::sum",
                     "aten::mean", "aten::exp", "aten::log", "aten::where", "masked",
                     "aten::neg", "aten::rsub", "aten::pow", "aten::sqrt", "aten::clamp",
                     "nll_loss", "aten::max")),
    ("data movement", ("copy", "aten::to", "_to_copy", "cat", "index", "clone", "contiguous",
                       "expand", "view", "reshape", "slice", "select", "transpose", "permute",
                       "empty", "stack", "unsqueeze", "squeeze", "aten::t", "as_strided",
                       "fill", "zeros", "ones", "split", "narrow", "detach", "alias")),
)  # fmt: skip


def category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other aten"


def make_step(method: str, precision: str, sets: dict):
    cfg = FedmmConfig().with_overrides(
        {"method": "feddat", "train.precision": precision, "progress": False, **sets}
    )
    meth, rt = get_method(cfg), get_runtime(cfg)
    model = rt.model
    steps = cfg.train.local_steps
    ctx = ClientContext(cfg, model, rt.client_split(0, "train"), rt.client_split(0, "test"),
                        {}, 1, 0, steps, steps * cfg.fed.rounds)  # fmt: skip
    meth.prepare(model)
    meth.load(ctx, to_torch(meth.init_global(model)))
    with torch.no_grad():  # trained-looking adapters (W_up != 0)
        for name in (GLOBAL, CLIENT):
            for p in model.peft.parameters_of(name):
                p.add_(0.01 * torch.randn_like(p))
    model.train()
    idx = torch.arange(cfg.train.batch_size)
    if method == "fedavg":
        opt = ctx.optimizer(model_groups(model, GLOBAL))

        def step() -> None:
            with model.active(GLOBAL), ctx.autocast():
                feats, ids, mask, labels = ctx.train.batch(idx, ctx.device)
                loss = task_loss(model(feats, ids, mask), labels)
            ctx.step(opt, loss)
    else:
        dc = cfg.feddat
        opt = ctx.optimizer([model.peft.parameters_of(GLOBAL), model.peft.parameters_of(CLIENT),
                             list(model.visual_proj.parameters()),
                             list(model.head.parameters())])  # fmt: skip

        def step() -> None:
            with ctx.autocast():
                feats, ids, mask, labels = ctx.train.batch(idx, ctx.device)
                z_s, z_dat = feddat_logits(model, feats, ids, mask, dc.dat_combine)
                loss_s, loss_dat = feddat_losses(z_s, z_dat, labels, dc)
            ctx.step(opt, loss_s + loss_dat)

    return step, ctx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--methods", default="fedavg,feddat")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--top", type=int, default=12)
    add_set_option(parser)
    args = parser.parse_args()
    print(facts("start"), flush=True)
    sets = parse_set(args.set)
    for method in args.methods.split(","):
        for precision in args.precisions.split(","):
            step, ctx = make_step(method, precision, sets)
            for _ in range(args.warmup):
                step()
            t0 = time.perf_counter()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(args.steps):
                    step()
            wall = (time.perf_counter() - t0) / args.steps
            events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
            total_self = sum(e.self_cpu_time_total for e in events) / args.steps / 1e6
            shares: dict[str, float] = defaultdict(float)
            for e in events:
                shares[category(e.key)] += e.self_cpu_time_total / args.steps / 1e6
            print(f"\n== {method}, {precision}: {1e3 * wall:.1f} ms/step under the profiler "
                  f"(threads {torch.get_num_threads()}, batch {ctx.cfg.train.batch_size})")  # fmt: skip
            for cat, sec in sorted(shares.items(), key=lambda kv: -kv[1]):
                print(f"  {cat:<20} {1e3 * sec:8.1f} ms  {100 * sec / wall:5.1f}%")
            print(
                f"  {'python/framework':<20} {1e3 * (wall - total_self):8.1f} ms  "
                f"{100 * (wall - total_self) / wall:5.1f}%  (wall minus every op's self time)"
            )
            print(f"  top {args.top} operators by self time:")
            for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.top]:
                per = e.self_cpu_time_total / args.steps / 1e3
                print(
                    f"    {e.key:<44} {per:8.2f} ms  {100 * per / 1e3 / wall:5.1f}%  "
                    f"calls/step {e.count / args.steps:6.1f}  [{category(e.key)}]"
                )
    print(facts("end"))


if __name__ == "__main__":
    main()
