"""Site-local data directories (fedmm.data.sites) and ``fedmm split``: round trips, unknown answers,
schema errors, a site that holds only its own records."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedmm.data import BENCHMARKS, Benchmark, Task
from fedmm.data.schema import SCHEMA_FILE, Schema, read_schema, schema_of, write_schema
from fedmm.data.site_split import write_sites
from fedmm.data.sites import SITE_FILE, UNKNOWN_LABEL, list_sites, load_site
from fedmm.data.vqa_rad import find_vqa_rad


def resized(image: np.ndarray, size: int) -> np.ndarray:
    """The benchmark's array as ``read_images`` would see it after a lossless PNG round trip."""
    im = Image.fromarray(image).convert("RGB")
    return np.asarray(im.resize((size, size), Image.BILINEAR))


def label_strings(bench: Benchmark, client, split) -> list:
    task = bench.tasks[client.task] if bench.tasks else Task("single", bench.answers)
    if task.kind == "single":
        return [task.answers[int(y)] for y in split.labels]
    return [[task.answers[j] for j in np.flatnonzero(row > 0.5)] for row in split.labels]


def assert_round_trip(bench: Benchmark, out: Path, cfg) -> None:
    sites = write_sites(bench, out)
    assert sites == list_sites(out) and len(sites) == len(bench.clients)
    schema = read_schema(out / SCHEMA_FILE)
    assert schema == schema_of(bench) and schema.head_sizes() == bench.head_sizes()
    size = cfg.model.image_size
    for k, (site, c) in enumerate(zip(sites, bench.clients)):
        assert (site / SCHEMA_FILE).read_text() == (out / SCHEMA_FILE).read_text()
        assert json.loads((site / SITE_FILE).read_text())["index"] == k
        got = load_site(site, cfg)
        assert got.head_sizes() == bench.head_sizes() and got.name == bench.name
        assert got.answers == bench.answers and got.tasks == bench.tasks
        assert got.notes["unknown_answers"]["train"] == got.notes["unknown_answers"]["test"] == 0
        (g,) = got.clients
        assert (g.client_id, g.task, g.modalities) == (c.client_id, c.task, c.modalities)
        assert g.description == c.description
        for a, b in ((c.train, g.train), (c.test, g.test)):
            assert len(a) == len(b)
            assert b.texts == (a.texts if "text" in c.modalities else [""] * len(a))
            assert b.groups == a.groups
            assert label_strings(bench, c, a) == label_strings(got, g, b)
            if "image" in c.modalities:
                assert b.images.shape == (len(a), size, size, 3)
                want = np.stack([resized(img, size) for img in a.images])
                assert np.array_equal(b.images, want)
            else:
                assert b.images is None


@pytest.mark.parametrize("name", ["fmnist-domain", "fmnist-function", "fmnist-task"])
def test_split_round_trips_the_fmnist_benchmarks(tiny_cfg, tmp_path, name):
    clients = 6 if name == "fmnist-task" else 3
    cfg = tiny_cfg.with_overrides({"data.benchmark": name, "fed.clients": clients,
                                   "data.train_per_client": 12, "data.test_per_client": 6})  # fmt: skip
    bench = BENCHMARKS[name](cfg)
    assert_round_trip(bench, tmp_path / "sites", cfg)
    if name == "fmnist-task":
        schema = read_schema(tmp_path / "sites" / SCHEMA_FILE)
        assert not schema.single and schema.tasks["attributes"].kind == "multilabel"
        mods = {c.modalities for c in bench.clients}
        assert ("text",) in mods and ("image",) in mods  # text-only and image-only sites
        text_only = load_site(tmp_path / "sites" / "05-5-describe", cfg)
        assert text_only.clients[0].train.images is None
    else:
        schema = read_schema(tmp_path / "sites" / SCHEMA_FILE)
        assert schema.single and list(schema.tasks) == [name]


