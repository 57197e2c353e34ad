"""Experiment tracking: every round of a run in TensorBoard or MLflow, beside results.json.

``track = "tensorboard"`` or ``"mlflow"`` (``fedmm run --track ...``; ``""``, the default, logs
nothing) sends what ``results.json`` records for each round to the tracker, written by the
libraries' own writers (``torch.utils.tensorboard.SummaryWriter`` / ``mlflow.MlflowClient``), on
this machine only:

* **TensorBoard**: event files in ``<out_dir>/tensorboard/<run name>/`` (one directory per run,
  so a bench has one per cell); ``tensorboard --logdir <out_dir>/tensorboard`` shows them.
* **MLflow**: a local SQLite store ``<out_dir>/mlflow.db`` with artifacts in
  ``<out_dir>/mlartifacts/`` (MLflow 3 refuses new ``./mlruns`` file stores), unless
  ``MLFLOW_TRACKING_URI`` points elsewhere.  One experiment per output directory (a bench's cells
  share it; ``MLFLOW_EXPERIMENT_NAME`` overrides the name), one MLflow run per fedmm run, tagged
  with its method, variant, PEFT type, benchmark and seed.  ``mlflow ui --backend-store-uri
  sqlite:///<out_dir>/mlflow.db`` shows them.

Per round (the step is the round number), names as in ``round_metrics``: mean accuracy per view
(``accuracy/<view>/mean``, a benchmark's question groups as ``<view>.<group>``), per task and per
client; training loss (mean and per client); bytes up, down and for evaluation; seconds (round,
server); clients sampled, trained, evaluated; failures; the sites' DP ε.  The configuration goes in
as parameters (TensorBoard: the HParams tab and a text table), and when the run ends the out
directory's ``summary.md`` and ``curves.png`` as artifacts.

The round loop calls ``track(cfg, run)`` and ``Tracker.log_round(entry)``; it never knows which
tracker runs.  A resumed run continues the same MLflow run (found by fedmm's ``run_id`` tag) and,
in TensorBoard, replaces the steps from the first resumed round on (``purge_step``).
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fedmm import results
from fedmm.config import ConfigError, FedmmConfig, run_name

log = logging.getLogger(__name__)

TRACKERS = ("tensorboard", "mlflow")
# the import name of what each tracker needs, and the command that installs it
REQUIRES = {"tensorboard": "tensorboard", "mlflow": "mlflow"}
INSTALL = "pip install 'fedmm[track]' (or: pip install tensorboard==2.21.0 mlflow-skinny==3.17.2)"


def check(track: str) -> None:
    """Raise ``ConfigError`` unless ``track`` is ``""`` or a tracker whose library is installed
    (what to install is in the message)."""
    if not track:
        return
    if track not in TRACKERS:
        raise ConfigError(f"track={track!r}: choices are {', '.join(TRACKERS)} (or '' for none)")
    if importlib.util.find_spec(REQUIRES[track]) is None:
        raise ConfigError(
            f"track={track}: the {REQUIRES[track]} package is not installed; {INSTALL}"
        )


def metric_name(name: str) -> str:
    """``name`` with every character MLflow refuses in a metric name (anything but letters,
    digits, ``_ . - / :`` and space) replaced by ``_``: ``shared+head`` -> ``shared_head``.  Both
    trackers use the same names."""
    return re.sub(r"[^/\w.\- :]", "_", name)


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if isinstance(v, int | float) and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def round_metrics(run: dict, entry: dict) -> dict[str, float]:
    """The scalars of one round (``entry``, as ``results.add_round`` stores it) of ``run``:

    * ``accuracy/<view>/mean``: mean over the included clients (``results.mean_views``; excluded
      clients are left out as in results.json); ``accuracy/<view>/task/<task>`` (multi-task
      runs) and ``accuracy/<view>/client/<client>``;
    * ``loss/train/mean`` and ``loss/train/client/<client>``: each trained client's mean training
      loss of the round;
    * ``bytes/up``, ``bytes/down``, ``bytes/eval`` (tensor bytes, all clients); ``seconds/round``
      (wall clock), ``seconds/server`` (aggregation);
    * ``clients/sampled``, ``clients/trained``, ``clients/evaluated``; ``failures/train`` (sampled
      clients not aggregated: errors, time-outs, rejected replies), ``failures/eval``;
    * ``dp/epsilon/max`` and ``dp/epsilon/client/<client>``: the ε each DP site reports.

    A round without evaluation has no accuracy entries."""
    excluded = run.get("excluded_clients", {})
    out: dict[str, float] = {}
    for view, acc in results.mean_views(entry["clients"], excluded).items():
        out[f"accuracy/{view}/mean"] = acc
    for task in sorted(set(run.get("tasks", {}).values())):
        members = {c: m for c, m in entry["clients"].items() if run["tasks"].get(c) == task}
        for view, acc in results.mean_views(members, excluded).items():
            out[f"accuracy/{view}/task/{task}"] = acc
    for client, scores in entry["clients"].items():
        for view, acc in scores.items():
            if isinstance(acc, int | float) and math.isfinite(acc):
                out[f"accuracy/{view}/client/{client}"] = float(acc)
    losses = {c: t["loss"] for c, t in entry["train"].items() if "loss" in t}
    mean_loss = _mean(list(losses.values()))
    if mean_loss is not None:
        out["loss/train/mean"] = mean_loss
    for client, loss in losses.items():
        if math.isfinite(loss):
            out[f"loss/train/client/{client}"] = float(loss)
    for key in ("up", "down", "eval"):
        out[f"bytes/{key}"] = float(entry[f"bytes_{key}"])
    out["seconds/round"] = float(entry["seconds"])
    out["seconds/server"] = float(entry.get("server_seconds", 0.0))
    out["clients/sampled"] = float(entry.get("sampled", 0))
    out["clients/trained"] = float(len(entry["train"]))
    out["clients/evaluated"] = float(entry.get("evaluated", 0))
    out["failures/train"] = float(entry.get("failures", 0))
    out["failures/eval"] = float(len(entry.get("eval_failed", [])))
    epsilons = {c: t["dp-epsilon"] for c, t in entry["train"].items() if "dp-epsilon" in t}
    if epsilons:
        out["dp/epsilon/max"] = float(max(epsilons.values()))
        for client, eps in epsilons.items():
            out[f"dp/epsilon/client/{client}"] = float(eps)
    return {metric_name(k): v for k, v in out.items()}


def run_tags(run: dict) -> dict[str, str]:
    """What identifies a fedmm run in a tracker (MLflow tags; TensorBoard's text)."""
    return {
        "fedmm.run_id": run["run_id"],
        "fedmm.method": run["method"],
        "fedmm.variant": run.get("variant", "") or run["method"],
        "fedmm.peft": run["peft"],
        "fedmm.benchmark": run["benchmark"],
        "fedmm.seed": str(run["seed"]),
    }


def artifacts(out_dir: str | Path) -> list[Path]:
    """The out directory's summary table and curves (written by ``results.save_run``)."""
    return [p for p in (Path(out_dir) / "summary.md", Path(out_dir) / "curves.png") if p.is_file()]


class Tracker:
    """No tracking (``track = ""``); the interface of the trackers below."""

    def log_round(self, entry: dict) -> None:
        """Log one round (``results.add_round``'s entry) at step ``entry["round"]``."""

    def close(self, ok: bool) -> None:
        """End the run: on success with the out directory's artifacts; ``ok=False``: failed."""


class TensorBoardTracker(Tracker):
    """Event files in ``<out_dir>/tensorboard/<run name>/`` (``torch.utils.tensorboard``)."""

    def __init__(self, cfg: FedmmConfig, run: dict) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.cfg, self.run = cfg, run
        self.log_dir = Path(cfg.out_dir) / "tensorboard" / run_name(cfg, run["benchmark"])
        first = len(run["history"]) + 1
        # events from step `first` on in earlier files of this directory (a run redone, or the
        # rounds after a resumed run's checkpoint) are hidden: the new ones replace them
        self.writer = SummaryWriter(str(self.log_dir), purge_step=0 if first == 1 else first)
        if first == 1:
            table = "\n".join(
                f"| {k} | {v} |" for k, v in {**run_tags(run), **cfg.to_flat()}.items()
            )
            self.writer.add_text("config", "| option | value |\n|---|---|\n" + table, 0)

    def log_round(self, entry: dict) -> None:
        for name, value in round_metrics(self.run, entry).items():
            self.writer.add_scalar(name, value, entry["round"])
        self.writer.flush()

    def close(self, ok: bool) -> None:
        if ok:
            self._hparams()
            step = len(self.run["history"])
            for path in artifacts(self.cfg.out_dir):
                if path.suffix == ".md":
                    self.writer.add_text(path.stem, path.read_text(), step)
                else:
                    import numpy as np
                    from PIL import Image

                    with Image.open(path) as image:
                        pixels = np.asarray(image.convert("RGB"))
                    self.writer.add_image(path.stem, pixels, step, dataformats="HWC")
        self.writer.close()

    def _hparams(self) -> None:
        """The config in TensorBoard's HParams tab, against the final mean accuracies."""
        from torch.utils.tensorboard.summary import hparams

        final = {f"accuracy/{metric_name(v)}/mean": a for v, a in self.run["final"].items()
                 if isinstance(a, int | float) and math.isfinite(a)}  # fmt: skip
        params = {k: v for k, v in self.cfg.to_flat().items() if isinstance(v, int | float | str)}
        for summary in hparams(params, final):
            self.writer.file_writer.add_summary(summary)


class MLflowTracker(Tracker):
    """One MLflow run per fedmm run (``mlflow.MlflowClient``), in the experiment of its out
    directory."""

    def __init__(self, cfg: FedmmConfig, run: dict) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.cfg, self.run = cfg, run
        out = Path(cfg.out_dir).resolve()
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{out / 'mlflow.db'}"
        self.client = client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or f"fedmm {out}"
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            experiment_id = client.create_experiment(
                name, artifact_location=None if "MLFLOW_TRACKING_URI" in os.environ
                else (out / "mlartifacts").as_uri(), tags={"fedmm.out_dir": str(out)},
            )  # fmt: skip
        else:
            experiment_id = experiment.experiment_id
        found = client.search_runs(
            [experiment_id], filter_string=f"tags.`fedmm.run_id` = '{run['run_id']}'"
        )
        if found:  # a resumed run: the same MLflow run goes on
            self.run_id = found[0].info.run_id
            client.update_run(self.run_id, status="RUNNING")
        else:
            label = f"{results.label(run)} seed {run['seed']}"
            self.run_id = client.create_run(experiment_id, run_name=label,
                                            tags=run_tags(run)).info.run_id  # fmt: skip
            params = [Param(k, str(v)) for k, v in cfg.to_flat().items()]
            for start in range(0, len(params), 100):  # MLflow takes at most 100 per batch
                client.log_batch(self.run_id, params=params[start : start + 100])

    def log_round(self, entry: dict) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, entry["round"])
                   for k, v in round_metrics(self.run, entry).items()]  # fmt: skip
        for start in range(0, len(metrics), 1000):  # MLflow's batch limit
            self.client.log_batch(self.run_id, metrics=metrics[start : start + 1000])

    def close(self, ok: bool) -> None:
        if ok:
            for path in artifacts(self.cfg.out_dir):
                self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, status="FINISHED" if ok else "FAILED")


@contextmanager
def track(cfg: FedmmConfig, run: dict) -> Iterator[Tracker]:
    """The tracker of ``cfg.track`` for ``run`` (a run record, ``results.new_run``), closed when
    the block ends: with the artifacts when it ends normally, marked failed when it raises.
    ``ConfigError`` when the tracker's library is missing (``check``)."""
    check(cfg.track)
    kinds = {"tensorboard": TensorBoardTracker, "mlflow": MLflowTracker}
    tracker = kinds[cfg.track](cfg, run) if cfg.track else Tracker()
    try:
        yield tracker
    except BaseException:
        tracker.close(ok=False)
        raise
    tracker.close(ok=True)
