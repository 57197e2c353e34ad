"""The method registry: name -> class.  Each method is one module holding both protocol halves
and its options; it registers itself with ``@register("name")`` when imported.  Adding a method
is one line here (docs/adding-a-method.md)."""

from __future__ import annotations

import importlib

from fedmm.config import ConfigError, FedmmConfig
from fedmm.methods.aggregation import Reply
from fedmm.methods.base import METHODS, ClientUpdate, Method, register
from fedmm.methods.context import ClientContext

MODULES = (
    "local",
    "centralized",
    "fedavg",
    "fedprox",
    "fedadam",
    "ditto",
    "fedper",
    "feddat",
    "fedpia",
    "tap",
    "fedavgm",
    "fedyogi",
    "scaffold",
)
for _module in MODULES:
    importlib.import_module(f"fedmm.methods.{_module}")


def get_method(cfg: FedmmConfig) -> Method:
    if cfg.method not in METHODS:
        raise ConfigError(f"unknown method {cfg.method!r}; choices: {', '.join(METHODS)}")
    return METHODS[cfg.method](cfg)


__all__ = ["METHODS", "ClientContext", "ClientUpdate", "Method", "Reply", "get_method", "register"]
