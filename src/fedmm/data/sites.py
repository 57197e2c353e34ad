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

``schema.json``::

    {"fedmm_schema": 1, "name": "fmnist-task",
     "tasks": [{"name": "vqa", "kind": "single", "labels": ["t-shirt", ...],
                "groups": ["closed", "open"], "description": "..."}, ...]}

* ``fedmm_schema`` must be 1; ``name`` (string) names the benchmark it came from (informational).
* ``tasks``: a non-empty list; each task has a unique non-empty ``name``, a ``kind`` (``single``:
  one label per record; ``multilabel``: a set of labels per record), ``labels``: a non-empty list
  of distinct strings whose order *is* the label index, and optionally ``groups`` (distinct
  strings: the evaluation groups its records may carry), ``description`` (string) and
  ``image_window`` (``[center, width]`` or ``"minmax"``: the default window of the task's DICOM
  images that carry none, ``fedmm.data.medical``; written only when set, so schemas without it
  keep their hash).
* Other keys are rejected (a typo would otherwise silently change nothing).
* ``Schema.sha256()`` hashes the canonical form (``Schema.to_json``: keys sorted, fixed
  separators), so re-indenting the file keeps its hash.

``load_site`` turns a schema of one single-label task into a ``Benchmark`` without ``tasks``
(``answers`` = its labels, client task ``""``), any other schema into ``Benchmark.tasks``.

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
  a ``multilabel`` task; the other one is rejected.
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

import io
import json
import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedmm.config import FedmmConfig
from fedmm.data import MODALITIES, TASK_KINDS, Benchmark, ClientSpec, RawSplit, Task
from fedmm.data.common import read_images
from fedmm.data.jsonl import json_lines
from fedmm.data.medical import ImageOptions, parse_window
from fedmm.files import atomic_write

log = logging.getLogger(__name__)

SCHEMA_FILE = "schema.json"
SITE_FILE = "site.json"
SPLITS = ("train", "test")
SCHEMA_VERSION = 1
UNKNOWN_LABEL = -100  # a test answer outside the schema: never an argmax, ignored by CE loss
SITE_FIELDS = ("name", "index", "task", "modalities", "description")
TASK_FIELDS = ("name", "kind", "labels", "groups", "description", "image_window", "prompt")


@dataclass
class Schema:
    """The federation's task schema: the label space of every task, shared by all sites."""

    name: str  # benchmark name it came from (informational)
    tasks: dict[str, Task]  # task name -> kind, answers (ordered labels), description
    groups: dict[str, list[str]] = field(default_factory=dict)  # task -> evaluation groups
    # task -> default window of its DICOM files without one: (center, width) or "minmax"
    image_window: dict[str, tuple[float, float] | str] = field(default_factory=dict)

    @property
    def single(self) -> bool:
        """Exactly one task."""
        return len(self.tasks) == 1

    @property
    def plain(self) -> bool:
        """One single-label task: a ``Benchmark`` without ``tasks`` (every VQA benchmark)."""
        return self.single and next(iter(self.tasks.values())).kind == "single"

    def task_names(self) -> list[str]:
        """The tasks as clients name them: ``[""]`` for a plain schema (one single-label task),
        else the schema's task names."""
        return [""] if self.plain else list(self.tasks)

    def head_sizes(self) -> int | dict[str, int]:
        """One task: its number of labels; several: ``{task: number of labels}``.

        Always equal to ``load_site(...).head_sizes()``: a lone *multilabel* task (which a
        ``Benchmark`` can only hold in ``tasks``) is ``{task: number of labels}`` too.
        """
        if self.plain:
            return len(next(iter(self.tasks.values())).answers)
        return {name: len(task.answers) for name, task in self.tasks.items()}

    def to_dict(self) -> dict:
        tasks = []
        for name, task in self.tasks.items():
            entry = {"name": name, "kind": task.kind, "labels": list(task.answers)}
            if self.groups.get(name):
                entry["groups"] = list(self.groups[name])
            if task.description:
                entry["description"] = task.description
            if task.prompt:  # generate: the prompt template (fedmm.generation)
                entry["prompt"] = task.prompt
            if name in self.image_window:
                window = self.image_window[name]
                entry["image_window"] = window if isinstance(window, str) else list(window)
            tasks.append(entry)
        return {"fedmm_schema": SCHEMA_VERSION, "name": self.name, "tasks": tasks}

    def to_json(self) -> str:
        """The canonical text: keys sorted, indent 1, separators ``(",", ": ")``, final newline."""
        return (
            json.dumps(
                self.to_dict(),
                sort_keys=True,
                indent=1,
                separators=(",", ": "),
                ensure_ascii=False,
            )  # fmt: skip
            + "\n"
        )

    def sha256(self) -> str:
        """Hex SHA-256 of ``to_json()`` (UTF-8): equal at two sites iff their schemas are equal."""
        import hashlib

        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------- schema files
def _str_list(value: object, where: str, what: str, allow_empty: bool = False) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where}: field {what!r} must be a list of strings")
    if not value and not allow_empty:
        raise ValueError(f"{where}: field {what!r} must not be empty")
    dup = next((v for i, v in enumerate(value) if v in value[:i]), None)
    if dup is not None:
        raise ValueError(f"{where}: field {what!r} lists {dup!r} twice; labels must be distinct")
    return list(value)


