"""The fedmm ServerApp (Flower Message API) and its round loop.

The loop is method-agnostic and reads like Flower's ``Strategy``: each round
``configure_train`` samples clients and gives each the method's global state,
``aggregate_train`` validates the replies and hands them to ``method.aggregate``,
``configure_evaluate`` / ``aggregate_evaluate`` score the new global state, and one
``RoundRecord`` holds what happened (``Federation``).  It never looks inside a state or a method.

    ask every node its client index once (query)
    for t in 1..R:
        S_t ← sample ⌈fraction·K⌉ nodes (seeded)            configure_train
        replies ← train(S_t, global)    # client half: method.client_train; each client gets
                                        # method.global_for_client(global, k)
        global ← method.aggregate(global, replies)          aggregate_train
                 (if ≥ fed.min_clients valid replies)
        if t ≡ 0 (mod fed.eval_every) or t = R:             configure_evaluate
            metrics ← evaluate(E_t, global)   E_t: all nodes in the last round, otherwise a
                                              seeded sample of ⌈fed.eval_fraction·K⌉ nodes
                                                            aggregate_evaluate

The server never loads data: it builds the trainable shapes from the model config and the task
schema (``data.schema``, the server's copy of the ``schema.json`` every site holds), and learns
the clients' names, tasks, modalities and sizes from their replies to the query.  What it sends
is the experiment only (``config.experiment_keys``).

The same ``app`` runs under ``flwr run .`` (config from ``[tool.flwr.app.config]``) and under
``fedmm run`` (config passed to ``make_server_app``).  Each round writes the checkpoint, then
``<out_dir>/results.json``, then logs one line (round, sites trained / sampled, failed, seconds,
mean accuracy); ``fedmm.logs.configure`` makes that line visible in a ``flwr-serverapp`` process
(and under ``flwr run --stream``).  Results in ``<out_dir>/results.json`` come
with every client's own seconds per training and evaluation reply: a round's wall time minus their
sum is what the engine (Flower, Ray, serialisation, this loop) costs.

With the defaults (``eval_every = 1``, ``eval_fraction = 1``) every node evaluates every round, so
a round costs O(K) evaluations; with many clients, ``eval_every`` and ``eval_fraction`` make a
round's cost grow with the sampled clients only.

Size (~570 lines): the round loop and ``Federation`` (its phases named after Flower's strategy
hooks); the method-specific parts live in the methods.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable

from flwr.app import Context, Message, MessageType
from flwr.serverapp import Grid, ServerApp

from fedmm import logs, results, tracking
from fedmm.config import ConfigError, FedmmConfig
from fedmm.data.schema import Schema, read_schema
from fedmm.federation import checkpoint, early_stopping, messages, secagg, validation
from fedmm.files import remove_stale_temps
from fedmm.methods import Reply, get_method
from fedmm.methods.aggregation import ClientInfo
from fedmm.results.record import RoundRecord
from fedmm.runtime import server_model
from fedmm.validate import validate_config

log = logging.getLogger(__name__)


def make_server_app(
    cfg: FedmmConfig | None = None, on_round: Callable[[dict], None] | None = None
) -> ServerApp:
    """A ServerApp running ``cfg`` (or, when None, the config in Flower's run_config)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        logs.configure("serverapp")  # flwr-serverapp configures no logging of its own
        run_cfg = cfg if cfg is not None else FedmmConfig().with_overrides(dict(context.run_config))
        run_cfg = run_cfg.resolved()
        # fedmm run passes its config in-process (a simulation); flwr run gives a run config
        engine = "simulation" if cfg is not None else "deployment"
        run_federation(grid, run_cfg, on_round, engine)

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


def origin(reply: Message, sent: list[Message]) -> int:
    """The node a reply is about.  An error the SuperLink makes for an unreachable node ("Node
    Unavailable") comes from the SuperLink itself, so match it to the message it answers."""
    by_id = {m.metadata.message_id: m.metadata.dst_node_id for m in sent if m.metadata.message_id}
    return by_id.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)


