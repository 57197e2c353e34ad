"""Method registry: name -> class.  Each method is one module holding both protocol halves."""

from __future__ import annotations

from fedmm.config import ConfigError, FedmmConfig
from fedmm.methods.base import ClientContext, Method, Reply
from fedmm.methods.centralized import Centralized
from fedmm.methods.ditto import Ditto
from fedmm.methods.fedadam import FedAdam
from fedmm.methods.fedavg import FedAvg
from fedmm.methods.feddat import FedDAT
from fedmm.methods.fedper import FedPer
from fedmm.methods.fedpia import FedPIA
from fedmm.methods.fedprox import FedProx
from fedmm.methods.local import Local
from fedmm.methods.tap import TAP

METHODS: dict[str, type[Method]] = {
    m.name: m
    for m in (Local, Centralized, FedAvg, FedProx, FedAdam, Ditto, FedPer, FedDAT, FedPIA, TAP)
}


def get_method(cfg: FedmmConfig) -> Method:
    if cfg.method not in METHODS:
        raise ConfigError(f"unknown method {cfg.method!r}; choices: {', '.join(METHODS)}")
    return METHODS[cfg.method](cfg)


__all__ = ["METHODS", "ClientContext", "Method", "Reply", "get_method"]
