"""Bad data is loud and located, never silent (issue 15, kinds 2, 3, 6, 7).

Images are read by their real range or refused by name; a client with nothing to learn from or
nothing to be scored on is refused before a run or kept out of every mean; what the loader did
is counted; every text error names its file and line.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedmm.config import ConfigError, FedmmConfig
from fedmm.data import BENCHMARKS, load_benchmark
from fedmm.data.common import ImageReadError, load_image, read_images, to_rgb8


# ------------------------------------------------------------------ kind 2: images, every mode
def gradient(lo: float, hi: float, dtype) -> np.ndarray:
    """A 16 x 20 horizontal ramp from lo to hi."""
    return np.tile(np.linspace(lo, hi, 20), (16, 1)).astype(dtype)


def test_16_bit_grayscale_png_is_scaled_by_its_true_range_not_clipped_to_white(tmp_path):
    """What DICOM -> PNG exports produce: 16-bit values in [1000, 3000]."""
    path = tmp_path / "ct.png"
    Image.fromarray(gradient(1000, 3000, np.uint16)).save(path)
    with Image.open(path) as im:
        assert im.mode.startswith("I")  # Pillow opens it as 16/32-bit integer
        assert (np.asarray(im.convert("RGB")) == 255).mean() > 0.99  # the old way: all white
    rgb = load_image(path, 20)
    assert rgb.dtype == np.uint8 and rgb.shape == (20, 20, 3)
    assert rgb.min() <= 2 and rgb.max() >= 253  # the true range maps onto 0..255
    row = rgb[10, :, 0].astype(int)
    assert (np.diff(row) >= 0).all() and len(set(row.tolist())) > 10  # the ramp survives
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L", "I", "F"])
def test_high_depth_modes_map_min_to_0_and_max_to_255(mode):
    values = gradient(-5.0 if mode in ("I", "F") else 7, 60_000 if mode != "F" else 2.5, float)
    if mode == "F":
        im = Image.fromarray(values.astype(np.float32), "F")
    elif mode == "I":
        im = Image.fromarray(values.astype(np.int32), "I")
    else:
        dtype = {"I;16": "<u2", "I;16L": "<u2", "I;16B": ">u2"}[mode]
        im = Image.frombytes(mode, (20, 16), values.astype(dtype).tobytes())
    assert im.mode == mode
    rgb = to_rgb8(im)
    assert rgb.shape == (16, 20, 3) and rgb[:, 0].max() == 0 and rgb[:, -1].min() == 255


def test_a_constant_high_depth_image_becomes_zeros():
    assert not to_rgb8(Image.fromarray(np.full((4, 4), 2000, np.uint16))).any()


def test_float_tiff_is_read_by_its_range(tmp_path):
    path = tmp_path / "map.tif"
    Image.fromarray(gradient(0.1, 0.3, np.float32), "F").save(path)
    rgb = load_image(path, 20)
    assert rgb.min() <= 2 and rgb.max() >= 253


def test_palette_alpha_cmyk_and_bilevel_images(tmp_path):
    # palette: the palette colour, not the index
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 200, 10, 30] + [0] * 762)
    assert tuple(to_rgb8(pal)[0, 0]) == (200, 10, 30)
    # RGBA: composited on black (half alpha halves the colour); opaque stays as it is
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = (200, 100, 50), 255
    rgba[:4, :, 3] = 128
    out = to_rgb8(Image.fromarray(rgba, "RGBA"))
    assert tuple(out[6, 0]) == (200, 100, 50) and tuple(out[0, 0]) == (100, 50, 25)
    la = Image.fromarray(np.dstack([np.full((4, 4), 90, np.uint8), np.full((4, 4), 255, np.uint8)]),
                         "LA")  # fmt: skip
    assert tuple(to_rgb8(la)[0, 0]) == (90, 90, 90)
    # CMYK JPEG (print workflows): converted to RGB colours, red stays red
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path, quality=95)
    r, g, b = load_image(path, 16)[8, 8].astype(int)
    assert r > 200 and g < 60 and b < 60
    # bilevel
    bw = Image.fromarray(np.eye(4, dtype=bool))
    assert bw.mode == "1" and set(np.unique(to_rgb8(bw)).tolist()) == {0, 255}


def test_unreadable_images_are_named_with_their_problem(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(gradient(0, 255, np.uint8)).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:60])
    text = tmp_path / "notes.png"
    text.write_text("this is not an image\n")
    paths = [good, truncated, text, tmp_path / "absent.png"]
    with pytest.raises(ImageReadError) as err:
        read_images(paths, 8, ["a.jsonl:1", "a.jsonl:2", "a.jsonl:3", "a.jsonl:4"])
    msg = str(err.value)
    assert msg.startswith("3 image(s)")
    assert f"a.jsonl:2: image {truncated} cannot be read (" in msg
    assert f"a.jsonl:3: image {text} cannot be read (" in msg
    assert f"a.jsonl:4: image {tmp_path / 'absent.png'} missing" in msg


# ------------------------------------------------------------------ jsonl helpers
def write_jsonl(root: Path, name: str, rows: list) -> None:
    root.mkdir(parents=True, exist_ok=True)
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    (root / name).write_text("\n".join(lines) + "\n")


def jsonl_cfg(root: Path, **over) -> FedmmConfig:
    return FedmmConfig().with_overrides({
        "data.benchmark": "jsonl", "data.data_dir": str(root), "model.image_size": 16,
        "model.backbone": "tiny", **over,
    })  # fmt: skip


@pytest.fixture()
def byo(tmp_path) -> Path:
    """Two clients by column, 6 train + 2 test records each, 4 PNG images."""
    root = tmp_path / "byo"
    (root / "img").mkdir(parents=True)
    for i in range(4):
        Image.fromarray(np.full((12, 12, 3), 40 * i, np.uint8)).save(root / "img" / f"{i}.png")
    rows = [{"image": f"img/{i % 4}.png", "text": f"q{i}", "answer": ["yes", "no"][i % 2],
             "client": i % 2} for i in range(16)]  # fmt: skip
    write_jsonl(root, "train.jsonl", rows[:12])
    write_jsonl(root, "test.jsonl", rows[12:])
    return root


def test_jsonl_unreadable_image_is_located_or_dropped_and_counted(byo):
    (byo / "img" / "x.png").write_text("not a png")
    rows = (byo / "train.jsonl").read_text().splitlines()
    rows[5] = json.dumps({"image": "img/x.png", "text": "q", "answer": "yes", "client": 1})
    (byo / "train.jsonl").write_text("\n".join(rows) + "\n")
    with pytest.raises(ImageReadError) as err:
        BENCHMARKS["jsonl"](jsonl_cfg(byo, **{"fed.clients": 2}))
    msg = str(err.value)
    assert "train.jsonl:6: image img/x.png cannot be read (" in msg
    assert msg.startswith("1 record(s)") and "data.skip_missing_images=true" in msg
    bench = BENCHMARKS["jsonl"](jsonl_cfg(byo, **{"fed.clients": 2,
                                                  "data.skip_missing_images": True}))  # fmt: skip
    assert bench.notes["unreadable_images_dropped"] == 1
    assert bench.notes["missing_images_dropped"] == 0
    assert sum(len(c.train) for c in bench.clients) == 11
    assert "1 with unreadable images dropped" in bench.description


def test_jsonl_16_bit_images_reach_the_split_with_their_range(byo):
    Image.fromarray(gradient(1000, 3000, np.uint16)).save(byo / "img" / "0.png")
    bench = BENCHMARKS["jsonl"](jsonl_cfg(byo, **{"fed.clients": 2}))
    image = bench.clients[0].train.images[0]  # record 0 uses img/0.png
    assert image.min() <= 5 and image.max() >= 250


# ------------------------------------------------------------------ kind 7: text errors located
def test_non_utf8_byte_names_file_line_byte_and_column(byo):
    data = (byo / "train.jsonl").read_bytes().split(b"\n")
    data[2] = data[2].replace(b'"q2"', b'"q\xe92"')
    (byo / "train.jsonl").write_bytes(b"\n".join(data))
    with pytest.raises(ValueError) as err:
        BENCHMARKS["jsonl"](jsonl_cfg(byo, **{"fed.clients": 2}))
    column = data[2].index(b"\xe9") + 1
    assert f"train.jsonl:3: not valid UTF-8 (byte 0xe9 at column {column})" in str(err.value)


@pytest.mark.parametrize("field", ["text", "image"])
def test_whitespace_only_text_or_image_is_a_located_error(byo, field):
    row = {"image": "img/0.png", "text": "q", "answer": "yes", "client": 0, field: "  \t "}
    write_jsonl(byo, "test.jsonl", [{**row, field: "ok" if field == "text" else "img/1.png"}, row])
    with pytest.raises(ValueError, match=rf"test.jsonl:2: field '{field}' must be a non-empty "
                                         "string, got only whitespace"):  # fmt: skip
        BENCHMARKS["jsonl"](jsonl_cfg(byo, **{"fed.clients": 2}))


def test_a_utf8_bom_and_crlf_line_ends_are_accepted(byo):
    data = (byo / "train.jsonl").read_bytes().replace(b"\n", b"\r\n")
    (byo / "train.jsonl").write_bytes(b"\xef\xbb\xbf" + data)
    bench = BENCHMARKS["jsonl"](jsonl_cfg(byo, **{"fed.clients": 2}))
    assert sum(len(c.train) for c in bench.clients) == 12


def test_vqa_rad_json_errors_name_file_and_line(tmp_path):
    from fedmm.data.vqa_rad import load_vqa_rad

    root = tmp_path / "vqa"
    (root / "images").mkdir(parents=True)
    rec = {"image_name": "a.png", "image_organ": "HEAD", "question": "q?", "question_type": "PRES",
           "answer": "yes", "answer_type": "CLOSED"}  # fmt: skip
    (root / "testset.json").write_text(json.dumps([rec]))
    (root / "trainset.json").write_bytes(b'[\n{"image_name": "a\xff.png"}\n]')
    with pytest.raises(
        ValueError, match=r"trainset.json:2: not valid UTF-8 \(byte 0xff at column 18\)"
    ):
        load_vqa_rad(str(root))
    (root / "trainset.json").write_text('[\n{"image_name": "a.png",\n}]')
    with pytest.raises(ValueError, match=r"trainset.json:3: invalid JSON"):
        load_vqa_rad(str(root))
    (root / "trainset.json").write_text(json.dumps([{**rec, "question": "   "}]))
    with pytest.raises(
        ValueError, match=r"trainset.json: record 0 .*'question' must be a non-empty"
    ):
        load_vqa_rad(str(root))


def test_config_toml_that_is_not_utf8_names_the_file(tmp_path):
    from fedmm.config import load_toml

    path = tmp_path / "c.toml"
    path.write_bytes(b"[train]\nlr = 0.01\n# caf\xe9\n")
    with pytest.raises(ConfigError, match=r"c.toml:3: not valid UTF-8 \(byte 0xe9 at column 6\)"):
        load_toml(path)


# ------------------------------------------------------------------ kind 6: what the loader did
def test_jsonl_answer_normalisation_is_on_by_default_counted_and_can_be_turned_off(byo):
    rows = [json.loads(x) for x in (byo / "test.jsonl").read_text().splitlines()]
    rows[0]["answer"] = " Yes"  # train says "yes": differs only by case and spacing
    rows[1]["answer"] = "NO  "
    rows.append({**rows[0], "answer": "maybe"})  # truly unseen
    write_jsonl(byo, "test.jsonl", rows)
    bench = BENCHMARKS["jsonl"](jsonl_cfg(byo, **{"fed.clients": 2}))
    assert bench.notes["normalize_answers"] is True and bench.notes["answers_normalised"] == 2
    assert bench.notes["test_unk"] == 1 and bench.answers == ["no", "yes", "<unk>"]
    assert bench.notes["records_read"] == {"train": 12, "test": 5}
    raw = BENCHMARKS["jsonl"](jsonl_cfg(byo, **{"fed.clients": 2, "data.normalize_answers": False}))
    assert raw.notes["answers_normalised"] == 0 and raw.notes["test_unk"] == 3


def test_loader_notes_are_formatted_for_the_user(byo):
    from fedmm.results.tables import loader_notes_lines

    bench = BENCHMARKS["jsonl"](jsonl_cfg(byo, **{"fed.clients": 2}))
    text = "\n".join(loader_notes_lines(bench.notes))
    assert "test answers unseen in training -> <unk>: 0" in text
    assert "answers normalised" in text and "records read" in text
    assert loader_notes_lines({}) == []


# ------------------------------------------------------------------ kind 3: empty clients
def test_a_client_without_test_rows_is_refused_naming_it_and_what_to_change(byo):
    rows = [json.loads(x) for x in (byo / "test.jsonl").read_text().splitlines()]
    write_jsonl(byo, "test.jsonl", [r for r in rows if r["client"] == 0])
    cfg = jsonl_cfg(byo, **{"fed.clients": 2, "cache_dir": str(byo / "cache")})
    with pytest.raises(ConfigError) as err:
        load_benchmark(cfg)
    msg = str(err.value)
    assert "client 1: 0 test rows" in msg and "data.allow_empty_clients=true" in msg
    assert "test.jsonl" in msg  # what to change for clients_by=column
    bench = load_benchmark(cfg.with_overrides({"data.allow_empty_clients": True}))
    assert bench.excluded == {"1": "0 test rows"}


@pytest.mark.parametrize("how", ["iid", "dirichlet"])
def test_iid_and_dirichlet_splits_that_leave_a_client_empty_are_refused(byo, how):
    rows = [json.loads(x) for x in (byo / "test.jsonl").read_text().splitlines()]
    write_jsonl(byo, "test.jsonl", rows[:1])  # one test record for 3 clients
    cfg = jsonl_cfg(byo, **{"fed.clients": 3, "data.clients_by": how})
    with pytest.raises(ConfigError, match=r"0 test rows.*fewer clients \(fed.clients=3\)"):
        load_benchmark(cfg)


def test_empty_test_split_has_no_score_and_empty_train_takes_no_step(tiny_cfg):
    import torch

    from fedmm.methods import ClientContext
    from fedmm.runtime import get_runtime

    runtime = get_runtime(tiny_cfg)
    train = runtime.client_split(0, "train")
    empty = train.subset(torch.arange(0))
    ctx = ClientContext(tiny_cfg, runtime.model, empty, empty, {}, 1, 0, 3, 6)
    assert ctx.score() == {} and ctx.accuracy() is None
    assert ctx.view("global", "personalized") == {}
    opt = ctx.optimizer([list(runtime.model.head.parameters())])
    assert list(ctx.steps(opt)) == [] and "steps" not in ctx.stats
    full = ClientContext(tiny_cfg, runtime.model, train, train, {}, 1, 0, 3, 6)
    assert 0.0 <= full.score()[""] <= 1.0


def test_vqa_rad_question_type_split_with_a_client_without_test_rows_is_refused(tmp_path):
    root = tmp_path / "vqa"
    (root / "images").mkdir(parents=True)
    train, test = [], []
    for i in range(6):
        name = f"synpic{i}.png"
        Image.fromarray(np.full((8, 8, 3), 30 * i, np.uint8)).save(root / "images" / name)
        rec = {"image_name": name, "image_organ": "HEAD", "question": f"q{i}?",
               "answer": "Yes ", "answer_type": "CLOSED"}  # fmt: skip
        train += [{**rec, "question_type": "PRES"}, {**rec, "question_type": "POS"}]
        test.append({**rec, "question_type": "PRES"})  # no POS question in the test set
    (root / "trainset.json").write_text(json.dumps(train))
    (root / "testset.json").write_text(json.dumps(test))
    cfg = FedmmConfig().with_overrides({"data.benchmark": "vqa-rad-qtype", "fed.clients": 2,
                                        "data.data_dir": str(root), "model.image_size": 8})  # fmt: skip
    with pytest.raises(ConfigError, match=r"client 0-POS: 0 test rows.*fewer clients"):
        load_benchmark(cfg)
    bench = load_benchmark(cfg.with_overrides({"data.allow_empty_clients": True}))
    assert bench.excluded == {"0-POS": "0 test rows"}
    assert bench.notes["answers_normalised"] == 18  # "Yes " -> "yes", train and test
