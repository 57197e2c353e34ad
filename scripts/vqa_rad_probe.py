"""Does the fused backbone learn?  VQA-RAD, standard split: centralised fedmm model vs a probe.

Both models see the same frozen encoders (ImageNet MobileNetV2, MiniLM-L6) and the same data:

* probe: [mean-pooled MobileNetV2 grid ; mean-pooled MiniLM question states] -> MLP;
* fedmm: the ``minilm-mobilenet`` single-stream model trained centrally (visual projection +
  bottleneck adapters + head; backbone frozen) with fedmm's own centralised method and schedule.

Fair model selection for both: 10% of the *training images* (all their questions) are held out as
a validation split; each model's epoch is chosen by validation accuracy, and the test accuracy
(overall / closed / open) of that epoch is reported.  Test answers never seen in training count
as wrong for both.

    .venv/bin/python scripts/vqa_rad_probe.py   # defaults: --epochs 20 --grid 3 --probe-epochs 60
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedmm.backbones import build_model
from fedmm.backbones.fusion import preprocess_images
from fedmm.config import FedmmConfig
from fedmm.data.vqa_rad import load_images, load_vqa_rad
from fedmm.methods.centralized import Centralized
from fedmm.methods.context import ClientContext
from fedmm.runtime import Encoded


def split_by_image(records: list[dict], frac: float, seed: int) -> tuple[list[dict], list[dict]]:
    images = sorted({r["image_name"] for r in records})
    rng = np.random.default_rng(seed)
    held = set(rng.choice(images, size=max(1, int(frac * len(images))), replace=False))
    return [r for r in records if r["image_name"] not in held], [
        r for r in records if r["image_name"] in held
    ]


def encode(model, data, records, answers, size) -> tuple[Encoded, torch.Tensor, torch.Tensor]:
    """fedmm inputs, the closed-question mask, and the probe's full-grid pooled image feature."""
    names = sorted({r["image_name"] for r in records})
    images = load_images(data.root, names, size)
    feats = model.encode_images(images)
    with torch.no_grad():  # the probe pools MobileNetV2's whole 7x7 grid, whatever fedmm's grid
        full = model.vision(preprocess_images(images, size)).mean(dim=(-2, -1))
    row = {n: i for i, n in enumerate(names)}
    ids, mask = model.tokenize([r["question"] for r in records])
    index = {a: i for i, a in enumerate(answers)}
    labels = torch.tensor([index.get(r["answer"], -1) for r in records])
    closed = torch.tensor([r["answer_type"] == "CLOSED" for r in records])
    rows = [row[r["image_name"]] for r in records]
    return Encoded(feats[rows].half(), ids, mask, labels), closed, full[rows]


def scores(pred: torch.Tensor, labels: torch.Tensor, closed: torch.Tensor) -> dict[str, float]:
    hit = (pred == labels).float()
    return {
        "all": float(hit.mean()),
        "closed": float(hit[closed].mean()),
        "open": float(hit[~closed].mean()),
    }


@torch.no_grad()
def pooled_features(model, enc: Encoded, image: torch.Tensor) -> torch.Tensor:
    """[mean visual grid ; masked-mean MiniLM question states] with the frozen encoders only."""
    model.eval()  # no dropout: the frozen encoders' deterministic features
    out = []
    for start in range(0, len(enc), 256):
        sl = slice(start, start + 256)
        ids, mask = enc.input_ids[sl], enc.attention_mask[sl]
        with model.active():
            h = model.text(input_ids=ids, attention_mask=mask).last_hidden_state
        text = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        out.append(torch.cat([image[sl], text], -1))
    return torch.cat(out)


