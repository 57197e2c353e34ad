"""Site-local data: each site (a hospital) holds only its own records, plus the federation's schema.

A cross-silo federation has no pooled data set: every site keeps one directory, and all sites and
the server share one *task schema* (like a CA certificate: the same file everywhere, compared by
its hash).  The model's heads are built from the schema alone, never from the answers a site
happens to hold, so every site and the server agree on the label indices.

``fedmm split --benchmark NAME --out DIR`` writes any benchmark in this form (``write_sites``),
one directory per client, to rehearse a deployment; ``load_site`` reads one directory back.

Layout of a site directory::

    schema.json     the federation's task schema (identical at every site and the server)
    site.json       optional: who this site is
    train.jsonl     its training records
    test.jsonl      its test records
    images/...      image files named by the records (any relative path under the directory)

The schema (``schema.json``) is ``fedmm.data.schema``'s; writing sites (``fedmm split``) is
``fedmm.data.site_split``'s.

``site.json`` (optional; every field optional, other keys rejected)::

    {"name": "hospital-a", "index": 0, "task": "vqa", "modalities": ["image", "text"],
     "description": "..."}

* ``name`` (string): the client id; default: the directory's name.
* ``index`` (integer >= 0): the client's index when rehearsing a benchmark (kept in notes).
* ``task`` (string): the schema task this site does; required when the schema has more than one
  task; with one task it may be omitted, and if given must equal that task's name.
* ``modalities``: a non-empty subset of ``["image", "text"]``; default both.
* ``description`` (string); default ``site <name>``.  It leaves the site (the server's
  query), so it never holds a path.

``train.jsonl`` / ``test.jsonl``: one JSON object per line, blank lines ignored.

* ``image`` (string): the image path relative to the site directory (no absolute paths, no
  ``..`` out of it); required iff the site has the ``image`` modality, ignored otherwise.  Any
  format PIL reads, converted to RGB and resized to ``model.image_size``; DICOM (``.dcm`` or
  the ``DICM`` magic) and NIfTI (``.nii``, ``.nii.gz``) through ``fedmm.data.medical``: window
  (the file's, else the task's ``image_window``), MONOCHROME1 inverted, the middle frame of a
  multi-frame DICOM, the middle axial slice of a volume.
* ``text`` (non-empty string): required iff the site has the ``text`` modality; otherwise absent
  or ``""``.
* ``answer`` (string) for a ``single`` task, or ``labels`` (list of strings, possibly empty) for
  a ``multilabel`` task; the other one is rejected.  A ``generate`` task: ``answer`` (the
  non-empty target text) or ``answers`` (several references, e.g. captions: the first is the
  training target, all are scored against).
* ``group`` (string, optional): kept as ``RawSplit.groups`` when every record of the site (train
  and test) has one.
* Other keys are ignored (a site may keep its own ids next to the records).

Answers outside the schema are counted, reported and scored as wrong, never a crash and never
remapped: a test record whose ``answer`` is not a schema label gets label ``UNKNOWN_LABEL``
(-100; it never equals an argmax, and cross-entropy ignores it); a training record whose answer
is unknown is dropped (it cannot be learned); unknown entries of ``labels`` are dropped from the
record's 0/1 vector.  The counts and up to 5 ``file:line answer`` examples are in
``Benchmark.notes["unknown_answers"]`` (``{"train": n, "test": m, "examples": [...]}``) and in a
logged warning.  A site left with no training or no test records is an error.  Every error names
the file (and ``file:line`` for a record) and what to change.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedmm.config import FedmmConfig
from fedmm.data import MODALITIES, Benchmark, ClientSpec, RawSplit, Task
from fedmm.data.common import read_images
from fedmm.data.jsonl import json_lines
from fedmm.data.medical import ImageOptions
from fedmm.data.schema import SCHEMA_FILE, Schema, read_schema

log = logging.getLogger(__name__)

SITE_FILE = "site.json"
SPLITS = ("train", "test")


UNKNOWN_LABEL = -100  # a test answer outside the schema: never an argmax, ignored by CE loss
SITE_FIELDS = ("name", "index", "task", "modalities", "description")


# ---------------------------------------------------------------------- reading a site
def list_sites(root: Path) -> list[Path]:
    """Sorted subdirectories of ``root`` that hold a ``site.json`` or a ``train.jsonl``."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory (expected one site directory per "
                                "client, as written by `fedmm split`)")  # fmt: skip
    sites = sorted(
        p for p in root.iterdir()
        if p.is_dir() and ((p / SITE_FILE).is_file() or (p / "train.jsonl").is_file())
    )  # fmt: skip
    if not sites:
        raise ValueError(f"{root} holds no site directories (subdirectories with {SITE_FILE} or "
                         "train.jsonl); write some with `fedmm split --out DIR`")  # fmt: skip
    return sites


