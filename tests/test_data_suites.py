"""VQA-RAD federated benchmarks and the bring-your-own JSONL benchmark.

Synthetic VQA-RAD-shaped data (with the real files' quirks) runs everywhere; one test uses the
real data and is skipped where it is absent.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedmm.config import ConfigError, FedmmConfig
from fedmm.data import BENCHMARKS, RawSplit
from fedmm.data.common import UNK, partition
from fedmm.data.vqa_rad import (
    find_vqa_rad,
    image_disjoint_split,
    load_vqa_rad,
    normalise_qtype,
    qtype_groups,
)

ORGANS = ("HEAD", "CHEST", "ABD")
QTYPES = ["PRES", "POS", "ABN", "Other", "ATRIB", "PRES, POS", "PRSE", "SIZE", "MODALITY"]


def write_image(path: Path, seed: int) -> None:
    pixels = np.random.default_rng(seed).integers(0, 255, size=(20, 24, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture()
def vqa_dir(tmp_path) -> Path:
    """18 images (6 per organ, PNG and JPG), 4 train + 1 test questions each, with quirks."""
    root = tmp_path / "vqa-rad"
    (root / "images").mkdir(parents=True)
    train, test = [], []
    for i in range(18):
        organ, name = ORGANS[i % 3], f"synpic{i:05d}.{'png' if i % 2 else 'jpg'}"
        write_image(root / "images" / name, i)
        for j in range(5):
            closed = j % 2 == 0
            answer = ("Yes" if i % 3 else "yes ") if closed else (i % 4 if j == 1 else f"Lobe {i}")
            rec = {
                "qid": 5 * i + j, "image_name": name, "image_organ": organ,
                "question": f"question {j} about image {i}?", "answer": answer,
                "answer_type": "CLOSED " if closed and i == 0 else ("CLOSED" if closed else "OPEN"),
                "question_type": QTYPES[(i + j) % len(QTYPES)], "phrase_type": "freeform",
            }  # fmt: skip
            (test if j == 4 else train).append(rec)
    test[0]["answer"] = "never in train"
    (root / "trainset.json").write_text(json.dumps(train))
    (root / "testset.json").write_text(json.dumps(test))
    return root


def cfg_for(root: Path, benchmark: str, **overrides) -> FedmmConfig:
    base = {"data.benchmark": benchmark, "data.data_dir": str(root), "model.image_size": 16}
    return FedmmConfig().with_overrides(base | overrides)


def image_ids(split: RawSplit) -> set[bytes]:
    return {img.tobytes() for img in split.images}


def test_loader_normalises_the_quirks(vqa_dir):
    data = load_vqa_rad(str(vqa_dir))
    assert data.normalised["answer not a string"] == 18  # integer answers
    assert (
        data.normalised["answer case/space"] > 0
        and data.normalised["answer_type case/space/typo"] == 3
    )
    assert {r["answer_type"] for r in data.train} == {"CLOSED", "OPEN"}
    assert {"yes", "0", "1", "2", "3"} <= set(data.answers) and "Yes" not in data.answers
    qtypes = {r["question_type"] for r in data.train + data.test}
    assert {"ATTRIB", "OTHER", "PRES, POS"} <= qtypes and not {"ATRIB", "PRSE", "Other"} & qtypes
    assert normalise_qtype("pres,Atrib") == "PRES, ATTRIB"


def test_missing_data_names_the_env_var(tmp_path):
    with pytest.raises(FileNotFoundError, match="FEDMM_VQA_RAD"):
        load_vqa_rad(str(tmp_path / "absent"))


def test_organ_benchmark_labels_groups_and_notes(vqa_dir):
    bench = BENCHMARKS["vqa-rad-organ"](cfg_for(vqa_dir, "vqa-rad-organ", **{"fed.clients": 3}))
    assert [c.client_id for c in bench.clients] == ["0-HEAD", "1-CHEST", "2-ABD"]
    assert sum(len(c.train) for c in bench.clients) == 72
    assert [len(c.test) for c in bench.clients] == [6, 6, 6]
    assert bench.answers[-1] == UNK and bench.notes["unk_index"] == len(bench.answers) - 1
    train_labels = np.concatenate([c.train.labels for c in bench.clients])
    assert bench.notes["unk_index"] not in train_labels  # <unk> is never a training target
    assert bench.clients[0].test.labels[0] == bench.notes["unk_index"]  # "never in train"
    assert bench.notes["test_unk"] >= 1 and bench.notes["normalised"]["answer not a string"] == 18
    assert bench.notes["answers_normalised"] == 18 + bench.notes["normalised"]["answer case/space"]
    assert "normalised:" in bench.description
    for c in bench.clients:
        assert set(c.train.groups) == {"closed", "open"}
        assert c.train.images.shape[1:] == (16, 16, 3) and c.train.images.dtype == np.uint8
    assert len(bench.pooled_train().groups) == 72
    with pytest.raises(ConfigError, match="fed.clients=3"):
        BENCHMARKS["vqa-rad-organ"](cfg_for(vqa_dir, "vqa-rad-organ", **{"fed.clients": 5}))


def test_image_disjoint_split_is_by_image_and_seeded(vqa_dir):
    data = load_vqa_rad(str(vqa_dir))
    train, test = image_disjoint_split(data, seed=0)
    assert len(train) + len(test) == 90
    assert not {r["image_name"] for r in train} & {r["image_name"] for r in test}
    assert {r["image_organ"] for r in test} == set(ORGANS)  # stratified by organ
    assert 0.1 <= len(test) / 90 <= 0.35
    again = image_disjoint_split(load_vqa_rad(str(vqa_dir)), seed=0)[1]
    other = image_disjoint_split(load_vqa_rad(str(vqa_dir)), seed=1)[1]
    names = [{r["image_name"] for r in t} for t in (test, again, other)]
    assert names[0] == names[1] and names[0] != names[2]
    bench = BENCHMARKS["vqa-rad-organ"](
        cfg_for(vqa_dir, "vqa-rad-organ", **{"fed.clients": 3, "data.test_split": "image-disjoint"})
    )
    assert bench.notes["test_images_seen_in_train"] == 0
    for c in bench.clients:
        assert not image_ids(c.train) & image_ids(c.test)


def test_qtype_clients_hold_their_types(vqa_dir):
    bench = BENCHMARKS["vqa-rad-qtype"](cfg_for(vqa_dir, "vqa-rad-qtype", **{"fed.clients": 3}))
    assert len(bench.clients) == 3 and sum(len(c.train) for c in bench.clients) == 72
    types = [set(c.client_id.split("-", 1)[1].split("+")) for c in bench.clients]
    assert not (types[0] & types[1]) and set().union(*types) == {"PRES", "POS", "ABN", "OTHER",
                                                                 "ATTRIB", "SIZE", "MODALITY"}  # fmt: skip
    records = [
        {"question_type": t} for t, n in (("A", 5), ("B", 4), ("C", 3), ("D", 2)) for _ in range(n)
    ]
    assert qtype_groups(records, 2) == {"A": 0, "B": 1, "C": 1, "D": 0}  # loads 7 / 7
    with pytest.raises(ConfigError, match="fed.clients must be 1..4"):
        qtype_groups(records, 5)


@pytest.mark.parametrize("by", ["answer", "organ"])
def test_dirichlet_is_by_image_and_reproducible(vqa_dir, by):
    def build(seed: int):
        over = {"fed.clients": 3, "data.dirichlet_by": by, "data.split_seed": seed}
        return BENCHMARKS["vqa-rad-dirichlet"](cfg_for(vqa_dir, "vqa-rad-dirichlet", **over))

    bench = build(0)
    assert sum(len(c.train) for c in bench.clients) == 72
    held = [image_ids(c.train) | image_ids(c.test) for c in bench.clients]
    for a in range(3):  # every question of an image sits with one client
        for b in range(a + 1, 3):
            assert not held[a] & held[b]
    assert [c.train.texts for c in build(0).clients] == [c.train.texts for c in bench.clients]


def test_partition_seeds_and_skew():
    labels = [f"y{i % 4}" for i in range(400)] + ["rare"]
    a, b = (partition(labels, 5, "dirichlet", 0.3, seed) for seed in (0, 0))
    c = partition(labels, 5, "dirichlet", 0.3, 1)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert set(a.tolist()) == set(range(5)) and np.bincount(a).min() >= 10
    iid = partition(labels, 4, "iid", 0.5, 0)
    assert sorted(np.bincount(iid).tolist()) == [100, 100, 100, 101]
    assert not np.array_equal(iid, partition(labels, 4, "iid", 0.5, 1))


# ------------------------------------------------------------------ bring your own data (jsonl)


def write_jsonl(root: Path, name: str, rows: list) -> None:
    root.mkdir(parents=True, exist_ok=True)
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    (root / name).write_text("\n".join(lines) + "\n")


@pytest.fixture()
def byo_dir(tmp_path) -> Path:
    root = tmp_path / "byo"
    (root / "img").mkdir(parents=True)
    for i in range(8):
        write_image(root / "img" / f"{i}.png", 100 + i)
    rows = [{"image": f"img/{i % 8}.png", "text": f"q{i}", "answer": ["cat", "dog"][i % 2],
             "client": i % 2, "group": "closed"} for i in range(20)]  # fmt: skip
    write_jsonl(root, "train.jsonl", rows[:16])
    write_jsonl(root, "test.jsonl", rows[16:] + [{**rows[0], "answer": "bird"}])
    return root


def test_jsonl_clients_by_column_iid_and_dirichlet(byo_dir):
    bench = BENCHMARKS["jsonl"](cfg_for(byo_dir, "jsonl", **{"fed.clients": 2}))
    assert [c.client_id for c in bench.clients] == ["0", "1"]
    assert [len(c.train) for c in bench.clients] == [8, 8] and bench.answers == ["cat", "dog", UNK]
    assert bench.clients[0].test.labels[-1] == 2 and bench.clients[0].train.groups[0] == "closed"
    with pytest.raises(ConfigError, match="fed.clients=2"):
        BENCHMARKS["jsonl"](cfg_for(byo_dir, "jsonl", **{"fed.clients": 3}))
    for how in ("iid", "dirichlet"):
        over = {"fed.clients": 3, "data.clients_by": how}
        bench = BENCHMARKS["jsonl"](cfg_for(byo_dir, "jsonl", **over))
        assert sum(len(c.train) for c in bench.clients) == 16
        assert sum(len(c.test) for c in bench.clients) == 5


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"image": "img/0.png", "text": "q", "answer": "a"', "invalid JSON"),
        ({"image": "img/0.png", "answer": "a"}, "missing required field 'text'"),
        ({"image": "img/0.png", "text": "q", "answer": 3}, "field 'answer' must be a string"),
        ({"image": 7, "text": "q", "answer": "a"}, "field 'image' must be"),
        ({"image": "img/0.png", "text": "q", "labels": ["a", "b"]}, "field 'labels': 2 labels; multi-label"),
        ({"image": "img/0.png", "text": "q", "answer": "a", "client": [1]}, "field 'client'"),
        ("[1, 2]", "expected a JSON object"),
    ],
)  # fmt: skip
def test_jsonl_errors_name_file_line_and_field(byo_dir, line, message):
    good = {"image": "img/0.png", "text": "q", "answer": "a", "client": 0}
    write_jsonl(byo_dir, "train.jsonl", [good, "", line])
    with pytest.raises(ValueError, match="train.jsonl:3: ") as err:
        BENCHMARKS["jsonl"](cfg_for(byo_dir, "jsonl", **{"fed.clients": 1}))
    assert message in str(err.value)


def test_jsonl_missing_images_are_reported_or_dropped_and_counted(byo_dir):
    for i in range(4, 8):  # used by 8 training records, no test record
        (byo_dir / "img" / f"{i}.png").unlink()
    cfg = cfg_for(byo_dir, "jsonl", **{"fed.clients": 2})
    with pytest.raises(FileNotFoundError) as err:
        BENCHMARKS["jsonl"](cfg)
    text = str(err.value)
    assert text.startswith("8 record(s)") and text.count("img/") == 5
    assert "train.jsonl:5: image img/4.png missing" in text and "skip_missing_images" in text
    bench = BENCHMARKS["jsonl"](cfg.with_overrides({"data.skip_missing_images": True}))
    assert bench.notes["missing_images_dropped"] == 8
    assert sum(len(c.train) + len(c.test) for c in bench.clients) == 21 - 8
    assert "8 records with missing images dropped" in bench.description


def test_jsonl_column_needs_client_on_every_record(byo_dir):
    write_jsonl(byo_dir, "test.jsonl", [{"image": "img/0.png", "text": "q", "answer": "cat"}])
    with pytest.raises(ValueError, match=r"test.jsonl:1: missing field 'client'"):
        BENCHMARKS["jsonl"](cfg_for(byo_dir, "jsonl", **{"fed.clients": 2}))


# ------------------------------------------------------------------ the real data


@pytest.mark.skipif(find_vqa_rad() is None, reason="VQA-RAD not available here")
def test_real_vqa_rad_organ_sizes_and_image_disjoint_split():
    cfg = FedmmConfig().with_overrides({"fed.clients": 3, "model.image_size": 32})
    bench = BENCHMARKS["vqa-rad-organ"](cfg)
    assert sum(len(c.train) for c in bench.clients) == 3064
    assert sum(len(c.test) for c in bench.clients) == 451
    assert bench.notes["test_images_seen_in_train"] == 203 and bench.notes["test_unk"] == 47
    train, test = image_disjoint_split(load_vqa_rad(), seed=0)
    assert len(train) + len(test) == 3515 and 0.12 < len(test) / 3515 < 0.15
    assert not {r["image_name"] for r in train} & {r["image_name"] for r in test}
