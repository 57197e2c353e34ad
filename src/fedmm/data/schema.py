"""The federation's task schema (``schema.json``): the contract every site and the server share.

A cross-silo federation has no pooled data set, so all sites and the server share one *task schema*
(like a CA certificate: the same file everywhere, compared by its hash).  The model's heads are
built from the schema alone, never from the answers a site happens to hold, so every site and the
server agree on the label indices.  Site directories: ``fedmm.data.sites``.

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
  keep their hash).  A ``generate`` task (text targets, ``fedmm.generation``) has no labels and
  may carry ``prompt`` (its template) and ``score`` (``vqa``, the default, or ``caption``),
  each written only when set.
* Other keys are rejected (a typo would otherwise silently change nothing).
* ``Schema.sha256()`` hashes the canonical form (``Schema.to_json``: keys sorted, fixed
  separators), so re-indenting the file keeps its hash.

``load_site`` turns a schema of one single-label task into a ``Benchmark`` without ``tasks``
(``answers`` = its labels, client task ``""``), any other schema into ``Benchmark.tasks``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from fedmm.data import TASK_KINDS, TASK_SCORES, Benchmark, Task
from fedmm.data.medical import parse_window
from fedmm.files import atomic_write

SCHEMA_FILE = "schema.json"


SCHEMA_VERSION = 1


TASK_FIELDS = ("name", "kind", "labels", "groups", "description", "image_window", "prompt", "score")


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
            if task.score:  # generate: how it is scored; written only when set (hash unchanged)
                entry["score"] = task.score
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
        score = entry.get("score", "")
        if "score" in entry and (kind != "generate" or score not in TASK_SCORES):
            raise ValueError(
                f"{where}: field '{at}.score' must be one of {', '.join(TASK_SCORES)} on a task "
                f"of kind generate (got {score!r} on kind {kind!r}); classification tasks are "
                "scored by accuracy (single) or AUROC / macro-F1 (multilabel)"
            )
        tasks[task_name] = Task(kind, labels, description, prompt, score)
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
        {
            name: Task(t.kind, list(t.answers), t.description, t.prompt, t.score)
            for name, t in tasks.items()
        },  # fmt: skip
        {task: sorted(g) for task, g in groups.items() if g},
    )
