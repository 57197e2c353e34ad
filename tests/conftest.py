"""Shared fixtures: a tiny Fashion-MNIST-format dataset and tiny-backbone configs (no weights)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from fedmm.config import FedmmConfig


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="session")
def fmnist_dir(tmp_path_factory) -> Path:
    """Four IDX files in the real format: 600 train / 200 test 28x28 images, 10 classes."""
    root = tmp_path_factory.mktemp("fmnist")
    rng = np.random.default_rng(0)
    for split, n in (("train", 600), ("t10k", 200)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 60, size=(n, 28, 28))
        for i, y in enumerate(labels):  # a class-dependent bright bar makes the task learnable
            images[i, 2 * y : 2 * y + 6, 4:24] = 230
        write_idx(root / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", labels)
    return root


@pytest.fixture()
def tiny_cfg(fmnist_dir, tmp_path) -> FedmmConfig:
    return FedmmConfig().with_overrides({
        "model.backbone": "tiny", "model.image_size": 32, "data.data_dir": str(fmnist_dir),
        "data.train_per_client": 40, "data.test_per_client": 20, "fed.clients": 3,
        "fed.rounds": 2, "train.local_steps": 3, "train.batch_size": 8,
        "out_dir": str(tmp_path / "out"), "cache_dir": str(tmp_path / "cache"), "progress": False,
    })  # fmt: skip


@pytest.fixture()
def flower_task_identity():
    """Messages outside a running Flower process need a task identity (the runtime sets one)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
