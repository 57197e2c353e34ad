"""Centralised training on the pooled data of all clients: the quality ceiling, no federation.

θ = {adapter ``central_adapter``, visual projection, head} is trained on ∪_k D_k with
``CE(f(x; θ), y)``.  Equal budget: per "round" it takes ``local_steps × clients`` steps (with
``train.local_epochs``: Σ_k s_k, each client's ``sections.steps_per_round``) of the
same batch size (the samples a whole federated round processes), on the same learning-rate
schedule stretched over the run, and is evaluated on every client's test set after each round.
On a multi-task benchmark the data are pooled per task (one head each) and each round trains
the tasks one after the other, ``local_steps × (clients of the task)`` steps each.

There is nothing to exchange, so this method runs outside Flower (``run_centralized``); its
history has the same schema as a federated run (bytes are 0).  View: ``shared`` (the one pooled
model, which every client -- and a new one -- would receive).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from fedmm.federation import early_stopping
from fedmm.methods.aggregation import Reply
from fedmm.methods.base import register
from fedmm.methods.context import ClientContext
from fedmm.methods.local import Local
from fedmm.methods.state import Arrays, State
from fedmm.results.record import RoundRecord
from fedmm.runtime import get_runtime
from fedmm.sections import steps_per_round


@register("centralized")
class Centralized(Local):
    """``Local`` training of one model whose "client" holds everyone's data."""

    adapter_sets = ("central_adapter",)
    federated = False
    secagg_refusal = "it pools every site's data in one process: there is no aggregation to secure"

    def aggregate(self, global_state: Arrays, replies: Sequence[Reply]) -> Arrays:
        raise RuntimeError("centralized training has no server aggregation")


def run_centralized(
    cfg, on_round: Callable[[RoundRecord], None] | None = None
) -> list[RoundRecord]:
    """Train on pooled data for ``fed.rounds`` rounds (fewer when early stopping ends it:
    ``federation.early_stopping``, on each client's validation split); returns the per-round
    history."""
    runtime = get_runtime(cfg)
    method = Centralized(cfg)
    specs = runtime.benchmark.clients
    pooled = {task: runtime.pooled_train(task) for task in runtime.tasks()}  # "train": val held out
    with_val = cfg.fed.early_stopping_patience > 0
    view = early_stopping.stopping_view(cfg) if with_val else ""
    deciding = {c.client_id for c in specs} - set(runtime.benchmark.excluded)  # as the run record
    state: State = {}
    history = []
    for rnd in range(1, cfg.fed.rounds + 1):
        t0 = time.perf_counter()
        stats: dict[str, float] = {}
        for task, data in pooled.items():  # one task after the other, each its clients' budget
            # Σ_k s_k over the task's clients: what they take together in a federated round
            steps = sum(steps_per_round(cfg.train, len(runtime.client_split(i, "train")))
                        for i, c in enumerate(specs) if c.task == task)  # fmt: skip
            ctx = ClientContext(
                cfg, runtime.model, data, data, state, rnd, -1, steps, steps * cfg.fed.rounds
            )
            state = method.client_train(ctx, {}).keep
            stats.setdefault("lr_first", ctx.stats.get("lr_first", 0.0))
            for key in ("steps", "loss_sum"):
                stats[key] = stats.get(key, 0.0) + ctx.stats.get(key, 0.0)
            stats["lr_last"] = ctx.stats.get("lr_last", 0.0)
        clients, val = {}, {}
        for i, spec in enumerate(specs):
            ectx = ClientContext(
                cfg, runtime.model, runtime.client_split(i, "train"),
                runtime.client_split(i, "test"), state, rnd, i, 1, cfg.fed.rounds,
                val=runtime.client_split(i, "val") if with_val else None, val_view=view,
            )  # fmt: skip
            clients[spec.client_id] = method.client_evaluate(ectx, {})
            if ectx.val_views:
                val[spec.client_id] = ectx.val_views
            if ectx.predictions:  # generative: as a rehearsed site keeps them (summary.md)
                from fedmm.config import run_name
                from fedmm.generation import save_predictions
                from fedmm.results.predictions import PREDICTIONS_FILE

                where = Path(cfg.out_dir) / "client_state" / "centralized" / spec.client_id
                save_predictions(where / run_name(cfg) / PREDICTIONS_FILE, spec.client_id, rnd,
                                 ectx.predictions)  # fmt: skip
        n_steps = stats.get("steps", 0)
        record = RoundRecord(
            rnd, seconds=time.perf_counter() - t0, evaluated=len(specs), clients=clients, val=val,
            train={"pooled": {
                "steps": n_steps, "lr-first": stats.get("lr_first", 0.0),
                "lr-last": stats.get("lr_last", 0.0),
                "loss": stats.get("loss_sum", 0.0) / max(1, n_steps),
                "seconds": time.perf_counter() - t0,
            }},
        )  # fmt: skip
        history.append(record)
        if on_round:
            on_round(record)
        if early_stopping.decide(cfg, ((r.round, r.val) for r in history), deciding):
            break  # the run record gets it from early_stopping.update (engine.run_method)
    return history
