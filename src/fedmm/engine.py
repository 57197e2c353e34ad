"""Run methods: federated ones on Flower's simulation runtime, ``centralized`` in-process.

A simulation is a rehearsal of a deployment on one machine: the same ServerApp and ClientApp,
each simulated SuperNode with its own site settings (``rehearsal_sites``), as an operator would
give them with ``--node-config``:

* ``data.benchmark = "sites"`` (``fedmm run --sites DIR``): one client per site directory under
  ``DIR`` (``fedmm split`` writes them), each reading only its own directory;
* any other benchmark: client K is partition K of that central benchmark (``partition-id``).

Either way the server reads the task schema only (``data.schema``; for a central benchmark it is
derived here, before the run, and written to ``<out>/schemas/``)."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace
from pathlib import Path

from fedmm import logs, results, tracking
from fedmm.config import ConfigError, FedmmConfig
from fedmm.data import sites
from fedmm.data.schema import SCHEMA_FILE, read_schema, write_schema
from fedmm.federation import consent, early_stopping
from fedmm.federation.site import SiteSettings
from fedmm.files import remove_stale_temps
from fedmm.methods import get_method
from fedmm.methods.centralized import run_centralized
from fedmm.runkey import RunKey
from fedmm.runtime import SITES, get_runtime, resolve_device

log = logging.getLogger(__name__)


def _progress(cfg: FedmmConfig, label: str):
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.fed.rounds, desc=label, unit="round", disable=not cfg.progress, leave=True)

    def on_round(entry: dict) -> None:
        final = results.mean_views(entry["clients"])
        bar.set_postfix({v: f"{100 * a:.1f}" for v, a in final.items()}, refresh=False)
        bar.update(1)

    return bar, on_round


def prepare(cfg: FedmmConfig) -> FedmmConfig:
    """``cfg`` completed for a rehearsal: absolute paths, the server's schema (``data.schema``),
    and, for site directories, ``fed.clients`` = the number of sites."""
    cfg = cfg.resolved()
    if cfg.data.benchmark == SITES:
        if not cfg.data.data_dir:
            raise ConfigError("data.benchmark=sites needs the directory of site directories "
                              "(fedmm run --sites DIR)")  # fmt: skip
        roots = sites.list_sites(Path(cfg.data.data_dir))
        updates = {"fed.clients": len(roots)}
        if not cfg.data.schema:
            updates["data.schema"] = str(Path(cfg.data.data_dir) / SCHEMA_FILE)
        return cfg.with_overrides(updates)
    if cfg.data.schema:
        return cfg
    schema = get_runtime(cfg).schema  # the operator's machine holds the central benchmark
    path = Path(cfg.out_dir) / "schemas" / f"{schema.name}-{schema.sha256()[:12]}.json"
    write_schema(schema, path)
    return cfg.with_overrides({"data.schema": str(path)})


def rehearsal_sites(cfg: FedmmConfig, site: dict | None = None) -> dict[int, dict]:
    """Each simulated SuperNode's site settings (``--node-config`` keys): its data, its own state
    directory under ``<out>/client_state/``, the run's cache, device and threads, plus ``site``
    (e.g. a privacy floor) for every site."""
    common = {"cache-dir": cfg.cache_dir, "device": cfg.device, "threads": cfg.train.threads}
    source = cfg.model.hf_path
    if source not in ("", consent.TINY):
        if not consent.is_hub_id(source) or Path(source).exists():
            # the operator's local weights: every simulated site's own copy (model-dir)
            common["model-dir"] = os.path.abspath(os.path.expanduser(source))
        else:  # the operator consents, as each simulated site, to the hub model it runs
            common["accept-models"] = f"{consent.BUILTIN},{source}"
    if cfg.model.hf_download:
        common["allow-download"] = True
    out = Path(cfg.out_dir) / "client_state"
    if cfg.data.benchmark == SITES:
        roots = sites.list_sites(Path(cfg.data.data_dir))
        settings = {k: {"data-dir": str(r), "state-dir": str(out / r.name)}
                    for k, r in enumerate(roots)}  # fmt: skip
    else:
        settings = {k: {"data-dir": cfg.data.data_dir, "state-dir": str(out / f"site-{k}")}
                    for k in range(cfg.fed.clients)}  # fmt: skip
    own = sorted({"data-dir", "state-dir", "partition-id"} & set(site or {}))
    if own:  # one value for every site would make them share their data or state
        raise ConfigError(f"--site {own[0]}: each simulated site has its own; fedmm sets it")
    for k in settings:
        settings[k] |= common | dict(site or {})
        SiteSettings.from_node_config(settings[k])  # a bad setting fails here, before the run
    return settings


def run_method(cfg: FedmmConfig, site: dict | None = None) -> dict:
    """Run ``cfg.method`` to the end; returns the run record (also saved in results.json).

    ``site``: site settings (``--node-config`` keys, e.g. ``{"dp-clip-norm": 1.0}``) given to
    every simulated site."""
    cfg = prepare(cfg)
    method = get_method(cfg)
    label = f"{cfg.method} on {cfg.data.benchmark}"
    bar, on_round = _progress(cfg, label)
    t0 = time.perf_counter()
    try:
        if method.federated:
            _simulate(cfg, on_round, rehearsal_sites(cfg, site))
        else:
            remove_stale_temps(cfg.out_dir)  # a federated run's ServerApp does this itself
            runtime = get_runtime(cfg)
            bench = runtime.benchmark
            record = results.new_run(
                cfg, runtime.schema.name, {c.client_id: c.description for c in bench.clients},
                {c.client_id: c.task for c in bench.clients} if bench.tasks else None,
                method.views, method.count_trainable(runtime.model), bench.notes, bench.excluded,
                dict(method.view_aliases),
            )  # fmt: skip

            with tracking.track(cfg, record) as tracker:

                def save_round(round_record: results.RoundRecord) -> None:
                    entry = results.add_round(record, round_record)
                    early_stopping.update(record, cfg)  # as the server records it
                    results.save_run(cfg.out_dir, record)
                    tracker.log_round(entry)
                    on_round(entry)

                run_centralized(cfg, save_round)
                results.write_reports(cfg.out_dir)  # before the tracker takes them as artifacts
    finally:
        bar.close()
    log.info("%s finished in %.0fs", label, time.perf_counter() - t0)
    data = results.load(cfg.out_dir)
    schema = read_schema(Path(cfg.data.schema)).name
    key = RunKey.of_config(cfg, schema)
    for run in data["runs"]:
        if results.run_key(run) == key:
            return run
    raise RuntimeError(f"{label}: the run finished but wrote no results to {cfg.out_dir}")


def _simulate(cfg: FedmmConfig, on_round, site_settings: dict[int, dict]) -> None:
    """Run the ServerApp and ClientApp on Flower's Simulation Engine (Ray backend), in this
    process.

    Flower (1.41, 1.42) deprecates the Python entry ``flwr.simulation.run_simulation`` in favour of
    ``flwr run`` against a managed local SuperLink.  That route loads the apps from a built FAB,
    and its virtual SuperNodes get no node config but ``partition-id`` / ``num-partitions``
    (``flwr.server.superlink.fleet.vce.vce_api._register_node_info_stores``), so it cannot give
    each rehearsed site its own settings (data, state directory, DP floor: ``rehearsal_sites``)
    nor report rounds to this process.  fedmm therefore calls the Simulation Engine entry that
    ``flwr run``'s simulation process itself calls (``flwr.simulation.app.run_simulation_process``
    -> ``_run_simulation``), with the in-process apps: the same engine, without the deprecated
    wrapper.  It is a private Flower function: ``tests/test_flower_entry.py`` pins its parameters
    and fails if a run logs a Flower deprecation notice.  A deployment goes through ``flwr run``
    (``fedmm deploy``, docs/deployment.md)."""
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.telemetry import EventType

    from fedmm.federation.clientapp import make_client_app
    from fedmm.federation.serverapp import make_server_app

    cpus = max(1, os.cpu_count() or 1)
    gpus = 1 if resolve_device(cfg.device).type == "cuda" else 0
    backend_config = {
        # one client at a time, using every core: the clients of one machine share its CPUs
        "client_resources": {"num_cpus": cpus, "num_gpus": gpus},
        "init_args": {"num_cpus": cpus, "num_gpus": gpus, "include_dashboard": False},
    }
    with logs.workers_log_like_me():  # a worker's INFO lines only where this process shows them
        _run_simulation(
            num_supernodes=cfg.fed.clients,
            exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
            client_app=make_client_app(site_settings),
            server_app=make_server_app(replace(cfg), on_round),
            backend_name="ray",
            backend_config=backend_config,
        )
