"""VQA-RAD (Lau et al., Scientific Data 2018): real radiology VQA, 315 images, 3,515 QA pairs.

Not shipped with fedmm (CC0, but not on PyPI/Debian): point ``$FEDMM_VQA_RAD`` at a directory with
``trainset.json``, ``testset.json`` and ``images/``; a checkout beside ``../shared/data/vqa-rad``
finds it automatically.

Normalisation (the real files' quirks), counted in ``VqaRad.normalised`` and reported in
``Benchmark.notes["normalised"]``: answers are ``str()``-ed (10 train answers are JSON integers),
whitespace-collapsed and lower-cased; ``answer_type`` and ``image_organ`` are stripped and
upper-cased ("CLOSED "); ``question_type`` is upper-cased and two typos fixed (ATRIB -> ATTRIB,
PRSE -> PRES; "Other" -> OTHER).

Federated benchmarks (``data.test_split`` and ``data.split_seed`` apply to all three):

* ``vqa-rad-organ`` (domain heterogeneity): 3 clients, HEAD / CHEST / ABD (``image_organ``);
  needs ``fed.clients = 3``.
* ``vqa-rad-qtype`` (function heterogeneity): a question's type is the *first* listed type
  ("PRES, ATTRIB" -> PRES), giving 11 types; they are merged into ``fed.clients`` (1..11) clients
  by greedy balancing: types in decreasing order of training questions (ties by name) each go to
  the client with the fewest training questions so far (ties: lowest index).
* ``vqa-rad-dirichlet`` (label skew): ``fed.clients`` clients; *images* are partitioned (all
  questions of an image go to one client) with ``DirichletPartitioner`` over each image's label
  (see ``fedmm.data.common.partition``, alpha = ``data.alpha``, seed = ``data.split_seed``):
  ``data.dirichlet_by = "organ"`` uses the image's organ; ``"answer"`` its most frequent
  normalised answer over all its questions (ties: alphabetically first).

Test split: ``standard`` is the official ``testset.json`` (203 of its images also appear in
training); ``image-disjoint`` pools train and test and re-splits by image, within each organ: the
organ's images (sorted by name) are permuted with ``data.split_seed`` and taken as test images
until they hold at least the official test fraction (451 / 3515) of the organ's questions.
A client's test set is the test questions of its own partition (its organ, its question types,
its images).

Labels: the answer vocabulary is the sorted normalised training answers followed by ``<unk>``;
a test answer outside it gets the ``<unk>`` index, which no training question has, so it counts
as wrong (``notes["unk_index"]``, ``notes["test_unk"]``).  Every record keeps its answer type as
``RawSplit.groups`` ("closed" / "open") for per-type accuracy.

Size (~430 lines): the reader of one data set and its five benchmark splits.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedmm.config import ConfigError, FedmmConfig
from fedmm.data import Benchmark, ClientSpec, RawSplit, Task, register
from fedmm.data.common import (
    label_of,
    normalize_answer,
    partition,
    read_images,
    read_json,
    vocabulary,
)

ORGANS = ("HEAD", "CHEST", "ABD")


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
    return normalize_answer(answer)


QTYPE_FIXES = {"ATRIB": "ATTRIB", "PRSE": "PRES"}  # typos in the real trainset.json


def normalise_qtype(qtype: str) -> str:
    """``"pres,  Atrib"`` -> ``"PRES, ATTRIB"``: upper-case, typos fixed, one space after commas."""
    parts = [p.strip().upper() for p in qtype.split(",")]
    return ", ".join(QTYPE_FIXES.get(p, p) for p in parts)


def load_vqa_rad(root: str = "") -> VqaRad:
    path = find_vqa_rad(root)
    if path is None or (root and path != Path(root)):
        raise FileNotFoundError(
            f"VQA-RAD not found{f' in {root}' if root else ''}: set FEDMM_VQA_RAD=DIR "
            "(or data.data_dir=DIR), a directory with trainset.json, testset.json and images/"
        )
    changed: Counter = Counter()
    splits = {}
    for split in ("train", "test"):
        file = path / f"{split}set.json"
        records = read_json(file)
        if not isinstance(records, list):
            raise ValueError(
                f"{file}: expected a JSON list of records, got {type(records).__name__}"
            )
        for i, rec in enumerate(records):
            if not isinstance(rec, dict):
                raise ValueError(
                    f"{file}: record {i}: expected an object, got {type(rec).__name__}"
                )
            for key in ("image_name", "image_organ", "question", "question_type", "answer",
                        "answer_type"):  # fmt: skip
                if key not in rec:
                    raise ValueError(f"{file}: record {i} has no {key!r}")
            for key in ("image_name", "image_organ", "question", "question_type", "answer_type"):
                if not isinstance(rec[key], str) or not rec[key].strip():
                    raise ValueError(f"{file}: record {i} (qid {rec.get('qid', '?')}): field "
                                     f"{key!r} must be a non-empty string, got {rec[key]!r}")  # fmt: skip
            if not normalise_answer(rec["answer"]):
                raise ValueError(f"{file}: record {i} (qid {rec.get('qid', '?')}): empty answer")
            raw = rec["answer"]
            if not isinstance(raw, str):
                changed["answer not a string"] += 1
            elif raw != normalise_answer(raw):
                changed["answer case/space"] += 1
            rec["answer"] = normalise_answer(raw)
            for key, norm in (("answer_type", lambda t: t.strip().upper()),
                              ("image_organ", lambda t: t.strip().upper()),
                              ("question_type", normalise_qtype)):  # fmt: skip
                if rec[key] != norm(rec[key]):
                    changed[f"{key} case/space/typo"] += 1
                rec[key] = norm(rec[key])
        splits[split] = records
    answers = sorted({r["answer"] for r in splits["train"]})
    return VqaRad(path, splits["train"], splits["test"], answers, changed)


def answers_normalised(data: VqaRad) -> int:
    """How many answers the loader changed (case, spacing, a number turned into a string):
    the same count the ``jsonl`` benchmark reports under ``notes["answers_normalised"]``."""
    return data.normalised["answer case/space"] + data.normalised["answer not a string"]


def load_images(root: Path, names: list[str], size: int) -> np.ndarray:
    """uint8 ``(N, size, size, 3)`` RGB images from ``root/images``, each file read once per process."""
    return read_images([root / "images" / name for name in names], size)


def image_disjoint_split(data: VqaRad, seed: int) -> tuple[list[dict], list[dict]]:
    """Train and test re-split by image within each organ (see the module docstring)."""
    pool = data.train + data.test
    frac = len(data.test) / len(pool)
    rng = np.random.default_rng(seed)
    test_images: set[str] = set()
    for organ in sorted({r["image_organ"] for r in pool}):
        per_image = Counter(r["image_name"] for r in pool if r["image_organ"] == organ)
        names = sorted(per_image)
        target, taken = frac * sum(per_image.values()), 0
        for j in rng.permutation(len(names)):
            if taken >= target:
                break
            test_images.add(names[j])
            taken += per_image[names[j]]
    return (
        [r for r in pool if r["image_name"] not in test_images],
        [r for r in pool if r["image_name"] in test_images],
    )


def qtype_groups(train: list[dict], n: int) -> dict[str, int]:
    """First-listed question type -> client, greedily balancing training questions over n clients."""
    counts = Counter(r["question_type"].split(",")[0] for r in train)
    if not 1 <= n <= len(counts):
        raise ConfigError(
            f"vqa-rad-qtype merges the {len(counts)} question types into fed.clients groups; "
            f"fed.clients must be 1..{len(counts)}, got {n}"
        )
    load, group = [0] * n, {}
    for qtype, count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        k = int(np.argmin(load))
        group[qtype], load[k] = k, load[k] + count
    return group


def image_labels(records: list[dict], by: str) -> dict[str, str]:
    """Each image's Dirichlet label: its organ, or its most frequent answer (ties: first by name)."""
    if by == "organ":
        return {r["image_name"]: r["image_organ"] for r in records}
    if by == "answer":
        per_image: dict[str, Counter] = {}
        for r in records:
            per_image.setdefault(r["image_name"], Counter())[r["answer"]] += 1
        return {name: min(c, key=lambda a: (-c[a], a)) for name, c in per_image.items()}
    raise ConfigError(f"data.dirichlet_by must be answer or organ, got {by!r}")


