"""Benchmarks: named builders that return per-client raw splits over a shared answer vocabulary.

A benchmark is data only (images, texts, labels); ``fedmm.runtime`` turns a client's raw split into
model inputs (frozen visual features, token ids) once and caches them.

Task and modality heterogeneity: a benchmark may declare several ``tasks`` (each with its own label
space and kind: ``single`` = one label per record, cross-entropy, metric accuracy; ``multilabel`` =
a 0/1 vector per record, BCE, metrics mean AUROC and macro-F1).  Each client then does one task
(``ClientSpec.task``) and sees some modalities (``ClientSpec.modalities``): a client without
images has ``RawSplit.images = None`` (the model masks the visual tokens out, no image is made
up), a client without text has empty texts (the sequence holds [CLS] [SEP] only).  A benchmark
without ``tasks`` is one single-label task over ``answers`` (every VQA benchmark).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from fedmm.config import ConfigError, FedmmConfig


@dataclass
class RawSplit:
    """``images`` uint8 ``(N, H, W)`` or ``(N, H, W, 3)``; one text and one label per image.

    ``images`` is None for a client without the image modality.  ``labels`` are int64 indices
    ``(N,)`` into the task's answers, or a 0/1 float32 matrix ``(N, K)`` for a multi-label task.
    ``groups`` optionally tags each record with an evaluation group (VQA-RAD: "closed" / "open"
    answer type) so accuracy can be reported per group; ``None`` means one group.
    """

    images: np.ndarray | None
    texts: list[str]
    labels: np.ndarray  # int64 indices into the task's answers, or (N, K) multi-hot
    groups: list[str] | None = None
    # the records' answer texts, one per record: a generative task's targets (fedmm.generation);
    # a classification benchmark may keep them too (a test answer outside its label list keeps
    # its text), which data.task_kind=generate answers; None otherwise
    targets: list[str] | None = None
    # generative: every reference text of each record (captions: several), ``targets[i]`` among
    # them; None = each record's target is its only reference
    references: list[list[str]] | None = None
    # generative: whether each record's reference answer occurs in no training record of the
    # benchmark (scored apart as ``.unseen``: only a model that writes text can get it right);
    # None = not known (a site directory sees its own records only)
    unseen: list[bool] | None = None

    def __post_init__(self) -> None:
        n_images = len(self.texts) if self.images is None else len(self.images)
        sizes = {n_images, len(self.texts), len(self.labels)}
        if self.groups is not None:
            sizes.add(len(self.groups))
        for extra in (self.targets, self.references, self.unseen):
            if extra is not None:
                sizes.add(len(extra))
        if len(sizes) != 1:
            raise ValueError(
                f"split sizes differ: {n_images} images, {len(self.texts)} texts, "
                f"{len(self.labels)} labels"
                + ("" if self.groups is None else f", {len(self.groups)} groups")
            )

    def __len__(self) -> int:
        return len(self.labels)


MODALITIES = ("image", "text")
TASK_KINDS = ("single", "multilabel", "generate")  # generate: text targets, fedmm.generation
# how a generative task is scored (fedmm.generation): "vqa" short answers (exact match, token F1),
# "caption" descriptions (BLEU-4, ROUGE-L, CIDEr-D)
TASK_SCORES = ("vqa", "caption")


@dataclass
class Task:
    """One task's label space: ``single`` (softmax over ``answers``) or ``multilabel``."""

    kind: str
    answers: list[str]
    description: str = ""
    prompt: str = ""  # generate: the prompt template, "{question}" = the record's text
    score: str = ""  # generate: one of TASK_SCORES; "" = "vqa"

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise ValueError(f"task kind must be one of {TASK_KINDS}, got {self.kind!r}")
        if self.score and (self.kind != "generate" or self.score not in TASK_SCORES):
            raise ValueError(f"task score {self.score!r}: a generate task's score is one of "
                             f"{', '.join(TASK_SCORES)} (other kinds have none)")  # fmt: skip


@dataclass
class ClientSpec:
    client_id: str
    description: str
    train: RawSplit
    test: RawSplit
    task: str = ""  # a key of Benchmark.tasks; "" on single-task benchmarks
    modalities: tuple[str, ...] = MODALITIES


@dataclass
class Benchmark:
    name: str
    description: str
    answers: list[str]  # single-task benchmarks: the label space; multi-task: unused ([])
    clients: list[ClientSpec]
    notes: dict = field(default_factory=dict)  # what the loader normalised, dropped, decided
    tasks: dict[str, Task] = field(default_factory=dict)  # empty: one single-label task
    # clients left out of every mean (data.allow_empty_clients): client id -> why ("0 test rows")
    excluded: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for c in self.clients:
            if self.tasks and c.task not in self.tasks:
                raise ValueError(f"client {c.client_id}: task {c.task!r} not in {list(self.tasks)}")
            if not set(c.modalities) <= set(MODALITIES) or not c.modalities:
                raise ValueError(f"client {c.client_id}: modalities must be from {MODALITIES}")

    def head_sizes(self) -> int | dict[str, int]:
        """The model's output size: one int, or one size per task (one head each)."""
        if not self.tasks:
            return len(self.answers)
        return {name: len(task.answers) for name, task in self.tasks.items()}

    def task_kind(self, task: str) -> str:
        return self.tasks[task].kind if self.tasks else "single"

    def pooled_train(self) -> RawSplit:
        """All clients' training data together (the centralised baseline; one task only)."""
        if self.tasks:
            raise ValueError("a multi-task benchmark pools training data per task")
        tagged = all(c.train.groups is not None for c in self.clients)
        return RawSplit(
            images=np.concatenate([c.train.images for c in self.clients]),
            texts=[t for c in self.clients for t in c.train.texts],
            labels=np.concatenate([c.train.labels for c in self.clients]),
            groups=[g for c in self.clients for g in c.train.groups] if tagged else None,
        )


