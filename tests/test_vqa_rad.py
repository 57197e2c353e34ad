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
