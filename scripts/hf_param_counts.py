"""Parameter counts of the Hugging Face families, measured -- the tables of docs/backbones.md.

    python scripts/hf_param_counts.py            # tiny configs and the families' default configs
    python scripts/hf_param_counts.py --tiny     # tiny configs only (seconds)

No weights are needed: every model is built from a config with random weights on CPU.  "default"
is the transformers config class with its defaults (``ViltConfig()``, ``CLIPConfig()``,
``SiglipConfig()``, ``BlipConfig()``), which are the base-size architectures of the families'
default hub checkpoints.  Prompt tuning: 16 tokens.  Head: 10 answers (``model.head_hidden`` = 256).  Bytes per round are
what one client uploads (FedAvg: PEFT set + projection + head; FedDAT: global set + projection),
fp32 on the wire; the download is the same size.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib

import torch

from fedmm.backbones.hf import MODEL_CLASSES
from fedmm.backbones.hf_families import FAMILIES, TINY
from fedmm.sections import AdapterConfig, ModelConfig, PeftConfig

DEFAULT_CONFIGS = {"vilt": "ViltConfig", "clip": "CLIPConfig", "siglip": "SiglipConfig",
                   "blip": "BlipConfig"}  # fmt: skip


def model_for(family: str, size: str, peft_type: str):
    cls = MODEL_CLASSES[family]
    if size == "default":
        config_cls = getattr(importlib.import_module("transformers"), DEFAULT_CONFIGS[family])
        fam = dataclasses.replace(FAMILIES[family], tiny_config=config_cls)
        cls = type(cls.__name__, (cls,), {"family": fam})
    model_cfg = ModelConfig(backbone=family, hf_path=TINY, image_size=224)  # counts: any size
    # prompt: 16 tokens, as ViLT's 40 text positions leave 16 next to model.max_text_len = 24
    return cls(model_cfg, AdapterConfig(), 10, PeftConfig(type=peft_type, prompt_length=16))


def count(family: str, size: str) -> dict:
    row: dict = {"family": family, "size": size}
    for peft_type in ("adapter", "lora", "bitfit", "prompt"):
        if peft_type == "prompt" and FAMILIES[family].no_prompt:
            continue
        model = model_for(family, size, peft_type)
        model.peft.ensure_sets(["global"])
        peft = model.peft.num_params("global")
        proj = sum(p.numel() for p in model.visual_proj.parameters())
        head = sum(p.numel() for p in model.head.parameters())
        row["total"] = sum(p.numel() for n, p in model.hf.named_parameters() if "lora_" not in n)
        row[peft_type] = {"set": peft, "proj": proj, "head": head,
                          "fedavg_bytes": 4 * (peft + proj + head), "feddat_bytes": 4 * (peft + proj)}  # fmt: skip
        if peft_type == "lora":
            row[peft_type]["rank"] = model.peft.r
        del model
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny configs only")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    print("| family | config | backbone params | PEFT type | PEFT set | proj | head | "
          "FedAvg up/round | FedDAT up/round |")  # fmt: skip
    print("|---|---|---:|---|---:|---:|---:|---:|---:|")
    for size in ("tiny",) if args.tiny else ("tiny", "default"):
        for family in FAMILIES:
            row = count(family, size)
            for peft_type in ("adapter", "lora", "bitfit", "prompt"):
                if peft_type not in row:
                    continue
                c = row[peft_type]
                name = f"lora (r={c['rank']})" if peft_type == "lora" else peft_type
                print(f"| {family} | {size} | {row['total']:,} | {name} | {c['set']:,} | "
                      f"{c['proj']:,} | {c['head']:,} | {_kib(c['fedavg_bytes'])} | "
                      f"{_kib(c['feddat_bytes'])} |", flush=True)  # fmt: skip


def _kib(n: int) -> str:
    return f"{n / 1024:,.1f} KiB" if n < 1024**2 else f"{n / 1024**2:,.2f} MiB"


if __name__ == "__main__":
    main()
