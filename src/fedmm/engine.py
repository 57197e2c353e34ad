"""Run methods: federated ones on Flower's simulation runtime, ``centralized`` in-process."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace

from fedmm import results
from fedmm.config import FedmmConfig
from fedmm.methods import get_method
from fedmm.methods.centralized import run_centralized
from fedmm.runtime import get_runtime, resolve_device

log = logging.getLogger(__name__)


def _progress(cfg: FedmmConfig, label: str):
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.fed.rounds, desc=label, unit="round", disable=not cfg.progress, leave=True)

    def on_round(entry: dict) -> None:
        final = results.mean_views(entry["clients"])
        bar.set_postfix({v: f"{100 * a:.1f}" for v, a in final.items()}, refresh=False)
        bar.update(1)

    return bar, on_round


def run_method(cfg: FedmmConfig) -> dict:
    """Run ``cfg.method`` to the end; returns the run record (also saved in results.json)."""
    cfg = cfg.resolved()
    method = get_method(cfg)
    label = f"{cfg.method} on {cfg.data.benchmark}"
    bar, on_round = _progress(cfg, label)
    t0 = time.perf_counter()
    try:
        if method.federated:
            _simulate(cfg, on_round)
        else:
            runtime = get_runtime(cfg)
            record = results.new_run(
                cfg, runtime.benchmark, method.views, method.count_trainable(runtime.model)
            )

            def save_round(entry: dict) -> None:
                results.add_round(record, entry)
                results.save_run(cfg.out_dir, record)
                on_round(entry)

            run_centralized(cfg, save_round)
    finally:
        bar.close()
    log.info("%s finished in %.0fs", label, time.perf_counter() - t0)
    data = results.load(cfg.out_dir)
    key = (cfg.method, cfg.peft.type, get_runtime(cfg).benchmark.name, cfg.seed)
    for run in data["runs"]:
        if results.run_key(run) == key:
            return run
    raise RuntimeError(f"{label}: the run finished but wrote no results to {cfg.out_dir}")


def _simulate(cfg: FedmmConfig, on_round) -> None:
    from flwr.simulation import run_simulation

    from fedmm.federation.clientapp import app as client_app
    from fedmm.federation.serverapp import make_server_app

    cpus = max(1, os.cpu_count() or 1)
    gpus = 1 if resolve_device(cfg.device).type == "cuda" else 0
    backend_config = {
        # one client at a time, using every core: the clients of one machine share its CPUs
        "client_resources": {"num_cpus": cpus, "num_gpus": gpus},
        "init_args": {"num_cpus": cpus, "num_gpus": gpus, "include_dashboard": False},
    }
    run_simulation(
        server_app=make_server_app(replace(cfg), on_round),
        client_app=client_app,
        num_supernodes=cfg.fed.clients,
        backend_config=backend_config,
    )
