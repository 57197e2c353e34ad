"""Benchmarks: named builders that return per-client raw splits over a shared answer vocabulary.

A benchmark is data only (images, texts, labels); ``fedmm.runtime`` turns a client's raw split into
model inputs (frozen visual features, token ids) once and caches them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fedmm.config import ConfigError, FedmmConfig


@dataclass
class RawSplit:
    """``images`` uint8 ``(N, H, W)`` or ``(N, H, W, 3)``; one text and one label per image."""

    images: np.ndarray
    texts: list[str]
    labels: np.ndarray  # int64 indices into Benchmark.answers

    def __post_init__(self) -> None:
        if not (len(self.images) == len(self.texts) == len(self.labels)):
            raise ValueError(
                f"split sizes differ: {len(self.images)} images, {len(self.texts)} texts, "
                f"{len(self.labels)} labels"
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

    def pooled_train(self) -> RawSplit:
        """All clients' training data together (the centralised baseline)."""
        return RawSplit(
            images=np.concatenate([c.train.images for c in self.clients]),
            texts=[t for c in self.clients for t in c.train.texts],
            labels=np.concatenate([c.train.labels for c in self.clients]),
        )


BenchmarkBuilder = Callable[[FedmmConfig], Benchmark]
BENCHMARKS: dict[str, BenchmarkBuilder] = {}


def register(name: str) -> Callable[[BenchmarkBuilder], BenchmarkBuilder]:
    def deco(fn: BenchmarkBuilder) -> BenchmarkBuilder:
        BENCHMARKS[name] = fn
        return fn

    return deco


_CACHE: dict[str, Benchmark] = {}


def load_benchmark(cfg: FedmmConfig) -> Benchmark:
    """The configured benchmark, built once per process for the same data options."""
    name = cfg.data.benchmark
    if name not in BENCHMARKS:
        raise ConfigError(f"unknown benchmark {name!r}; choices: {', '.join(sorted(BENCHMARKS))}")
    key = f"{name}|{cfg.data}|{cfg.fed.clients}"
    if key not in _CACHE:
        _CACHE[key] = BENCHMARKS[name](cfg)
    return _CACHE[key]


# builders register themselves on import
from fedmm.data import fmnist  # noqa: E402,F401

__all__ = ["BENCHMARKS", "Benchmark", "ClientSpec", "RawSplit", "load_benchmark", "register"]
