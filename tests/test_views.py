"""The view definitions, pinned for every method: which model each named view evaluates.

Views are named by kind (``fedmm.spec.VIEW_KINDS``): ``shared`` = what the federation shares,
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
from fedmm.methods.fedavg import FedAvg
from fedmm.methods.state import from_namespace, get_parts, model_keys, to_torch
from fedmm.runtime import get_runtime
from fedmm.spec import PERSONAL, SHARED, SHARED_HEAD, VIEW_KINDS

# methods that evaluate as FedAvg does (its subclasses that keep its evaluate)
FEDAVG_FAMILY = sorted(n for n, c in METHODS.items()
                       if issubclass(c, FedAvg) and c.evaluate is FedAvg.evaluate)  # fmt: skip
COVERED = {*FEDAVG_FAMILY, "ditto", "fedper", "feddat", "local", "centralized", "tap"}


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
    """Every tensor of ``part`` in ``state`` equals ``source``'s (keys renamed by ``rename``).
    A multi-task head holds every task's head; only the client's own task's are in ``source``,
    and at least one tensor must match."""
    keys = [k for k in state if k.split("/", 1)[0] == part]
    assert keys, f"no {part} tensors in the view"
    checked = 0
    for k in keys:
        src = (rename or {}).get(part, part) + "/" + k.split("/", 1)[1]
        if src in source or part != "head":
            assert torch.equal(state[k], torch.as_tensor(source[src])), f"{k} is not {src}'s"
            checked += 1
    assert checked, f"none of the view's {part} tensors is in the source"


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
    assert views[SHARED][0] == ("global_adapter",)
    assert views[PERSONAL][0] == ("client_adapter", "frozen_global")
    assert views["client"][0] == ("client_adapter",)
    for part in ("adapter.global_adapter", "proj", "head"):
        assert_from(views[SHARED][1], new_global, part)
    for view in (PERSONAL, "client"):
        assert_from(views[view][1], new_global, "head")
        assert_from(views[view][1], kept, "adapter.client_adapter")
    assert_from(views[PERSONAL][1], new_global, "adapter.frozen_global",
                rename={"adapter.frozen_global": "adapter.global_adapter"})  # fmt: skip


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
    parts = [f"adapter.{s}" for s in views[SHARED][0]]
    assert parts and all(p in {k.split("/", 1)[0] for k in model_keys(new_global)} for p in parts)
    for part in [*parts, "proj", "head"]:
        assert_from(views[SHARED][1], new_global, part)
        assert_from(views[PERSONAL][1], personal, part)


@pytest.mark.parametrize("name", sorted(set(METHODS) - {"centralized"}))
def test_a_client_that_has_not_trained_scores_no_model_of_its_own(tiny_cfg, name):
    """Before its first round a client has no personal model or head: it reports ``shared``
    where the method has one and nothing else -- never the shared model under another name."""
    cfg = tiny_cfg.with_overrides({"method": name, "fed.rounds": 2})
    method = bound_method(cfg)
    start = method.global_for_client(method.init_global(get_runtime(cfg).model), 0)
    scores = method.client_evaluate(client_ctx(cfg, {}, 1), to_torch(start))
    expected = {SHARED} & set(method.views)
    assert {k.partition(".")[0] for k in scores} == expected, name


def test_every_method_has_its_views_pinned_here():
    assert set(METHODS) == COVERED, f"add a view test for {set(METHODS) - COVERED}"


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
        scores = {v: 0.1 * (i + 1) for i, v in enumerate(views)}  # a distinct value per view
        return {"method": method, "benchmark": "b", "seed": 0, "views": views,
                "config": config or {}, "final": scores | {"global.closed": 0.9},
                "history": [{"clients": {"c": dict(scores)}}]}  # fmt: skip

    feddat = results.upgrade(old("feddat", ["global", "personalized", "dat", "client"]))
    assert feddat["views"] == [SHARED_HEAD, PERSONAL, "client"]
    # personalized and dat were one evaluation (equal in every real run): either lands on personal
    assert feddat["history"][0]["clients"]["c"] == pytest.approx(
        {SHARED_HEAD: 0.1, PERSONAL: 0.3, "client": 0.4})  # fmt: skip
    assert feddat["final"]["shared+head.closed"] == 0.9 and feddat["final"]["global"] == 0.1
    assert results.scored_views(feddat) == pytest.approx({SHARED_HEAD: 0.1, "shared+head.closed": 0.9,
                                                          PERSONAL: 0.3, "client": 0.4})  # fmt: skip
    fedhead = results.upgrade(old("feddat", ["global", "personalized"],
                                  {"feddat.federate_head": True}))  # fmt: skip
    assert fedhead["views"] == [SHARED, PERSONAL]
    assert fedhead["history"][0]["clients"]["c"] == {SHARED: 0.1, PERSONAL: 0.2}
    assert results.upgrade(old("feddat", ["global"], {"feddat.federate_head": False}))["views"] == [
        SHARED_HEAD]  # fmt: skip
    for method, old_views, new_views in (
        ("fedper", ["personalized"], [SHARED_HEAD]),
        ("fedavg", ["global", "personalized"], [SHARED, PERSONAL]),
        ("ditto", ["global", "personalized"], [SHARED, PERSONAL]),
        ("tap", ["global", "personalized", "distilled"], [SHARED, PERSONAL, "distilled"]),
        ("local", ["personalized"], [PERSONAL]),
        ("centralized", ["global"], [SHARED]),
    ):
        run = results.upgrade(old(method, old_views))
        assert run["views"] == new_views, method
        assert run["history"][0]["clients"]["c"] == pytest.approx(
            {n: 0.1 * (i + 1) for i, n in enumerate(new_views)}), method  # fmt: skip
    gone = results.upgrade(old("fedgone", ["global", "personalized"]))  # unknown method
    assert gone["views"] == ["global", PERSONAL]
