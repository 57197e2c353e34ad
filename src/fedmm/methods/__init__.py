"""The method registry: name -> class.  Each method is one module holding both protocol halves;
it registers itself with ``@register("name")`` when imported.  Its declarations (options, views)
and its line in the registry are on the ground floor, ``fedmm.spec.METHOD_SPECS``
(docs/adding-a-method.md); this package imports ``fedmm.methods.<name>`` for each."""

from __future__ import annotations

import importlib

from fedmm.config import ConfigError, FedmmConfig
from fedmm.methods.aggregation import Reply
from fedmm.methods.base import METHODS, ClientUpdate, Method, register
from fedmm.methods.context import ClientContext
from fedmm.spec import METHOD_SPECS

MODULES = tuple(METHOD_SPECS)  # one module per declared method, named as it
for _module in MODULES:
    importlib.import_module(f"fedmm.methods.{_module}")


def get_method(cfg: FedmmConfig) -> Method:
    if cfg.method not in METHODS:
        raise ConfigError(f"unknown method {cfg.method!r}; choices: {', '.join(METHODS)}")
    return METHODS[cfg.method](cfg)


__all__ = ["METHODS", "ClientContext", "ClientUpdate", "Method", "Reply", "get_method", "register"]
