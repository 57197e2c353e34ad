"""A site's differential-privacy policy for one message: what it spends, what it lets leave.

The ClientApp (``clientapp.handle``) calls these in a round's order:

* ``check_mode`` -- before any training: ``dp-mode = "record"`` on a method or PEFT type that
  DP-SGD cannot serve is refused with the reason (``dpsgd.refusal``);
* ``spend`` -- before any training: the release this round will make (``privacy.Release``) is
  checked against the site's ``dp-max-epsilon`` and recorded in the site's one ledger
  (``privacy.Ledger``: keyed by the data the site holds, locked, written before the reply);
* ``train_metrics`` -- what a training reply says: with DP on, the exact pre-clip norm
  (``dp-norm``, ``dp-scale``), the training loss and a method's ``stat.*`` scores (TAP's
  validation accuracy, ...) are withheld -- they are computed from the data and are not covered
  by the noise; C, σ, the mode, δ and the ε spent so far are sent instead;
* ``gate_evaluation`` / ``evaluation_metrics`` -- an evaluation is counted against the site's
  limits (``privacy.EvaluationLog``) before it runs, and with DP on its scores are withheld
  unless the site sets ``dp-evaluation = "exact"`` (then they leave exactly, outside ε: a server
  that may choose the global state can probe the test data with them).

Reply keys (all scalars): ``dp-clip-norm`` C, ``dp-noise-multiplier`` σ, ``dp-mode`` (0 =
update, 1 = record; ``DP_MODES``), ``dp-delta`` δ, ``dp-epsilon`` (the site's cumulative ε after
this release, over every run; absent when infinite), and in record mode ``dp-sample-rate`` q and
``dp-steps`` T; an evaluation whose scores were withheld carries ``scores-withheld`` = 1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from fedmm.config import FedmmConfig
from fedmm.federation import consent, dpsgd
from fedmm.federation.messages import RefusedMessage
from fedmm.federation.privacy import (
    EvaluationLog,
    Ledger,
    PrivacyBudgetExceeded,
    Release,
    data_identity,
    ledger_path,
    state_digest,
)
from fedmm.runtime import SITES
from fedmm.sections import DPConfig, steps_per_round

DP_MODES = ("update", "record")  # the value of the reply's dp-mode is the index here
WITHHELD = ("dp-norm", "dp-scale", "loss")  # and every stat.*: computed from the data, not noised


def is_on(dp_cfg: DPConfig) -> bool:
    """Whether this message runs under DP (the effective clip norm is set)."""
    return dp_cfg.clip_norm > 0


def ledger(site) -> Ledger:
    """The one ledger of ``site``'s training data (``privacy.data_identity``)."""
    cfg, settings = site.cfg, site.settings
    identity = data_identity(
        cfg.data.benchmark, cfg.data.data_dir, site.runtime.schema.sha256(),
        -1 if cfg.data.benchmark == SITES else settings.partition_id,
    )  # fmt: skip
    # the site's one root (``consent.site_root``), where its audit log is and purge looks
    return Ledger(ledger_path(consent.site_root(settings), identity))


def check_mode(settings, dp_cfg: DPConfig, method, cfg: FedmmConfig) -> None:
    """Refuse (``RefusedMessage``) what this site's DP settings cannot serve: a budget without a
    clip norm, record-level DP-SGD for a method / PEFT type / accumulation it cannot run."""
    if settings.dp_max_epsilon > 0 and not is_on(dp_cfg):
        raise PrivacyBudgetExceeded(
            "this site has a privacy budget (dp-max-epsilon) but neither it nor the run sets a "
            "clip norm: an upload without DP has ε = ∞; set dp-clip-norm and "
            "dp-noise-multiplier in the site settings"
        )
    if is_on(dp_cfg) and settings.dp_mode == "record":
        reason = dpsgd.refusal(method, cfg)
        if reason:
            raise RefusedMessage(f"this site trains with record-level DP-SGD (dp-mode=record), "
                                 f"which cannot serve this run: {reason}")  # fmt: skip


def release(settings, dp_cfg: DPConfig, cfg: FedmmConfig, rows: int) -> Release:
    """The release one training round makes at a site with ``rows`` training records."""
    if settings.dp_mode == "update":
        return Release("update", dp_cfg.noise_multiplier, dp_cfg.clip_norm)
    steps = steps_per_round(cfg.train, rows) if rows > 0 else 0
    rate = min(1.0, cfg.train.batch_size / rows) if rows > 0 else 1.0
    return Release("record", dp_cfg.noise_multiplier, dp_cfg.clip_norm, rate, steps)