def run_probe(model, splits, images, closed_val, closed_test, n_answers, epochs, seed) -> dict:
    torch.manual_seed(seed)
    train, val, test = splits
    xs = [pooled_features(model, e, im) for e, im in zip(splits, images)]
    mu, sd = xs[0].mean(0), xs[0].std(0) + 1e-6
    xs = [(x - mu) / sd for x in xs]
    mlp = nn.Sequential(
        nn.Linear(xs[0].shape[1], 512), nn.ReLU(), nn.Dropout(0.3), nn.Linear(512, n_answers)
    )
    opt = torch.optim.AdamW(mlp.parameters(), lr=1e-3, weight_decay=1e-2)
    best, history = None, []
    for epoch in range(1, epochs + 1):
        mlp.train()
        for idx in torch.randperm(len(train)).split(64):
            loss = nn.functional.cross_entropy(mlp(xs[0][idx]), train.labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        mlp.eval()
        with torch.no_grad():
            v = scores(mlp(xs[1]).argmax(-1), val.labels, closed_val)
            t = scores(mlp(xs[2]).argmax(-1), test.labels, closed_test)
        history.append({"epoch": epoch, "val": v, "test": t})
        if best is None or v["all"] > best["val"]["all"]:
            best = history[-1]
    return {"selected": best, "history": history}


def run_fedmm(cfg, model, train, val, test, closed_val, closed_test, epochs) -> dict:
    method = Centralized(cfg)
    steps = -(-len(train) // cfg.train.batch_size)
    state: dict = {}
    best, history = None, []
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        ctx = ClientContext(cfg, model, train, val, state, epoch, 0, steps, steps * epochs)
        state = method.client_train(ctx, {}).keep  # the model goes on from it next epoch
        with model.active("central_adapter"):
            v = scores(ctx.predict(val), val.labels, closed_val)
            t = scores(ctx.predict(test), test.labels, closed_test)
        history.append({"epoch": epoch, "val": v, "test": t, "seconds": time.perf_counter() - t0,
                        "loss": ctx.stats["loss_sum"] / steps})  # fmt: skip
        print(f"  fedmm epoch {epoch}: loss {history[-1]['loss']:.3f} val {v['all']:.3f} "
              f"test {t['all']:.3f} ({history[-1]['seconds']:.0f}s)", flush=True)  # fmt: skip
        if best is None or v["all"] > best["val"]["all"]:
            best = history[-1]
    return {"selected": best, "history": history}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--probe-epochs", type=int, default=60)
    ap.add_argument(
        "--grid", type=int, default=3, help="visual tokens per side (7 = the full 224px grid)"
    )
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--dropout", type=float, default=0.3, help="head dropout")
    ap.add_argument("--head-hidden", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="docs/results/vqa_rad_probe.json")
    args = ap.parse_args()

    data = load_vqa_rad()
    print(f"VQA-RAD at {data.root}: {len(data.train)} train / {len(data.test)} test QA, "
          f"{len(data.answers)} answers; normalised: {dict(data.normalised)}")  # fmt: skip
    cfg = FedmmConfig().with_overrides({
        "seed": args.seed, "model.image_size": 224, "model.grid": args.grid, "model.max_text_len": 32,
        "train.lr": args.lr, "train.batch_size": 32, "train.warmup_frac": 0.05,
        "train.weight_decay": args.weight_decay, "model.dropout": args.dropout,
        "model.head_hidden": args.head_hidden,
    })  # fmt: skip
    model = build_model(cfg.model, cfg.adapter, len(data.answers), cfg.peft)
    Centralized(cfg).prepare(model)
    train_recs, val_recs = split_by_image(data.train, 0.1, args.seed)
    train, _, im_train = encode(model, data, train_recs, data.answers, 224)
    val, closed_val, im_val = encode(model, data, val_recs, data.answers, 224)
    test, closed_test, im_test = encode(model, data, data.test, data.answers, 224)
    print(f"train {len(train)} / val {len(val)} (held-out images) / test {len(test)}; "
          f"visual tokens {train.feats.shape[1]}", flush=True)  # fmt: skip

    probe = run_probe(model, (train, val, test), (im_train, im_val, im_test), closed_val,
                      closed_test, len(data.answers), args.probe_epochs, args.seed)  # fmt: skip
    print(
        f"probe: selected epoch {probe['selected']['epoch']}: test {probe['selected']['test']}",
        flush=True,
    )
    fused = run_fedmm(cfg, model, train, val, test, closed_val, closed_test, args.epochs)
    print(f"fedmm: selected epoch {fused['selected']['epoch']}: test {fused['selected']['test']}")

    report = {"command": "python scripts/vqa_rad_probe.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
        "split": "standard VQA-RAD train/test; validation = 10% of train images",
        "probe": probe, "fedmm_centralized": fused}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print("| model | selected epoch (val acc) | test all | closed | open | last epoch: test all |")
    print("|---|---|---|---|---|---|")
    for name, res in (("frozen-feature MLP probe", probe), ("fedmm centralised", fused)):
        sel, last = res["selected"], res["history"][-1]["test"]
        t = sel["test"]
        print(f"| {name} | {sel['epoch']} ({100 * sel['val']['all']:.1f}) | {100 * t['all']:.1f} | "
              f"{100 * t['closed']:.1f} | {100 * t['open']:.1f} | {100 * last['all']:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