def query_clients(
    grid: Grid, nodes: list[int], cfg: FedmmConfig, schema_sha: str
) -> tuple[dict[int, int], dict[int, ClientInfo], dict[int, dict]]:
    """Ask every node once who it is: ``(node -> client index, index -> ClientInfo, index ->
    {"num_train", "num_test", "unknown_train", "unknown_test"})``.

    A site may declare its index (a rehearsed partition, or ``index`` in its site.json); when no
    site declares one, indices follow the sorted site names.  Two sites with the same index or
    name, or a schema other than the run's, stop the run before round 1.
    """
    content = messages.server_message({}, cfg, 0, schema_sha=schema_sha)
    replies = grid.send_and_receive(
        [Message(content, n, MessageType.QUERY, group_id="clients") for n in nodes]
    )
    found: dict[int, tuple[int, ClientInfo, dict]] = {}
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error():
            kind = NodeUnavailable if "Node Unavailable" in reply.error.reason else RuntimeError
            raise kind(f"node {node} did not say which client it is: {reply.error.reason}")
        m, about = reply.content[messages.METRICS], reply.content[messages.SITE]
        if str(about["schema-sha256"]) != schema_sha:
            raise RuntimeError(
                f"site {about['name']!r} (node {node}) holds another task schema than the run's "
                f"data.schema ({str(about['schema-sha256'])[:12]} vs {schema_sha[:12]})"
            )
        modalities = tuple(x for x in str(about["modalities"]).split(",") if x)
        info = ClientInfo(str(about["name"]), str(about["task"]), modalities)
        sizes = {k.replace("-", "_"): int(m[k])
                 for k in ("num-train", "num-test", "unknown-train", "unknown-test")}  # fmt: skip
        found[node] = (int(m["client-index"]), info, sizes | {"description": about["description"]})
    missing = sorted(set(nodes) - set(found))
    if missing:
        raise RuntimeError(f"nodes {missing} did not say which client they are")
    names = [info.client_id for _, info, _ in found.values()]
    if len(set(names)) != len(names):
        raise RuntimeError(f"two sites have the same name: {sorted(names)}")
    declared = {node: index for node, (index, _, _) in found.items()}
    if all(i < 0 for i in declared.values()):
        order = sorted(found, key=lambda n: found[n][1].client_id)
        declared = {node: k for k, node in enumerate(order)}
    elif any(i < 0 for i in declared.values()):
        raise RuntimeError(f"some sites declare a client index and others do not: {declared}")
    if len(set(declared.values())) != len(declared):
        raise RuntimeError(f"two nodes claim the same client index: {declared}")
    if not all(0 <= i < cfg.fed.clients for i in declared.values()):
        raise RuntimeError(f"client indices {sorted(declared.values())} outside "
                           f"[0, fed.clients={cfg.fed.clients})")  # fmt: skip
    infos = {declared[n]: found[n][1] for n in found}
    sizes = {declared[n]: found[n][2] for n in found}
    return declared, infos, sizes


class NodeUnavailable(RuntimeError):
    """A node the SuperLink still lists did not answer: it died and has not yet timed out, or
    restarted and is not yet back (the heartbeat window)."""


def ask_clients(grid: Grid, cfg: FedmmConfig, schema_sha: str, patience: float = 180.0):
    """``query_clients`` over the nodes online now; a node that is listed but unavailable (a site
    restarting after a crash) is waited for, up to ``patience`` seconds, never skipped."""
    deadline = time.monotonic() + patience
    while True:
        nodes = wait_for_nodes(grid, cfg.fed.clients)
        try:
            return nodes, query_clients(grid, nodes, cfg, schema_sha)
        except NodeUnavailable as exc:
            if time.monotonic() > deadline:
                raise
            log.warning("%s; asking again in 5 s", exc)
            time.sleep(5.0)


def load_schema(cfg: FedmmConfig) -> Schema:
    if not cfg.data.schema:
        raise ConfigError(
            "the server needs the task schema: set data.schema=PATH to the schema.json every "
            "site holds (fedmm split writes one; fedmm run and fedmm deploy set it themselves)"
        )
    return read_schema(cfg.data.schema)


