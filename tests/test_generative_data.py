"""Generative tasks from the user's data (issue 26) on the tiny Llama (``tiny-gen``): a jsonl data
directory or site directories whose ``schema.json`` declares a ``generate`` task, caption scores
(BLEU-4, ROUGE-L, CIDEr-D from their libraries), the answers unseen in training, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_federation
from test_serverapp import InProcessGrid

from fedmm.config import ConfigError, FedmmConfig
from fedmm.generation import caption_scores, caption_text

pytestmark = pytest.mark.usefixtures("flower_task_identity")

SHAPES = ["top", "middle", "bottom"]  # where the bright bar of an image lies
CAPTIONS = {  # several references per image, as a caption data set gives them
    "top": ["a bright bar at the top", "a white stripe near the top edge"],
    "middle": ["a bright bar in the middle", "a white stripe across the centre"],
    "bottom": ["a bright bar at the bottom", "a white stripe near the bottom edge"],
}


def write_caption_data(root: Path, n_train: int = 24, n_test: int = 9, score: str = "caption",
                       several: bool = True, schema: dict | None = None) -> Path:  # fmt: skip
    """A jsonl data directory: 32x32 PNGs with a bar at the top / middle / bottom, two clients
    (the ``client`` column), a ``schema.json`` with one generate task."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        lines = []
        for i in range(n):
            where = SHAPES[i % 3]
            pic = rng.integers(0, 60, size=(32, 32), dtype=np.uint8)
            row = {"top": 2, "middle": 13, "bottom": 24}[where]
            pic[row : row + 6, 4:28] = 230
            name = f"{split}-{i}.png"
            Image.fromarray(pic).save(root / name)
            record = {"image": name, "text": "Describe the image.", "client": i % 2}
            if several:
                record["answers"] = CAPTIONS[where]
            else:
                record["answer"] = CAPTIONS[where][0]
            lines.append(json.dumps(record))
        (root / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    task = {"name": "caption", "kind": "generate", "prompt": "{question}"}
    if score:
        task["score"] = score
    schema = schema or {"fedmm_schema": 1, "name": "bars", "tasks": [task]}
    (root / "schema.json").write_text(json.dumps(schema))
    return root


@pytest.fixture()
def caption_cfg(tiny_cfg, tmp_path) -> FedmmConfig:
    return tiny_cfg.with_overrides({
        "model.backbone": "tiny-gen", "peft.type": "lora", "data.benchmark": "jsonl",
        "data.data_dir": str(write_caption_data(tmp_path / "bars")), "data.clients_by": "column",
        "fed.clients": 2, "model.max_text_len": 64, "train.local_steps": 2,
        "train.batch_size": 4, "eval.max_new_tokens": 10, "method": "fedavg",
        "train.max_target_tokens": 40,
    })  # fmt: skip


def grid_for(cfg: FedmmConfig, n: int = 2) -> InProcessGrid:
    """In-process sites that read ``cfg``'s data directory, as ``fedmm run`` gives them theirs."""
    return InProcessGrid(n, sites={k: {"data-dir": cfg.data.data_dir,
                                       "state-dir": f"{cfg.out_dir}/client_state/site-{k}"}
                                   for k in range(n)})  # fmt: skip


# ---------------------------------------------------------------------- caption scores
HYPS = ["a bright bar at the top", "a stripe in the middle of it", "the bar is low"]
REFS = [CAPTIONS["top"], CAPTIONS["middle"], ["a bright bar at the bottom"]]


def test_caption_scores_are_the_libraries_own_values():
    """Each score equals what sacrebleu, rouge-score and pycocoevalcap compute directly on the
    same (lower-cased, punctuation-free) texts; several references and a lone one mixed."""
    import sacrebleu
    from pycocoevalcap.cider.cider import Cider
    from rouge_score import rouge_scorer

    scores = caption_scores([h.upper() + "!" for h in HYPS], REFS)  # case, punctuation: dropped
    streams = [[r[0] for r in REFS], [r[1] if len(r) > 1 else None for r in REFS]]
    bleu = sacrebleu.corpus_bleu(HYPS, streams).score
    rouge = rouge_scorer.RougeScorer(["rougeL"])
    rouge_l = np.mean([rouge.score_multi(r, h)["rougeL"].fmeasure for h, r in zip(HYPS, REFS)])
    cider, _ = Cider().compute_score(dict(enumerate(REFS)), {i: [h] for i, h in enumerate(HYPS)})
    assert scores[".bleu"] == pytest.approx(bleu / 100)
    assert scores[".rougeL"] == pytest.approx(rouge_l)
    assert scores[".cider"] == scores[""] == pytest.approx(cider)
    assert 0 < scores[".bleu"] < 1 and 0 < scores[".rougeL"] < 1 and scores[".cider"] > 0
    assert caption_text("A  T-shirt, folded.") == "a t shirt folded"  # articles kept


def test_a_perfect_caption_scores_full_and_an_empty_one_zero():
    perfect = caption_scores([r[0] for r in REFS], REFS)
    assert perfect[".bleu"] == pytest.approx(1.0) and perfect[".rougeL"] == pytest.approx(1.0)
    # CIDEr-D is x10: a perfect caption of a distinct image scores high
    assert perfect[".cider"] > 3
    empty = caption_scores(["", "", ""], REFS)
    assert empty == {"": 0.0, ".cider": 0.0, ".bleu": 0.0, ".rougeL": 0.0}
    with pytest.raises(ValueError, match="at least one reference"):
        caption_scores(["a"], [[]])


def test_a_caption_view_scores_what_the_model_generated(caption_cfg, monkeypatch):
    """The view's scores are the caption scores of the generated text against every reference:
    the references themselves score BLEU 1 and ROUGE-L 1; one wrong caption lowers all three."""
    from fedmm.methods.base import ClientContext
    from fedmm.runtime import get_runtime

    runtime = get_runtime(caption_cfg)
    test = runtime.client_split(0, "test")
    ctx = ClientContext(caption_cfg, runtime.model, test, test, {}, 1, 0, 1, 1)
    said = [refs[-1] for refs in test.reference_sets]  # the last reference, not the target
    monkeypatch.setattr("fedmm.generation.generate_split", lambda ctx, split: list(said))
    perfect = dict(ctx.view("shared"))
    assert perfect["shared.bleu"] == pytest.approx(1.0)
    assert perfect["shared.rougeL"] == pytest.approx(1.0)
    assert perfect["shared"] == perfect["shared.cider"] > 1
    assert perfect == {
        "shared" + k: v for k, v in caption_scores(said, test.reference_sets).items()
    }
    said[0] = "nothing to see"
    worse = ctx.view("shared")
    assert all(worse[k] < perfect[k] for k in ("shared.bleu", "shared.rougeL", "shared.cider"))


# ---------------------------------------------------------------------- the schema's score field
def test_schema_score_field_is_validated_and_written_only_when_set(tmp_path):
    from fedmm.data.schema import parse_schema

    task = {"name": "c", "kind": "generate"}
    plain = parse_schema({"fedmm_schema": 1, "name": "x", "tasks": [task]}, "s.json")
    assert plain.tasks["c"].score == "" and '"score"' not in plain.to_json()  # hash unchanged
    cap = parse_schema({"fedmm_schema": 1, "name": "x", "tasks": [task | {"score": "caption"}]},
                       "s.json")  # fmt: skip
    assert cap.tasks["c"].score == "caption" and cap.sha256() != plain.sha256()
    assert parse_schema(json.loads(cap.to_json()), "again").tasks["c"].score == "caption"
    for bad in ({"score": "bleu"}, {"kind": "single", "labels": ["a"], "score": "caption"}):
        with pytest.raises(ValueError, match=r"s.json: field 'tasks\[0\].score' must be one of "
                                              "vqa, caption"):  # fmt: skip
            parse_schema({"fedmm_schema": 1, "name": "x", "tasks": [task | bad]}, "s.json")


# ---------------------------------------------------------------------- jsonl, end to end
def test_jsonl_caption_task_trains_two_fedavg_rounds_and_reports_caption_scores(caption_cfg):
    from fedmm.runtime import get_runtime

    runtime = get_runtime(caption_cfg)
    assert runtime.benchmark.tasks["caption"].score == "caption"
    test = runtime.client_split(0, "test")
    assert test.kind == "generate" and test.score == "caption"
    assert test.reference_sets[0] == tuple(CAPTIONS["top"])  # every reference is scored against
    assert test.references[0] == CAPTIONS["top"][0]  # the first one is the training target
    record = run_federation(grid_for(caption_cfg), caption_cfg)
    assert [h["round"] for h in record["history"]] == [1, 2]
    (run,) = json.loads((Path(caption_cfg.out_dir) / "results.json").read_text())["runs"]
    for client in ("0", "1"):
        scores = run["history"][-1]["clients"][client]
        assert {"shared", "shared.bleu", "shared.rougeL", "shared.cider"} <= set(scores)
        assert scores["shared"] == scores["shared.cider"]
        assert "shared.f1" not in scores  # a caption task has no VQA scores
    assert "Generated answers" in (Path(caption_cfg.out_dir) / "summary.md").read_text()


def test_jsonl_vqa_generate_task_scores_exact_match_and_unseen(caption_cfg, tmp_path):
    """A generate task scored as VQA (the default): exact match, token F1, per group, and the
    records whose answer no training record has (``.unseen``)."""
    from fedmm.runtime import get_runtime

    root = write_caption_data(tmp_path / "vqa", score="", several=False)
    lines = (root / "test.jsonl").read_text().splitlines()
    novel = json.loads(lines[0]) | {"answer": "a thin line on the left"}  # in no training record
    (root / "test.jsonl").write_text("\n".join([json.dumps(novel), *lines[1:]]) + "\n")
    cfg = caption_cfg.with_overrides({"data.data_dir": str(root)})
    bench = get_runtime(cfg).benchmark
    assert bench.notes["test_unseen"] == 1 and bench.clients[0].test.unseen[0]
    assert bench.clients[0].test.targets[0] == "a thin line on the left"  # its own text
    record = run_federation(grid_for(cfg), cfg)
    scores = record["history"][-1]["clients"]["0"]
    assert {"shared", "shared.f1", "shared.unseen"} <= set(scores)
    assert scores["shared.unseen"] == 0.0 or scores["shared.unseen"] == 1.0  # one record
    assert "shared.unseen" not in record["history"][-1]["clients"]["1"]  # client 1 has none


def test_fedmm_run_simulates_a_jsonl_caption_task(caption_cfg, tmp_path):
    """``fedmm run`` (Flower's simulation engine) on the jsonl caption task: exit 0 and the
    caption scores in results.json."""
    from fedmm.cli import main

    out = tmp_path / "run"
    args = ["run", "--benchmark", "jsonl", "--method", "fedavg", "--clients", "2", "--rounds",
            "2", "--out", str(out)]  # fmt: skip
    flat = caption_cfg.to_flat()
    for key in ("model.backbone", "model.image_size", "peft.type", "data.data_dir",
                "data.clients_by", "model.max_text_len", "train.local_steps",
                "train.batch_size", "eval.max_new_tokens", "train.max_target_tokens"):  # fmt: skip
        args += ["--set", f"{key}={flat[key]}"]
    assert main([*args, "--set", "progress=false"]) == 0
    (run,) = json.loads((out / "results.json").read_text())["runs"]
    assert [h["round"] for h in run["history"]] == [1, 2]
    assert {"shared.bleu", "shared.rougeL", "shared.cider"} <= set(
        run["history"][-1]["clients"]["0"]
    )


# ---------------------------------------------------------------------- site directories
def test_caption_sites_keep_every_reference_and_train_two_rounds(caption_cfg, tmp_path):
    """`fedmm split` of the jsonl caption task writes ``answers`` (all references) and the
    schema's score; the site directories read back the same and run 2 FedAvg rounds."""
    from fedmm.data.schema import read_schema
    from fedmm.data.site_split import write_sites
    from fedmm.runtime import get_runtime

    bench = get_runtime(caption_cfg).benchmark
    sites = write_sites(bench, tmp_path / "split")
    assert read_schema(tmp_path / "split" / "schema.json").tasks["caption"].score == "caption"
    first = json.loads((sites[0] / "test.jsonl").read_text().splitlines()[0])
    assert first["answers"] == CAPTIONS["top"] and "answer" not in first
    cfg = caption_cfg.with_overrides({"data.benchmark": "sites",
                                      "data.data_dir": str(tmp_path / "split")})  # fmt: skip
    grid = InProcessGrid(2, sites={k: {"data-dir": str(s)} for k, s in enumerate(sites)})
    record = run_federation(grid, cfg)
    assert [h["round"] for h in record["history"]] == [1, 2]
    assert "shared.cider" in record["history"][-1]["clients"]["0"]


# ---------------------------------------------------------------------- errors
def test_mixed_schema_on_a_generative_backbone_is_refused_naming_the_task(caption_cfg, tmp_path):
    """A generate task beside a classification task: a generative backbone has no task head,
    so the schema is refused before anything trains, naming the classification task."""
    from fedmm.backbones import build_model
    from fedmm.data.schema import parse_schema
    from fedmm.runtime import server_model

    schema = parse_schema({"fedmm_schema": 1, "name": "mixed", "tasks": [
        {"name": "caption", "kind": "generate"},
        {"name": "organ", "kind": "single", "labels": ["head", "chest"]}]}, "s.json")  # fmt: skip
    with pytest.raises(ConfigError, match=r"mixes generate tasks with classification task\(s\) "
                                          r"'organ' \(2 labels\)"):  # fmt: skip
        server_model(caption_cfg, schema)
    with pytest.raises(ConfigError, match=r"task 'caption' of this benchmark is generative"):
        build_model(caption_cfg.with_overrides({"model.backbone": "tiny"}).model,
                    caption_cfg.adapter, schema.head_sizes(), caption_cfg.peft)  # fmt: skip


def test_a_classification_backbone_refuses_a_jsonl_generate_task(caption_cfg):
    from fedmm.runtime import get_runtime

    with pytest.raises(ConfigError, match=r"tiny.*task 'caption' of this benchmark is generative"):
        get_runtime(caption_cfg.with_overrides({"model.backbone": "tiny"}))


def test_a_generative_backbone_refuses_a_jsonl_classification_task(caption_cfg, tmp_path):
    from fedmm.runtime import get_runtime

    root = write_caption_data(tmp_path / "labels", several=False)
    (root / "schema.json").unlink()  # no schema: one single-label task over the answers
    cfg = caption_cfg.with_overrides({"data.data_dir": str(root)})
    with pytest.raises(ConfigError, match="'tiny-gen' is generative.*data.task_kind=generate"):
        get_runtime(cfg)
    test = get_runtime(cfg.with_overrides({"data.task_kind": "generate"})).client_split(0, "test")
    assert test.references[0] == CAPTIONS["top"][0]  # the answer's text (normalised: lower case)


def test_jsonl_generate_errors_name_the_file_and_line(caption_cfg, tmp_path):
    from fedmm.data import load_benchmark

    def broken(name: str, edit) -> FedmmConfig:
        root = write_caption_data(tmp_path / name)
        lines = (root / "train.jsonl").read_text().splitlines()
        lines[2] = json.dumps(edit(json.loads(lines[2])))
        (root / "train.jsonl").write_text("\n".join(lines) + "\n")
        return caption_cfg.with_overrides({"data.data_dir": str(root)})

    cfg = broken("empty", lambda r: r | {"answers": ["a bar", "  "]})
    with pytest.raises(ValueError, match=r"train.jsonl:3: empty target text in field 'answers'"):
        load_benchmark(cfg)
    cfg = broken("both", lambda r: r | {"answer": "a bar"})
    with pytest.raises(ValueError, match=r"train.jsonl:3: field 'answer' \(or 'answers'\)"):
        load_benchmark(cfg)
    root = write_caption_data(tmp_path / "single", schema={"fedmm_schema": 1, "name": "x",
        "tasks": [{"name": "organ", "kind": "single", "labels": ["a"]}]})  # fmt: skip
    with pytest.raises(ValueError, match=r"schema.json: task 'organ' has kind 'single'; a jsonl "
                                          "schema declares a generate task only"):  # fmt: skip
        load_benchmark(caption_cfg.with_overrides({"data.data_dir": str(root)}))
    (root / "schema.json").unlink()  # a classification jsonl: 'answers' is refused
    with pytest.raises(ValueError, match=r"train.jsonl:1: field 'answers' \(several references\) "
                                          "is for a generate task"):  # fmt: skip
        load_benchmark(caption_cfg.with_overrides({"data.data_dir": str(root),
                                                   "model.backbone": "tiny"}))  # fmt: skip


def test_a_site_with_an_empty_target_is_an_error_naming_the_record(caption_cfg, tmp_path):
    from fedmm.data.site_split import write_sites
    from fedmm.data.sites import load_site
    from fedmm.runtime import get_runtime

    sites = write_sites(get_runtime(caption_cfg).benchmark, tmp_path / "split")
    lines = (sites[1] / "test.jsonl").read_text().splitlines()
    lines[1] = json.dumps(json.loads(lines[1]) | {"answers": [""]})
    (sites[1] / "test.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"test.jsonl:2: empty target text in field 'answers'"):
        load_site(sites[1], caption_cfg)


# ---------------------------------------------------------------------- fmnist-caption
def test_fmnist_caption_references_are_templated_from_the_class_and_it_trains(tiny_cfg):
    """The built-in caption benchmark: fmnist-domain's images with three references templated
    from the class; 2 FedAvg rounds report BLEU / ROUGE-L / CIDEr-D; a classification backbone
    is refused before anything runs."""
    from fedmm.data import load_benchmark
    from fedmm.data.fmnist import ITEMS, captions
    from fedmm.validate import validate_config

    cfg = tiny_cfg.with_overrides({
        "data.benchmark": "fmnist-caption", "model.backbone": "tiny-gen", "peft.type": "lora",
        "fed.clients": 2, "data.train_per_client": 12, "data.test_per_client": 6,
        "model.max_text_len": 64, "train.max_target_tokens": 40, "train.local_steps": 2,
        "train.batch_size": 4, "eval.max_new_tokens": 8,
    })  # fmt: skip
    validate_config(cfg)
    with pytest.raises(ConfigError, match="'fmnist-caption' is generative"):
        validate_config(cfg.with_overrides({"model.backbone": "tiny"}))
    assert captions(7) == ["a sneaker, a kind of footwear",
                           "a sneaker: for everyday wear, worn on the feet",
                           "a picture of a sneaker"]  # fmt: skip
    assert captions(9)[0] == "an ankle boot, a kind of footwear"
    bench = load_benchmark(cfg)
    domain = load_benchmark(cfg.with_overrides({"data.benchmark": "fmnist-domain",
                                                "model.backbone": "tiny"}))  # fmt: skip
    for c, d in zip(bench.clients, domain.clients):  # the same images, client for client
        assert np.array_equal(c.train.images, d.train.images) and c.client_id == d.client_id
    for refs in bench.clients[0].test.references:  # one class's templates, nothing else
        assert refs in [captions(y) for y in range(len(ITEMS))]
    record = run_federation(InProcessGrid(2), cfg)
    scores = record["history"][-1]["clients"]["0-original"]
    assert {"shared", "shared.bleu", "shared.rougeL", "shared.cider"} <= set(scores)


# ---------------------------------------------------------------------- VQA-RAD as generation
def _vqa_rad_or_skip() -> None:
    from fedmm.data.vqa_rad import find_vqa_rad

    if find_vqa_rad() is None:
        pytest.skip("VQA-RAD not available here (/work/shared/data/vqa-rad, docs/data.md)")


def test_vqa_rad_as_generation_keeps_unseen_answers_and_scores_them(tiny_cfg):
    """``--benchmark vqa-rad-organ --set data.task_kind=generate``: a test answer outside the
    training answers is the reference in its own words (never ``<unk>``) and is marked unseen;
    2 FedAvg rounds report ``closed`` / ``open`` and ``open_unseen``."""
    _vqa_rad_or_skip()
    from fedmm.runtime import get_runtime

    cfg = tiny_cfg.with_overrides({
        "data.benchmark": "vqa-rad-organ", "data.task_kind": "generate", "fed.clients": 3,
        "model.backbone": "tiny-gen", "peft.type": "lora", "model.max_text_len": 200,
        "train.local_steps": 1, "train.batch_size": 4, "eval.max_new_tokens": 4,
        "train.eval_batch_size": 64,
    })  # fmt: skip
    bench = get_runtime(cfg).benchmark
    tests = [c.test for c in bench.clients]
    assert not any("<unk>" in t.targets for t in tests)
    unseen = sum(sum(t.unseen) for t in tests)
    assert unseen == bench.notes["test_unseen"] and 0 < unseen <= bench.notes["test_unk"]
    open_unseen = sum(u and g == "open" for t in tests for u, g in zip(t.unseen, t.groups))
    assert open_unseen > 0
    record = run_federation(InProcessGrid(3), cfg)
    views = {k for scores in record["history"][-1]["clients"].values() for k in scores}
    assert {"shared.closed", "shared.open", "shared.open_unseen", "shared.unseen"} <= views
