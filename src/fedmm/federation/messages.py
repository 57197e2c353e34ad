"""What crosses the wire, in one place: Flower records <-> fedmm states.

Server -> client (``train`` / ``evaluate``):
    "global": ArrayRecord of the method's global state (trainable tensors only)
    "config": ConfigRecord {"round": int, "fedmm": flat config as JSON}
Client -> server (``train``):
    "update": ArrayRecord of the method's upload (trainable tensors only)
    "metrics": MetricRecord of scalars (num-examples, client-index, steps, lr, loss, seconds)
Client -> server (``evaluate``):
    "metrics": MetricRecord {"acc.<view>": float, "client-index", "num-examples"}
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedmm.config import FedmmConfig

GLOBAL, CONFIG, UPDATE, METRICS = "global", "config", "update", "metrics"


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(
        {k: Array(np.ascontiguousarray(v, dtype=np.float32)) for k, v in arrays.items()}
    )


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: record[k].numpy() for k in record.keys()}


def server_message(arrays: dict[str, np.ndarray], cfg: FedmmConfig, rnd: int) -> RecordDict:
    return RecordDict(
        {GLOBAL: to_record(arrays), CONFIG: ConfigRecord({"round": rnd, "fedmm": cfg.to_json()})}
    )


def read_server_message(content: RecordDict) -> tuple[dict[str, np.ndarray], FedmmConfig, int]:
    config = content[CONFIG]
    return (
        from_record(content[GLOBAL]),
        FedmmConfig.from_json(str(config["fedmm"])),
        int(config["round"]),
    )


def client_reply(arrays: dict[str, np.ndarray] | None, metrics: dict[str, float]) -> RecordDict:
    records: dict = {METRICS: MetricRecord({k: float(v) for k, v in metrics.items()})}
    if arrays is not None:
        records[UPDATE] = to_record(arrays)
    return RecordDict(records)
