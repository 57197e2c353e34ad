"""The embedded Fashion-MNIST benchmarks and the IDX reader."""

from __future__ import annotations

import numpy as np
import pytest

from fedmm.data import BENCHMARKS, load_benchmark
from fedmm.data.fmnist import (
    ANSWERS,
    DOMAINS,
    FAMILIES,
    apply_domain,
    find_fashion_mnist,
    make_question,
    read_idx,
)


def test_idx_reader_roundtrip(fmnist_dir):
    images = read_idx(fmnist_dir / "train-images-idx3-ubyte.gz")
    labels = read_idx(fmnist_dir / "train-labels-idx1-ubyte.gz")
    assert images.shape == (600, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (600,) and set(labels) == set(range(10))


def test_bad_idx_file_is_rejected(tmp_path):
    import gzip

    bad = tmp_path / "x.gz"
    with gzip.open(bad, "wb") as fh:
        fh.write(b"\x00\x00\x0d\x01" + (3).to_bytes(4, "big") + b"abc")
    with pytest.raises(ValueError, match="magic"):
        read_idx(bad)


def test_missing_data_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr("fedmm.data.fmnist.DEFAULT_DIRS", ())
    monkeypatch.delenv("FEDMM_FASHION_MNIST", raising=False)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        find_fashion_mnist(str(tmp_path))


@pytest.mark.parametrize("name", ["fmnist-domain", "fmnist-function"])
def test_benchmarks_are_deterministic_disjoint_and_share_one_vocabulary(tiny_cfg, name):
    cfg = tiny_cfg.with_overrides({"data.benchmark": name})
    bench = BENCHMARKS[name](cfg)
    again = BENCHMARKS[name](cfg)
    assert bench.answers == ANSWERS and len(bench.clients) == cfg.fed.clients
    for a, b in zip(bench.clients, again.clients):
        assert a.train.texts == b.train.texts and np.array_equal(a.train.images, b.train.images)
    for c in bench.clients:
        assert len(c.train) == cfg.data.train_per_client and len(c.test) == cfg.data.test_per_client
        assert c.train.labels.max() < len(ANSWERS)
    seen = [c.train.images.reshape(len(c.train), -1) for c in bench.clients]
    ids = [{row.tobytes() for row in s} for s in seen]
    if name == "fmnist-function":  # same domain: raw images must be disjoint across clients
        assert not (ids[0] & ids[1]) and not (ids[1] & ids[2])
    assert load_benchmark(cfg) is load_benchmark(cfg)


def test_function_clients_ask_one_family_and_domain_clients_see_one_domain(tiny_cfg):
    func = BENCHMARKS["fmnist-function"](tiny_cfg)
    answers = [{ANSWERS[y] for y in c.train.labels} for c in func.clients]
    assert answers[0] <= set(ANSWERS[:10])  # object: item names
    assert answers[1] <= {"yes", "no"}  # verify
    dom = BENCHMARKS["fmnist-domain"](tiny_cfg)
    assert [c.client_id for c in dom.clients] == [f"{i}-{d}" for i, d in enumerate(DOMAINS[:3])]


def test_domains_and_questions():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, size=(2, 28, 28)).astype(np.uint8)
    assert np.array_equal(apply_domain(img, "inverted"), 255 - img)
    assert np.array_equal(apply_domain(img, "rotated"), np.rot90(img, 1, (1, 2)))
    for d in DOMAINS:
        out = apply_domain(img, d)
        assert out.shape == img.shape and out.dtype == np.uint8
    for family in FAMILIES:
        q, a = make_question(family, 7, rng)
        assert a in ANSWERS and q.endswith("?")
    assert make_question("feet", 7, rng)[1] == "yes" and make_question("feet", 0, rng)[1] == "no"
    with pytest.raises(ValueError):
        apply_domain(img, "sepia")
