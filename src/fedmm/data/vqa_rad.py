"""VQA-RAD (Lau et al., Scientific Data 2018): real radiology VQA, 315 images, 3,515 QA pairs.

Not shipped with fedmm (CC0, but not on PyPI/Debian): point ``$FEDMM_VQA_RAD`` at a directory with
``trainset.json``, ``testset.json`` and ``images/``; a checkout beside ``../shared/data/vqa-rad``
finds it automatically.

Normalisation (the real files' quirks): answers are ``str()``-ed (10 train answers are JSON
integers), stripped and lower-cased; ``answer_type`` is stripped and upper-cased ("CLOSED ").
The answer vocabulary is built from the training split; test answers outside it can never be
predicted and count as wrong.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class VqaRad:
    root: Path
    train: list[dict]
    test: list[dict]
    answers: list[str]
    normalised: Counter  # what the loader changed, by kind


def find_vqa_rad(root: str = "") -> Path | None:
    """The VQA-RAD directory: ``root``, ``$FEDMM_VQA_RAD``, or ``shared/data/vqa-rad`` beside the checkout."""
    here = Path(__file__).resolve()
    candidates = [root, os.environ.get("FEDMM_VQA_RAD", "")]
    candidates += [str(p / "shared" / "data" / "vqa-rad") for p in here.parents[2:5]]
    for cand in filter(None, candidates):
        path = Path(cand)
        if (path / "trainset.json").is_file() and (path / "images").is_dir():
            return path
    return None


def normalise_answer(answer: object) -> str:
    return " ".join(str(answer).split()).lower()


def load_vqa_rad(root: str = "") -> VqaRad:
    path = find_vqa_rad(root)
    if path is None:
        raise FileNotFoundError(
            "VQA-RAD not found: set FEDMM_VQA_RAD=DIR (a directory with trainset.json, "
            "testset.json and images/)"
        )
    changed: Counter = Counter()
    splits = {}
    for split in ("train", "test"):
        records = json.loads((path / f"{split}set.json").read_text())
        for i, rec in enumerate(records):
            for key in ("image_name", "question", "answer", "answer_type"):
                if key not in rec:
                    raise ValueError(f"{path / f'{split}set.json'}: record {i} has no {key!r}")
            raw = rec["answer"]
            if not isinstance(raw, str):
                changed["answer not a string"] += 1
            elif raw != normalise_answer(raw):
                changed["answer case/space"] += 1
            rec["answer"] = normalise_answer(raw)
            if rec["answer_type"] != rec["answer_type"].strip().upper():
                changed["answer_type case/space"] += 1
            rec["answer_type"] = rec["answer_type"].strip().upper()
        splits[split] = records
    answers = sorted({r["answer"] for r in splits["train"]})
    return VqaRad(path, splits["train"], splits["test"], answers, changed)


def load_images(root: Path, names: list[str], size: int) -> np.ndarray:
    """uint8 ``(N, size, size, 3)`` RGB images, each read once."""
    from PIL import Image

    cache: dict[str, np.ndarray] = {}
    out = np.empty((len(names), size, size, 3), dtype=np.uint8)
    for i, name in enumerate(names):
        if name not in cache:
            with Image.open(root / "images" / name) as im:
                cache[name] = np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR))
        out[i] = cache[name]
    return out
