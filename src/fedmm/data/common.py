"""Helpers shared by the file-backed benchmarks: image reading, label-skew partitions, vocabularies.

Partitions come from ``flwr-datasets`` partitioners applied to a small in-memory
``datasets.Dataset`` with one row per *unit* (an image for VQA-RAD, a record for JSONL) and its
label; nothing is downloaded.

* ``iid``: the units are shuffled with ``seed`` (``Dataset.shuffle``) and cut into ``n`` contiguous
  shards of (almost) equal size (``IidPartitioner``).
* ``dirichlet``: ``DirichletPartitioner(n, "label", alpha, self_balancing=False, seed=seed)``: for
  every label, client shares are drawn from Dir(alpha) and its units split accordingly; the draw
  is repeated (at most 10 times) until every client holds at least
  ``min(10, units // (4 n))`` units (at least 1).  Labels held by fewer than ``n`` units are
  pooled into one ``<rare>`` label first: the partitioner floors each label's cumulative shares,
  so on its own a label with a handful of units would always land on the last clients.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

UNK = "<unk>"  # the last answer: test answers never seen in training; no training label uses it
RARE = "<rare>"

_IMAGES: dict[tuple[str, int], np.ndarray] = {}  # (path, size) -> image, read once per process


def read_images(paths: list[Path], size: int) -> np.ndarray:
    """uint8 ``(N, size, size, 3)`` RGB images, bilinear-resized; each file is read once per process."""
    from PIL import Image

    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        key = (str(path), size)
        if key not in _IMAGES:
            with Image.open(path) as im:
                _IMAGES[key] = np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR))
        out[i] = _IMAGES[key]
    return out


def vocabulary(train_answers: list[str]) -> tuple[list[str], dict[str, int]]:
    """Sorted training answers plus ``UNK`` at the end, and the answer -> index map.

    ``label_of`` maps unseen (test) answers to the ``UNK`` index: a valid class index for
    cross-entropy that no training example carries, so such a question counts as wrong.
    """
    answers = sorted(set(train_answers)) + [UNK]
    return answers, {a: i for i, a in enumerate(answers)}


def label_of(index: dict[str, int], answer: str) -> int:
    return index.get(answer, index[UNK])


def partition(labels: list[str], n: int, how: str, alpha: float, seed: int) -> np.ndarray:
    """The client (0..n-1) of each unit, by a flwr-datasets partitioner (see the module doc)."""
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    if n < 1 or n > len(labels):
        raise ValueError(f"cannot split {len(labels)} units into {n} clients")
    counts = Counter(labels)
    merged = [y if counts[y] >= n else RARE for y in labels]
    ds = Dataset.from_dict({"unit": list(range(len(labels))), "label": merged})
    min_size = max(1, min(10, len(labels) // (4 * n)))  # units per client, for dirichlet
    if how == "iid":
        part = IidPartitioner(n)
        ds = ds.shuffle(seed=seed)
    elif how == "dirichlet":
        if alpha <= 0:
            raise ValueError(f"data.alpha must be > 0, got {alpha}")
        part = DirichletPartitioner(
            n, "label", float(alpha), min_partition_size=min_size, self_balancing=False,
            shuffle=False, seed=seed,
        )  # fmt: skip
    else:
        raise ValueError(f"unknown partitioner {how!r}; choices: iid, dirichlet")
    part.dataset = ds
    owner = np.full(len(labels), -1, dtype=np.int64)
    try:
        for k in range(n):
            owner[part.load_partition(k)["unit"]] = k
    except ValueError as exc:  # the Dirichlet draw failed its minimum size 10 times
        raise ValueError(
            f"Dirichlet partition of {len(labels)} units into {n} clients (alpha={alpha}, "
            f"at least {min_size} each) failed: {exc} Raise data.alpha or lower fed.clients."
        ) from exc
    assert (owner >= 0).all()
    return owner
