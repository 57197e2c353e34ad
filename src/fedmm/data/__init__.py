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

    def __post_init__(self) -> None:
        n_images = len(self.texts) if self.images is None else len(self.images)
        sizes = {n_images, len(self.texts), len(self.labels)}
        if self.groups is not None:
            sizes.add(len(self.groups))
        if len(sizes) != 1:
            raise ValueError(
                f"split sizes differ: {n_images} images, {len(self.texts)} texts, "
                f"{len(self.labels)} labels"
                + ("" if self.groups is None else f", {len(self.groups)} groups")
            )

    def __len__(self) -> int:
        return len(self.labels)


MODALITIES = ("image", "text")
TASK_KINDS = ("single", "multilabel")


@dataclass
class Task:
    """One task's label space: ``single`` (softmax over ``answers``) or ``multilabel``."""

    kind: str
    answers: list[str]
    description: str = ""

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise ValueError(f"task kind must be one of {TASK_KINDS}, got {self.kind!r}")


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
        _CACHE[key] = BENCHMARKS[name](cfg)
    return _CACHE[key]


# builders register themselves on import
from fedmm.data import fmnist, jsonl, vqa_rad  # noqa: E402,F401

__all__ = [
    "BENCHMARKS",
    "FIXED_CLIENTS",
    "MODALITIES",
    "Benchmark",
    "ClientSpec",
    "Task",
    "RawSplit",
    "load_benchmark",
    "register",
]