def write_jsonl_data(root: Path, n_train: int = 24, n_test: int = 12) -> None:
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True)
    answers = ["cat", "dog", "bird"]
    for split, n in (("train", n_train), ("test", n_test)):
        lines = []
        for i in range(n):
            name = f"img/{split}{i}.png"
            Image.fromarray(rng.integers(0, 255, (10, 14, 3), dtype=np.uint8)).save(root / name)
            answer = "fish" if split == "test" and i == 0 else answers[i % 3]  # fish: <unk>
            lines.append(json.dumps({"image": name, "text": f"what is {i}?", "answer": answer,
                                     "client": f"h{i % 2}", "group": ["open", "closed"][i % 2]}))  # fmt: skip
        (root / f"{split}.jsonl").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("clients_by", ["column", "dirichlet"])
def test_split_round_trips_jsonl(tiny_cfg, tmp_path, clients_by):
    write_jsonl_data(tmp_path / "data")
    cfg = tiny_cfg.with_overrides({"data.benchmark": "jsonl", "data.data_dir": str(tmp_path / "data"),
                                   "data.clients_by": clients_by, "fed.clients": 2,
                                   "data.alpha": 1.0, "data.split_seed": 1})  # fmt: skip
    # split_seed 1: every Dirichlet client holds test records (the partitioner assigns pooled
    # records by position within a label, so with some seeds a client gets no test record)
    bench = BENCHMARKS["jsonl"](cfg)
    assert "<unk>" in bench.answers
    assert_round_trip(bench, tmp_path / "sites", cfg)
    schema = read_schema(tmp_path / "sites" / SCHEMA_FILE)
    assert schema.groups == {"jsonl": ["closed", "open"]}


def vqa_rad_cfg(tiny_cfg, name: str):
    root = find_vqa_rad()
    if root is None:
        alt = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "vqa-rad"
        root = find_vqa_rad(str(alt)) if alt.is_dir() else None
    if root is None:
        pytest.skip("VQA-RAD not available here")
    return tiny_cfg.with_overrides({"data.benchmark": name, "data.data_dir": str(root),
                                    "fed.clients": 3 if name == "vqa-rad-organ" else 4,
                                    "model.image_size": 16})  # fmt: skip


@pytest.mark.parametrize("name", ["vqa-rad-organ", "vqa-rad-task"])
def test_split_round_trips_vqa_rad(tiny_cfg, tmp_path, name):
    cfg = vqa_rad_cfg(tiny_cfg, name)
    bench = BENCHMARKS[name](cfg)
    assert_round_trip(bench, tmp_path / "sites", cfg)


def test_a_site_directory_alone_loads_and_nothing_else_is_read(tiny_cfg, tmp_path, monkeypatch):
    cfg = tiny_cfg.with_overrides({"data.benchmark": "fmnist-task", "fed.clients": 6,
                                   "data.train_per_client": 8, "data.test_per_client": 4})  # fmt: skip
    bench = BENCHMARKS["fmnist-task"](cfg)
    sites = write_sites(bench, tmp_path / "split")
    alone = tmp_path / "hospital" / "vqa-site"
    shutil.copytree(sites[1], alone)
    shutil.rmtree(tmp_path / "split")  # the other sites and the top-level schema are gone

    def no_benchmark(*args, **kwargs):
        raise AssertionError("a site must not build a benchmark")

    monkeypatch.setattr("fedmm.data.load_benchmark", no_benchmark)
    for name in list(BENCHMARKS):
        monkeypatch.setitem(BENCHMARKS, name, no_benchmark)
    cfg = cfg.with_overrides({"data.data_dir": str(tmp_path / "nowhere")})
    got = load_site(alone, cfg)
    (c,) = got.clients
    assert c.client_id == "1-vqa" and c.task == "vqa" and got.tasks == bench.tasks
    assert len(c.train) == 8 and len(c.test) == 4
    assert np.array_equal(c.train.labels, bench.clients[1].train.labels)