@dataclass
class SiteInfo:
    """``site.json``, with its defaults filled in."""

    name: str
    index: int | None
    task: str | None
    modalities: tuple[str, ...]
    description: str


def read_site_info(data_dir: Path) -> SiteInfo:
    path = data_dir / SITE_FILE
    if not path.is_file():
        return SiteInfo(data_dir.name, None, None, MODALITIES, "")
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON: {exc.msg} (line {exc.lineno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    extra = sorted(set(obj) - set(SITE_FIELDS))
    if extra:
        raise ValueError(f"{path}: unknown field {extra[0]!r}; fields: {', '.join(SITE_FIELDS)}")
    for key in ("name", "task", "description"):
        if key in obj and not isinstance(obj[key], str):
            raise ValueError(f"{path}: field {key!r} must be a string")
    if "name" in obj and not obj["name"]:
        raise ValueError(f"{path}: field 'name' must not be empty (or leave it out)")
    index = obj.get("index")
    if index is not None and (isinstance(index, bool) or not isinstance(index, int) or index < 0):
        raise ValueError(f"{path}: field 'index' must be an integer >= 0")
    modalities = obj.get("modalities", list(MODALITIES))
    if (
        not isinstance(modalities, list) or not modalities
        or not all(m in MODALITIES for m in modalities) or len(set(modalities)) != len(modalities)
    ):  # fmt: skip
        raise ValueError(f"{path}: field 'modalities' must be a non-empty list of distinct values "
                         f"from {list(MODALITIES)}, got {modalities!r}")  # fmt: skip
    return SiteInfo(
        obj.get("name", data_dir.name), index, obj.get("task"),
        tuple(m for m in MODALITIES if m in modalities), obj.get("description", ""),
    )  # fmt: skip


def read_site_records(path: Path, kind: str, modalities: tuple[str, ...]) -> list[dict]:
    """Validated records of one site file, each with its ``file:line`` as ``where``.

    Returns dicts with ``image`` (path string or None), ``text``, ``answer`` (single) or
    ``labels`` (multilabel), ``group`` (or None) and ``where``.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: a site directory needs train.jsonl and "
                                "test.jsonl (one JSON record per line)")  # fmt: skip
    records = []
    site = path.parent.resolve()
    for where, obj in json_lines(path):
        image = None
        if "image" in modalities:
            image = obj.get("image")
            if not isinstance(image, str) or not image:
                raise ValueError(f"{where}: field 'image' must be a non-empty string (the site "
                                 "has the image modality; see site.json 'modalities')")  # fmt: skip
            if Path(image).is_absolute() or not (site / image).resolve().is_relative_to(site):
                raise ValueError(f"{where}: field 'image' must be a path relative to the site "
                                 f"directory and inside it, got {image!r}")  # fmt: skip
        text = obj.get("text", "")
        if "text" in modalities:
            if not isinstance(text, str) or not text:
                raise ValueError(f"{where}: field 'text' must be a non-empty string (the site "
                                 "has the text modality; see site.json 'modalities')")  # fmt: skip
        elif text != "":
            raise ValueError(f"{where}: field 'text' must be absent or \"\": the site has no text "
                             "modality (add \"text\" to site.json 'modalities' to use it)")  # fmt: skip
        record = {"image": image, "text": text, "where": where}
        if kind == "generate":  # the target text(s) (fedmm.generation)
            answers = obj["answers"] if "answers" in obj else [obj.get("answer")]
            if (
                ("answer" in obj) == ("answers" in obj)
                or not answers
                or not all(isinstance(a, str) for a in answers)
            ):
                raise ValueError(f"{where}: field 'answer' must be a string, or 'answers' a "
                                 "non-empty list of strings (the target text(s) of the site's "
                                 "generative task; give exactly one of them)")  # fmt: skip
            if not all(a.strip() for a in answers):
                raise ValueError(f"{where}: empty target text in field "
                                 f"{'answers' if 'answers' in obj else 'answer'!r}; every "
                                 "reference of a generate task must be non-empty")  # fmt: skip
            record["answer"], record["answers"] = answers[0], list(answers)
        elif kind == "single":
            if "labels" in obj or not isinstance(obj.get("answer"), str):
                raise ValueError(f"{where}: field 'answer' must be a string (the site's task is "
                                 "single-label; 'labels' is for multilabel tasks)")  # fmt: skip
            record["answer"] = obj["answer"]
        else:
            if "answer" in obj:
                raise ValueError(f"{where}: field 'answer' is for single-label tasks; this "
                                 "site's task is multilabel: give 'labels' (a list of strings)")  # fmt: skip
            labels = obj.get("labels")
            if not isinstance(labels, list) or not all(isinstance(y, str) for y in labels):
                raise ValueError(f"{where}: field 'labels' must be a list of strings (the site's "
                                 "task is multilabel)")  # fmt: skip
            record["labels"] = labels
        group = obj.get("group")
        if group is not None and not isinstance(group, str):
            raise ValueError(f"{where}: field 'group' must be a string")
        record["group"] = group
        records.append(record)
    return records


def site_task(info: SiteInfo, schema: Schema, site_file: Path) -> str:
    """The schema task a site does: ``site.json``'s ``task``, or the schema's lone task.

    Raises ``ValueError`` naming ``site_file`` when the schema has several tasks and the site
    names none, or names one the schema lacks."""
    if info.task is None:
        if not schema.single:
            raise ValueError(f"{site_file}: field 'task' is required: the schema has several "
                             f"tasks ({', '.join(schema.tasks)}); name the one this site does")  # fmt: skip
        return next(iter(schema.tasks))
    if info.task not in schema.tasks:
        raise ValueError(f"{site_file}: field 'task': {info.task!r} is not a task of the schema "
                         f"{schema.name!r} ({', '.join(schema.tasks)})")  # fmt: skip
    return info.task


def label_records(
    records: dict[str, list[dict]], task: Task
) -> tuple[dict[str, list[dict]], dict[str, np.ndarray], dict]:
    """Each split's records with their label targets over ``task``'s schema labels.

    Returns ``(kept, targets, unknown)``: the records kept per split; targets per split (int64
    label indices ``(N,)`` for a single-label task, test answers outside the schema as
    ``UNKNOWN_LABEL``; float32 0/1 ``(N, K)`` for a multilabel task); ``unknown``: counts of
    answers outside the schema per split and up to 5 ``file:line answer`` examples.  A training
    record whose single answer is unknown is dropped (it cannot be learned)."""
    index = {a: i for i, a in enumerate(task.answers)}
    unknown = {"train": 0, "test": 0, "examples": []}

    def seen_unknown(split: str, r: dict, answer: str) -> None:
        unknown[split] += 1
        if len(unknown["examples"]) < 5:
            unknown["examples"].append(f"{r['where']} {answer}")

    kept: dict[str, list[dict]] = {}
    targets: dict[str, np.ndarray] = {}
    for split in SPLITS:
        rows, ys = [], []
        for r in records[split]:
            if task.kind == "generate":  # no label list: the answer text is the target
                ys.append(0)
            elif task.kind == "single":
                if r["answer"] in index:
                    ys.append(index[r["answer"]])
                elif split == "train":  # cannot be learned: dropped
                    seen_unknown(split, r, r["answer"])
                    continue
                else:  # scored as wrong
                    seen_unknown(split, r, r["answer"])
                    ys.append(UNKNOWN_LABEL)
            else:
                vec = np.zeros(len(task.answers), dtype=np.float32)
                for y in r["labels"]:
                    if y in index:
                        vec[index[y]] = 1.0
                    else:
                        seen_unknown(split, r, y)
                ys.append(vec)
            rows.append(r)
        kept[split] = rows
        if task.kind in ("single", "generate"):
            targets[split] = np.asarray(ys, dtype=np.int64)
        else:
            targets[split] = np.stack(ys) if ys else np.zeros((0, len(task.answers)), np.float32)
    return kept, targets, unknown


def load_site(data_dir: Path, cfg: FedmmConfig, schema: Schema | None = None) -> Benchmark:
    """One site directory as a one-client ``Benchmark`` over the schema's label space.

    ``schema`` defaults to ``data_dir/schema.json``.  A schema with one single-label task gives
    ``Benchmark(name=schema.name, answers=labels, tasks={})`` and client task ""; otherwise
    (several tasks, or one multilabel task) ``tasks=schema.tasks`` and the client's task from
    ``site.json`` (or the lone task).  Only ``data_dir`` is read.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"site directory {data_dir} does not exist")
    if schema is None:
        schema = read_schema(data_dir / SCHEMA_FILE)
    info = read_site_info(data_dir)
    task_name = site_task(info, schema, data_dir / SITE_FILE)
    task = schema.tasks[task_name]
    plain = schema.plain  # a Benchmark without tasks

    records = {s: read_site_records(data_dir / f"{s}.jsonl", task.kind, info.modalities)
               for s in SPLITS}  # fmt: skip
    missing = [r for s in SPLITS for r in records[s]
               if r["image"] is not None and not (data_dir / r["image"]).is_file()]  # fmt: skip
    if missing:
        examples = "; ".join(f"{r['where']} {r['image']}" for r in missing[:5])
        raise FileNotFoundError(f"{len(missing)} record(s) name image files that do not exist "
                                f"under {data_dir}, e.g. {examples}. Fix the paths.")  # fmt: skip

    kept, targets, unknown = label_records(records, task)
    for split in SPLITS:
        if not kept[split]:
            dropped = " (all of its training answers are outside the schema)" if records[
                split] else ""  # fmt: skip
            raise ValueError(f"site {data_dir}: {split}.jsonl holds no usable records{dropped}; "
                             "a site needs at least one training and one test record")  # fmt: skip
    if unknown["train"] or unknown["test"]:
        log.warning(
            "site %s: %d training and %d test answers are not labels of schema task %r "
            "(training records dropped, test records scored wrong), e.g. %s",
            data_dir, unknown["train"], unknown["test"], task_name, "; ".join(unknown["examples"]),
        )  # fmt: skip

    tagged = all(r["group"] is not None for s in SPLITS for r in kept[s])
    generate = task.kind == "generate"  # several references per record: a caption data set
    several = generate and any(len(r["answers"]) > 1 for s in SPLITS for r in kept[s])
    options = ImageOptions(schema.image_window.get(task_name))  # DICOM / NIfTI reading

    def encode(split: str) -> RawSplit:
        rows = kept[split]
        images = None
        if "image" in info.modalities:
            images = read_images([data_dir / r["image"] for r in rows], cfg.model.image_size,
                                 [r["where"] for r in rows], options)  # fmt: skip
        return RawSplit(
            images, [r["text"] for r in rows], targets[split],
            groups=[r["group"] for r in rows] if tagged else None,
            targets=[r["answer"] for r in rows] if generate else None,
            references=[r["answers"] for r in rows] if several else None,
        )  # fmt: skip

    description = info.description or f"site {info.name}"  # it leaves the site: never a path
    client = ClientSpec(info.name, description, encode("train"), encode("test"),
                        task="" if plain else task_name, modalities=info.modalities)  # fmt: skip
    notes = {
        "unknown_answers": unknown,
        "site_dir": str(data_dir),
        "site_index": info.index,
        "schema_sha256": schema.sha256(),
    }
    return Benchmark(
        schema.name,
        f"site {info.name}: {len(client.train)} train / {len(client.test)} test records of task "
        f"{task_name!r} from {data_dir} (schema {schema.name}, sha256 {notes['schema_sha256'][:12]})",
        list(task.answers) if plain else [],
        [client],
        notes,
        tasks={} if plain else dict(schema.tasks),
    )  # fmt: skip
