"""What crosses the wire, in one place: Flower records <-> fedmm states.

Server -> client (``query`` / ``train`` / ``evaluate``):
    "global": ArrayRecord of the method's global state (trainable tensors only)
    "config": ConfigRecord {"round": int, "experiment": the run's experiment options as JSON
              (``config.experiment_keys``: never a path, device or thread count),
              "client-index": int (-1 in the query), "schema-sha256": str,
              "last-trained": the last round whose training reply of this client the server
              aggregated (0: none), "run-id": hex id of the run (kept across a resume)}
Client -> server (``query``):
    "metrics": MetricRecord {"client-index" (-1: the site declares none), "num-train",
               "num-test", "unknown-train", "unknown-test"}
    "site": ConfigRecord {"name", "task", "modalities" (comma-separated), "description",
            "schema-sha256"}
Client -> server (``train``):
    "update": ArrayRecord of the method's upload (trainable tensors only)
    "metrics": MetricRecord of scalars (num-examples, client-index, steps, lr, loss, seconds)
Client -> server (``evaluate``):
    "metrics": MetricRecord {"acc.<view>": float, "client-index", "num-examples", "seconds"}
Secure aggregation (``fed.secure_aggregation``, ``secagg.py``): four ``train`` messages per round,
each the usual "global" (empty but in the collect stage) and "config" plus a "secagg"
ConfigRecord {"stage": setup | share-keys | collect-masked-input | unmask, ...}; replies carry a
"secagg" ConfigRecord (public keys, encrypted shares, shares) or, in the collect stage, "masked":
ArrayRecord of uint64/uint32 masked integers under the upload's keys + "secagg/weight", and
"metrics" {"client-index", "seconds", "load-seconds"} only.

Update compression (``fed.compression``, the upload only; ``from_record`` decodes whatever
arrived, so the server always sees float32 arrays under the original keys):

* ``none``: float32 as is;
* ``fp16``: float16 (relative error ≤ 2⁻¹¹ per value in float16's normal range);
* ``int8``: per-tensor affine 8-bit quantisation, ``x ≈ lo + s·(q + 128)`` with ``q`` int8,
  ``s = (max − min)/255``, ``lo = min``; the pair ``[lo, s]`` travels as float32 under
  ``"<key>@int8"``.  Error ≤ s/2 per value (plus float32 rounding); a constant tensor is exact.
"""

from __future__ import annotations

import json

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedmm.config import ConfigError, FedmmConfig, experiment_keys, experiment_of
from fedmm.spec import COMPRESSIONS

GLOBAL, CONFIG, UPDATE, METRICS, SITE = "global", "config", "update", "metrics", "site"
# fed.compression's choices, declared with the option (fedmm.spec)
INT8_SUFFIX = "@int8"


def check_compression(compression: str) -> None:
    if compression not in COMPRESSIONS:
        raise ConfigError(
            f"fed.compression must be one of {', '.join(COMPRESSIONS)}, got {compression!r}"
        )


