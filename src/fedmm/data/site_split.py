"""``fedmm split``: write a benchmark as site directories (one per client, each with the federation's
schema), to rehearse a deployment; the layout is ``fedmm.data.sites``'s."""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import numpy as np

from fedmm.data import Benchmark, RawSplit, Task
from fedmm.data.schema import SCHEMA_FILE, Schema, schema_of, write_schema
from fedmm.data.sites import SITE_FILE
from fedmm.files import atomic_write


# ---------------------------------------------------------------------- writing sites
def slug(text: str) -> str:
    """A file-name-safe form of a client id: runs of other characters become one '-'."""
    return re.sub(r"[^A-Za-z0-9._]+", "-", text).strip("-.") or "site"


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    if image.dtype != np.uint8 or not (
        image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)
    ):
        raise ValueError(f"cannot write an image of dtype {image.dtype} and shape {image.shape}; "
                         "expected uint8 (H, W) or (H, W, 3)")  # fmt: skip
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG")  # 2-D: L, 3-D: RGB
    return buf.getvalue()


def _write_records(
    site: Path, split: str, data: RawSplit, task: Task, modalities: tuple[str, ...]
) -> None:
    lines = []
    if "image" in modalities:
        (site / "images").mkdir(parents=True, exist_ok=True)
    for row in range(len(data)):
        record: dict = {}
        if "image" in modalities:
            name = f"images/{split}-{row:05d}.png"
            (site / name).write_bytes(_png(data.images[row]))
            record["image"] = name
        if "text" in modalities:
            record["text"] = data.texts[row]
        label = data.labels[row]
        if task.kind == "generate" and data.references is not None:
            record["answers"] = list(data.references[row])  # several references (captions)
        elif task.kind == "generate":
            record["answer"] = data.targets[row]
        elif task.kind == "single":
            record["answer"] = task.answers[int(label)]
        else:
            record["labels"] = [task.answers[j] for j in np.flatnonzero(np.asarray(label) > 0.5)]
        if data.groups is not None:
            record["group"] = data.groups[row]
        lines.append(json.dumps(record, ensure_ascii=False))
    atomic_write(site / f"{split}.jsonl", ("\n".join(lines) + "\n").encode("utf-8"))


def check_split_dir(out: Path) -> bool:
    """Whether ``out`` holds a previous split; ``FileExistsError`` if it holds anything else."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return False
    if not (out / SCHEMA_FILE).is_file():
        raise FileExistsError(f"{out} is not empty and is not a previous `fedmm split` (no "
                              f"{SCHEMA_FILE}); choose an empty or new --out directory")  # fmt: skip
    return True


def _check_writable(benchmark: Benchmark, schema: Schema) -> None:
    """Every client can be written as a site that ``load_site`` reads back unchanged."""
    for client in benchmark.clients:
        name = f"client {client.client_id}"
        task = schema.tasks[client.task or benchmark.name]
        if not len(client.train) or not len(client.test):
            raise ValueError(f"{name} has {len(client.train)} training and {len(client.test)} "
                             "test records; a site needs at least one of each (give it more "
                             "data or fewer clients)")  # fmt: skip
        for split, data in (("train", client.train), ("test", client.test)):
            if "image" in client.modalities and data.images is None:
                raise ValueError(f"{name}: declares the image modality but its {split} split "
                                 "has no images")  # fmt: skip
            if "text" in client.modalities and not all(data.texts):
                raise ValueError(f"{name}: has the text modality but empty {split} texts (a "
                                 "site record's 'text' must be non-empty)")  # fmt: skip
            bad = task.kind == "single" and (
                (data.labels < 0).any() or (data.labels >= len(task.answers)).any()
            )
            if bad:
                raise ValueError(f"{name}: {split} labels outside 0..{len(task.answers) - 1} "
                                 "(e.g. an unknown answer of a loaded site) cannot be written "
                                 "as answers")  # fmt: skip


def write_sites(benchmark: Benchmark, out: Path) -> list[Path]:
    """Write every client of ``benchmark`` as a site directory under ``out`` (see the module doc).

    Client k goes to ``out/<k:02d>-<slug of client_id>/``; ``schema.json`` is written into every
    site directory and at ``out/schema.json``.  ``out`` must be empty, missing, or a previous
    split (it has ``schema.json``): then its site directories are removed first.
    """
    out = Path(out)
    schema = schema_of(benchmark)
    _check_writable(benchmark, schema)  # before anything is written or removed
    if check_split_dir(out):
        for old in out.iterdir():
            if old.is_dir() and ((old / SITE_FILE).is_file() or (old / SCHEMA_FILE).is_file()):
                shutil.rmtree(old)
    sites = []
    for k, client in enumerate(benchmark.clients):
        task_name = client.task or benchmark.name
        task = schema.tasks[task_name]
        site = out / f"{k:02d}-{slug(client.client_id)}"
        info = {"name": client.client_id, "index": k, "task": task_name,
                "modalities": list(client.modalities), "description": client.description}  # fmt: skip
        for split, data in (("train", client.train), ("test", client.test)):
            _write_records(site, split, data, task, client.modalities)
        atomic_write(site / SITE_FILE, (json.dumps(info, indent=1) + "\n").encode("utf-8"))
        write_schema(schema, site / SCHEMA_FILE)
        sites.append(site)
    write_schema(schema, out / SCHEMA_FILE)
    return sites