BenchmarkBuilder = Callable[[FedmmConfig], Benchmark]
BENCHMARKS: dict[str, BenchmarkBuilder] = {}


FIXED_CLIENTS: dict[str, int] = {}  # benchmarks whose client count is part of their definition


def register(
    name: str, clients: int | None = None
) -> Callable[[BenchmarkBuilder], BenchmarkBuilder]:
    def deco(fn: BenchmarkBuilder) -> BenchmarkBuilder:
        BENCHMARKS[name] = fn
        if clients is not None:
            FIXED_CLIENTS[name] = clients
        return fn

    return deco


_CACHE: dict[str, Benchmark] = {}


def load_benchmark(cfg: FedmmConfig) -> Benchmark:
    """The configured benchmark, built once per process for the same data options."""
    name = cfg.data.benchmark
    if name not in BENCHMARKS:
        raise ConfigError(f"unknown benchmark {name!r}; choices: {', '.join(sorted(BENCHMARKS))}")
    key = f"{name}|{cfg.data}|{cfg.fed.clients}|{cfg.model.image_size}"  # file images are resized
    if key not in _CACHE:
        benchmark = BENCHMARKS[name](cfg)
        if cfg.data.task_kind == "generate":  # answered in text (fedmm.generation)
            from fedmm.generation import as_generative

            benchmark = as_generative(benchmark)
        check_clients(benchmark, cfg)
        _CACHE[key] = benchmark
    return _CACHE[key]


def empty_clients(benchmark: Benchmark) -> dict[str, str]:
    """Clients with nothing to learn from or nothing to be scored on: client id -> why."""
    out = {}
    for c in benchmark.clients:
        why = [f"0 {name} rows" for name, split in (("train", c.train), ("test", c.test))
               if len(split) == 0]  # fmt: skip
        if why:
            out[c.client_id] = " and ".join(why)
    return out


def _split_hint(cfg: FedmmConfig) -> str:
    """What a user can change so that every client gets rows, for this benchmark."""
    name, d = cfg.data.benchmark, cfg.data
    if name == "jsonl" and d.clients_by == "column":
        return "give each such client records in both train.jsonl and test.jsonl"
    if name.startswith("fmnist"):
        return "set data.train_per_client and data.test_per_client >= 1"
    options = [f"use fewer clients (fed.clients={cfg.fed.clients})"]
    if name == "vqa-rad-dirichlet" or (name == "jsonl" and d.clients_by == "dirichlet"):
        options += ["a larger data.alpha", "another data.split_seed"]
    elif name == "jsonl":
        options += ["another data.split_seed", "add records"]
    if name.startswith("vqa-rad"):
        options += ["data.test_split=image-disjoint"]
    return ", ".join(options[:-1]) + " or " + options[-1]


def check_clients(benchmark: Benchmark, cfg: FedmmConfig) -> None:
    """Refuse (``ConfigError``, before any run) a split that leaves a client 0 training or 0 test
    rows -- it would train on nothing, or be scored on nothing and drag every mean down -- naming
    the clients and what to change.  With ``data.allow_empty_clients = true`` such clients are
    kept but recorded in ``benchmark.excluded``: they take no training step, send no score, and
    results leave them out of every mean (shown as ``n/a``, listed in ``excluded_clients``)."""
    empty = empty_clients(benchmark)
    if not empty:
        return
    if cfg.data.allow_empty_clients:
        benchmark.excluded = dict(empty)
        return
    listed = "; ".join(f"client {cid}: {why}" for cid, why in empty.items())
    raise ConfigError(
        f"{benchmark.name}: {len(empty)} of {len(benchmark.clients)} clients would have "
        f"nothing to learn from or nothing to be scored on ({listed}). To fix the split, "
        f"{_split_hint(cfg)}; or set data.allow_empty_clients=true to keep them out of every "
        "mean (shown as n/a)."
    )


# builders register themselves on import
from fedmm.data import fmnist, jsonl, vqa_rad  # noqa: E402,F401

__all__ = [
    "BENCHMARKS",
    "FIXED_CLIENTS",
    "MODALITIES",
    "TASK_KINDS",
    "TASK_SCORES",
    "Benchmark",
    "ClientSpec",
    "Task",
    "RawSplit",
    "check_clients",
    "empty_clients",
    "load_benchmark",
    "register",
]