def round_line(entry: dict, rounds: int, excluded=()) -> str:
    """The one line a round logs: ``round 3/5: 2/3 sites trained, 1 failed (+0 rejected), 41.2s,
    shared 61.8% shared+head 68.0% personal 70.3% over 3/3 evaluated sites`` (``not evaluated``
    in rounds without evaluation)."""
    failed, rejected = len(entry["failed"]), len(entry["rejected"])
    trained = len(entry["train"])
    line = (
        f"round {entry['round']}/{rounds}: {trained}/{entry['sampled']} sites trained, "
        f"{failed} failed (+{rejected} rejected), {entry['seconds']:.1f}s, "
    )
    means = results.mean_views(entry["clients"], excluded)
    if not entry["evaluated"]:
        return line + "not evaluated"
    if not means:
        return line + f"no scores from {entry['evaluated']} evaluated sites"
    views = " ".join(f"{view} {100 * acc:.1f}%" for view, acc in means.items())
    return line + f"{views} over {len(entry['clients'])}/{entry['evaluated']} evaluated sites"


TRAIN_METRICS = ("steps", "lr-first", "lr-last", "loss", "seconds", "load-seconds")
# a DP reply carries C, σ, the mode (0 = update, 1 = record: sitedp.DP_MODES), δ, the site's ε and
# (record level) q and T; dp-norm / dp-scale: results of fedmm <= 0.2 (now withheld, sitedp.py)
DP_METRICS = ("dp-norm", "dp-scale", "dp-clip-norm", "dp-noise-multiplier", "dp-mode", "dp-delta",
              "dp-epsilon", "dp-sample-rate", "dp-steps")  # fmt: skip