def write_site(root: Path, schema: Schema, train: list[dict], test: list[dict],
               info: dict | None = None) -> Path:  # fmt: skip
    root.mkdir(parents=True)
    write_schema(schema, root / SCHEMA_FILE)
    if info is not None:
        (root / SITE_FILE).write_text(json.dumps(info))
    for split, records in (("train", train), ("test", test)):
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def test_unknown_answers_are_counted_and_scored_wrong_never_a_crash(tiny_cfg, tmp_path, caplog):
    schema = Schema("demo", {"demo": Task("single", ["a", "b"])})
    site = write_site(
        tmp_path / "s",
        schema,
        train=[{"text": "q1", "answer": "a"}, {"text": "q2", "answer": "b"},
               {"text": "q3", "answer": "zzz"}],
        test=[{"text": "q4", "answer": "b"}, {"text": "q5", "answer": "yyy"}],
        info={"modalities": ["text"]},
    )  # fmt: skip
    with caplog.at_level("WARNING", logger="fedmm.data.sites"):
        got = load_site(site, tiny_cfg)
    (c,) = got.clients
    assert c.client_id == "s" and c.task == "" and got.answers == ["a", "b"] and not got.tasks
    assert c.train.texts == ["q1", "q2"] and c.train.labels.tolist() == [0, 1]
    assert c.test.labels.tolist() == [1, UNKNOWN_LABEL] and c.train.images is None
    unknown = got.notes["unknown_answers"]
    assert unknown["train"] == 1 and unknown["test"] == 1
    assert unknown["examples"] == [f"{site / 'train.jsonl'}:3 zzz", f"{site / 'test.jsonl'}:2 yyy"]
    assert "zzz" in caplog.text

    multi = Schema(
        "demo", {"attrs": Task("multilabel", ["x", "y"]), "other": Task("single", ["k"])}
    )
    site = write_site(
        tmp_path / "m", multi,
        train=[{"text": "t", "labels": ["x", "q"]}, {"text": "u", "labels": []}],
        test=[{"text": "v", "labels": ["y", "x", "r"]}],
        info={"task": "attrs", "modalities": ["text"], "name": "site-m"},
    )  # fmt: skip
    got = load_site(site, tiny_cfg)
    (c,) = got.clients
    assert c.client_id == "site-m" and c.task == "attrs" and set(got.tasks) == {"attrs", "other"}
    assert c.train.labels.tolist() == [[1, 0], [0, 0]] and c.test.labels.tolist() == [[1, 1]]
    assert got.notes["unknown_answers"]["train"] == 1 and got.notes["unknown_answers"]["test"] == 1

    lone = Schema("demo", {"attrs": Task("multilabel", ["x", "y"])})  # one task, multilabel
    site = write_site(tmp_path / "l", lone, [{"text": "t", "labels": ["y"]}],
                      [{"text": "v", "labels": ["x"]}], {"modalities": ["text"]})  # fmt: skip
    got = load_site(site, tiny_cfg)
    assert got.clients[0].task == "attrs" and got.head_sizes() == lone.head_sizes() == {"attrs": 2}


def test_a_site_whose_training_answers_are_all_unknown_is_an_error(tiny_cfg, tmp_path):
    schema = Schema("demo", {"demo": Task("single", ["a"])})
    site = write_site(tmp_path / "s", schema, [{"text": "q", "answer": "zzz"}],
                      [{"text": "q", "answer": "a"}], {"modalities": ["text"]})  # fmt: skip
    with pytest.raises(ValueError, match=r"site .*s: train.jsonl holds no usable records"):
        load_site(site, tiny_cfg)


