"""The view definitions, pinned for every method: which model each named view evaluates.

Views are named by kind (``methods.base.VIEW_KINDS``): ``shared`` = what the federation shares,
shared head included; ``shared+head`` = the shared body with the client's own head; ``personal``
= the client's own full model.  Each test trains one client round (what it keeps), then evaluates
with a *different* global state (the round's new aggregate), and records -- at the moment each
view is scored -- the active PEFT sets and every tensor of the model they use.  Each view must
then be exactly the named parts of the global state or of what the client kept.
"""

from __future__ import annotations

import pytest
import torch
from conftest import bound_method

from fedmm import results
from fedmm.methods import METHODS, ClientContext
from fedmm.methods.base import (
    PERSONAL,
    SHARED,
    SHARED_HEAD,
    VIEW_KINDS,
    from_namespace,
    get_parts,
    model_keys,
    to_torch,
)
from fedmm.runtime import get_runtime

FEDAVG_FAMILY = ["fedavg", "fedprox", "fedadam", "fedavgm", "fedyogi", "scaffold", "fedpia"]


def client_ctx(cfg, kept, rnd):
    rt = get_runtime(cfg)
    steps = cfg.train.local_steps
    return ClientContext(cfg, rt.model, rt.client_split(0, "train"), rt.client_split(0, "test"),
                         kept, rnd, 0, steps, steps * cfg.fed.rounds)  # fmt: skip


def evaluated_models(cfg, monkeypatch):
    """Train client 0 for one round, then evaluate it with a new global state.  Returns
    ``(views: {view: (active sets, {key: tensor})}, new global, what the client kept)``."""
    method = bound_method(cfg)
    model = get_runtime(cfg).model
    start = method.global_for_client(method.init_global(model), 0)  # TAP: the client's own
    kept = method.client_train(client_ctx(cfg, {}, 1), to_torch(start)).keep
    new_global = {k: v + 0.5 for k, v in to_torch(start).items()}  # differs from all trained
    seen: dict[str, tuple] = {}
    original = ClientContext.view

    def recording_view(self, *names):
        active = self.model.peft._active
        parts = ["head", "proj", *(f"adapter.{s}" for s in active.names)]
        for name in names:
            seen[name] = (active.names, get_parts(self.model, parts))
        return original(self, *names)

    monkeypatch.setattr(ClientContext, "view", recording_view)
    method.client_evaluate(client_ctx(cfg, kept, 1), new_global)
    assert set(seen) == set(method.views), "every declared view is scored, and only those"
    return seen, new_global, kept


def assert_from(state: dict, source: dict, part: str, rename: dict | None = None) -> None:
    """Every tensor of ``part`` in ``state`` equals ``source``'s (keys renamed by ``rename``)."""
    keys = [k for k in state if k.split("/", 1)[0] == part]
    assert keys, f"no {part} tensors in the view"
    for k in keys:
        src = (rename or {}).get(part, part) + "/" + k.split("/", 1)[1]
        if src in source or part != "head":  # a multi-task head: only this task's rows exist
            assert torch.equal(state[k], torch.as_tensor(source[src])), f"{k} is not {src}'s"


@pytest.mark.parametrize("name", FEDAVG_FAMILY)
def test_fedavg_family_views(tiny_cfg, monkeypatch, name):
    """shared = θ^{t+1}; shared+head = θ^{t+1}'s body + the local copy's head; personal = the
    locally trained copy θ_k."""
    views, new_global, kept = evaluated_models(tiny_cfg.with_overrides({"method": name}),
                                               monkeypatch)  # fmt: skip
    personal = from_namespace(kept, "personal")
    assert set(views) == {SHARED, SHARED_HEAD, PERSONAL}
    for view in views.values():
        assert view[0] == ("global_adapter",)
    for part in ("adapter.global_adapter", "proj", "head"):
        assert_from(views[SHARED][1], new_global, part)
        assert_from(views[PERSONAL][1], personal, part)
    assert_from(views[SHARED_HEAD][1], new_global, "adapter.global_adapter")
    assert_from(views[SHARED_HEAD][1], new_global, "proj")
    assert_from(views[SHARED_HEAD][1], personal, "head")


def test_ditto_views(tiny_cfg, monkeypatch):
    """shared = θ^{t+1}; personal = v_k (its own adapter, projection and head); no shared+head."""
    views, new_global, kept = evaluated_models(tiny_cfg.with_overrides({"method": "ditto"}),
                                               monkeypatch)  # fmt: skip
    assert set(views) == {SHARED, PERSONAL}
    assert views[SHARED][0] == ("global_adapter",)
    assert views[PERSONAL][0] == ("personal_adapter",)
    personal = from_namespace(kept, "personal")
    for part in ("adapter.global_adapter", "proj", "head"):
        assert_from(views[SHARED][1], new_global, part)
    for part in ("adapter.personal_adapter", "proj", "head"):
        assert_from(views[PERSONAL][1], personal, part)


def test_fedper_views(tiny_cfg, monkeypatch):
    """shared+head only: the federated body with the client's kept head."""
    views, new_global, kept = evaluated_models(tiny_cfg.with_overrides({"method": "fedper"}),
                                               monkeypatch)  # fmt: skip
    assert set(views) == {SHARED_HEAD}
    assert_from(views[SHARED_HEAD][1], new_global, "adapter.global_adapter")
    assert_from(views[SHARED_HEAD][1], new_global, "proj")
    assert_from(views[SHARED_HEAD][1], kept, "head")