class Federation:
    """The server's half of one run, in the steps of Flower's ``Strategy``: ``configure_train``
    (which clients train, with what), ``aggregate_train`` (validate the replies, hand them to the
    method), ``configure_evaluate`` and ``aggregate_evaluate``.  ``run_federation`` calls them
    round by round; none of them knows which method runs -- they ask the method's declarations
    (``upload_spec``, ``per_client_messages``, ``global_for_client``) and its ``aggregate``.
    """

    def __init__(
        self, grid: Grid, cfg: FedmmConfig, engine: str = "simulation",
        saved: checkpoint.Checkpoint | None = None,
    ) -> None:  # fmt: skip
        """Ask the nodes who they are, build the method's first global state and the run record;
        ``saved``: the checkpoint a resumed run continues from (its round < fed.rounds)."""
        self.grid, self.cfg, self.saved = grid, cfg, saved
        self.method = method = get_method(cfg)
        schema = load_schema(cfg)
        self.schema_sha = schema.sha256()
        self.first = 1 if saved is None else saved.round + 1
        nodes, (self.index_of, infos, sizes) = ask_clients(grid, cfg, self.schema_sha)
        self.nodes = nodes
        self.client_ids = {k: info.client_id for k, info in infos.items()}
        method.bind(schema.task_names(), infos)
        model = server_model(cfg, schema)  # shapes from the model config and the schema alone
        self.global_state = method.init_global(model)
        self.spec = validation.UploadSpec.from_model(method, model, cfg)
        self.rng = random.Random(cfg.seed)
        # early stopping: the view whose validation scores are kept ("" = off, none kept)
        self.stop_view = (early_stopping.stopping_view(cfg)
                          if cfg.fed.early_stopping_patience > 0 else "")  # fmt: skip
        data = {self.client_ids[k]: {key: v for key, v in s.items() if key != "description"}
                for k, s in sorted(sizes.items())}  # fmt: skip
        # a site with nothing to learn from or nothing to be scored on is never averaged in (its
        # loader refused it unless data.allow_empty_clients); it is not sampled for training
        excluded = {name: ", ".join(f"0 {split} rows" for split in ("train", "test")
                                    if d[f"num_{split}"] == 0)
                    for name, d in data.items() if not (d["num_train"] and d["num_test"])}  # fmt: skip
        record = results.new_run(
            cfg, schema.name,
            {info.client_id: sizes[k]["description"] for k, info in infos.items()},
            {info.client_id: info.task for info in infos.values()} if not schema.single else None,
            method.views, method.count_trainable(model), notes={"sites": data}, excluded=excluded,
            view_aliases=dict(method.view_aliases),
        )  # fmt: skip
        record["privacy"] = {"dp_clip_norm": cfg.dp.clip_norm,
                             "dp_noise_multiplier": cfg.dp.noise_multiplier}  # fmt: skip
        record["data"] = data
        record["engine"] = engine  # where it ran: fedmm run --resume refuses a deployed run
        if self.saved is not None:
            self.global_state, record = self.saved.global_state, self.saved.record
            record["config"] = cfg.to_flat()  # operational options may have changed on resume
            method.load_server_state(self.saved.server_state)
            self.rng.setstate(self.saved.rng_state)
            log.warning("resuming %s from the checkpoint of round %d", cfg.method, self.saved.round)
        self.record = record
        by_name = {name: k for k, name in self.client_ids.items()}
        self.last_trained = {k: 0 for k in self.client_ids}  # what each client's state must hold
        for entry in record["history"]:
            for name in entry["train"]:
                if name in by_name:
                    self.last_trained[by_name[name]] = entry["round"]
        self.trainable = [n for n in nodes if sizes[self.index_of[n]]["num_train"] > 0]
        if not self.trainable:
            raise RuntimeError("no site holds any training record")
        self.secure = cfg.fed.secure_aggregation != "off"
        if self.secure:  # the masked sums must not wrap, whichever sites a round samples
            weights = [sizes[self.index_of[n]]["num_train"] if cfg.fed.weighting == "samples"
                       else 1 for n in self.trainable]  # fmt: skip
            secagg.check_capacity(sum(weights), secagg.Params.for_round(cfg, len(nodes)))
        self.n_sample = max(1, min(len(self.trainable),
                                   math.ceil(cfg.fed.fraction * len(self.trainable))))  # fmt: skip
        self.eval_rng = random.Random(cfg.seed + 7919)  # its own stream: training never changes
        self.n_eval = max(1, min(len(nodes), math.ceil(cfg.fed.eval_fraction * len(nodes))))

    def who(self, node: int) -> dict:
        index = self.index_of.get(node)
        return {"node": node, "client": None if index is None else self.client_ids[index]}

    def message(self, rnd: int, node: int, kind: str) -> Message:
        """The message to one node: the part of the global state the method sends it, and the
        experiment (``messages.server_message``)."""
        k = self.index_of[node]
        content = messages.server_message(
            self.method.global_for_client(self.global_state, k), self.cfg, rnd, k,
            self.schema_sha, self.last_trained[k], self.record["run_id"],
        )  # fmt: skip
        return Message(content, node, kind, group_id=str(rnd))

    # ------------------------------------------------------------------ train
    def configure_train(self, rnd: int, record: RoundRecord) -> list[Message]:
        """Sample ⌈fed.fraction·K⌉ of the nodes that hold training data (seeded), one message
        each."""
        sampled = sorted(self.rng.sample(self.trainable, self.n_sample))
        out = [self.message(rnd, n, MessageType.TRAIN) for n in sampled]
        record.sampled = len(sampled)
        record.bytes_down = sum(m.content[messages.GLOBAL].count_bytes() for m in out)
        return out

    def aggregate_train(self, rnd: int, out: list[Message], replies, record: RoundRecord) -> None:
        """Validate every reply against the method's declared upload (``validation.py``), then
        ``method.aggregate`` the valid ones when at least ``fed.min_clients`` remain."""
        method, spec = self.method, self.spec
        # a method that sends each client its own part expects only that part back
        sent_keys = {m.metadata.dst_node_id: set(m.content[messages.GLOBAL].keys())
                     for m in out if method.per_client_messages}  # fmt: skip
        ok, seen, answered = [], set(), set()
        down = record.bytes_down // max(1, len(out))
        for reply in replies:
            node = origin(reply, out)
            answered.add(node)
            if reply.has_error():
                log.warning("round %d: node %s failed: %s", rnd, node, reply.error.reason)
                record.failed.append(self.who(node) | {"reason": f"error: {reply.error.reason}"})
                continue
            try:
                m = reply.content[messages.METRICS]
                update = reply.content[messages.UPDATE]
                validation.check_size(update.count_bytes(), spec)
                arrays = messages.from_record(update)
                index = validation.check_reply(
                    arrays, m, spec, seen, self.index_of.get(node), sent_keys.get(node)
                )
            except (validation.InvalidReply, KeyError, TypeError, ValueError) as exc:
                reason = str(exc) if isinstance(exc, validation.InvalidReply) else repr(exc)
                log.warning("round %d: rejected the reply of node %s (client %s): %s",
                            rnd, node, self.who(node)["client"], reason)  # fmt: skip
                record.rejected.append(self.who(node) | {"reason": reason})
                continue
            record.bytes_up += update.count_bytes()
            ok.append(Reply(index, arrays, int(m["num-examples"])))
            record.train[self.client_ids[index]] = (
                {k: float(m[k]) for k in TRAIN_METRICS if k in m}
                | {k.removeprefix("stat."): float(v) for k, v in m.items() if k.startswith("stat.")}
                | {k: float(m[k]) for k in DP_METRICS if k in m}
                | {"bytes_up": update.count_bytes(), "bytes_down": down}
            )
        for msg in out:
            node = msg.metadata.dst_node_id
            if node not in answered:
                log.warning("round %d: no reply from node %s within fed.round_timeout", rnd, node)
                record.failed.append(self.who(node) | {
                    "reason": f"no reply within {self.cfg.fed.round_timeout:g}s"})  # fmt: skip
        record.failures = len(out) - len(ok)  # errors, timeouts and rejected replies alike
        t_server = time.perf_counter()
        if len(ok) >= self.cfg.fed.min_clients:
            self.global_state = method.aggregate(
                self.global_state, sorted(ok, key=lambda r: r.client_index)
            )
            for r in ok:
                self.last_trained[r.client_index] = rnd
        else:
            record.skipped = f"{len(ok)} valid replies < fed.min_clients={self.cfg.fed.min_clients}"
            log.warning("round %d: %s; global state kept", rnd, record.skipped)
        record.server_seconds = time.perf_counter() - t_server

    # ------------------------------------------------------------------ secure train
    def secure_train(self, rnd: int, record: RoundRecord, timeout: float | None) -> None:
        """``configure_train`` + ``aggregate_train`` under secure aggregation: the same seeded
        sample, then SecAgg+'s four stages (``secagg.SecureRound``); the method aggregates the
        survivors' sum (``Method.aggregate_sum``), or the round keeps the global state and
        records why (``record.skipped``).  Every stage's errors, timeouts and rejected masked
        inputs are recorded as in a plain round, once per site."""
        sampled = sorted(self.rng.sample(self.trainable, self.n_sample))
        record.sampled = len(sampled)
        cfg, method, spec = self.cfg, self.method, self.spec
        params = secagg.Params.for_round(cfg, len(sampled))
        keys = sorted(spec.shapes)
        out_of_round: set[int] = set()

        def message(node: int, kind: str, arrays) -> Message:
            if arrays is not None:
                msg = self.message(rnd, node, kind)
                record.bytes_down += msg.content[messages.GLOBAL].count_bytes()
                return msg
            k = self.index_of[node]
            content = messages.server_message({}, cfg, rnd, k, self.schema_sha,
                                              self.last_trained[k], self.record["run_id"])  # fmt: skip
            return Message(content, node, kind, group_id=str(rnd))

        def on_reply(stage: str, out: list[Message], replies):
            answered = set()
            for reply in replies:
                node = origin(reply, out)
                answered.add(node)
                if reply.has_error():
                    log.warning("round %d: node %s failed in secure aggregation %s: %s", rnd,
                                node, stage, reply.error.reason)  # fmt: skip
                    if node not in out_of_round:
                        out_of_round.add(node)
                        record.failed.append(self.who(node) | {
                            "reason": f"secagg {stage}: error: {reply.error.reason}"})  # fmt: skip
                    continue
                try:
                    content = reply.content
                    if stage == secagg.COLLECT:
                        m = content[messages.METRICS]
                        if int(m["client-index"]) != self.index_of.get(node):
                            raise validation.InvalidReply(
                                f"client-index {int(m['client-index'])} from node {node}"
                            )
                        secagg.check_masked(content[secagg.MASKED], keys,
                                            [spec.shapes[k] for k in keys],
                                            params.modulus_bits)  # fmt: skip
                    elif secagg.SECAGG not in content:
                        raise validation.InvalidReply(f"no {secagg.SECAGG} record")
                except (validation.InvalidReply, KeyError, TypeError, ValueError) as exc:
                    reason = f"secagg {stage}: {exc}"
                    log.warning("round %d: rejected the reply of node %s: %s", rnd, node, reason)
                    if node not in out_of_round:
                        out_of_round.add(node)
                        record.rejected.append(self.who(node) | {"reason": reason})
                    continue
                yield node, reply
            for msg in out:
                node = msg.metadata.dst_node_id
                if node not in answered and node not in out_of_round:
                    out_of_round.add(node)
                    log.warning("round %d: no %s reply from node %s", rnd, stage, node)
                    record.failed.append(
                        self.who(node)
                        | {"reason": f"secagg {stage}: no reply within {cfg.fed.round_timeout:g}s"}
                    )

        secure = secagg.SecureRound(
            params, keys, [spec.shapes[k] for k in keys], method.secagg_summed,
            seed=cfg.seed * 1_000_003 + rnd, minimum=cfg.fed.min_clients,
        )  # fmt: skip
        t_server = time.perf_counter()
        try:
            outcome = secure.run(
                sampled, lambda msgs: self.grid.send_and_receive(msgs, timeout=timeout),
                message, on_reply, self.global_state,
            )  # fmt: skip
        except secagg.SecAggFailed as exc:
            record.skipped = f"secure aggregation: {exc}"
            record.failures = len(sampled)
            record.secagg = secure.info
            log.warning("round %d: %s; global state kept", rnd, record.skipped)
            return
        total = Reply(-1, outcome.sums, outcome.weight)
        self.global_state = method.aggregate_sum(self.global_state, total)
        # the server's own work: stage messages, summing, unmasking, the method's step
        record.server_seconds = time.perf_counter() - t_server - outcome.info["wait_seconds"]
        record.failures = len(sampled) - len(outcome.survivors)
        record.secagg = outcome.info
        for node in outcome.survivors:
            k = self.index_of[node]
            self.last_trained[k] = rnd
            m = outcome.metrics.get(node, {})
            record.train[self.client_ids[k]] = {key: float(m[key]) for key in
                                               ("seconds", "load-seconds") if key in m}  # fmt: skip
        record.bytes_up = outcome.info.get("bytes_masked", 0)

    # ------------------------------------------------------------------ evaluate
    def configure_evaluate(self, rnd: int, record: RoundRecord) -> list[Message]:
        """Every ``fed.eval_every`` rounds a seeded ``fed.eval_fraction`` of the nodes, and every
        node after the last round; the new global state to each."""
        last = rnd == self.cfg.fed.rounds
        nodes = self.nodes
        if last or rnd % self.cfg.fed.eval_every == 0:
            if not last and self.n_eval != len(nodes):
                nodes = sorted(self.eval_rng.sample(nodes, self.n_eval))
        else:
            nodes = []
        out = [self.message(rnd, n, MessageType.EVALUATE) for n in nodes]
        record.evaluated = len(out)
        record.bytes_eval = sum(m.content[messages.GLOBAL].count_bytes() for m in out)
        return out

    def aggregate_evaluate(
        self, rnd: int, out: list[Message], replies, record: RoundRecord
    ) -> None:
        """Each valid reply's scores per view (``validation.check_eval_metrics``)."""
        for reply in replies:
            node = origin(reply, out)
            if reply.has_error():
                log.warning("round %d: evaluation failed on node %s: %s", rnd, node,
                            reply.error.reason)  # fmt: skip
                record.eval_failed.append(
                    self.who(node) | {"reason": f"error: {reply.error.reason}"}
                )
                continue
            try:
                m = reply.content[messages.METRICS]
                index, views = validation.check_eval_metrics(m, self.spec, self.index_of.get(node))
                _, val = validation.check_eval_metrics(m, self.spec, index, prefix="val.")
            except (validation.InvalidReply, KeyError, TypeError) as exc:
                log.warning("round %d: rejected the evaluation of node %s: %s", rnd, node, exc)
                record.eval_failed.append(self.who(node) | {"reason": str(exc)})
                continue
            record.clients[self.client_ids[index]] = views
            if val and self.stop_view in val:  # early stopping: the deciding view's only
                record.val[self.client_ids[index]] = {self.stop_view: val[self.stop_view]}
            record.eval[self.client_ids[index]] = {  # scores-withheld: a DP site (sitedp.py)
                k: float(m[k]) for k in ("seconds", "load-seconds", "scores-withheld") if k in m
            }

    # ------------------------------------------------------------------ record
    def save_round(self, rnd: int, record: RoundRecord) -> dict:
        """Checkpoint first, then results.json, then the round's log line.  results.json never
        shows a round that a resumed run would redo (a crash between the two leaves results.json
        a round behind; resuming rewrites it)."""
        entry = results.add_round(self.record, record)
        early_stopping.update(self.record, self.cfg)  # in the checkpoint: a resume stays stopped
        checkpoint.save(self.cfg, rnd, self.global_state, self.method.server_state(),
                        self.rng.getstate(), self.record)  # fmt: skip
        results.save_run(self.cfg.out_dir, self.record)
        log.info("%s", round_line(entry, self.cfg.fed.rounds,
                                  self.record.get("excluded_clients", {})))  # fmt: skip
        return entry


