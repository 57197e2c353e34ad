"""Early stopping on a validation split (``data.val_frac``, ``fed.early_stopping_patience``,
``federation/early_stopping.py``): the held-out rows, the rule, its refusals, and runs that stop."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from fedmm.bench import _same, write_outputs
from fedmm.config import ConfigError, FedmmConfig
from fedmm.engine import run_method
from fedmm.federation import consent, early_stopping, sitedp, validation
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
    decision = early_stopping.decide(cfg, rounds(*means), {"a", "b"})
    if stop is None:
        assert decision is None
    else:
        assert (decision["round"], decision["best_round"]) == stop
        assert decision["view"] == "shared" and decision["patience"] == patience


def test_an_evaluation_counts_only_when_every_client_reported():
    """A mean over fewer clients (one failed, withheld, or has no personal model yet) would
    compare other clients: a low-scoring site missing once must not make a false best."""
    cfg = cfg_with(early_stopping_patience=1)
    history = [
        (1, {"a": {"shared": 0.5}, "b": {"shared": 0.1}}),  # mean 30
        (2, {"a": {"shared": 0.5}}),  # b missing: 50 over a alone is no new best
        (3, {"a": {"shared": 0.5}, "b": {"shared": 0.2}}),  # 35: better than 30
    ]
    assert early_stopping.decide(cfg, history, {"a", "b"}) is None
    assert early_stopping.decide(cfg, history[:2], {"a", "b"}) is None
    stop = early_stopping.decide(cfg, [*history, (4, history[0][1])], {"a", "b"})
    assert (stop["round"], stop["best_round"], stop["best"]) == (4, 3, 35.0)
    # an excluded client (no data) is not waited for
    run = {"clients": {"a": "", "b": "", "c": ""}, "excluded_clients": {"c": "0 test rows"}}
    assert early_stopping.run_clients(run) == {"a", "b"}


def test_off_never_stops_and_the_view_is_the_methods_first_or_the_one_named():
    cfg = cfg_with().with_overrides({"data.val_frac": 0.0})
    assert early_stopping.decide(cfg, rounds(60, 50, 40), {"a", "b"}) is None
    ditto = cfg_with(early_stopping_patience=1).with_overrides({"method": "ditto"})
    assert early_stopping.stopping_view(ditto) == "shared"
    personal = ditto.with_overrides({"fed.early_stopping_view": "personal"})
    assert early_stopping.stopping_view(personal) == "personal"
    # the personal view decides: its scores fall while the shared ones rise
    history = [(r, {"a": {"shared": 0.1 * r, "personal": 0.9 - 0.1 * r}}) for r in (1, 2)]
    assert early_stopping.decide(ditto, history, {"a"}) is None
    assert early_stopping.decide(personal, history, {"a"})["round"] == 2


@pytest.mark.parametrize("overrides, match", [
    ({"fed.early_stopping_patience": 2, "data.val_frac": 0.0}, "needs a validation split"),
    ({"fed.early_stopping_patience": 2, "fed.eval_fraction": 0.5}, "fed.eval_fraction=0.5"),
    ({"fed.early_stopping_patience": 2, "method": "tap"}, "stage 2"),
    ({"fed.early_stopping_patience": 2, "fed.early_stopping_view": "distilled"},
     "'fedavg' scores the views"),
    ({"data.val_frac": 0.95}, r"data.val_frac must be a finite number in \[0, 0.9\]"),
    ({"data.val_frac": 0.2}, "for early stopping only: set fed.early_stopping_patience"),
])  # fmt: skip
def test_early_stopping_that_cannot_run_is_refused_before_anything_starts(overrides, match):
    cfg = FedmmConfig().with_overrides({"data.val_frac": 0.2, **overrides})
    with pytest.raises(ConfigError, match=match):
        validate_config(cfg)


def test_validation_scores_leave_a_site_only_unguarded_and_only_for_a_large_enough_split():
    views, val = {"shared": 0.5}, {"shared": 0.25}
    sent = sitedp.evaluation_metrics(views, SiteSettings(), False, val)
    assert sent == {"acc.shared": 0.5, "val.shared": 0.25}
    withhold = SiteSettings(dp_evaluation="withhold")
    assert sitedp.evaluation_metrics(views, withhold, True, val) == {"scores-withheld": 1}
    # "exact" consents to test scores; validation rows are training rows, which ε protects
    exact = SiteSettings(dp_evaluation="exact")
    assert sitedp.evaluation_metrics(views, exact, True, val) == {"acc.shared": 0.5}
    # a server choosing a tiny val_frac would score a handful of records it can single out
    cfg = cfg_with(early_stopping_patience=1)
    with pytest.raises(consent.NotAccepted, match="holds out 19 .* min-val-rows=20"):
        consent.check_val_rows(cfg, 19, SiteSettings())
    consent.check_val_rows(cfg, 20, SiteSettings())
    consent.check_val_rows(cfg, 5, SiteSettings(min_val_rows=5))
    with pytest.raises(ConfigError, match="min-val-rows must be >= 1"):
        SiteSettings(min_val_rows=0)


def test_the_server_checks_validation_scores_like_accuracies():
    spec = validation.UploadSpec({}, 0, 10, 2)
    metrics = {"client-index": 1, "acc.shared": 0.5, "val.shared": 0.75}
    assert validation.check_eval_metrics(metrics, spec) == (1, {"shared": 0.5})
    assert validation.check_eval_metrics(metrics, spec, prefix="val.") == (1, {"shared": 0.75})
    with pytest.raises(validation.InvalidReply, match="'val.shared' = 7"):
        validation.check_eval_metrics(metrics | {"val.shared": 7}, spec, prefix="val.")


def test_the_validation_split_is_held_out_of_training(tiny_cfg):
    cfg = tiny_cfg.with_overrides({"data.val_frac": 0.25, "fed.early_stopping_patience": 1})
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
    cfg = tiny_cfg.with_overrides({  # 20 of 40 rows: a site's default min-val-rows
        "method": method, "fed.rounds": 6, "train.lr": 1e-12, "data.val_frac": 0.5,
        "fed.early_stopping_patience": 1,
    })  # fmt: skip
    run = run_method(cfg)
    assert len(run["history"]) == 2
    assert run["stopped_early"] | {"best": 0} == {"round": 2, "best_round": 1, "best": 0,
                                                "view": "shared", "patience": 1,
                                                "min_delta": 0.0}  # fmt: skip
    for h in run["history"]:  # every client's validation score of the deciding view only
        assert sorted(h["val"]) == sorted(run["clients"])
        assert all(list(v) == ["shared"] and 0 <= v["shared"] <= 1 for v in h["val"].values())
    assert _same(run, cfg.resolved())  # complete for fedmm bench: not rerun
    summary = (Path(cfg.out_dir) / "summary.md").read_text()
    assert "stopped early after round 2 of 6" in summary
    if method == "fedavg":  # the server's checkpoint says it stopped: a resume runs nothing
        again = run_method(cfg.with_overrides({"resume": True}))
        assert len(again["history"]) == 2 and again["stopped_early"] == run["stopped_early"]
    stored = json.loads((Path(cfg.out_dir) / "results.json").read_text())["runs"]
    assert [len(r["history"]) for r in stored] == [2]
    # a bench report over seeds that stopped at different rounds: each curve its own length
    other = json.loads(json.dumps(stored[0])) | {"seed": 1}
    other["history"] = other["history"][:1]
    other["stopped_early"] = other["stopped_early"] | {"round": 1}
    out = Path(cfg.out_dir)
    both = {"fedmm_version": "x", "runs": [stored[0], other]}
    (out / "results.json").write_text(json.dumps(both))
    write_outputs(out, [("fmnist-domain", method, 0), ("fmnist-domain", method, 1)], "adapter")
    assert (out / "bench_curves.png").stat().st_size > 0
    assert re.search(rf"^\| {method}[^|]* \| 2 \|", (out / "report.md").read_text(), re.M)