def test_feddat_views_with_a_personal_head(tiny_cfg, monkeypatch):
    """Default (personal head): shared+head = A_s with the client's head -- never called
    ``shared``; personal = the DAT (A_c + Â_s = the new A_s, own head); client = A_c."""
    views, new_global, kept = evaluated_models(tiny_cfg.with_overrides({"method": "feddat"}),
                                               monkeypatch)  # fmt: skip
    assert set(views) == {SHARED_HEAD, PERSONAL, "client"}
    assert views[SHARED_HEAD][0] == ("global_adapter",)
    assert views[PERSONAL][0] == ("client_adapter", "frozen_global")
    assert views["client"][0] == ("client_adapter",)
    assert_from(views[SHARED_HEAD][1], new_global, "adapter.global_adapter")
    assert_from(views[SHARED_HEAD][1], new_global, "proj")
    for view in (SHARED_HEAD, PERSONAL, "client"):
        assert_from(views[view][1], kept, "head")
    assert_from(views[PERSONAL][1], kept, "adapter.client_adapter")
    assert_from(views[PERSONAL][1], new_global, "adapter.frozen_global",
                rename={"adapter.frozen_global": "adapter.global_adapter"})  # fmt: skip


def test_feddat_views_with_a_federated_head(tiny_cfg, monkeypatch):
    """``feddat.federate_head``: shared = A_s with the shared head; the DAT uses it too."""
    cfg = tiny_cfg.with_overrides({"method": "feddat", "feddat.federate_head": True})
    views, new_global, kept = evaluated_models(cfg, monkeypatch)
    assert set(views) == {SHARED, PERSONAL, "client"}
    for part in ("adapter.global_adapter", "proj", "head"):
        assert_from(views[SHARED][1], new_global, part)
    assert_from(views[PERSONAL][1], new_global, "head")
    assert_from(views[PERSONAL][1], kept, "adapter.client_adapter")


def test_local_and_centralized_views(tiny_cfg, monkeypatch):
    """local: personal = the client's own model; centralized: shared = the one pooled model."""
    for name, view, sets in (("local", PERSONAL, ("local_adapter",)),
                             ("centralized", SHARED, ("central_adapter",))):  # fmt: skip
        views, _, kept = evaluated_models(tiny_cfg.with_overrides({"method": name}), monkeypatch)
        assert set(views) == {view} and views[view][0] == sets
        for part in (f"adapter.{sets[0]}", "proj", "head"):
            assert_from(views[view][1], kept, part)


def test_tap_views(tiny_cfg, monkeypatch):
    """shared = the client's global sub-model θ[K_k] (its task's shared head); personal = the
    stage-1 personalised model.  (``distilled``, stage 2, is tested in test_tap.py.)"""
    cfg = tiny_cfg.with_overrides({"method": "tap", "fed.rounds": 2})  # no stage 2 in round 1
    monkeypatch.setattr(METHODS["tap"], "views", (SHARED, PERSONAL))  # distilled: last round
    views, new_global, kept = evaluated_models(cfg, monkeypatch)
    personal = from_namespace(kept, "personal")
    assert views[SHARED][0] == views[PERSONAL][0]
    for part in {k.split("/", 1)[0] for k in model_keys(new_global)} & {
        k.split("/", 1)[0] for k in views[SHARED][1]
    }:
        if part.startswith("adapter.") and part.removeprefix("adapter.") in views[SHARED][0]:
            assert_from(views[SHARED][1], new_global, part)
            assert_from(views[PERSONAL][1], personal, part)
    assert_from(views[SHARED][1], new_global, "head")
    assert_from(views[PERSONAL][1], personal, "head")


def test_every_method_declares_kinds_first_and_aliases_onto_its_views(tiny_cfg):
    for name, cls in METHODS.items():
        kinds = [v for v in cls.views if v in VIEW_KINDS]
        assert list(cls.views[: len(kinds)]) == kinds, f"{name}: kinds before extras"
        assert set(cls.view_aliases.values()) <= set(cls.views), name
        assert not set(cls.view_aliases) & set(VIEW_KINDS), name


def test_old_results_are_read_with_views_by_kind_and_old_names_kept_as_aliases():
    """A run stored before 0.2: FedDAT's ``global`` (A_s + own head) becomes ``shared+head``, never
    ``shared``; with a federated head it is ``shared``.  ``final`` keeps the old names."""

    def old(method, views, config=None):
        return {"method": method, "benchmark": "b", "seed": 0, "views": views,
                "config": config or {}, "final": {v: 0.5 for v in views} | {"global.closed": 0.4},
                "history": [{"clients": {"c": {v: 0.5 for v in views}}}]}  # fmt: skip

    feddat = results.upgrade(old("feddat", ["global", "personalized", "dat", "client"]))
    assert feddat["views"] == [SHARED_HEAD, PERSONAL, "client"]
    assert feddat["final"]["shared+head.closed"] == 0.4 and feddat["final"]["global"] == 0.5
    assert results.scored_views(feddat).keys() == {SHARED_HEAD, "shared+head.closed", PERSONAL,
                                                   "client"}  # fmt: skip
    assert feddat["history"][0]["clients"]["c"].keys() == {SHARED_HEAD, PERSONAL, "client"}
    fedhead = results.upgrade(old("feddat", ["global", "personalized"],
                                  {"feddat.federate_head": True}))  # fmt: skip
    assert fedhead["views"] == [SHARED, PERSONAL]
    assert results.upgrade(old("fedper", ["personalized"]))["views"] == [SHARED_HEAD]
    assert results.upgrade(old("fedavg", ["global", "personalized"]))["views"] == [SHARED, PERSONAL]