def build(cfg: FedmmConfig, setting: str) -> Benchmark:
    """One VQA-RAD benchmark: split, assign every question to a client, encode."""
    data = load_vqa_rad(cfg.data.data_dir)
    if cfg.data.test_split == "standard":
        train, test = data.train, data.test
    elif cfg.data.test_split == "image-disjoint":
        train, test = image_disjoint_split(data, cfg.data.split_seed)
    else:
        raise ConfigError(
            f"data.test_split must be standard or image-disjoint, got {cfg.data.test_split!r}"
        )
    n = cfg.fed.clients
    if setting == "organ":
        if n != len(ORGANS):
            raise ConfigError(f"vqa-rad-organ has {len(ORGANS)} clients (HEAD, CHEST, ABD): "
                              f"set fed.clients={len(ORGANS)}, got {n}")  # fmt: skip
        names = [f"{k}-{organ}" for k, organ in enumerate(ORGANS)]
        descs = [f"{organ} images, all question types" for organ in ORGANS]
        client_of = {organ: k for k, organ in enumerate(ORGANS)}

        def owner(r: dict) -> int:
            return client_of[r["image_organ"]]

    elif setting == "qtype":
        group = qtype_groups(train, n)
        members = [[t for t in group if group[t] == k] for k in range(n)]  # largest type first
        names = [f"{k}-{'+'.join(m)}" for k, m in enumerate(members)]
        descs = [f"all organs, question types {', '.join(m)}" for m in members]

        def owner(r: dict) -> int:
            # a test-only first type (none in the real data) goes to the last client
            return group.get(r["question_type"].split(",")[0], n - 1)

    else:
        labels = image_labels(train + test, cfg.data.dirichlet_by)
        images = sorted(labels)
        parts = partition([labels[i] for i in images], n, "dirichlet", cfg.data.alpha,
                          cfg.data.split_seed)  # fmt: skip
        client_of = dict(zip(images, parts.tolist()))
        names = [f"{k}-dir" for k in range(n)]
        descs = [f"Dirichlet(alpha={cfg.data.alpha}) share over {cfg.data.dirichlet_by}s"] * n

        def owner(r: dict) -> int:
            return client_of[r["image_name"]]

    answers, index = vocabulary([r["answer"] for r in train])

    def encode(records: list[dict]) -> RawSplit:
        return RawSplit(
            load_images(data.root, [r["image_name"] for r in records], cfg.model.image_size),
            [r["question"] for r in records],
            np.asarray([label_of(index, r["answer"]) for r in records], dtype=np.int64),
            groups=[r["answer_type"].lower() for r in records],
            targets=[r["answer"] for r in records],  # data.task_kind=generate: unseen keep text
        )

    clients = [
        ClientSpec(
            names[k], descs[k],
            encode([r for r in train if owner(r) == k]),
            encode([r for r in test if owner(r) == k]),
        )
        for k in range(n)
    ]  # fmt: skip
    shared = {r["image_name"] for r in train} & {r["image_name"] for r in test}
    notes = {
        "normalised": dict(data.normalised),
        "answers_normalised": answers_normalised(data),
        "test_split": cfg.data.test_split,
        "train_questions": len(train),
        "test_questions": len(test),
        "test_images_seen_in_train": len(shared),
        "unk_index": len(answers) - 1,
        "test_unk": sum(r["answer"] not in index for r in test),
    }
    fixes = ", ".join(f"{v} {k}" for k, v in sorted(data.normalised.items())) or "nothing"
    description = (
        f"VQA-RAD by {setting}, {cfg.data.test_split} test split "
        f"({len(train)} train / {len(test)} test questions, {notes['test_unk']} test answers "
        f"unseen in training -> <unk>); normalised: {fixes}"
    )
    return Benchmark(f"vqa-rad-{setting}", description, answers, clients, notes)


