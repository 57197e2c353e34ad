"""Options for many clients and small uploads: evaluation sampling, client seconds in the record,
update compression (fp16 / int8) decoded transparently by ``messages.from_record``."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import run_federation
from flwr.app import MessageType

from fedmm import results
from fedmm.config import ConfigError
from fedmm.federation import messages
from tests.test_serverapp import InProcessGrid

pytestmark = pytest.mark.usefixtures("flower_task_identity")


def arrays(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "adapter.global_adapter/0.down.weight": rng.normal(0, 0.02, (6, 16)).astype(np.float32),
        "head/0.weight": (1 + rng.normal(0, 0.01, 64)).astype(np.float32),  # LayerNorm-like
        "proj/bias": np.zeros(16, np.float32),  # constant: exact under int8
        "head/4.bias": rng.normal(0, 3.0, 7).astype(np.float32),
    }


def test_default_encoding_is_unchanged_float32():
    a = arrays()
    record = messages.to_record(a)
    assert set(record.keys()) == set(a)
    assert all(record[k].dtype == "float32" for k in a)
    back = messages.from_record(record)
    assert all(np.array_equal(back[k], a[k]) for k in a)
    reply = messages.client_reply(a, {"seconds": 1.0})  # default compression: none
    assert reply[messages.UPDATE].count_bytes() == record.count_bytes()


@pytest.mark.parametrize("compression", ["fp16", "int8"])
def test_compression_round_trips_within_its_bound_and_shrinks_the_upload(compression):
    a = arrays()
    record = messages.to_record(a, compression)
    back = messages.from_record(record)
    assert set(back) == set(a)  # original keys only: the scale travels beside, decoded away
    for k, v in a.items():
        assert back[k].dtype == np.float32 and back[k].shape == v.shape
        err = np.abs(back[k] - v).max()
        if compression == "fp16":
            assert err <= np.abs(v).max() * 2.0**-11 + 1e-7
        else:
            step = (v.max() - v.min()) / 255
            assert err <= step / 2 + 1e-6 * max(1.0, np.abs(v).max())
    assert np.array_equal(back["proj/bias"], a["proj/bias"])
    big = {"w": np.random.default_rng(1).normal(size=(384, 48)).astype(np.float32)}
    plain = messages.to_record(big).count_bytes()
    small = messages.to_record(big, compression).count_bytes()
    assert small < plain * (0.55 if compression == "fp16" else 0.3)


def test_unknown_compression_is_refused():
    with pytest.raises(ConfigError, match="fed.compression"):
        messages.to_record(arrays(), "int4")


def test_eval_sampling_records_client_seconds_and_compresses_uploads(tiny_cfg):
    cfg = tiny_cfg.with_overrides({
        "method": "fedavg", "fed.rounds": 3, "fed.fraction": 0.3, "fed.eval_fraction": 0.3,
        "fed.eval_every": 2, "fed.compression": "int8",
    })  # fmt: skip
    grid = InProcessGrid(3)
    record = run_federation(grid, cfg)
    evaluated = {r: [n for n, k, rr in grid.sent if k == MessageType.EVALUATE and rr == r]
                 for r in (1, 2, 3)}  # fmt: skip
    assert [len(evaluated[r]) for r in (1, 2, 3)] == [0, 1, 3]  # every 2nd, and all at the end
    hist = record["history"]
    assert [h["evaluated"] for h in hist] == [0, 1, 3]
    assert hist[0]["clients"] == {} and hist[0]["eval"] == {}
    assert all(e["seconds"] > 0 for e in hist[2]["eval"].values())
    assert all(t["seconds"] > 0 for h in hist for t in h["train"].values())
    assert set(results.scored_views(record)) == {"shared", "shared+head", "personal"}
    assert {"global", "personalized"} <= set(record["final"])  # the old names, for one release
    plain = run_federation(
        InProcessGrid(3), cfg.with_overrides({"fed.compression": "none", "fed.rounds": 1})
    )
    assert hist[0]["bytes_up"] < 0.3 * plain["history"][0]["bytes_up"]


def test_eval_options_are_validated(tiny_cfg):
    with pytest.raises(ConfigError, match="eval_every"):
        run_federation(InProcessGrid(3), tiny_cfg.with_overrides({"fed.eval_every": 0}))


def test_cli_rejects_bad_eval_and_compression_options_before_running(capsys, tmp_path):
    from fedmm.cli import main

    out = tmp_path / "never"
    assert main(["run", "--set", "fed.compression=int4", "--out", str(out)]) == 2
    assert "fed.compression 'int4'; choices: none, fp16, int8" in capsys.readouterr().err
    assert main(["run", "--set", "fed.eval_fraction=0", "--out", str(out)]) == 2
    assert "fed.eval_fraction" in capsys.readouterr().err
    assert not out.exists()