def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-tensor affine int8: ``(q, [lo, s])`` with ``x ≈ lo + s·(q + 128)``."""
    x = np.asarray(x, dtype=np.float32)
    lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    scale = (hi - lo) / 255.0
    if scale > 0:
        q = np.clip(np.rint((x - lo) / scale), 0, 255) - 128
    else:
        q = np.full(x.shape, -128.0)
    return q.astype(np.int8), np.array([lo, scale], dtype=np.float32)


def dequantize_int8(q: np.ndarray, params: np.ndarray) -> np.ndarray:
    lo, scale = (float(v) for v in params)
    return (lo + scale * (q.astype(np.float32) + 128.0)).astype(np.float32)


def to_record(arrays: dict[str, np.ndarray], compression: str = "none") -> ArrayRecord:
    """Arrays -> ArrayRecord, float32 or compressed (``compression``, see module docstring)."""
    check_compression(compression)
    out: dict[str, Array] = {}
    for k, v in arrays.items():
        if compression == "fp16":
            out[k] = Array(np.ascontiguousarray(v, dtype=np.float16))
        elif compression == "int8":
            q, params = quantize_int8(v)
            out[k], out[k + INT8_SUFFIX] = Array(np.ascontiguousarray(q)), Array(params)
        else:
            out[k] = Array(np.ascontiguousarray(v, dtype=np.float32))
    return ArrayRecord(out)


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """ArrayRecord -> float32 arrays under the original keys, whatever the encoding."""
    out = {}
    for k in record.keys():
        if k.endswith(INT8_SUFFIX):
            continue
        value = record[k].numpy()
        if k + INT8_SUFFIX in record:
            out[k] = dequantize_int8(value, record[k + INT8_SUFFIX].numpy())
        else:
            out[k] = value.astype(np.float32, copy=False)
    return out


class RefusedMessage(ValueError):
    """A server message a client must not act on; nothing is written or changed."""


def server_message(
    arrays: dict[str, np.ndarray], cfg: FedmmConfig, rnd: int, client_index: int = -1,
    schema_sha: str = "", last_trained: int = 0, run_id: str = "",
) -> RecordDict:  # fmt: skip
    config = {
        "round": rnd, "experiment": json.dumps(experiment_of(cfg), sort_keys=True),
        "client-index": client_index, "schema-sha256": schema_sha, "last-trained": last_trained,
        "run-id": run_id,
    }  # fmt: skip
    return RecordDict({GLOBAL: to_record(arrays), CONFIG: ConfigRecord(config)})


def read_server_message(content: RecordDict) -> tuple[dict[str, np.ndarray], FedmmConfig, dict]:
    """``(global arrays, experiment config, meta)``; meta holds round, client-index,
    schema-sha256 and last-trained.  Raises ``RefusedMessage`` for a message that carries an
    option outside the experiment allowlist, a malformed config or non-finite global values."""
    try:
        config = content[CONFIG]
        experiment = json.loads(str(config["experiment"]))
        meta = {
            "round": int(config["round"]), "client-index": int(config["client-index"]),
            "schema-sha256": str(config["schema-sha256"]),
            "last-trained": int(config["last-trained"]), "run-id": str(config["run-id"]),
        }  # fmt: skip
    except (KeyError, TypeError, ValueError) as exc:
        raise RefusedMessage(f"malformed server message: {exc!r}") from None
    if not meta["run-id"].isalnum() and meta["run-id"]:
        raise RefusedMessage(f"malformed run id {meta['run-id']!r}")  # it names a directory
    if not isinstance(experiment, dict):
        raise RefusedMessage("malformed server message: the experiment is not a JSON object")
    foreign = sorted(set(experiment) - experiment_keys())
    if foreign:
        raise RefusedMessage(
            f"the server sent options that are not its to set: {', '.join(foreign)} (a site's "
            "paths, device, threads and privacy floor come from its own --node-config)"
        )
    try:
        cfg = FedmmConfig().with_overrides(experiment)
        arrays = from_record(content[GLOBAL])
    except (ConfigError, KeyError, TypeError, ValueError) as exc:
        raise RefusedMessage(f"malformed server message: {exc}") from None
    bad = [k for k, v in arrays.items() if not np.isfinite(v).all()]
    if bad:
        raise RefusedMessage(f"the global state holds non-finite values in {bad[:3]}")
    return arrays, cfg, meta


def client_reply(
    arrays: dict[str, np.ndarray] | None, metrics: dict[str, float], compression: str = "none"
) -> RecordDict:
    """A client's reply; the update (if any) encoded with ``compression`` (``fed.compression``)."""
    records: dict = {METRICS: MetricRecord({k: float(v) for k, v in metrics.items()})}
    if arrays is not None:
        records[UPDATE] = to_record(arrays, compression)
    return RecordDict(records)
