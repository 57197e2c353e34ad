"""Speed and memory of the generative backbone (issue 26): training and generation tokens/s.

For each case of ``--cases`` (precision x gradient checkpointing), in a fresh subprocess (so each
case's peak memory is its own): build ``--backbone`` (default ``smollm2-mobilenet``, LoRA) on
client 0 of ``--benchmark`` as generation, then

* training: ``--steps`` AdamW steps (forward, answer-only loss, backward, clip, step) on batches
  (a case named ``+full`` computes the output layer's logits at every position, as fedmm did
  before 0.3.1; the others at the answer positions only, as training does now)
  of ``train.batch_size``; tokens/s = non-padding tokens of the sequence (prompt, image tokens,
  answer) per second of steps, the first step (warm-up) excluded;
* generation: greedy decoding of ``--gen-rows`` test prompts in one batch, at most
  ``eval.max_new_tokens`` new tokens each; tokens/s = generated tokens per second (prefill
  included);
* peak memory: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` of the subprocess (the whole
  process: model load included).

Prints one line per case with the machine's load average beside it (the machine is shared).

    .venv/bin/python benchmarks/generative.py [--steps 4] [--cases fp32,bf16,fp32+ckpt,bf16+ckpt]
        [--backbone smollm2-mobilenet] [--set train.batch_size=8]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

from machine import facts

DEFAULTS = {
    "model.backbone": "smollm2-mobilenet", "peft.type": "lora", "data.task_kind": "generate",
    "data.benchmark": "fmnist-domain", "data.train_per_client": 64, "data.test_per_client": 16,
    "fed.clients": 3, "train.batch_size": 8, "model.max_text_len": 64, "eval.max_new_tokens": 8,
    "train.threads": 0, "device": "cpu",
}  # fmt: skip


def one_case(case: str, steps: int, gen_rows: int, overrides: dict) -> dict:
    import torch

    from fedmm.config import FedmmConfig
    from fedmm.methods.context import ClientContext, model_groups
    from fedmm.methods.losses import supervised_loss, task_loss
    from fedmm.runtime import get_runtime

    precision = "bf16" if case.startswith("bf16") else "fp32"
    cfg = FedmmConfig().with_overrides({
        **DEFAULTS, **overrides, "train.precision": precision,
        "model.gradient_checkpointing": "ckpt" in case, "train.local_steps": steps + 1,
    })  # fmt: skip
    t0 = time.perf_counter()
    runtime = get_runtime(cfg)
    model = runtime.model
    train, test = runtime.client_split(0, "train"), runtime.client_split(0, "test")
    load_s = time.perf_counter() - t0
    model.peft.ensure_sets(["global_adapter"])
    ctx = ClientContext(cfg, model, train, test, {}, 1, 0, steps + 1, steps + 1)
    opt = ctx.optimizer(model_groups(model, "global_adapter"))
    tokens, seconds = 0, 0.0
    with model.active("global_adapter"):
        for i, (feats, ids, mask, labels) in enumerate(ctx.steps(opt)):
            t = time.perf_counter()
            if "full" in case:  # the output layer at every position, as before 0.3.1
                ctx.step(opt, task_loss(model(feats, ids, mask), labels))
            else:  # at the answer positions only (what training does)
                ctx.step(opt, supervised_loss(model, feats, ids, mask, labels))
            if i:  # the first step warms up (allocations, one-time kernels)
                seconds += time.perf_counter() - t
                tokens += int(mask.sum())
        from fedmm.generation import generate_split

        rows = test.subset(torch.arange(min(gen_rows, len(test))))
        cfg_gen = cfg.with_overrides({"train.eval_batch_size": len(rows)})
        gctx = ClientContext(cfg_gen, model, train, rows, {}, 1, 0, 1, 1)
        t = time.perf_counter()
        answers = generate_split(gctx, rows)
        gen_s = time.perf_counter() - t
    gen_tokens = sum(len(model.chat.encode(a)) for a in answers)
    return {
        "case": case, "load_s": load_s, "train_tok_s": tokens / max(seconds, 1e-9),
        "step_s": seconds / max(1, steps), "gen_tok_s": gen_tokens / max(gen_s, 1e-9),
        "gen_s": gen_s, "gen_tokens": gen_tokens, "loss": ctx.stats["loss_sum"] / (steps + 1),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
        "load_avg": os.getloadavg()[0], "sample": answers[:3],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--gen-rows", type=int, default=8)
    parser.add_argument("--cases", default="fp32,bf16,fp32+ckpt,bf16+ckpt")
    parser.add_argument("--set", action="append", default=[], help="key=value overrides")
    parser.add_argument("--one", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    from fedmm.config import parse_set

    overrides = parse_set(args.set)
    if args.one:
        print("RESULT " + json.dumps(one_case(args.one, args.steps, args.gen_rows, overrides)))
        return
    with open("/proc/cpuinfo") as fh:
        flags = {f for line in fh if line.startswith("flags") for f in line.split()}
    native = sorted(flags & {"amx_bf16", "avx512_bf16"})
    print(facts("generative"), f"; native bf16: {', '.join(native) or 'none'}", flush=True)
    print(f"{'case':<11} {'train tok/s':>11} {'s/step':>7} {'gen tok/s':>9} {'peak RSS':>9} "
          f"{'load s':>7} {'load avg':>8}")  # fmt: skip
    for case in args.cases.split(","):
        cmd = [sys.executable, __file__, "--one", case, "--steps", str(args.steps),
               "--gen-rows", str(args.gen_rows), *sum((["--set", s] for s in args.set), [])]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True)
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"{case:<11} failed:\n{out.stderr[-2000:]}")
            continue
        r = json.loads(line.removeprefix("RESULT "))
        print(f"{case:<11} {r['train_tok_s']:>11.1f} {r['step_s']:>7.2f} {r['gen_tok_s']:>9.2f} "
              f"{r['peak_rss_gb']:>7.2f}GB {r['load_s']:>7.1f} {r['load_avg']:>8.2f}  "
              f"(loss {r['loss']:.3f}; e.g. {r['sample'][:2]})", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
