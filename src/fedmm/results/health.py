"""Did a run train and evaluate: counts over its history, the one-line summary and the refusal
``fedmm run --require-healthy`` reads."""

from __future__ import annotations

import math

from fedmm.results.views import label


# ---------------------------------------------------------------------- health of a run
def health(run: dict) -> dict:
    """Did the run train and evaluate?  Counted over its whole history:

    * ``sampled``: client-rounds asked to train (centralised: one pooled update per round);
      ``trained``: of those, the valid replies that took at least one step;
    * ``expected``: evaluations asked for; ``evaluated``: those that came back with a score;
      ``withheld``: those a DP site answered without scores (by design: not expected to score);
    * ``rejected`` (refused by validation), ``failed`` (errors, timeouts), ``eval_failed``;
    * ``status``: ``no rounds``, ``trained nothing``, ``evaluated nothing``, ``partial`` (some
      client-rounds or evaluations missing) or ``ok``.

    Clients in ``excluded_clients`` are not held against the run: one with no training rows is
    not expected to train (its reply carries 0 examples and is refused), one with no test rows
    not to score (its scores are left out of every mean either way).
    """
    excluded = run.get("excluded_clients", {})
    no_train = {c for c, why in excluded.items() if "train" in why}
    no_test = {c for c, why in excluded.items() if "test" in why}
    counts = dict.fromkeys(
        ("sampled", "trained", "expected", "evaluated", "withheld", "rejected", "failed",
         "eval_failed"), 0
    )  # fmt: skip
    for h in run.get("history", []):
        train = h.get("train", {})
        rejected = h.get("rejected", [])
        skipped = sum(x.get("client") in no_train for x in rejected)
        skipped += sum(c in no_train for c in train)
        counts["sampled"] += (h.get("sampled") or len(train)) - skipped
        counts["trained"] += sum(
            c not in no_train and t.get("steps", 1) > 0 for c, t in train.items()
        )
        counts["rejected"] += sum(x.get("client") not in no_train for x in rejected)
        counts["failed"] += sum(x.get("client") not in no_train for x in h.get("failed", []))
        eval_failed = h.get("eval_failed", [])
        counts["eval_failed"] += sum(x.get("client") not in no_test for x in eval_failed)
        clients = h.get("clients", {})
        asked_excluded = {c for c in clients if c in no_test}
        asked_excluded |= {x.get("client") for x in eval_failed if x.get("client") in no_test}
        withheld = sum(bool(e.get("scores-withheld")) and c not in no_test
                       for c, e in h.get("eval", {}).items())  # fmt: skip
        counts["withheld"] += withheld
        counts["expected"] += h.get("evaluated", len(clients)) - len(asked_excluded) - withheld
        counts["evaluated"] += sum(
            c not in no_test and any(isinstance(v, int | float) and math.isfinite(v)
                                     for v in m.values())
            for c, m in clients.items()
        )  # fmt: skip
    if not run.get("history"):
        status = "no rounds"
    elif counts["trained"] == 0:
        status = "trained nothing"
    elif counts["evaluated"] == 0 and counts["withheld"] == 0:
        status = "evaluated nothing"
    elif counts["trained"] < counts["sampled"] or counts["evaluated"] < counts["expected"]:
        status = "partial"
    else:
        status = "ok"
    return counts | {"status": status}


def health_line(run: dict) -> str:
    """One line: ``health: 15/15 client-rounds trained, 15/15 evaluations, 0 rejected, 0 failed
    -> ok`` (plus evaluation failures and excluded clients when there are any)."""
    h = health(run)
    line = (
        f"{h['trained']}/{h['sampled']} client-rounds trained, {h['evaluated']}/{h['expected']} "
        f"evaluations, {h['rejected']} rejected, {h['failed']} failed"
    )
    if h["eval_failed"]:
        line += f", {h['eval_failed']} evaluations failed"
    if h["withheld"]:
        line += f", {h['withheld']} evaluations with scores withheld (DP)"
    excluded = run.get("excluded_clients", {})
    if excluded:
        line += "; excluded from every mean (n/a): " + ", ".join(
            f"{c} ({why})" for c, why in sorted(excluded.items())
        )
    return f"health: {line} -> {h['status']}"


def sites_scored(run: dict) -> tuple[int, int]:
    """``(N, K)``: the N of the run's K included clients (``excluded_clients`` left out) whose
    scores make ``final``, i.e. that were scored in the last evaluated round."""
    excluded = run.get("excluded_clients", {})
    included = [c for c in run.get("clients", {}) if c not in excluded]
    evaluated = [h["clients"] for h in run.get("history", []) if h.get("clients")]
    scores = evaluated[-1] if evaluated else {}
    scored = sum(
        any(isinstance(v, int | float) and math.isfinite(v) for v in scores.get(c, {}).values())
        for c in included
    )
    return scored, len(included)


def missing_line(run: dict, max_reason: int = 120) -> str | None:
    """Who is missing in the run's last round and why, from its ``failed``, ``rejected`` and
    ``eval_failed`` entries: ``missing in the last round: 2-blurred (no reply within 90s),
    0-original (evaluation: error: ...)``; None when every site answered."""
    if not run.get("history"):
        return None
    last = run["history"][-1]
    parts = []
    for key, stage in (("failed", ""), ("rejected", "rejected: "), ("eval_failed", "evaluation: ")):
        for x in last.get(key, []):
            who = x.get("client") or f"node {x.get('node')}"
            reason = " ".join(str(x.get("reason", "")).split())
            if len(reason) > max_reason:
                reason = reason[: max_reason - 1] + "…"
            parts.append(f"{who} ({stage}{reason})")
    return "missing in the last round: " + ", ".join(parts) if parts else None


def unhealthy(run: dict, allow_partial: bool = False) -> str | None:
    """Why ``run`` must not count as a finished run (a CLI exits non-zero), or None.

    A run that trained nothing or evaluated nothing is never fine; a ``partial`` one is fine only
    with ``allow_partial``."""
    h = health(run)
    if h["status"] == "ok" or (h["status"] == "partial" and allow_partial):
        return None
    why = h["status"] + ("" if h["status"] != "partial" else
                         " (use --allow-partial to accept partial runs)")  # fmt: skip
    return f"{label(run)} seed {run['seed']} on {run['benchmark']}: {why}; {health_line(run)}"
