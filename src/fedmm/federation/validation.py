"""Server-side validation of training replies: nothing malformed or hostile reaches aggregation.

Why: the server averages whatever clients upload, weighted by the example count they claim.  One
NaN poisons the global model for everyone; a reply with extra keys could overwrite tensors that
must stay frozen (``text.encoder.layer.0...``); an enormous example count hands one client the
whole average; a huge tensor exhausts the server's memory.  So before ``method.aggregate`` every
reply must match the method's declared upload exactly:

    keys    == the keys of method.upload_spec(model)   (model parts and extra tensors; no more, no fewer;
               for methods that send each client its own part of the global state (TAP),
               only the keys that client was sent)
    shape   == the server model's shape of that parameter,  dtype == float32
    values  finite (no NaN, no ±Inf)
    bytes   ≤ validate.max_upload_mb (default: the declared upload's own size)
    metrics finite scalars; 1 ≤ num-examples ≤ validate.max_examples (an integer);
            0 ≤ client-index < fed.clients, the index the node gave when asked who it is,
            at most one reply per client index per round

A violation raises ``InvalidReply`` with the reason; the round loop logs it with the node and
client, counts it in results.json (``rejected``) and leaves the reply out.  Checks run on the
decoded ``dict[str, np.ndarray]`` (``messages.from_record``), so they hold whatever encoding the
wire used; the size bound is checked on the record before decoding.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedmm.config import FedmmConfig

# Scalars every training reply must carry (messages.py); more are allowed, all must be finite.
REQUIRED_METRICS = ("client-index", "num-examples")


class InvalidReply(ValueError):
    """A training reply that must not be aggregated; the message says why."""


@dataclass(frozen=True)
class UploadSpec:
    """What one valid training reply looks like for this run."""

    shapes: dict[str, tuple[int, ...]]  # expected key -> shape
    max_bytes: int  # bound on the uploaded tensors' bytes
    max_examples: int
    num_clients: int
    dtype: np.dtype = np.dtype(np.float32)

    @classmethod
    def from_model(cls, method, model, cfg: FedmmConfig) -> UploadSpec:
        """The method's declared upload (``Method.upload_spec``) on the server's copy of the
        model (after init_global)."""
        shapes = method.upload_spec(model)
        declared = 4 * sum(math.prod(s) for s in shapes.values())
        limit = int(cfg.validate.max_upload_mb * 2**20) if cfg.validate.max_upload_mb > 0 else 0
        return cls(shapes, limit or declared, cfg.validate.max_examples, cfg.fed.clients)


def check_size(num_bytes: int, spec: UploadSpec) -> None:
    """Before decoding: the record's tensor bytes (``ArrayRecord.count_bytes``) within bound.

    Flower's ``count_bytes`` adds a few bytes of metadata per array, hence the per-key slack."""
    slack = 256 * max(1, len(spec.shapes))
    if num_bytes > spec.max_bytes + slack:
        raise InvalidReply(f"upload of {num_bytes} bytes exceeds the limit of {spec.max_bytes}")


def check_arrays(
    arrays: Mapping[str, np.ndarray], spec: UploadSpec, sent_keys: set[str] | None = None
) -> None:
    """Keys, shapes, dtypes and finiteness of a decoded upload; ``sent_keys``: the keys this
    client was sent, when the method sends each client only its own part (else all declared)."""
    expected = set(spec.shapes) if sent_keys is None else set(spec.shapes) & set(sent_keys)
    extra = sorted(set(arrays) - expected)
    if extra:
        more = f" (+{len(extra) - 3} more)" if len(extra) > 3 else ""
        raise InvalidReply(f"unexpected keys {extra[:3]}{more}: not part of the declared upload")
    missing = sorted(expected - set(arrays))
    if missing:
        raise InvalidReply(f"missing keys {missing[:3]}" + (" ..." if len(missing) > 3 else ""))
    for key, value in arrays.items():
        if not isinstance(value, np.ndarray):
            raise InvalidReply(f"{key}: not an array ({type(value).__name__})")
        if value.dtype != spec.dtype:
            raise InvalidReply(f"{key}: dtype {value.dtype}, expected {spec.dtype}")
        if tuple(value.shape) != spec.shapes[key]:
            raise InvalidReply(f"{key}: shape {tuple(value.shape)}, expected {spec.shapes[key]}")
        if not np.isfinite(value).all():
            bad = int((~np.isfinite(value)).sum())
            raise InvalidReply(f"{key}: {bad} non-finite values (NaN or Inf)")


def check_metrics(
    metrics: Mapping[str, float],
    spec: UploadSpec,
    seen: set[int],
    expected_index: int | None = None,
) -> int:
    """Scalar metrics of a training reply; returns its client index (not yet added to ``seen``).

    ``expected_index``: the client index the node gave before round 1 -- a node speaks for its
    own partition only."""
    for key in REQUIRED_METRICS:
        if key not in metrics:
            raise InvalidReply(f"metric {key!r} missing")
    for key, value in metrics.items():
        if not isinstance(value, int | float) or not math.isfinite(value):
            raise InvalidReply(f"metric {key!r} = {value!r} is not a finite number")
    n, index = float(metrics["num-examples"]), float(metrics["client-index"])
    if not n.is_integer() or not 1 <= n <= spec.max_examples:
        raise InvalidReply(
            f"num-examples = {metrics['num-examples']!r} is not an integer in "
            f"[1, validate.max_examples={spec.max_examples}]"
        )
    if not index.is_integer() or not 0 <= index < spec.num_clients:
        raise InvalidReply(
            f"client-index = {metrics['client-index']!r} is not in [0, {spec.num_clients})"
        )
    if expected_index is not None and int(index) != expected_index:
        raise InvalidReply(f"client-index = {int(index)}, but this node is client {expected_index}")
    if int(index) in seen:
        raise InvalidReply(f"a second reply for client index {int(index)} in this round")
    return int(index)


def check_eval_metrics(
    metrics: Mapping[str, float], spec: UploadSpec, expected_index: int | None = None,
    prefix: str = "acc.",
) -> tuple[int, dict[str, float]]:  # fmt: skip
    """An evaluation reply: ``(client index, {view: accuracy})``, accuracies finite in [0, 1];
    ``prefix="val."``: the validation scores (early stopping) instead of the test scores."""
    index = metrics.get("client-index")
    if (
        not isinstance(index, int | float)
        or not math.isfinite(index)
        or not (float(index).is_integer() and 0 <= index < spec.num_clients)
    ):
        raise InvalidReply(f"client-index = {index!r} is not in [0, {spec.num_clients})")
    if expected_index is not None and int(index) != expected_index:
        raise InvalidReply(f"client-index = {int(index)}, but this node is client {expected_index}")
    views = {}
    for key, value in metrics.items():
        if key.startswith(prefix):
            if not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
                raise InvalidReply(f"metric {key!r} = {value!r} is not an accuracy in [0, 1]")
            views[key.removeprefix(prefix)] = float(value)
    return int(index), views


def check_reply(
    arrays: Mapping[str, np.ndarray], metrics: Mapping[str, float], spec: UploadSpec,
    seen: set[int], expected_index: int | None = None, sent_keys: set[str] | None = None,
) -> int:  # fmt: skip
    """Every check on one decoded training reply; returns its client index, added to ``seen``
    only when the whole reply is valid."""
    check_arrays(arrays, spec, sent_keys)
    index = check_metrics(metrics, spec, seen, expected_index)
    seen.add(index)
    return index


__all__ = ["InvalidReply", "UploadSpec", "check_arrays", "check_eval_metrics", "check_metrics",
           "check_reply", "check_size"]  # fmt: skip
