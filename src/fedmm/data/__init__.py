"""Benchmarks: named builders that return per-client raw splits over a shared answer vocabulary.

A benchmark is data only (images, texts, labels); ``fedmm.runtime`` turns a client's raw split into
model inputs (frozen visual features, token ids) once and caches them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from fedmm.config import ConfigError, FedmmConfig


@dataclass
class RawSplit:
    """``images`` uint8 ``(N, H, W)`` or ``(N, H, W, 3)``; one text and one label per image.

    ``groups`` optionally tags each record with an evaluation group (VQA-RAD: "closed" / "open"
    answer type) so accuracy can be reported per group; ``None`` means one group.
    """

    images: np.ndarray
    texts: list[str]
    labels: np.ndarray  # int64 indices into Benchmark.answers
    groups: list[str] | None = None

    def __post_init__(self) -> None:
        sizes = {len(self.images), len(self.texts), len(self.labels)}
        if self.groups is not None:
            sizes.add(len(self.groups))
        if len(sizes) != 1:
            raise ValueError(
                f"split sizes differ: {len(self.images)} images, {len(self.texts)} texts, "
                f"{len(self.labels)} labels"
                + ("" if self.groups is None else f", {len(self.groups)} groups")
            )

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class ClientSpec:
    client_id: str
    description: str
    train: RawSplit
    test: RawSplit


@dataclass
class Benchmark:
    name: str
    description: str
    answers: list[str]
    clients: list[ClientSpec]
    notes: dict = field(default_factory=dict)  # what the loader normalised, dropped, decided

    def pooled_train(self) -> RawSplit:
        """All clients' training data together (the centralised baseline)."""
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
    "Benchmark",
    "ClientSpec",
    "RawSplit",
    "load_benchmark",
    "register",
]
