"""Early stopping on a validation split (``data.val_frac``, ``fed.early_stopping_patience``,
``federation/early_stopping.py``): the held-out rows, the rule, its refusals, and runs that stop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedmm.bench import _same
from fedmm.config import ConfigError, FedmmConfig
from fedmm.engine import run_method
from fedmm.federation import early_stopping, sitedp, validation
from fedmm.federation.site import SiteSettings
from fedmm.runtime import get_runtime, held_out
from fedmm.validate import validate_config


@pytest.mark.parametrize("n, frac, n_out", [(100, 0.1, 10), (10, 0.01, 1), (2, 0.9, 1), (1, 0.5, 0),
                                            (0, 0.5, 0), (7, 0.0, 0)])  # fmt: skip
def test_held_out_rows_are_disjoint_complete_and_fixed_by_the_seed(n, frac, n_out):
    kept, out = held_out(n, frac, seed=3)
    assert len(out) == n_out and len(kept) == n - n_out
    assert sorted(torch.cat([kept, out]).tolist()) == list(range(n))
    again = held_out(n, frac, seed=3)
    assert torch.equal(again[1], out) and torch.equal(again[0], kept)
    if n >= 10:
        assert not torch.equal(held_out(n, frac, seed=4)[1], out)  # another seed, other rows


def cfg_with(**fed) -> FedmmConfig:
    return FedmmConfig().with_overrides(
        {"data.val_frac": 0.2, **{f"fed.{k}": v for k, v in fed.items()}}
    )


def rounds(*means: float | None, view: str = "shared") -> list:
    """One round per value: two clients whose validation score averages to it (None: no
    validation score that round)."""
    return [(r, {} if m is None else {"a": {view: m / 100 - 0.01}, "b": {view: m / 100 + 0.01}})
            for r, m in enumerate(means, 1)]  # fmt: skip


@pytest.mark.parametrize("means, patience, delta, stop", [
    ((50, 60, 70), 1, 0.0, None),  # still improving
    ((50, 60, 55), 1, 0.0, (3, 2)),  # one evaluation without a new best: stop after it
    ((50, 60, 55, 58), 2, 0.0, (4, 2)),  # two in a row
    ((50, 60, 55, 61), 2, 0.0, None),  # the second beat the best: the count restarts
    ((50, 60, 60.4, 60.45), 2, 0.5, (4, 2)),  # gains below min_delta are no improvement
    ((50, 60, 60.6), 1, 0.5, None),  # above it they are
    ((50, 60, None, None, 55), 1, 0.0, (5, 2)),  # rounds without a score count neither way
    ((None, None), 1, 0.0, None),  # never a score: never stops
])  # fmt: skip
def test_the_patience_rule(means, patience, delta, stop):
    cfg = cfg_with(early_stopping_patience=patience, early_stopping_min_delta=delta)
    decision = early_stopping.decide(cfg, rounds(*means))
    if stop is None:
        assert decision is None
    else:
        assert (decision["round"], decision["best_round"]) == stop
        assert decision["view"] == "shared" and decision["patience"] == patience


def test_off_never_stops_and_the_view_is_the_methods_first_or_the_one_named():
    assert early_stopping.decide(cfg_with(), rounds(60, 50, 40)) is None
    ditto = cfg_with(early_stopping_patience=1).with_overrides({"method": "ditto"})
    assert early_stopping.stopping_view(ditto) == "shared"
    personal = ditto.with_overrides({"fed.early_stopping_view": "personal"})
    assert early_stopping.stopping_view(personal) == "personal"
    # the personal view decides: its scores fall while the shared ones rise
    history = [(r, {"a": {"shared": 0.1 * r, "personal": 0.9 - 0.1 * r}}) for r in (1, 2)]
    assert early_stopping.decide(ditto, history) is None
    assert early_stopping.decide(personal, history)["round"] == 2


@pytest.mark.parametrize("overrides, match", [
    ({"fed.early_stopping_patience": 2, "data.val_frac": 0.0}, "needs a validation split"),
    ({"fed.early_stopping_patience": 2, "fed.eval_fraction": 0.5}, "fed.eval_fraction=0.5"),
    ({"fed.early_stopping_patience": 2, "method": "tap"}, "stage 2"),
    ({"fed.early_stopping_patience": 2, "fed.early_stopping_view": "distilled"},
     "'fedavg' scores the views"),
    ({"data.val_frac": 0.95}, r"data.val_frac must be a finite number in \[0, 0.9\]"),
])  # fmt: skip
def test_early_stopping_that_cannot_run_is_refused_before_anything_starts(overrides, match):
    cfg = FedmmConfig().with_overrides({"data.val_frac": 0.2, **overrides})
    with pytest.raises(ConfigError, match=match):
        validate_config(cfg)


def test_validation_scores_leave_a_site_only_as_its_test_scores_do():
    views, val = {"shared": 0.5}, {"shared": 0.25}
    sent = sitedp.evaluation_metrics(views, SiteSettings(), False, val)
    assert sent == {"acc.shared": 0.5, "val.shared": 0.25}
    withhold = SiteSettings(dp_evaluation="withhold")
    assert sitedp.evaluation_metrics(views, withhold, True, val) == {"scores-withheld": 1}


def test_the_server_checks_validation_scores_like_accuracies():
    spec = validation.UploadSpec({}, 0, 10, 2)
    metrics = {"client-index": 1, "acc.shared": 0.5, "val.shared": 0.75}
    assert validation.check_eval_metrics(metrics, spec) == (1, {"shared": 0.5})
    assert validation.check_eval_metrics(metrics, spec, prefix="val.") == (1, {"shared": 0.75})
    with pytest.raises(validation.InvalidReply, match="'val.shared' = 7"):
        validation.check_eval_metrics(metrics | {"val.shared": 7}, spec, prefix="val.")


def test_the_validation_split_is_held_out_of_training(tiny_cfg):
    cfg = tiny_cfg.with_overrides({"data.val_frac": 0.25})
    runtime = get_runtime(cfg)
    whole = get_runtime(tiny_cfg).client_split(0, "train")
    runtime = get_runtime(cfg)  # rebuilt: data.val_frac is part of the runtime's data key
    train, val = runtime.client_split(0, "train"), runtime.client_split(0, "val")
    assert (len(train), len(val)) == (30, 10) and len(whole) == 40
    rows = {tuple(r.tolist()) for r in whole.input_ids}
    seen = [tuple(r.tolist()) for r in torch.cat([train.input_ids, val.input_ids])]
    assert set(seen) <= rows and len(seen) == len(whole)
    # every pooled (centralised) training row is a clients' training row, never a validation one
    pooled = runtime.pooled_train()
    assert len(pooled) == sum(len(runtime.client_split(i, "train")) for i in range(3))
    with pytest.raises(ConfigError, match="data.val_frac"):
        get_runtime(tiny_cfg).client_split(0, "val")


@pytest.mark.parametrize("method", ["fedavg", "centralized"])
def test_a_run_that_stops_learning_stops_early_and_a_resume_stays_stopped(tiny_cfg, method):
    # lr ~ 0: the validation score cannot improve after round 1, so patience 1 stops after 2
    cfg = tiny_cfg.with_overrides({
        "method": method, "fed.rounds": 6, "train.lr": 1e-12, "data.val_frac": 0.25,
        "fed.early_stopping_patience": 1,
    })  # fmt: skip
    run = run_method(cfg)
    assert len(run["history"]) == 2
    assert run["stopped_early"] | {"best": 0} == {"round": 2, "best_round": 1, "best": 0,
                                                "view": "shared", "patience": 1,
                                                "min_delta": 0.0}  # fmt: skip
    for h in run["history"]:  # every client's validation score, every round
        assert sorted(h["val"]) == sorted(run["clients"]) and all(
            0 <= v["shared"] <= 1 for v in h["val"].values()
        )
    assert _same(run, cfg.resolved())  # complete for fedmm bench: not rerun
    summary = (Path(cfg.out_dir) / "summary.md").read_text()
    assert "stopped early after round 2 of 6" in summary
    if method == "fedavg":  # the server's checkpoint says it stopped: a resume runs nothing
        again = run_method(cfg.with_overrides({"resume": True}))
        assert len(again["history"]) == 2 and again["stopped_early"] == run["stopped_early"]
    stored = json.loads((Path(cfg.out_dir) / "results.json").read_text())["runs"]
    assert [len(r["history"]) for r in stored] == [2]


def test_without_patience_the_validation_scores_are_reported_and_every_round_runs(tiny_cfg):
    run = run_method(tiny_cfg.with_overrides({"data.val_frac": 0.25, "train.lr": 1e-12,
                                              "fed.rounds": 3}))  # fmt: skip
    assert len(run["history"]) == 3 and "stopped_early" not in run
    assert all(h["val"] for h in run["history"])
