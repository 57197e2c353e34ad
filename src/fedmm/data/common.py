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

import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from fedmm.data.medical import ImageOptions

UNK = "<unk>"  # the last answer: test answers never seen in training; no training label uses it
RARE = "<rare>"

# (path, size, medical ImageOptions or None) -> image, read once per process
_IMAGES: dict[tuple, np.ndarray] = {}

HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I;16S", "I", "F")  # scaled by their range
ALPHA_MODES = ("LA", "RGBA", "PA", "La", "RGBa")


class ImageReadError(ValueError):
    """One or more image files that cannot be read; the message lists where (``file:line``)."""


def to_rgb8(im) -> np.ndarray:
    """uint8 ``(H, W, 3)`` RGB of a Pillow image, faithful to its real range -- whatever its mode.

    * 8-bit modes (``L``, ``RGB``, ``1`` bilevel, ``P`` palette, ``CMYK``, ``YCbCr``, ``LAB``,
      ``HSV``): Pillow's own conversion to RGB (colour spaces converted, palette looked up,
      ``1`` -> 0 / 255).
    * more than 8 bits or float (``I;16`` / ``I;16B`` / ``I;16L``, the 16-bit grayscale of DICOM
      -> PNG exports; ``I`` 32-bit integer; ``F`` float): scaled linearly from the image's own
      ``min..max`` to 0..255 (a window over the values actually present -- what a viewer's
      auto-contrast shows).  A constant image has no range and becomes all zeros; non-finite
      float values become 0 before scaling.  ``convert("RGB")`` would instead clip such images
      (16-bit values above 255 all become white).
    * with alpha (``LA``, ``RGBA``, ``PA``, and the premultiplied ``La`` / ``RGBa``): composited
      on black, i.e. each colour channel multiplied by alpha / 255 (premultiplied modes already
      are); a fully opaque image is unchanged.
    * multi-frame files (TIFF stacks, GIF): the first frame.
    """
    mode = im.mode
    if mode in HIGH_DEPTH_MODES or mode.startswith("I;"):
        a = np.asarray(im).astype(np.float64)
        if a.ndim == 3:  # unusual multi-channel high-depth data: one range over all channels
            a = a[..., :3] if a.shape[-1] >= 3 else a[..., :1]
        a = np.where(np.isfinite(a), a, 0.0)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        scaled = np.zeros_like(a) if hi <= lo else (a - lo) * (255.0 / (hi - lo))
        gray = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
        if gray.ndim == 2:
            gray = gray[..., None]
        return np.ascontiguousarray(np.broadcast_to(gray, (*gray.shape[:2], 3)))
    if mode in ALPHA_MODES:
        if mode == "La":
            rgba = np.asarray(im)  # premultiplied luminance + alpha: drop alpha
            return np.repeat(rgba[..., :1], 3, axis=-1)
        if mode == "RGBa":
            return np.asarray(im)[..., :3].copy()
        rgba = np.asarray(im.convert("RGBA")).astype(np.float64)
        rgb = rgba[..., :3] * (rgba[..., 3:4] / 255.0)
        return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    if mode == "P" and "transparency" in im.info:
        return to_rgb8(im.convert("RGBA"))
    if mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im).copy()


def load_image(path: Path, size: int, options: ImageOptions | None = None) -> np.ndarray:
    """uint8 ``(size, size, 3)`` RGB of one file (``to_rgb8``, bilinear resize), cached per process.

    DICOM and NIfTI files (``fedmm.data.medical.medical_kind``) are read by
    ``fedmm.data.medical.load_medical`` with ``options`` (an ``ImageOptions``: the task's default
    window; None = no default); every other file by Pillow.  Raises ``FileNotFoundError`` for a
    missing file and ``ImageReadError`` (with the reason) for one that cannot be opened or
    decoded: not an image, corrupt, truncated, a DICOM without pixel data or decoder."""
    from PIL import Image

    key = (str(path), size, options)
    if key in _IMAGES:
        return _IMAGES[key]
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} does not exist")
    from fedmm.data import medical

    if medical.medical_kind(path) is not None:
        out = medical.load_medical(path, size, options)
        _IMAGES[key] = out
        return out
    try:
        with Image.open(path) as im:
            im.load()  # decode now: truncated or corrupt data fails here, not later
            rgb = to_rgb8(im)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        # OSError covers UnidentifiedImageError (not an image) and "image file is truncated"
        raise ImageReadError(f"{type(exc).__name__}: {exc}") from exc
    out = np.asarray(Image.fromarray(rgb, "RGB").resize((size, size), Image.BILINEAR))
    _IMAGES[key] = out
    return out


def image_problem(path: Path, size: int, options: ImageOptions | None = None) -> str | None:
    """Why ``path`` cannot be used as an image (``"missing"`` or ``"cannot be read (...)"``),
    or None when it loads (and is then cached for ``read_images``)."""
    try:
        load_image(path, size, options)
    except FileNotFoundError:
        return "missing"
    except ImageReadError as exc:
        return f"cannot be read ({exc})"
    return None


def read_images(
    paths: list[Path],
    size: int,
    where: list[str] | None = None,
    options: ImageOptions | None = None,
) -> np.ndarray:
    """uint8 ``(N, size, size, 3)`` RGB images (``load_image`` with ``options``); each file is
    read once per process.

    Every file is tried; any that is missing or unreadable gives one ``ImageReadError`` with
    their count and up to 5 examples, each as ``<where>: image <path> <problem>`` (``where``:
    one location per path, e.g. ``train.jsonl:6``; default: the path itself)."""
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    problems = []
    for i, path in enumerate(paths):
        problem = image_problem(path, size, options)
        if problem is None:
            out[i] = _IMAGES[(str(path), size, options)]
        else:
            problems.append(f"{where[i]}: image {path} {problem}" if where else
                            f"image {path} {problem}")  # fmt: skip
    if problems:
        raise ImageReadError(
            f"{len(problems)} image(s) missing or unreadable, e.g. " + "; ".join(problems[:5])
        )
    return out


def read_json(path: Path) -> object:
    """A JSON file's content; a file that is not UTF-8 or not JSON fails naming ``file:line``
    (and the column, for UTF-8 in bytes), never with a bare decoder traceback."""
    data = Path(path).read_bytes().removeprefix(b"\xef\xbb\xbf")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ValueError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{data[exc.start]:02x} at column {column})"
        ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"{path}:{exc.lineno}: invalid JSON: {exc.msg} (column {exc.colno})"
        ) from None


def normalize_answer(answer: object) -> str:
    """Standard VQA answer normalisation: ``str()``, strip, internal whitespace collapsed to one
    space, lower-case (``" Left  Lung "`` -> ``"left lung"``)."""
    return " ".join(str(answer).split()).lower()


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