def run_federation(
    grid: Grid, cfg: FedmmConfig, on_round: Callable[[dict], None] | None = None,
    engine: str = "simulation",
) -> dict:  # fmt: skip
    """Run ``fed.rounds`` rounds of ``cfg.method``; returns (and writes) the run record.

    Every round ends with a server checkpoint (``checkpoint.py``), then results.json and one INFO
    line (``round_line``); with ``resume=true`` the loop continues after the last checkpointed
    round.  Temporary files of writes a killed server left in ``out_dir`` and its checkpoints are
    removed at the start.  Replies that fail validation (``validation.py``)
    and nodes that fail or time out are logged and recorded per round (``rejected``, ``failed``),
    and the round aggregates the others when at least ``fed.min_clients`` remain.  Evaluation
    runs every ``fed.eval_every`` rounds on a seeded ``fed.eval_fraction`` of the nodes, and on
    every node after the last round.
    """
    if cfg.resume:  # the checkpointed run's own options (checkpoint.resume_config), or an error
        cfg = checkpoint.resume_config(cfg)
    validate_config(cfg)  # the one pass the CLI runs too: flwr run / a deployment get it here
    for directory in (cfg.out_dir, checkpoint.path(cfg).parent):
        remove_stale_temps(directory)  # left by writes a killed server never finished
    saved = checkpoint.load(cfg) if cfg.resume else None
    if saved is not None and (saved.round >= cfg.fed.rounds or saved.record.get("stopped_early")):
        # killed after its last checkpoint (the last round, or the one it stopped early after),
        # maybe before results: write them
        results.save_run(cfg.out_dir, saved.record)
        results.write_reports(cfg.out_dir)
        return saved.record
    fed = Federation(grid, cfg, engine, saved)
    timeout = cfg.fed.round_timeout or None
    with tracking.track(cfg, fed.record) as tracker:  # cfg.track: TensorBoard, MLflow or none
        for rnd in range(fed.first, cfg.fed.rounds + 1):
            t0 = time.perf_counter()
            record = RoundRecord(rnd)
            # 1. train: sampled clients run the method's local update on the global state
            if fed.secure:  # SecAgg+: four message stages, the server learns only the sum
                fed.secure_train(rnd, record, timeout)
            else:
                out = fed.configure_train(rnd, record)
                fed.aggregate_train(rnd, out, grid.send_and_receive(out, timeout=timeout), record)
            # 2. evaluate: the new global state (and each client's own models) on test data
            out = fed.configure_evaluate(rnd, record)
            replies = grid.send_and_receive(out, timeout=timeout) if out else []
            fed.aggregate_evaluate(rnd, out, replies, record)
            # 3. record: checkpoint, results.json, one log line
            record.seconds = time.perf_counter() - t0
            entry = fed.save_round(rnd, record)
            tracker.log_round(entry)
            if on_round:
                on_round(entry)
            if fed.record.get("stopped_early"):  # early_stopping.py: no better validation score
                break
        results.write_reports(cfg.out_dir)  # summary.md and curves.png once, before the tracker
        # takes them as artifacts
    return fed.record
