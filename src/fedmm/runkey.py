"""A run's identity: one frozen value instead of a tuple written out by hand in every module.

A run in a results directory is identified by ``(method, variant, peft, benchmark, seed)``:

* ``method``: the registered method (``fedavg``, ``feddat``, ...);
* ``variant``: a named ablation of it ("" for the method itself, e.g. ``feddat-nodistill``);
* ``peft``: the PEFT type (``adapter``, ``lora``, ``prompt``, ``bitfit``);
* ``benchmark``: the benchmark the run recorded -- for site directories the name in their task
  schema, not ``"sites"``;
* ``seed``: the run's seed.

``results.json`` holds at most one run per key; ``fedmm run``, ``fedmm bench``, ``fedmm deploy``
and the engine find "their" run by it (``fedmm deploy`` used to match by method, seed and PEFT
type only and could return an older run of another benchmark or variant from the same ``--out``).
This module imports nothing heavy: reading results needs no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmm.config import SITES


@dataclass(frozen=True, order=True)
class RunKey:
    """The identity of one run (module docstring)."""

    method: str
    variant: str
    peft: str
    benchmark: str
    seed: int

    # the flat config keys the fields come from (``of_config``), in field order
    CONFIG_KEYS = ("method", "variant", "peft.type", "data.benchmark", "seed")

    @classmethod
    def of_run(cls, run: dict[str, Any]) -> RunKey:
        """The key of a run as stored in results.json (older files: variant in the config,
        PEFT type absent = ``adapter``)."""
        variant = run.get("variant", run.get("config", {}).get("variant", ""))
        return cls(run["method"], variant, run.get("peft", "adapter"), run["benchmark"],
                   int(run["seed"]))  # fmt: skip

    @classmethod
    def of_config(cls, cfg, benchmark: str | None = None) -> RunKey:
        """The key ``cfg`` (a ``FedmmConfig``) records under; ``benchmark``: the recorded
        benchmark where known, else ``recorded_benchmark(cfg)`` (reads the task schema of site
        directories: ``ValueError`` naming the file when it cannot)."""
        return cls(cfg.method, cfg.variant, cfg.peft.type, benchmark or recorded_benchmark(cfg),
                   int(cfg.seed))  # fmt: skip

    @property
    def label(self) -> str:
        """The variant's name or the method's."""
        return self.variant or self.method

    def __str__(self) -> str:
        return f"{self.label}+{self.peft} seed {self.seed} on {self.benchmark}"


def recorded_benchmark(cfg) -> str:
    """The benchmark a run of ``cfg`` records: for site directories (``data.benchmark =
    "sites"``) the name in their task schema (``data.schema``, else ``<data.data_dir>/
    schema.json``), otherwise ``data.benchmark``."""
    if cfg.data.benchmark != SITES:
        return cfg.data.benchmark
    from fedmm.data.schema import SCHEMA_FILE, read_schema

    schema = cfg.data.schema or str(Path(cfg.data.data_dir) / SCHEMA_FILE)
    return read_schema(Path(schema)).name


__all__ = ["RunKey", "recorded_benchmark"]
