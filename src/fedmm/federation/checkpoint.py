"""Server checkpoints: a federated run survives the server's death and resumes where it stopped.

After every round the server writes, atomically and durably (``fedmm.files``: temp file, fsync,
``os.replace``, fsync of the directory) and *before* results.json, one file
``<out_dir>/checkpoints/<method>-<peft>-<benchmark>-seed<S>.pt`` holding everything the rest of the
run depends on:

    round           the last completed round r
    global          the method's global state after round r
    server          the method's own server state (``Method.server_state``: FedAdam's m, v)
    rng             the client-sampling RNG's state, so rounds r+1.. sample the same clients
    record          the results record so far (history of rounds 1..r), as JSON
    config          the flat config, to refuse resuming a different experiment

``resume=true`` (``fedmm run --resume DIR``) makes the round loop load it and continue at r+1.
Client private state is not here: each client keeps its own on its node (clientapp.py), and a
resumed round r+1 reads the copy a client wrote in round ≤ r.  Together, an interrupted run that
is resumed produces the same results as one that never stopped (tested).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# what may differ between the interrupted and the resuming process (where things are, how they
# are shown) and what a resumed run may change (operational options): derived from the
# options' declarations (fedmm.spec.option)
from fedmm.config import MAY_DIFFER, OPERATIONAL, ConfigError, FedmmConfig, run_name
from fedmm.files import atomic_torch_save

log = logging.getLogger(__name__)


@dataclass
class Checkpoint:
    round: int
    global_state: dict[str, np.ndarray]
    server_state: dict[str, np.ndarray]
    rng_state: tuple
    record: dict
    config: dict


def path(cfg: FedmmConfig) -> Path:
    return Path(cfg.out_dir) / "checkpoints" / f"{run_name(cfg)}.pt"


def _tensors(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(v, copy=True)) for k, v in arrays.items()}


def save(cfg: FedmmConfig, rnd: int, global_state, server_state, rng_state, record) -> Path:
    """Write the checkpoint of round ``rnd`` atomically; returns its path."""
    target = path(cfg)
    target.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "round": rnd,
        "global": _tensors(global_state),
        "server": _tensors(server_state),
        "rng": json.dumps(rng_state),
        "record": json.dumps(record),
        "config": json.dumps(cfg.to_flat()),
    }
    atomic_torch_save(payload, target)
    return target


def _as_rng_state(value):
    """JSON turned the RNG state's tuples into lists; ``random.setstate`` wants tuples."""
    return tuple(_as_rng_state(v) for v in value) if isinstance(value, list) else value


def load(cfg: FedmmConfig) -> Checkpoint | None:
    """The checkpoint of ``cfg``'s run, or None; refuses one made with a different config."""
    source = path(cfg)
    if not source.is_file():
        return None
    payload = torch.load(source, weights_only=True)
    saved = json.loads(payload["config"])
    current = cfg.to_flat()
    differ = sorted(
        k for k in set(saved) | set(current)
        if k not in MAY_DIFFER | OPERATIONAL and saved.get(k) != current.get(k)
    )  # fmt: skip
    if differ:
        raise ConfigError(
            f"{source} was made with a different configuration ({', '.join(differ)}); "
            "resume with the same options or use another --out"
        )
    return Checkpoint(
        round=int(payload["round"]),
        global_state={k: v.numpy() for k, v in payload["global"].items()},
        server_state={k: v.numpy() for k, v in payload["server"].items()},
        rng_state=_as_rng_state(json.loads(payload["rng"])),
        record=json.loads(payload["record"]),
        config=saved,
    )


def find(out_dir: str | Path) -> list[FedmmConfig]:
    """Configs of every checkpointed run under ``out_dir`` (for ``fedmm run --resume DIR``)."""
    return [cfg for cfg, _ in find_runs(out_dir)]


def find_runs(out_dir: str | Path) -> list[tuple[FedmmConfig, dict]]:
    """``(config, run record so far)`` of every checkpointed run under ``out_dir``."""
    runs = []
    for source in sorted((Path(out_dir) / "checkpoints").glob("*.pt")):
        payload = torch.load(source, weights_only=True)
        cfg = FedmmConfig().with_overrides(json.loads(payload["config"]))
        runs.append((cfg, json.loads(payload["record"])))
    return runs


def resume_config(cfg: FedmmConfig) -> FedmmConfig:
    """The config a ``resume=true`` run continues with: the checkpointed run's own options, with
    this process's locations (``MAY_DIFFER``) and operational options (``OPERATIONAL``).

    The run is the only checkpoint under ``out_dir``, or the one of ``cfg``'s (method, PEFT,
    benchmark, seed) when there are several; none is an error naming what is there -- a resume
    never silently starts a fresh run."""
    runs = find_runs(cfg.out_dir)
    match = [c for c, _ in runs if run_name(c) == run_name(cfg)]
    chosen = match or ([runs[0][0]] if len(runs) == 1 else [])
    if not chosen:
        there = ", ".join(p.stem for p in sorted((Path(cfg.out_dir) / "checkpoints").glob("*.pt")))
        raise ConfigError(
            f"resume=true, but no checkpoint of {run_name(cfg)} under {cfg.out_dir}/checkpoints"
            + (f" (there: {there}; name one with method, variant, peft.type, data.benchmark "
               "and seed)"
               if there else " (nothing was checkpointed there)")
        )  # fmt: skip
    default = FedmmConfig().to_flat()
    # flwr run's run config holds every default (pyproject): an operational option changes only
    # when it was set to something else; a location only when given
    keep = {k: v for k, v in cfg.to_flat().items()
            if (k in OPERATIONAL and v != default[k])
            or (k in MAY_DIFFER and v not in ("", None))}  # fmt: skip
    return chosen[0].with_overrides(keep | {"resume": True})
