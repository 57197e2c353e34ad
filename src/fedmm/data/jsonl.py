"""Bring your own data: the ``jsonl`` benchmark reads ``data.data_dir/{train,test}.jsonl``.

Format (also in docs/data.md): one JSON object per line, blank lines ignored.

* ``image`` (string, required): image file path relative to ``data.data_dir``; any format PIL
  reads, mapped to 8-bit RGB by its real range (``fedmm.data.common.to_rgb8``: 16-bit and float
  images scaled from their own min..max, alpha composited on black) and resized to
  ``model.image_size``; DICOM and NIfTI files by ``fedmm.data.medical`` (here without a task
  schema, so a DICOM file must carry its own window).
* ``text`` (string, required): the question or caption.
* ``answer`` (string): the label; or ``labels`` (list of strings) with exactly one element --
  multi-label records (more than one label) are rejected for now, since a RawSplit holds one
  label per record.  With a generate task (below): ``answer`` (string) is the target text, or
  ``answers`` (non-empty list of strings) several references (captions), the first of which is
  the training target; all are scored against.
* ``client`` (string or integer, optional): the client that holds the record.
* ``group`` (string, optional): an evaluation group (e.g. "closed" / "open"), kept as
  ``RawSplit.groups`` when every record has one.

Clients (``data.clients_by``):

* ``column``: one client per distinct ``client`` value (sorted; every record needs one, every test
  client must also have training records), so ``fed.clients`` must equal their number;
* ``iid`` / ``dirichlet``: the pooled train and test records are partitioned into ``fed.clients``
  clients by ``fedmm.data.common.partition`` over their answers (``data.alpha``,
  ``data.split_seed``); each client's train / test set is its records from each file, so a client's
  test labels follow its training skew.

Task (optional ``data.data_dir/schema.json``, ``fedmm.data.schema``'s format): without it the
data is one single-label task over the training answers.  A schema may declare exactly one task,
of kind ``generate`` (text targets, ``fedmm.generation``; needs a generative backbone), with its
optional ``prompt`` and ``score`` (``vqa`` / ``caption``); the targets are the records' answer
texts, stripped, never normalised (the scores normalise), and an empty one is an error naming
``file:line``.  A classification schema is refused (its labels come from the training answers;
site directories, ``fedmm split``, hold a fixed label list).  ``data.task_kind=generate`` without
a schema answers the single-label task in text (``fedmm.generation.as_generative``).

Answers: with ``data.normalize_answers = true`` (the default) every answer gets the standard VQA
normalisation (``normalize_answer``: strip, internal whitespace collapsed, lower-case), so "Yes"
and "yes " are one class; how many answers it changed is ``notes["answers_normalised"]``.  The
label space is the sorted training answers plus ``<unk>`` for test answers never seen in training
(they count as wrong; their number is ``notes["test_unk"]``).

Errors name the place.  A malformed line raises ``ValueError`` naming ``file:line`` and the field
(also: not UTF-8, with the byte and its column; a whitespace-only ``image`` or ``text``).  Every
image is opened and decoded before anything else: files that are missing, not images, corrupt or
truncated give one error with their count and up to 5 ``file:line: image PATH missing`` /
``... cannot be read (reason)`` examples (``FileNotFoundError`` when all are missing, else
``ImageReadError``), unless ``data.skip_missing_images = true``: then those records are dropped
and counted in ``notes["missing_images_dropped"]`` / ``notes["unreadable_images_dropped"]``.
``Benchmark.notes`` also holds the records read per file and kept in the end.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from fedmm.config import ConfigError, FedmmConfig
from fedmm.data import Benchmark, ClientSpec, RawSplit, Task, register
from fedmm.data.common import (
    ImageReadError,
    image_problem,
    label_of,
    normalize_answer,
    partition,
    read_images,
    vocabulary,
)

FILES = ("train.jsonl", "test.jsonl")
SCHEMA_FILE = "schema.json"  # optional: one generate task (fedmm.data.schema's format)


def json_lines(path: Path) -> Iterator[tuple[str, dict]]:
    """``(file:line, object)`` of every non-blank line of a JSON-lines file.

    The file must be UTF-8 (a leading byte-order mark is allowed): a line that is not gives
    ``file:line: not valid UTF-8 (byte 0x.. at column ..)``, the column counted in bytes from 1.
    Lines end at ``\\n`` (a ``\\r`` before it is dropped); blank lines are skipped.  A line that
    is not a JSON object raises ``ValueError`` naming ``file:line`` (and the column)."""
    data = path.read_bytes().removeprefix(b"\xef\xbb\xbf")
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        where = f"{path}:{lineno}"
        try:
            line = raw.removesuffix(b"\r").decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(
                f"{where}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
                "save the file as UTF-8"
            ) from None
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: invalid JSON: {exc.msg} (column {exc.colno})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        yield where, obj


def read_jsonl(path: Path, generate: bool = False) -> list[dict]:
    """Validated records of one file, each with its ``file:line`` as ``where`` (``json_lines``
    reads the lines).  ``generate``: the records of a generate task (``answer`` or ``answers``:
    target texts; the record's ``answers`` lists every reference, ``answer`` the first)."""
    records = []
    for where, obj in json_lines(path):
        for key in ("image", "text"):
            if key not in obj:
                raise ValueError(f"{where}: missing required field {key!r}")
            if not isinstance(obj[key], str) or not obj[key].strip():
                got = (
                    "only whitespace" if isinstance(obj[key], str) and obj[key] else repr(obj[key])
                )
                raise ValueError(f"{where}: field {key!r} must be a non-empty string, got {got}")
        answers = None
        if generate:
            if ("answer" in obj) == ("answers" in obj) or "labels" in obj:
                raise ValueError(f"{where}: field 'answer' (or 'answers'): give exactly one of "
                                 "them, the target text(s) of the generate task ('labels' is "
                                 "for classification)")  # fmt: skip
            answers = obj["answers"] if "answers" in obj else [obj["answer"]]
            if (
                not isinstance(answers, list)
                or not answers
                or not all(isinstance(a, str) for a in answers)
            ):
                raise ValueError(f"{where}: field 'answers' must be a non-empty list of strings "
                                 "(field 'answer': a string)")  # fmt: skip
            answers = [a.strip() for a in answers]
            if not all(answers):
                raise ValueError(f"{where}: empty target text in field "
                                 f"{'answers' if 'answers' in obj else 'answer'!r}; every "
                                 "reference of a generate task must be non-empty")  # fmt: skip
            answer = answers[0]
        elif "answers" in obj:
            raise ValueError(f"{where}: field 'answers' (several references) is for a generate "
                             f"task, declared in {SCHEMA_FILE}; give 'answer'")  # fmt: skip
        elif ("answer" in obj) == ("labels" in obj):
            raise ValueError(f"{where}: field 'answer' (or 'labels'): give exactly one of them")
        elif "labels" in obj:
            labels = obj["labels"]
            if not isinstance(labels, list) or not all(isinstance(y, str) for y in labels):
                raise ValueError(f"{where}: field 'labels' must be a list of strings")
            if len(labels) != 1:
                raise ValueError(
                    f"{where}: field 'labels': {len(labels)} labels; multi-label records are "
                    "not supported yet (one answer per record)"
                )
            answer = labels[0]
        else:
            answer = obj["answer"]
            if not isinstance(answer, str):
                raise ValueError(f"{where}: field 'answer' must be a string")
        client = obj.get("client")
        if client is not None and (isinstance(client, bool) or not isinstance(client, str | int)):
            raise ValueError(f"{where}: field 'client' must be a string or an integer")
        group = obj.get("group")
        if group is not None and not isinstance(group, str):
            raise ValueError(f"{where}: field 'group' must be a string")
        records.append({
            "image": obj["image"], "text": obj["text"], "answer": answer, "where": where,
            "client": None if client is None else str(client), "group": group,
            "answers": answers,
        })  # fmt: skip
    return records


def read_task(root: Path) -> tuple[str, Task] | None:
    """The generate task declared by ``root/schema.json``, or None when there is no schema.

    Raises ``ValueError`` naming the file when the schema is invalid, declares more than one
    task, or a task of another kind."""
    from fedmm.data.schema import read_schema

    path = root / SCHEMA_FILE
    if not path.is_file():
        return None
    schema = read_schema(path)
    if not schema.single:
        raise ValueError(f"{path}: declares {len(schema.tasks)} tasks ({', '.join(schema.tasks)});"
                         " the jsonl benchmark holds one task (several tasks: site directories, "
                         "docs/data.md)")  # fmt: skip
    name, task = next(iter(schema.tasks.items()))
    if task.kind != "generate":
        raise ValueError(
            f"{path}: task {name!r} has kind {task.kind!r}; a jsonl schema declares a generate "
            "task only (a classification task's labels are the training answers; a fixed label "
            "list needs site directories, docs/data.md). Remove the file or declare "
            '"kind": "generate"'
        )
    return name, task


def _client_key(cid: str) -> tuple:
    return (0, int(cid), "") if cid.isdigit() else (1, 0, cid)


@register("jsonl")
def jsonl_benchmark(cfg: FedmmConfig) -> Benchmark:
    if not cfg.data.data_dir:
        raise ConfigError(
            "the jsonl benchmark needs data.data_dir=DIR holding " + " and ".join(FILES)
        )
    root = Path(cfg.data.data_dir)
    for name in FILES:
        if not (root / name).is_file():
            raise FileNotFoundError(
                f"{root / name} does not exist (the jsonl benchmark reads {FILES})"
            )
    declared = read_task(root)
    generate = declared is not None
    train, test = (read_jsonl(root / name, generate) for name in FILES)
    notes: dict = {"records_read": {"train": len(train), "test": len(test)},
                   "normalize_answers": cfg.data.normalize_answers, "answers_normalised": 0}  # fmt: skip
    if cfg.data.normalize_answers and not generate:  # target texts are scored normalised
        for r in train + test:
            norm = normalize_answer(r["answer"])
            notes["answers_normalised"] += norm != r["answer"]
            r["answer"] = norm
    empty = next((r for r in train + test if not r["answer"]), None)
    if empty is not None:
        raise ValueError(f"{empty['where']}: field 'answer' is empty after normalisation")

    # every image is opened and decoded now (and cached for encoding): missing, corrupt,
    # truncated or non-image files are reported together, each with its file:line
    problems = [(r, image_problem(root / r["image"], cfg.model.image_size)) for r in train + test]
    bad = [(r, why) for r, why in problems if why is not None]
    missing = sum(why == "missing" for _, why in bad)
    notes |= {"missing_images_dropped": 0, "unreadable_images_dropped": 0}
    if bad and not cfg.data.skip_missing_images:
        examples = "; ".join(f"{r['where']}: image {r['image']} {why}" for r, why in bad[:5])
        kind = FileNotFoundError if missing == len(bad) else ImageReadError
        raise kind(
            f"{len(bad)} record(s) name image files under {root} that are missing ({missing}) "
            f"or cannot be read ({len(bad) - missing}), e.g. {examples}. Fix or remove them, or "
            "set data.skip_missing_images=true to drop those records."
        )
    if bad:
        gone = {id(r) for r, _ in bad}
        train = [r for r in train if id(r) not in gone]
        test = [r for r in test if id(r) not in gone]
        notes["missing_images_dropped"] = missing
        notes["unreadable_images_dropped"] = len(bad) - missing
    if not train or not test:
        raise ValueError(f"{root}: train.jsonl and test.jsonl must each hold at least one record")

    n, how = cfg.fed.clients, cfg.data.clients_by
    if how == "column":
        unnamed = next((r for r in train + test if r["client"] is None), None)
        if unnamed is not None:
            raise ValueError(
                f"{unnamed['where']}: missing field 'client' (data.clients_by=column needs it "
                "on every record; or use data.clients_by=iid|dirichlet)"
            )
        ids = sorted({r["client"] for r in train}, key=_client_key)
        stray = next((r for r in test if r["client"] not in ids), None)
        if stray is not None:
            raise ValueError(
                f"{stray['where']}: client {stray['client']!r} has no training records"
            )
        if len(ids) != n:
            raise ConfigError(f"{root}: the 'client' column names {len(ids)} clients; "
                              f"set fed.clients={len(ids)} (got {n})")  # fmt: skip
        for r in train + test:
            r["owner"] = ids.index(r["client"])
        descs = [f"client {cid} (from the 'client' column)" for cid in ids]
    elif how in ("iid", "dirichlet"):
        pooled = train + test
        owner = partition(
            [r["answer"] for r in pooled], n, how, cfg.data.alpha, cfg.data.split_seed
        )
        for r, k in zip(pooled, owner.tolist()):
            r["owner"] = k
        ids = [str(k) for k in range(n)]
        skew = "" if how == "iid" else f" Dirichlet(alpha={cfg.data.alpha}) over answers"
        descs = [f"{how} partition{skew}"] * n
    else:
        raise ConfigError(f"data.clients_by must be column, iid or dirichlet, got {how!r}")

    tagged = all(r["group"] is not None for r in train + test)
    if generate:
        return _generative(cfg, root, declared, train, test, ids, descs, tagged, notes)
    answers, index = vocabulary([r["answer"] for r in train])

    def encode(records: list[dict]) -> RawSplit:
        return RawSplit(
            read_images(
                [root / r["image"] for r in records],
                cfg.model.image_size,
                [r["where"] for r in records],
            ),
            [r["text"] for r in records],
            np.asarray([label_of(index, r["answer"]) for r in records], dtype=np.int64),
            groups=[r["group"] for r in records] if tagged else None,
            targets=[r["answer"] for r in records],  # data.task_kind=generate answers these
        )

    clients = [
        ClientSpec(ids[k], descs[k], encode([r for r in train if r["owner"] == k]),
                   encode([r for r in test if r["owner"] == k]))
        for k in range(n)
    ]  # fmt: skip
    notes |= {
        "clients_by": how,
        "train_records": len(train),
        "test_records": len(test),
        "unk_index": len(answers) - 1,
        "test_unk": sum(r["answer"] not in index for r in test),
    }
    description = (
        f"JSONL data from {root} ({len(train)} train / {len(test)} test records, clients by {how}, "
        f"{notes['missing_images_dropped']} records with missing images dropped, "
        f"{notes['unreadable_images_dropped']} with unreadable images dropped, "
        f"{notes['answers_normalised']} answers normalised, "
        f"{notes['test_unk']} test answers unseen in training -> <unk>)"
    )
    return Benchmark("jsonl", description, answers, clients, notes)


def _generative(
    cfg: FedmmConfig, root: Path, declared: tuple[str, Task], train: list[dict],
    test: list[dict], ids: list[str], descs: list[str], tagged: bool, notes: dict,
) -> Benchmark:  # fmt: skip
    """The records of a generate task (``schema.json``) as one generative ``Benchmark``: each
    record's first reference is its training target, all of them are scored against; a record
    is ``unseen`` when its normalised target is in no training record."""
    from fedmm.generation import normalize_text

    name, task = declared
    seen = {normalize_text(r["answer"]) for r in train}
    several = any(len(r["answers"]) > 1 for r in train + test)

    def encode(records: list[dict]) -> RawSplit:
        return RawSplit(
            read_images([root / r["image"] for r in records], cfg.model.image_size,
                        [r["where"] for r in records]),
            [r["text"] for r in records], np.zeros(len(records), dtype=np.int64),
            groups=[r["group"] for r in records] if tagged else None,
            targets=[r["answer"] for r in records],
            references=[list(r["answers"]) for r in records] if several else None,
            unseen=[normalize_text(r["answer"]) not in seen for r in records],
        )  # fmt: skip

    clients = [
        ClientSpec(ids[k], descs[k], encode([r for r in train if r["owner"] == k]),
                   encode([r for r in test if r["owner"] == k]), task=name)
        for k in range(len(ids))
    ]  # fmt: skip
    notes |= {
        "clients_by": cfg.data.clients_by, "train_records": len(train), "test_records": len(test),
        "task": f"{name} (generate, score {task.score or 'vqa'})",
        "test_unseen": sum(normalize_text(r["answer"]) not in seen for r in test),
        "references_per_record": max(len(r["answers"]) for r in train + test),
    }  # fmt: skip
    description = (
        f"JSONL data from {root}, generate task {name!r} ({len(train)} train / {len(test)} test "
        f"records, clients by {cfg.data.clients_by}, {notes['missing_images_dropped']} records "
        f"with missing images dropped, {notes['unreadable_images_dropped']} with unreadable "
        f"images dropped, {notes['test_unseen']} test targets unseen in training)"
    )
    return Benchmark("jsonl", description, [], clients, notes, {name: task})
