"""Experiment tracking (tracking.py): what a 2-round run leaves in TensorBoard and in MLflow, read
back with each library's own reader."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from conftest import run_federation
from test_serverapp import InProcessGrid

from fedmm import tracking
from fedmm.cli import main
from fedmm.config import ConfigError
from fedmm.validate import validate_config

TINY_KEYS = ("model.backbone", "model.image_size", "data.train_per_client",
             "data.test_per_client", "train.local_steps", "train.batch_size", "progress")  # fmt: skip


def event_scalars(log_dir: Path) -> tuple[dict[str, list[tuple[int, float]]], object]:
    """Every scalar tag of the event files in ``log_dir``: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in tags}, acc


def expected(run: dict, entry: dict) -> dict[str, float]:
    """The figures results.json holds for one round, independently of round_metrics."""
    excluded = run.get("excluded_clients", {})
    views = {v for scores in entry["clients"].values() for v in scores}
    out = {}
    for view in views:
        accs = [s[view] for c, s in entry["clients"].items() if c not in excluded and view in s]
        out[f"accuracy/{tracking.metric_name(view)}/mean"] = sum(accs) / len(accs)
        for client, scores in entry["clients"].items():
            if view in scores:
                out[f"accuracy/{tracking.metric_name(view)}/client/{client}"] = scores[view]
    for client, t in entry["train"].items():
        out[f"loss/train/client/{client}"] = t["loss"]
    out["bytes/up"], out["bytes/down"] = entry["bytes_up"], entry["bytes_down"]
    out["seconds/round"], out["failures/train"] = entry["seconds"], entry["failures"]
    return out


@pytest.mark.usefixtures("flower_task_identity")
def test_tensorboard_event_file_holds_every_round_of_a_federated_run(tiny_cfg):
    # node 101 crashes whenever it is sampled: failures must show up too
    cfg = tiny_cfg.with_overrides({"method": "feddat", "track": "tensorboard"})
    record = run_federation(InProcessGrid(3, failing={101}), cfg)
    log_dirs = list((Path(cfg.out_dir) / "tensorboard").iterdir())
    assert [d.name for d in log_dirs] == ["feddat-adapter-fmnist-domain-seed0"]
    scalars, acc = event_scalars(log_dirs[0])
    assert len(record["history"]) == 2
    for entry in record["history"]:
        for name, value in expected(record, entry).items():
            steps = dict(scalars[name])
            assert steps[entry["round"]] == pytest.approx(value, rel=1e-6), name
    assert sum(v for _, v in scalars["failures/train"]) == 2  # the crashing node, each round
    assert {"clients/evaluated", "bytes/eval", "seconds/server"} <= set(scalars)
    # FedDAT's view kinds, MLflow-safe names ('+' -> '_'), both rounds
    assert [s for s, _ in scalars["accuracy/shared_head/mean"]] == [1, 2]
    assert [s for s, _ in scalars["accuracy/personal/mean"]] == [1, 2]
    # the config, the summary table and the curves
    texts = acc.Tags()["tensors"]
    assert {"config/text_summary", "summary/text_summary"} <= set(texts)
    config = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| feddat.temperature | 3.0 |" in config
    summary = acc.Tensors("summary/text_summary")[0].tensor_proto.string_val[0].decode()
    assert summary == (Path(cfg.out_dir) / "summary.md").read_text()
    assert acc.Images("curves")[0].width > 100


def test_mlflow_run_holds_the_round_metrics_of_a_flower_simulation(tiny_cfg, tmp_path):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "mlflow-run"
    args = ["run", "--method", "fedavg", "--rounds", "2", "--clients", "2", "--out", str(out),
            "--track", "mlflow"]  # fmt: skip
    for key in TINY_KEYS:
        args += ["--set", f"{key}={tiny_cfg.to_flat()[key]}"]
    assert main(args) == 0
    run = json.loads((out / "results.json").read_text())["runs"][0]
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(f"fedmm {out.resolve()}")
    (mlrun,) = client.search_runs([experiment.experiment_id])
    assert mlrun.info.status == "FINISHED"
    assert mlrun.data.tags["fedmm.run_id"] == run["run_id"]
    assert mlrun.data.params["fed.rounds"] == "2" and mlrun.data.params["method"] == "fedavg"
    assert len(mlrun.data.params) == len(run["config"])  # the whole config, as params
    for entry in run["history"]:
        for name, value in expected(run, entry).items():
            history = {m.step: m.value for m in client.get_metric_history(mlrun.info.run_id, name)}
            assert history[entry["round"]] == pytest.approx(value, rel=1e-6), name
    artifacts = {a.path for a in client.list_artifacts(mlrun.info.run_id)}
    assert artifacts == {"summary.md", "curves.png"}
    assert (out / "mlartifacts").is_dir()  # local artifacts beside the store


