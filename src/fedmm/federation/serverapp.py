"""The fedmm ServerApp (Flower Message API) and its round loop.

The loop is method-agnostic: each round it samples clients, sends them the method's global state,
hands the replies to ``method.aggregate``, broadcasts the new global state for evaluation, and
records what happened.  It never looks inside a state or a method.

    for t in 1..R:
        S_t ← sample ⌈fraction·K⌉ nodes (seeded)
        replies ← train(S_t, global)            # client half: method.client_train
        global ← method.aggregate(global, replies)   (if ≥ fed.min_clients replied)
        if t ≡ 0 (mod fed.eval_every) or t = R:  # client half: method.client_evaluate
            metrics ← evaluate(E_t, global)   E_t: all nodes in the last round, otherwise a
                                              seeded sample of ⌈fed.eval_fraction·K⌉ nodes

The same ``app`` runs under ``flwr run .`` (config from ``[tool.flwr.app.config]``) and under
``fedmm run`` (config passed to ``make_server_app``).  Results go to ``<out_dir>/results.json``,
with every client's own seconds per training and evaluation reply: a round's wall time minus their
sum is what the engine (Flower, Ray, serialisation, this loop) costs.

With the defaults (``eval_every = 1``, ``eval_fraction = 1``) every node evaluates every round, so
a round costs O(K) evaluations; with many clients, ``eval_every`` and ``eval_fraction`` make a
round's cost grow with the sampled clients only.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable

from flwr.app import Context, Message, MessageType
from flwr.serverapp import Grid, ServerApp

from fedmm import results
from fedmm.config import ConfigError, FedmmConfig
from fedmm.federation import messages
from fedmm.methods import Reply, get_method
from fedmm.runtime import get_runtime

log = logging.getLogger(__name__)


def make_server_app(
    cfg: FedmmConfig | None = None, on_round: Callable[[dict], None] | None = None
) -> ServerApp:
    """A ServerApp running ``cfg`` (or, when None, the config in Flower's run_config)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_cfg = cfg if cfg is not None else FedmmConfig().with_overrides(dict(context.run_config))
        run_cfg = run_cfg.resolved()
        run_federation(grid, run_cfg, on_round)

    return app


app = make_server_app()


def wait_for_nodes(grid: Grid, n: int, timeout: float = 120.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= n:
            return nodes
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"only {len(nodes)} of {n} SuperNodes connected within {timeout:.0f}s"
            )
        time.sleep(0.5)


def run_federation(
    grid: Grid, cfg: FedmmConfig, on_round: Callable[[dict], None] | None = None
) -> dict:
    """Run ``fed.rounds`` rounds of ``cfg.method``; returns (and writes) the run record."""
    if cfg.fed.eval_every < 1 or not 0 < cfg.fed.eval_fraction <= 1:
        raise ConfigError(
            f"fed.eval_every must be >= 1 and fed.eval_fraction in (0, 1], got "
            f"{cfg.fed.eval_every} and {cfg.fed.eval_fraction}"
        )
    messages.check_compression(cfg.fed.compression)
    method = get_method(cfg)
    runtime = get_runtime(cfg)  # the server needs the trainable shapes and the client names
    client_ids = [c.client_id for c in runtime.benchmark.clients]
    global_state = method.init_global(runtime.model)
    nodes = wait_for_nodes(grid, cfg.fed.clients)
    rng = random.Random(cfg.seed)
    n_sample = max(1, min(len(nodes), math.ceil(cfg.fed.fraction * len(nodes))))
    eval_rng = random.Random(cfg.seed + 7919)  # its own stream: training samples never change
    n_eval = max(1, min(len(nodes), math.ceil(cfg.fed.eval_fraction * len(nodes))))
    timeout = cfg.fed.round_timeout or None
    record = results.new_run(
        cfg, runtime.benchmark, method.views,
        trainable_params=method.count_trainable(runtime.model),
    )  # fmt: skip
    for rnd in range(1, cfg.fed.rounds + 1):
        t0 = time.perf_counter()
        sampled = sorted(rng.sample(nodes, n_sample))
        content = messages.server_message(global_state, cfg, rnd)
        down = content[messages.GLOBAL].count_bytes() * len(sampled)
        replies = grid.send_and_receive(
            [Message(content, n, MessageType.TRAIN, group_id=str(rnd)) for n in sampled],
            timeout=timeout,
        )
        ok, up, train_stats = [], 0, {}
        for reply in replies:
            if reply.has_error():
                log.warning(
                    "round %d: node %s failed: %s",
                    rnd,
                    reply.metadata.src_node_id,
                    reply.error.reason,
                )
                continue
            m = reply.content[messages.METRICS]
            update = reply.content[messages.UPDATE]
            up += update.count_bytes()
            index = int(m["client-index"])
            ok.append(Reply(index, messages.from_record(update), int(m["num-examples"])))
            train_stats[client_ids[index]] = {
                k: float(m[k]) for k in ("steps", "lr-first", "lr-last", "loss", "seconds")
            } | {"bytes_up": update.count_bytes(), "bytes_down": down // len(sampled)}
        failures = len(sampled) - len(ok)  # errors and timeouts alike
        t_server = time.perf_counter()
        if len(ok) >= cfg.fed.min_clients:
            global_state = method.aggregate(global_state, sorted(ok, key=lambda r: r.client_index))
        else:
            log.warning("round %d: %d replies < fed.min_clients=%d; global state kept",
                        rnd, len(ok), cfg.fed.min_clients)  # fmt: skip
        t_server = time.perf_counter() - t_server

        last = rnd == cfg.fed.rounds
        if last or rnd % cfg.fed.eval_every == 0:
            eval_nodes = (
                nodes if last or n_eval == len(nodes) else sorted(eval_rng.sample(nodes, n_eval))
            )
        else:
            eval_nodes = []
        clients, eval_stats, eval_bytes = evaluate(grid, global_state, cfg, rnd, eval_nodes,
                                                   client_ids, timeout)  # fmt: skip
        entry = {
            "round": rnd, "seconds": time.perf_counter() - t0, "server_seconds": t_server, "bytes_up": up, "bytes_down": down,
            "bytes_eval": eval_bytes, "sampled": len(sampled), "failures": failures,
            "evaluated": len(eval_nodes), "clients": dict(sorted(clients.items())),
            "train": dict(sorted(train_stats.items())), "eval": dict(sorted(eval_stats.items())),
        }  # fmt: skip
        results.add_round(record, entry)
        results.save_run(cfg.out_dir, record)
        if on_round:
            on_round(entry)
    return record


def evaluate(
    grid: Grid, global_state: dict, cfg: FedmmConfig, rnd: int, nodes: list[int],
    client_ids: list[str], timeout: float | None,
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]], int]:  # fmt: skip
    """Broadcast ``global_state`` to ``nodes`` for evaluation: (accuracy per client and view,
    each client's seconds, bytes sent)."""
    if not nodes:
        return {}, {}, 0
    content = messages.server_message(global_state, cfg, rnd)
    eval_bytes = content[messages.GLOBAL].count_bytes() * len(nodes)
    clients: dict[str, dict[str, float]] = {}
    stats: dict[str, dict[str, float]] = {}
    for reply in grid.send_and_receive(
        [Message(content, n, MessageType.EVALUATE, group_id=str(rnd)) for n in nodes],
        timeout=timeout,
    ):
        if reply.has_error():
            log.warning("round %d: evaluation failed on node %s: %s", rnd,
                        reply.metadata.src_node_id, reply.error.reason)  # fmt: skip
            continue
        m = reply.content[messages.METRICS]
        cid = client_ids[int(m["client-index"])]
        clients[cid] = {
            k.removeprefix("acc."): float(v) for k, v in m.items() if k.startswith("acc.")
        }
        stats[cid] = {"seconds": float(m["seconds"])} if "seconds" in m else {}
    return clients, stats, eval_bytes