def test_schema_and_site_errors_name_the_file(tiny_cfg, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothere.*schema\.json"):
        read_schema(tmp_path / "nothere" / SCHEMA_FILE)
    path = tmp_path / SCHEMA_FILE
    good = {"fedmm_schema": 1, "name": "n", "tasks": [{"name": "t", "kind": "single",
                                                        "labels": ["a", "b"]}]}  # fmt: skip
    path.write_text(json.dumps(good))
    assert read_schema(path).head_sizes() == 2
    bad_cases = [
        (
            {**good, "tasks": [{"name": "t", "kind": "ranking", "labels": ["a"]}]},
            r"tasks\[0\]\.kind",
        ),
        ({**good, "tasks": [{"name": "t", "kind": "single", "labels": ["a", "a"]}]}, "twice"),
        ({**good, "fedmm_schema": 2}, "fedmm_schema"),
        ({**good, "tasks": []}, "tasks"),
        ({**good, "taks": 1}, "unknown field 'taks'"),
    ]
    for obj, field in bad_cases:
        path.write_text(json.dumps(obj))
        with pytest.raises(ValueError, match=field) as info:
            read_schema(path)
        assert str(path) in str(info.value)
    path.write_text("{not json")
    with pytest.raises(ValueError, match=rf"{path}: invalid JSON"):
        read_schema(path)

    two = Schema("n", {"t": Task("single", ["a"]), "u": Task("single", ["b"])})
    rec = [{"text": "q", "answer": "a"}]
    site = write_site(tmp_path / "s1", two, rec, rec, {"task": "nope", "modalities": ["text"]})
    with pytest.raises(ValueError, match=r"s1/site\.json: field 'task': 'nope'"):
        load_site(site, tiny_cfg)
    site = write_site(tmp_path / "s2", two, rec, rec, {"modalities": ["text"]})
    with pytest.raises(ValueError, match=r"s2/site\.json: field 'task' is required"):
        load_site(site, tiny_cfg)
    site = write_site(
        tmp_path / "s3", two, rec, [{"answer": "a"}], {"task": "t", "modalities": ["text"]}
    )
    with pytest.raises(ValueError, match=r"s3/test\.jsonl:1: field 'text'"):
        load_site(site, tiny_cfg)
    site = write_site(tmp_path / "s4", two, [{"text": "q", "answer": "a", "image": "../x.png"}],
                      rec, {"task": "t"})  # fmt: skip
    with pytest.raises(ValueError, match=r"s4/train\.jsonl:1: field 'image'"):
        load_site(site, tiny_cfg)
    pic = [{"text": "q", "answer": "a", "image": "x.png"}]
    site = write_site(tmp_path / "s5", two, pic, pic, {"task": "t"})
    with pytest.raises(FileNotFoundError, match=r"s5/train\.jsonl:1 x\.png"):
        load_site(site, tiny_cfg)
    (tmp_path / "s6").mkdir()
    with pytest.raises(FileNotFoundError, match=r"s6/schema\.json"):
        load_site(tmp_path / "s6", tiny_cfg)


def test_write_sites_refuses_a_foreign_directory_and_overwrites_a_previous_split(
    tiny_cfg, tmp_path
):
    bench = BENCHMARKS["fmnist-domain"](tiny_cfg.with_overrides({"data.train_per_client": 4,
                                                                 "data.test_per_client": 2}))  # fmt: skip
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a previous `fedmm split`"):
        write_sites(bench, foreign)
    out = tmp_path / "split"
    write_sites(bench, out)
    (out / "99-stale").mkdir()
    (out / "99-stale" / SITE_FILE).write_text("{}")
    again = write_sites(bench, out)
    assert list_sites(out) == again and len(again) == 3


def test_fedmm_split_cli_end_to_end(fmnist_dir, tmp_path, capsys):
    from fedmm.cli import main

    out = tmp_path / "sites"
    rc = main(["split", "--benchmark", "fmnist-domain", "--clients", "3", "--out", str(out),
               "--set", f"data.data_dir={fmnist_dir}", "--set", "data.train_per_client=5",
               "--set", "data.test_per_client=3", "--set", "model.backbone=tiny"])  # fmt: skip
    assert rc == 0
    assert (out / SCHEMA_FILE).is_file()
    sites = list_sites(out)
    assert [p.name for p in sites] == ["00-0-original", "01-1-inverted", "02-2-blurred"]
    printed = capsys.readouterr().out
    assert "0-original  task fmnist-domain  5 train  3 test" in printed
    assert f"schema: {out / SCHEMA_FILE}" in printed
    rc = main(["split", "--benchmark", "fmnist-domain", "--out", str(tmp_path / "sites" / "00-0-original" / "images"),
               "--set", f"data.data_dir={fmnist_dir}"])  # fmt: skip
    assert rc == 2 and "not a previous `fedmm split`" in capsys.readouterr().err
