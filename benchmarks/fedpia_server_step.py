"""FedPIA's server step vs FedAvg's, on a classifier's or a decoder's PEFT sets.

Builds a backbone's trainable state, makes K client uploads from it -- each a copy with its hidden
units (adapter) or rank components (LoRA) randomly permuted in every layer and Gaussian noise added
(what heterogeneous clients send: the same function, units in different orders) -- and times
``method.aggregate`` (one round's server step) of FedAvg and FedPIA (every solver) on the same
uploads, best of ``--repeat`` runs.  Prints the times and ratios, and the machine's load average
before and after (the figures are wall-clock seconds: on a shared machine they move with it).

``--backbone``:

* ``minilm-mobilenet`` (default): the default classifier's real trainable state (adapter or LoRA
  set, visual projection, head).
* ``smollm2-mobilenet``: the generative backbone's PEFT sets and projector with the shapes of
  SmolLM2-135M (30 decoder layers, hidden 576, intermediate 1536, 9 query / 3 key-value heads;
  LoRA on q, k, v, o, gate, up, down at the rank fedmm's equal-budget rule picks, or adapters
  after every block), built by fedmm's own ``GenerativeVLModel`` on PyTorch's ``meta`` device, so
  the keys and shapes are the real model's without loading its weights; the tensors are random
  (N(0, 0.02²)): timing the server's alignment needs shapes, not trained values.

    .venv/bin/python benchmarks/fedpia_server_step.py [--clients 10,100] [--peft adapter|lora]
    .venv/bin/python benchmarks/fedpia_server_step.py --backbone smollm2-mobilenet --clients 3,10
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import ot  # noqa: F401 -- imported here, once per process (seconds), not inside a timed round

from fedmm.backbones import build_model
from fedmm.config import FedmmConfig
from fedmm.methods import Reply, get_method
from fedmm.methods.fedpia import ADAPTER, permute, unit_groups

# SmolLM2-135M-Instruct's decoder (the config.json the GGUF dequantizes to)
SMOLLM2_135M = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
    tie_word_embeddings=True,
)  # fmt: skip
MOBILENET_V2_DIM = 1280  # the vision features the projector reads (as minilm-mobilenet's)


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


def classifier_state(base: FedmmConfig) -> dict[str, np.ndarray]:
    model = build_model(base.model, base.adapter, 18, base.peft)
    return get_method(base.with_overrides({"method": "fedpia"})).init_global(model)


def smollm2_state(base: FedmmConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The keys and shapes fedmm's smollm2-mobilenet uploads (PEFT set + projector), random values."""
    import torch
    from torch import nn
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedmm.backbones.generative import GenerativeVLModel, byte_chat_tokenizer
    from fedmm.methods.fedavg import PARTS
    from fedmm.methods.state import part_shapes

    with torch.device("meta"):  # shapes only: no memory, no weights read
        lm = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M))
        model = GenerativeVLModel(
            "smollm2-mobilenet", nn.Identity(), MOBILENET_V2_DIM, lm, byte_chat_tokenizer(),
            base.model, base.adapter, base.peft,
        )  # fmt: skip
        model.peft.ensure_sets(["global_adapter"])
        shapes = part_shapes(model, PARTS)
    if base.peft.type == "lora":
        print(f"LoRA rank {model.peft.r} (equal-budget rule) on {len(model.peft.paths)} "
              f"projections, e.g. {model.peft.paths[0]}")  # fmt: skip
    else:
        print(f"adapter bottleneck {model.peft.bottleneck} after {model.peft.num_points} blocks")
    return {k: (0.02 * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}


def loadavg() -> str:
    path = Path("/proc/loadavg")
    return " ".join(path.read_text().split()[:3]) if path.exists() else "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="10,100")
    parser.add_argument("--peft", default="adapter", choices=("adapter", "lora"))
    parser.add_argument(
        "--backbone", default="minilm-mobilenet", choices=("minilm-mobilenet", "smollm2-mobilenet")
    )
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    base = FedmmConfig().with_overrides(
        {"model.backbone": args.backbone, "peft.type": args.peft, "adapter.zero_init_up": False}
    )
    rng = np.random.default_rng(0)
    print(f"load average at start: {loadavg()}")
    if args.backbone == "smollm2-mobilenet":
        state = smollm2_state(base, rng)
    else:
        state = classifier_state(base)
    n_params = sum(v.size for v in state.values())
    groups = unit_groups(state, args.peft)
    key, axis = next(iter(groups[0].items()))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')}; "
          f"{args.backbone}, peft {args.peft}; upload {n_params:,} parameters "
          f"({sum(v.size for k, v in state.items() if k.startswith(ADAPTER)):,} in the PEFT set); "
          f"{len(groups)} alignment problems per upload of {state[key].shape[axis]} units each")  # fmt: skip
    print(f"{'clients':>7} {'fedavg s':>9} {'solver':>9} {'fedpia s':>9} {'ratio':>6}")
    for k in (int(c) for c in args.clients.split(",")):
        replies = uploads(state, k, args.peft, rng)
        fedavg = get_method(base.with_overrides({"method": "fedavg"}))
        t_avg = best_of(lambda m=fedavg, r=replies: m.aggregate(state, r), args.repeat)
        for solver in ("exact", "emd", "sinkhorn"):
            pia = get_method(base.with_overrides({"method": "fedpia", "fedpia.solver": solver}))
            t_pia = best_of(lambda m=pia, r=replies: m.aggregate(state, r), args.repeat)
            print(f"{k:>7} {t_avg:>9.3f} {solver:>9} {t_pia:>9.3f} {t_pia / t_avg:>6.2f}")
    print(f"load average at end: {loadavg()}")


if __name__ == "__main__":
    main()
