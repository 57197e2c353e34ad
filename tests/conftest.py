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
    """A tiny rehearsal.  Its data and cache directories are the sites' defaults (``""``: the
    synthetic Fashion-MNIST and a cache under tmp_path, see ``site_defaults``), so a test's
    ``get_runtime(cfg)`` is the very runtime its in-process clients use."""
    return FedmmConfig().with_overrides({
        "model.backbone": "tiny", "model.image_size": 32,
        "data.train_per_client": 40, "data.test_per_client": 20, "fed.clients": 3,
        "fed.rounds": 2, "train.local_steps": 3, "train.batch_size": 8,
        "out_dir": str(tmp_path / "out"), "progress": False,
    })  # fmt: skip


@pytest.fixture()
def flower_task_identity():
    """Messages outside a running Flower process need a task identity (the runtime sets one)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


@pytest.fixture(autouse=True)
def site_defaults(fmnist_dir, tmp_path, monkeypatch):
    """A node whose --node-config names only its partition finds the synthetic Fashion-MNIST
    (the site's default search) and keeps its cache and state under this test's tmp_path."""
    monkeypatch.setenv("FEDMM_FASHION_MNIST", str(fmnist_dir))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg-state"))


def run_federation(grid, cfg: FedmmConfig, on_round=None) -> dict:
    """The server's round loop on ``cfg`` completed as ``fedmm run`` does (the task schema the
    server reads, absolute paths)."""
    from fedmm.engine import prepare
    from fedmm.federation import serverapp

    return serverapp.run_federation(grid, prepare(cfg), on_round)


def server_msg(cfg: FedmmConfig, arrays, rnd: int, index: int = 0, last_trained: int = 0,
               run_id: str = "test"):  # fmt: skip
    """A server message to client ``index`` of ``cfg``'s benchmark, as the round loop sends it."""
    from fedmm.federation import messages
    from fedmm.runtime import get_runtime

    sha = get_runtime(cfg).schema.sha256()
    return messages.server_message(arrays, cfg, rnd, index, sha, last_trained, run_id)


def bound_method(cfg: FedmmConfig):
    """``get_method(cfg)`` bound to the tasks and clients of ``cfg``'s benchmark, as the server
    binds it after asking the sites (TAP's modules depend on them)."""
    from fedmm.methods import get_method
    from fedmm.methods.aggregation import ClientInfo
    from fedmm.runtime import get_runtime

    runtime = get_runtime(cfg)
    method = get_method(cfg)
    clients = runtime.benchmark.clients
    method.bind(runtime.schema.task_names(), {
        i: ClientInfo(c.client_id, c.task, tuple(c.modalities)) for i, c in enumerate(clients)
    })  # fmt: skip
    return method