def parse_schema(obj: object, where: str) -> Schema:
    """A ``Schema`` from parsed JSON; ``where`` (the file) starts every error message."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    extra = sorted(set(obj) - {"fedmm_schema", "name", "tasks"})
    if extra:
        raise ValueError(f"{where}: unknown field {extra[0]!r}; fields: fedmm_schema, name, tasks")
    if obj.get("fedmm_schema") != SCHEMA_VERSION:
        raise ValueError(f"{where}: field 'fedmm_schema' must be {SCHEMA_VERSION}, got "
                         f"{obj.get('fedmm_schema')!r} (is this a fedmm task schema?)")  # fmt: skip
    name = obj.get("name")
    if not isinstance(name, str):
        raise ValueError(f"{where}: field 'name' must be a string")
    raw_tasks = obj.get("tasks")
    if not isinstance(raw_tasks, list) or not raw_tasks:
        raise ValueError(f"{where}: field 'tasks' must be a non-empty list of task objects")
    tasks: dict[str, Task] = {}
    groups: dict[str, list[str]] = {}
    windows: dict[str, tuple[float, float] | str] = {}
    for i, entry in enumerate(raw_tasks):
        at = f"tasks[{i}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: field {at!r} must be an object")
        extra = sorted(set(entry) - set(TASK_FIELDS))
        if extra:
            raise ValueError(f"{where}: unknown field '{at}.{extra[0]}'; task fields: "
                             f"{', '.join(TASK_FIELDS)}")  # fmt: skip
        task_name = entry.get("name")
        if not isinstance(task_name, str) or not task_name:
            raise ValueError(f"{where}: field '{at}.name' must be a non-empty string")
        if task_name in tasks:
            raise ValueError(f"{where}: field '{at}.name': task {task_name!r} is declared twice")
        kind = entry.get("kind")
        if kind not in TASK_KINDS:
            raise ValueError(f"{where}: field '{at}.kind' must be one of {', '.join(TASK_KINDS)}, "
                             f"got {kind!r}")  # fmt: skip
        # a generative task (text targets, fedmm.generation) has no label list
        labels = _str_list(entry.get("labels", []), where, f"{at}.labels",
                           allow_empty=kind == "generate")  # fmt: skip
        description, prompt = entry.get("description", ""), entry.get("prompt", "")
        if not isinstance(description, str) or not isinstance(prompt, str):
            raise ValueError(f"{where}: fields '{at}.description' and '{at}.prompt' must be "
                             "strings")  # fmt: skip
        tasks[task_name] = Task(kind, labels, description, prompt)
        if entry.get("groups"):
            groups[task_name] = _str_list(entry["groups"], where, f"{at}.groups")
        elif "groups" in entry:
            _str_list(entry["groups"], where, f"{at}.groups", allow_empty=True)
        if "image_window" in entry:
            windows[task_name] = parse_window(entry["image_window"],
                                              f"{where}: field '{at}.image_window'")  # fmt: skip
    return Schema(name, tasks, groups, windows)


def read_schema(path: Path) -> Schema:
    """The schema in ``path``; ``FileNotFoundError`` / ``ValueError`` naming the file and field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: every site directory needs the federation's {SCHEMA_FILE} "
            "(the same file at every site and the server; `fedmm split` writes one)"
        )
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON: {exc.msg} (line {exc.lineno})") from None
    return parse_schema(obj, str(path))


def write_schema(schema: Schema, path: Path) -> None:
    """``schema.to_json()`` to ``path``, atomically."""
    atomic_write(path, schema.to_json().encode("utf-8"))


def schema_of(benchmark: Benchmark) -> Schema:
    """The schema of a benchmark: its tasks, or one task named after it over its answers.

    A task's groups are the sorted evaluation groups its clients' records carry (none if no
    client of the task tags its records).
    """
    tasks = benchmark.tasks or {benchmark.name: Task("single", list(benchmark.answers))}
    groups: dict[str, set[str]] = {}
    for c in benchmark.clients:
        task = c.task or benchmark.name
        for split in (c.train, c.test):
            if split.groups is not None:
                groups.setdefault(task, set()).update(split.groups)
    return Schema(
        benchmark.name,
        {name: Task(t.kind, list(t.answers), t.description, t.prompt) for name, t in tasks.items()},
        {task: sorted(g) for task, g in groups.items() if g},
    )


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
        if kind == "generate":  # the target text (fedmm.generation); empty is refused there
            if not isinstance(obj.get("answer"), str):
                raise ValueError(f"{where}: field 'answer' must be a string (the target text of "
                                 "the site's generative task)")  # fmt: skip
            record["answer"] = obj["answer"]
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
    site_file = data_dir / SITE_FILE
    if info.task is None:
        if not schema.single:
            raise ValueError(f"{site_file}: field 'task' is required: the schema has several "
                             f"tasks ({', '.join(schema.tasks)}); name the one this site does")  # fmt: skip
        task_name = next(iter(schema.tasks))
    elif info.task not in schema.tasks:
        raise ValueError(f"{site_file}: field 'task': {info.task!r} is not a task of the schema "
                         f"{schema.name!r} ({', '.join(schema.tasks)})")  # fmt: skip
    else:
        task_name = info.task
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
            targets=[r["answer"] for r in rows] if task.kind == "generate" else None,
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
        if task.kind == "generate":
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