def test_a_bench_logs_one_run_per_cell_grouped(tiny_cfg, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    elsewhere = tmp_path / "server" / "mlflow.db"
    elsewhere.parent.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{elsewhere}")  # the user's own store
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "my-bench")
    monkeypatch.chdir(tmp_path)  # artifacts: where that store puts them (sqlite: ./mlruns)
    for track in ("mlflow", "tensorboard"):
        out = tmp_path / f"bench-{track}"
        args = ["bench", "--method", "centralized", "--seeds", "0,1", "--rounds", "2",
                "--clients", "2", "--out", str(out), "--track", track]  # fmt: skip
        for key in TINY_KEYS:
            args += ["--set", f"{key}={tiny_cfg.to_flat()[key]}"]
        assert main(args) == 0
    cells = sorted(d.name for d in (tmp_path / "bench-tensorboard" / "tensorboard").iterdir())
    assert cells == [f"centralized-adapter-fmnist-domain-seed{s}" for s in (0, 1)]
    for cell in cells:
        scalars, _ = event_scalars(tmp_path / "bench-tensorboard" / "tensorboard" / cell)
        assert [s for s, _ in scalars["accuracy/shared/mean"]] == [1, 2]
    assert not (tmp_path / "bench-mlflow" / "mlflow.db").exists()  # MLFLOW_TRACKING_URI won
    assert not (tmp_path / "bench-mlflow" / "mlartifacts").exists()
    client = MlflowClient(tracking_uri=f"sqlite:///{elsewhere}")
    experiment = client.get_experiment_by_name("my-bench")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.tags["fedmm.seed"] for r in runs) == ["0", "1"]
    assert {r.data.tags["fedmm.method"] for r in runs} == {"centralized"}
    for r in runs:
        assert [m.step for m in client.get_metric_history(r.info.run_id,
                                                          "accuracy/shared/mean")] == [1, 2]  # fmt: skip


def test_round_metrics_per_task_dp_epsilon_and_excluded_clients():
    run = {"tasks": {"a": "vqa", "b": "vqa", "c": "cls"}, "excluded_clients": {"c": "0 test rows"}}
    entry = {
        "round": 3, "seconds": 2.0, "server_seconds": 0.5, "bytes_up": 10, "bytes_down": 20,
        "bytes_eval": 30, "sampled": 3, "failures": 1, "eval_failed": [{"client": "b"}],
        "evaluated": 3,
        "clients": {"a": {"shared": 0.5, "shared.closed": 1.0}, "b": {"shared": 0.25},
                    "c": {"shared": 0.0}},
        "train": {"a": {"loss": 1.0, "dp-epsilon": 2.0}, "b": {"loss": 3.0, "dp-epsilon": 4.0}},
    }  # fmt: skip
    m = tracking.round_metrics(run, entry)
    assert m["accuracy/shared/mean"] == 0.375  # c is excluded from the mean, as in results
    assert m["accuracy/shared/task/vqa"] == 0.375 and "accuracy/shared/task/cls" not in m
    assert m["accuracy/shared.closed/mean"] == 1.0  # a question group of a view
    assert m["accuracy/shared/client/c"] == 0.0  # but its own score is still shown
    assert m["loss/train/mean"] == 2.0 and m["loss/train/client/b"] == 3.0
    assert m["dp/epsilon/max"] == 4.0 and m["dp/epsilon/client/a"] == 2.0
    assert m["failures/train"] == 1 and m["failures/eval"] == 1 and m["clients/trained"] == 2


def test_a_missing_tracker_library_is_a_clear_error(tiny_cfg, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlflow" else real(name, *a))  # fmt: skip
    with pytest.raises(ConfigError, match=r"mlflow package is not installed; pip install"):
        validate_config(tiny_cfg.with_overrides({"track": "mlflow"}))
    with pytest.raises(
        ConfigError, match=r"unknown track 'wandb'; choices: \"\" \(none\), tensorboard, mlflow"
    ):
        validate_config(tiny_cfg.with_overrides({"track": "wandb"}))
    validate_config(tiny_cfg.with_overrides({"track": "tensorboard"}))  # installed: no error


@pytest.mark.usefixtures("flower_task_identity")
@pytest.mark.parametrize("track", ["mlflow", "tensorboard"])
def test_a_resumed_run_continues_its_tracked_run(tiny_cfg, track):
    from test_resume import CrashingGrid, Interrupted

    cfg = tiny_cfg.with_overrides({"method": "fedavg", "fed.rounds": 3, "track": track})
    with pytest.raises(Interrupted):
        run_federation(CrashingGrid(3, crash_round=3), cfg)
    record = run_federation(InProcessGrid(3), cfg.with_overrides({"resume": True}))
    means = {h["round"]: expected(record, h)["accuracy/shared/mean"] for h in record["history"]}
    out = Path(cfg.out_dir)
    if track == "mlflow":
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
        experiment = client.get_experiment_by_name(f"fedmm {out.resolve()}")
        (mlrun,) = client.search_runs([experiment.experiment_id])  # one run, not two
        assert mlrun.info.status == "FINISHED"
        history = client.get_metric_history(mlrun.info.run_id, "accuracy/shared/mean")
        got = {m.step: m.value for m in history}
        assert sorted(m.step for m in history) == [1, 2, 3]  # the crashed round 3 left nothing
    else:
        # the crashed process logged round 3's training nothing: its round never ended; the
        # resumed one's steps replace whatever the first file held from step 3 on
        scalars, _ = event_scalars(out / "tensorboard" / "fedavg-adapter-fmnist-domain-seed0")
        got = dict(scalars["accuracy/shared/mean"])
        assert [s for s, _ in scalars["accuracy/shared/mean"]] == [1, 2, 3]
    assert got == pytest.approx(means, rel=1e-6)