# ---------------------------------------------------------------------- Task: tasks x modalities
FINDINGS = {  # finding -> words that name it in a closed question (whole words, lower case)
    "mass": ("mass", "masses"),
    "enlarged": ("enlarged", "enlargement", "cardiomegaly", "dilated"),
    "lesion": ("lesion", "lesions"),
    "fracture": ("fracture", "fractures", "fractured"),
    "fluid": ("effusion", "effusions", "fluid"),
    "pneumothorax": ("pneumothorax",),
    "contrast": ("contrast", "enhancing", "enhancement"),
    "shift": ("shift", "deviation", "deviated"),
    "air": ("air",),
    "normal": ("normal",),
}
TASK_CLIENTS = (  # (client id, task, modalities)
    ("0-organ", "organ", ("image",)),
    ("1-closed", "closed", ("image", "text")),
    ("2-open", "open", ("image", "text")),
    ("3-findings", "findings", ("image",)),
)


def image_findings(records: list[dict]) -> dict[str, np.ndarray]:
    """Per image, a 0/1 vector over ``FINDINGS``, derived from its closed yes/no questions.

    Finding j is 1 when at least one closed question about the image names it (a word of
    ``FINDINGS[j]``) and is answered "yes"; otherwise 0 -- also when nobody asked, an assumption
    the data cannot check.  Images none of whose closed yes/no questions name any finding are
    left out.
    """
    import re

    names = list(FINDINGS)
    out: dict[str, np.ndarray] = {}
    for r in records:
        if r["answer_type"] != "CLOSED" or r["answer"] not in ("yes", "no"):
            continue
        words = set(re.findall(r"[a-z]+", r["question"].lower()))
        hits = [j for j, f in enumerate(names) if words & set(FINDINGS[f])]
        if not hits:
            continue
        vec = out.setdefault(r["image_name"], np.zeros(len(names), dtype=np.float32))
        if r["answer"] == "yes":
            vec[hits] = 1.0
    return out