def spend(site, rel: Release, meta: Mapping, cfg: FedmmConfig) -> float:
    """Check ``rel`` against ``dp-max-epsilon`` and record it in the site's ledger, under its
    lock, before any training (``PrivacyBudgetExceeded`` when over budget; nothing recorded).
    Returns the site's ε after it.  The run id, round, method and PEFT type are written beside
    the release for the audit only."""
    audit = {"run": str(meta.get("run-id", "")), "round": int(meta.get("round", 0)),
             "method": cfg.method, "peft": cfg.peft.type, "seed": cfg.seed}  # fmt: skip
    settings = site.settings
    return ledger(site).spend(rel, settings.dp_delta, settings.dp_max_epsilon, audit)


def dp_sgd_for(rel: Release, cfg: FedmmConfig, rows: int) -> dpsgd.DPSGD | None:
    """The DP-SGD machinery of a record-level release (None for update level or no rows)."""
    if rel.mode != "record" or rows == 0:
        return None
    return dpsgd.DPSGD(rel.clip_norm, rel.noise_multiplier, cfg.train.batch_size, rows)


def train_metrics(metrics: dict, rel: Release | None, epsilon: float, delta: float) -> dict:
    """A training reply's metrics: unchanged without DP; with DP, ``WITHHELD`` and ``stat.*``
    removed and C, σ, mode, δ, ε (and q, T for record level) added."""
    if rel is None:
        return metrics
    out = {k: v for k, v in metrics.items() if k not in WITHHELD and not k.startswith("stat.")}
    out |= {"dp-clip-norm": rel.clip_norm, "dp-noise-multiplier": rel.noise_multiplier,
            "dp-mode": DP_MODES.index(rel.mode), "dp-delta": delta}  # fmt: skip
    if rel.mode == "record":
        out |= {"dp-sample-rate": rel.sample_rate, "dp-steps": rel.steps}
    if math.isfinite(epsilon):
        out["dp-epsilon"] = epsilon
    return out


def evaluation_limits(settings, dp_on: bool) -> tuple[int, int]:
    """(per run, per state) evaluation limits in force; 0 = none.  The settings' ``-1`` (auto)
    is 1000 per run and 1 per state with DP on, no limit without DP."""
    per_run, per_state = settings.max_evaluations_per_run, settings.max_evaluations_per_state
    if per_run < 0:
        per_run = 1000 if dp_on else 0
    if per_state < 0:
        per_state = 1 if dp_on else 0
    return per_run, per_state


def gate_evaluation(site, dp_on: bool, meta: Mapping, global_arrays: Mapping) -> None:
    """Count this evaluation against the site's limits before it runs (``EvaluationLimit``:
    refused, nothing counted)."""
    per_run, per_state = evaluation_limits(site.settings, dp_on)
    if per_run == 0 and per_state == 0:
        return
    log = EvaluationLog(ledger(site).path)
    log.count(str(meta.get("run-id", "")), state_digest(global_arrays), per_run, per_state)


def evaluation_metrics(
    views: Mapping[str, float], settings, dp_on: bool, val: Mapping[str, float] | None = None
) -> dict:
    """``acc.<view>`` per view and ``val.<view>`` per validation score (``val``, early
    stopping); with DP on and ``dp-evaluation = "withhold"``: none of either, and
    ``scores-withheld`` = 1.  With DP on (``dp_on``: the site's scores are guarded) validation
    scores never leave, even under ``dp-evaluation = "exact"``: they score *training* records,
    the ones ε protects, and "exact" consents to test scores only."""
    if dp_on and settings.dp_evaluation == "withhold":
        return {"scores-withheld": 1}
    released = {f"acc.{view}": acc for view, acc in views.items()}
    if not dp_on:
        released |= {f"val.{view}": score for view, score in (val or {}).items()}
    return released


__all__ = ["DP_MODES", "WITHHELD", "check_mode", "dp_sgd_for", "evaluation_limits",
           "evaluation_metrics", "gate_evaluation", "is_on", "ledger", "release", "spend",
           "train_metrics"]  # fmt: skip
