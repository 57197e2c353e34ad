"""VQA-RAD loader on the real data (skipped where ../shared/data/vqa-rad is absent)."""

from __future__ import annotations

import pytest

from fedmm.data.vqa_rad import find_vqa_rad, load_vqa_rad, normalise_answer

pytestmark = pytest.mark.skipif(find_vqa_rad() is None, reason="VQA-RAD not available here")


def test_loader_survives_the_real_quirks():
    data = load_vqa_rad()
    assert len(data.train) == 3064 and len(data.test) == 451
    assert len(data.answers) == 476  # distinct normalised train answers (DATA.md)
    assert data.normalised["answer not a string"] == 10
    assert {r["answer_type"] for r in data.train + data.test} == {"CLOSED", "OPEN"}
    assert sum(r["answer"] not in set(data.answers) for r in data.test) == 47
    first_types = {r["question_type"].split(",")[0] for r in data.train + data.test}
    assert len(first_types) == 11 and {"ATTRIB", "OTHER"} <= first_types  # ATRIB, Other fixed
    assert {r["image_organ"] for r in data.train} == {"HEAD", "CHEST", "ABD"}


def test_normalise_answer():
    assert normalise_answer(" Yes ") == "yes" and normalise_answer(5) == "5"
    assert normalise_answer("Left  Lung") == "left lung"


def test_task_benchmark_from_the_real_data():
    from fedmm.config import FedmmConfig
    from fedmm.data import load_benchmark
    from fedmm.data.vqa_rad import FINDINGS, image_findings

    cfg = FedmmConfig().with_overrides({"data.benchmark": "vqa-rad-task", "fed.clients": 4,
                                        "model.image_size": 32})  # fmt: skip
    bench = load_benchmark(cfg)
    organ, closed, open_, findings = bench.clients
    assert [c.modalities for c in bench.clients] == [("image",), ("image", "text"),
                                                     ("image", "text"), ("image",)]  # fmt: skip
    assert organ.train.labels.max() <= 2 and set(closed.train.labels.tolist()) == {0, 1}
    assert findings.train.labels.shape[1] == len(FINDINGS) and findings.train.labels.max() == 1
    data = load_vqa_rad()
    asked = {r["image_name"] for r in data.train + data.test}
    assert len(organ.train) + len(organ.test) == len(asked)  # one record per image asked about
    # the derivation: a finding is positive iff a closed question naming it was answered yes
    toy = [
        {"image_name": "a", "answer_type": "CLOSED", "answer": "yes", "question": "Is there a mass?"},
        {"image_name": "a", "answer_type": "CLOSED", "answer": "no", "question": "Any fracture?"},
        {"image_name": "b", "answer_type": "OPEN", "answer": "mass", "question": "What is seen?"},
    ]  # fmt: skip
    found = image_findings(toy)
    assert set(found) == {"a"} and found["a"][list(FINDINGS).index("mass")] == 1
    assert found["a"].sum() == 1
