"""Early stopping on a validation split: a run ends when its validation score stops improving.

What is measured: with ``data.val_frac`` = f > 0 every client holds out ``max(1, round(f · n_k))``
of its n_k training records (``runtime.held_out``: never trained on) and, at each evaluation of a
run with early stopping on, scores the deciding view's model (V, below) on them beside its test
split (``ClientContext.view``); the evaluation reply carries ``val.<V>`` next to ``acc.<view>``,
under the same release rules
(a site that withholds its scores withholds these too, and a site under DP never releases them,
even with ``dp-evaluation = exact``: they are scores of training records,
``sitedp.evaluation_metrics``; a site refuses a split smaller than its ``min-val-rows``).

The rule (early stopping with patience p: Goodfellow, Bengio & Courville, *Deep Learning*, 2016,
Algorithm 7.1; with ``min_delta`` as in Keras' ``EarlyStopping``, ``restore_best_weights=False``):
after evaluation t,

    v_t  = 100 · mean over the run's clients K of their validation score of view V
    best = max_{s ≤ t} v_s,  improved at t  iff  v_t > best_{t-1} + min_delta

and the run stops after the evaluation at which ``patience`` evaluations in a row have not
improved (V: ``fed.early_stopping_view``, default the method's first view; P:
``fed.early_stopping_patience``; min_delta: ``fed.early_stopping_min_delta``, in points).
K is every client of the run except those excluded for lack of data; an evaluation counts only
when every client of K reported V's validation score -- a mean over fewer (a site failed, was
rejected, withheld its scores, or has no personal model yet) would compare other clients'
means and could make a false best -- and rounds without an evaluation count neither way.
``fed.rounds`` stays the budget's upper bound, and the learning-rate schedule still spans it
(stopping early leaves the schedule unfinished: the run is what it was at the stopping round,
not a shorter run's end).  The reported final scores are those
of the stopping round; ``stopped_early`` in results.json records it with the best round and
score.

Requires ``fed.eval_fraction = 1`` (the rule compares means over the same clients) and a method
whose last round does no extra work (TAP distils at its last round: it refuses,
``Method.early_stopping_refusal``).  Against a hostile party: the scores are the clients' claims
(bounded to [0, 1] by ``validation``), so a site can steer when a run stops -- as it can steer
the reported test scores; it cannot make the run train past ``fed.rounds``.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Mapping

from fedmm.config import ConfigError, FedmmConfig
from fedmm.spec import METHOD_SPECS

log = logging.getLogger(__name__)

RoundVal = tuple[int, Mapping[str, Mapping[str, float]]]  # (round, {client: {view: score}})


def stopping_view(cfg: FedmmConfig) -> str:
    """The view whose validation score decides: ``fed.early_stopping_view`` or the method's
    first view (``MethodSpec.views_for`` the run's options)."""
    views = METHOD_SPECS[cfg.method].views_for(cfg.to_flat())
    view = cfg.fed.early_stopping_view or views[0]
    if view not in views:
        raise ConfigError(f"fed.early_stopping_view={view!r}: method {cfg.method!r} scores the "
                          f"views {', '.join(views)}")  # fmt: skip
    return view


def check(cfg: FedmmConfig, refusal: str) -> None:
    """``ConfigError`` when early stopping is on but cannot run (no validation split, a sampled
    evaluation, a method that refuses it -- ``refusal``: its reason --, an unknown view) and when
    a validation split is asked for without it (rows held out of training that nothing uses)."""
    if cfg.fed.early_stopping_patience <= 0:
        if cfg.data.val_frac > 0:
            raise ConfigError(f"data.val_frac={cfg.data.val_frac:g} holds out training records "
                              "for early stopping only: set fed.early_stopping_patience (e.g. 3) "
                              "or data.val_frac=0")  # fmt: skip
        return
    if cfg.data.val_frac <= 0:
        raise ConfigError("fed.early_stopping_patience needs a validation split: set "
                          "data.val_frac (e.g. 0.1), the share of each client's training "
                          "records held out for it")  # fmt: skip
    if cfg.fed.eval_fraction < 1:
        raise ConfigError(f"fed.early_stopping_patience compares the mean validation score of "
                          f"every client, but fed.eval_fraction={cfg.fed.eval_fraction:g} "
                          "evaluates a sample: set fed.eval_fraction=1")  # fmt: skip
    if refusal:
        raise ConfigError(f"method {cfg.method!r} cannot stop early: {refusal}; set "
                          "fed.early_stopping_patience=0")  # fmt: skip
    stopping_view(cfg)


def mean_score(
    val: Mapping[str, Mapping[str, float]], view: str, clients: Collection[str]
) -> float | None:
    """100 × the mean of ``view``'s validation score over ``clients``; None unless every one of
    them reported it."""
    if not clients or any(view not in val.get(c, {}) for c in clients):
        return None
    return 100 * sum(val[c][view] for c in clients) / len(clients)


def decide(cfg: FedmmConfig, rounds: Iterable[RoundVal], clients: Collection[str]) -> dict | None:
    """Apply the rule to the run's rounds so far (oldest first; ``clients``: K, the clients
    whose mean decides); the ``stopped_early`` record ``{round, best_round, best, view,
    patience, min_delta}`` when it says stop after the last of them, else None (also when early
    stopping is off).  Stateless: a resumed server decides from the stored history alone."""
    patience = cfg.fed.early_stopping_patience
    if patience <= 0:
        return None
    view, delta = stopping_view(cfg), cfg.fed.early_stopping_min_delta
    best, best_round, since, last = None, 0, 0, 0
    for rnd, val in rounds:
        v = mean_score(val, view, clients)
        if v is None:
            continue
        last = rnd
        if best is None or v > best + delta:
            best, best_round, since = v, rnd, 0
        else:
            since += 1
    if best is None or since < patience:
        return None
    return {"round": last, "best_round": best_round, "best": round(best, 4), "view": view,
            "patience": patience, "min_delta": delta}  # fmt: skip


def run_clients(run: dict) -> set[str]:
    """K of a run record: its clients less those excluded for lack of data."""
    return set(run["clients"]) - set(run.get("excluded_clients", {}))


def update(run: dict, cfg: FedmmConfig) -> dict | None:
    """After a round was added to ``run`` (a results.json run record): decide, and record the
    decision as ``run["stopped_early"]``; returns it (None: go on)."""
    if run.get("stopped_early"):
        return run["stopped_early"]
    history, clients = run["history"], run_clients(run)
    if cfg.fed.early_stopping_patience > 0 and history and history[-1].get("clients"):
        view, val = stopping_view(cfg), history[-1].get("val", {})
        missing = sorted(c for c in clients if view not in val.get(c, {}))
        if missing:
            log.warning("round %d: no validation score of %s from %s (failed, withheld or not "
                        "trained yet): early stopping does not count this evaluation",
                        history[-1]["round"], view, ", ".join(missing))  # fmt: skip
    decision = decide(cfg, ((h["round"], h.get("val", {})) for h in history), clients)
    if decision is not None:
        run["stopped_early"] = decision
        log.info("early stopping after round %d: the mean validation score of %s has not "
                 "beaten %.2f (round %d) by more than %g points in %d evaluations",
                 decision["round"], decision["view"], decision["best"], decision["best_round"],
                 decision["min_delta"], decision["patience"])  # fmt: skip
    return decision


__all__ = ["check", "decide", "mean_score", "run_clients", "stopping_view", "update"]
