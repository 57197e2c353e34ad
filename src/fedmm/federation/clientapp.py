"""The fedmm ClientApp (Flower Message API): one SuperNode = one client of the benchmark.

The node's data partition is ``node_config["partition-id"]`` (set by Flower's simulation runtime,
or by ``--node-config "partition-id=K"`` for a SuperNode).  The experiment config arrives with each
message from the server.  The method named there does the work; this file only moves records.

Client state (FedDAT's A_c, personal heads, the local model, ...) persists across rounds in the
Flower ``Context`` (``context.state``) **and** on disk, atomically, in
``<out_dir>/client_state/<method>-<benchmark>-seed<S>/client-<K>.pt``.  A restarted node with an
empty Context picks the disk copy up; in round 1 any old copy is ignored (a new run starts clean).
The copy being replaced is kept as ``client-<K>.pt.prev``: when a server resumes an interrupted
round r+1 that this client had already trained, the client goes back to its state of round r.

With ``dp.clip_norm > 0`` the upload is clipped and noised here, on the client (``dp.py``).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from fedmm.config import FedmmConfig
from fedmm.federation import dp, messages
from fedmm.files import atomic_torch_save
from fedmm.methods import ClientContext, get_method
from fedmm.methods.base import State, to_numpy, to_torch
from fedmm.runtime import get_runtime

log = logging.getLogger(__name__)
STATE_KEY, STATE_META = "fedmm.client_state", "fedmm.client_state_meta"

app = ClientApp()
CORE_STATS = {"steps", "lr_first", "lr_last", "loss_sum"}  # sent under their own names


@app.train()
def train(msg: Message, context: Context) -> Message:
    return handle(msg, context, train=True)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return handle(msg, context, train=False)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Which client (data partition) this node is: the server asks once before round 1."""
    return Message(
        messages.client_reply(None, {"client-index": partition_id(context)}), reply_to=msg
    )


def partition_id(context: Context) -> int:
    try:
        return int(context.node_config["partition-id"])
    except KeyError as exc:
        raise RuntimeError(
            "this SuperNode has no 'partition-id' in its node config; start it with "
            '--node-config "partition-id=K" (K = the client index in the benchmark)'
        ) from exc


def handle(msg: Message, context: Context, train: bool) -> Message:
    t0 = time.perf_counter()
    global_arrays, cfg, rnd = messages.read_server_message(msg.content)
    index = partition_id(context)
    runtime = get_runtime(cfg)
    method = get_method(cfg)
    state = restore_state(context, cfg, index, rnd, train=train)
    steps = cfg.train.local_steps
    ctx = ClientContext(
        cfg, runtime.model, runtime.client_split(index, "train"), runtime.client_split(index, "test"),
        state, rnd, index, steps, steps * cfg.fed.rounds,
    )  # fmt: skip
    global_state = to_torch(global_arrays)
    if train:
        upload = method.client_train(ctx, global_state)
        save_state(context, cfg, index, rnd, ctx.state)
        arrays, dp_stats = dp.privatize(to_numpy(upload), global_arrays, cfg.dp)
        n_steps = ctx.stats.get("steps", 0)
        metrics = {f"stat.{k}": v for k, v in ctx.stats.items() if k not in CORE_STATS}
        metrics |= {
            "client-index": index, "num-examples": len(ctx.train), "steps": n_steps,
            "lr-first": ctx.stats.get("lr_first", 0.0), "lr-last": ctx.stats.get("lr_last", 0.0),
            "loss": ctx.stats.get("loss_sum", 0.0) / max(1, n_steps),
            "seconds": time.perf_counter() - t0, **dp_stats,
        }  # fmt: skip
        reply = messages.client_reply(arrays, metrics, cfg.fed.compression)
        return Message(reply, reply_to=msg)
    views = method.client_evaluate(ctx, global_state)
    metrics = {f"acc.{view}": acc for view, acc in views.items()}
    metrics.update({"client-index": index, "num-examples": len(ctx.test),
                    "seconds": time.perf_counter() - t0})  # fmt: skip
    return Message(messages.client_reply(None, metrics), reply_to=msg)


# ---------------------------------------------------------------------- persistent state
def state_path(cfg: FedmmConfig, index: int) -> Path:
    run = f"{cfg.method}-{cfg.data.benchmark}-seed{cfg.seed}"
    return Path(cfg.out_dir) / "client_state" / run / f"client-{index}.pt"


def prev_path(path: Path) -> Path:
    return path.with_name(path.name + ".prev")  # not client-*.pt: only current states match


def restore_state(
    context: Context, cfg: FedmmConfig, index: int, rnd: int, train: bool = True
) -> State:
    """The client's private state: from the Context, else (after a restart) from disk.

    Training in round ``rnd`` starts from the state of a round < rnd; evaluating in round ``rnd``
    reads the state that round's training left (≤ rnd).  A newer copy -- written by a round the
    server never completed, before it was restarted -- is passed over for the one before it.
    """
    newest = rnd - 1 if train else rnd
    meta = context.state.get(STATE_META)
    if (
        meta is not None and str(meta["method"]) == cfg.method and STATE_KEY in context.state
        and int(meta.get("round", 0)) <= newest
    ):  # fmt: skip
        return to_torch(messages.from_record(context.state[STATE_KEY]))
    if rnd <= 1 and train:
        return {}
    path = state_path(cfg, index)
    for candidate in (path, prev_path(path)):
        if candidate.is_file():
            saved = torch.load(candidate, weights_only=True)
            if 0 < saved.get("round", 0) <= newest:
                log.info("client %d: restored state of round %d from %s",
                         index, saved["round"], candidate)  # fmt: skip
                return dict(saved["state"])
    return {}


def save_state(context: Context, cfg: FedmmConfig, index: int, rnd: int, state: State) -> None:
    """Keep ``state`` in the Context and on disk (atomically; the previous round's copy kept)."""
    context.state[STATE_KEY] = messages.to_record(to_numpy(state))
    context.state[STATE_META] = ConfigRecord({"method": cfg.method, "round": rnd})
    path = state_path(cfg, index)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file():
        try:
            if torch.load(path, weights_only=True).get("round", 0) < rnd:
                os.replace(path, prev_path(path))
        except Exception as exc:  # a torn or foreign file is not worth keeping
            log.warning("client %d: unreadable state file %s replaced: %s", index, path, exc)
    atomic_torch_save({"round": rnd, "state": {k: v.cpu() for k, v in state.items()}}, path)


__all__ = ["app", "handle", "query", "restore_state", "save_state", "state_path"]