def build_task(cfg: FedmmConfig) -> Benchmark:
    """``vqa-rad-task``: four clients that differ in task and modality, from VQA-RAD.

    * ``0-organ``: organ (HEAD / CHEST / ABD) from the image alone, one record per image;
    * ``1-closed``: closed questions answered yes/no, image + text (other closed answers, e.g.
      "ct", are left out and counted in ``notes``);
    * ``2-open``: open questions, answer classification over the open training answers + <unk>,
      image + text;
    * ``3-findings``: multi-label findings per image (``image_findings``), image alone.

    Always split by image (``image_disjoint_split``, seeded by ``data.split_seed``): per-image
    tasks would otherwise test on training images.  Clients may share images (they hold
    different tasks about the same pictures).
    """
    if cfg.fed.clients != len(TASK_CLIENTS):
        raise ConfigError(f"vqa-rad-task has {len(TASK_CLIENTS)} fixed clients: set "
                          f"fed.clients={len(TASK_CLIENTS)}, got {cfg.fed.clients}")  # fmt: skip
    data = load_vqa_rad(cfg.data.data_dir)
    train, test = image_disjoint_split(data, cfg.data.split_seed)
    size = cfg.model.image_size
    open_answers, open_index = vocabulary(
        [r["answer"] for r in train if r["answer_type"] == "OPEN"]
    )
    tasks = {
        "organ": Task("single", list(ORGANS), "organ from the image"),
        "closed": Task("single", ["no", "yes"], "closed yes/no questions"),
        "open": Task("single", open_answers, "open questions"),
        "findings": Task("multilabel", list(FINDINGS), "findings derived from closed answers"),
    }

    def per_image(records: list[dict], task: str) -> RawSplit:
        if task == "organ":
            organ = {r["image_name"]: r["image_organ"] for r in records}
            names = sorted(organ)
            labels = np.asarray([ORGANS.index(organ[n]) for n in names], dtype=np.int64)
        else:
            found = image_findings(records)
            names = sorted(found)
            labels = np.stack([found[n] for n in names]) if names else np.zeros((0, len(FINDINGS)))
        return RawSplit(load_images(data.root, names, size), [""] * len(names), labels)

    def questions(records: list[dict], task: str) -> RawSplit:
        if task == "closed":
            rows = [r for r in records if r["answer_type"] == "CLOSED" and r["answer"] in
                    ("yes", "no")]  # fmt: skip
            labels = [("no", "yes").index(r["answer"]) for r in rows]
        else:
            rows = [r for r in records if r["answer_type"] == "OPEN"]
            labels = [label_of(open_index, r["answer"]) for r in rows]
        return RawSplit(
            load_images(data.root, [r["image_name"] for r in rows], size),
            [r["question"] for r in rows], np.asarray(labels, dtype=np.int64),
        )  # fmt: skip

    clients = []
    for cid, task, modalities in TASK_CLIENTS:
        make = per_image if task in ("organ", "findings") else questions
        clients.append(ClientSpec(cid, f"{task}: {tasks[task].description}", make(train, task),
                                  make(test, task), task=task, modalities=modalities))  # fmt: skip
    other_closed = sum(
        r["answer_type"] == "CLOSED" and r["answer"] not in ("yes", "no") for r in train + test
    )
    notes = {
        "normalised": dict(data.normalised), "answers_normalised": answers_normalised(data),
        "test_split": "image-disjoint (always)",
        "test_unk": sum(r["answer_type"] == "OPEN" and r["answer"] not in open_index
                        for r in test),  # open test answers unseen in training -> <unk>
        "closed_not_yes_no_left_out": other_closed,
        "findings_images": {"train": len(clients[3].train), "test": len(clients[3].test)},
        "findings_positive_rate": clients[3].train.labels.mean(0).round(3).tolist(),
    }  # fmt: skip
    description = (
        "VQA-RAD, Task: organ (image only), closed yes/no, open answers (image + text), "
        "findings (multi-label, image only); split by image"
    )
    return Benchmark("vqa-rad-task", description, [], clients, notes, tasks=tasks)


@register("vqa-rad-task", clients=len(TASK_CLIENTS))
def vqa_rad_task(cfg: FedmmConfig) -> Benchmark:
    return build_task(cfg)


@register("vqa-rad-organ", clients=len(ORGANS))
def vqa_rad_organ(cfg: FedmmConfig) -> Benchmark:
    return build(cfg, "organ")


@register("vqa-rad-qtype")
def vqa_rad_qtype(cfg: FedmmConfig) -> Benchmark:
    return build(cfg, "qtype")


@register("vqa-rad-dirichlet")
def vqa_rad_dirichlet(cfg: FedmmConfig) -> Benchmark:
    return build(cfg, "dirichlet")
