"""What every method shares: the method interface, its view kinds and its registry.

The helpers a method calls live beside it: ``state`` (state by part name), ``aggregation``
(``Reply``, ``weighted_average``), ``context`` (``ClientContext``: the round's steps, schedule,
optimiser and evaluation), ``losses`` and ``precision``.

A method module holds both halves of its protocol and registers itself (``@register("name")``,
plus one line in ``fedmm/methods/__init__.py``); docs/adding-a-method.md walks through one.

* server half: ``init_global`` (the first global state), ``aggregate`` (replies -> new global),
  optionally ``global_for_client`` (with ``per_client_messages = True``) and ``server_state``;
* client half: ``local_update`` (one round of local work: returns a ``ClientUpdate`` -- what it
  uploads and what it keeps private) and ``evaluate`` (score per *view*, by kind: ``shared``,
  ``shared+head``, ``personal``, plus a method's own extras -- ``VIEW_KINDS``).  The base class
  runs the round around them (``client_train`` / ``client_evaluate``): it resets the model
  (``prepare``), loads what the client received and what it kept (``load``), calls the method,
  and the ClientApp stores the returned private state.

The round loop (``fedmm.federation``) and the transport never look inside.  States are flat
``{key: tensor}`` dicts with keys ``"<part>/<param>"`` where part is ``proj``, ``head`` or
``adapter.<set name>`` (a named PEFT set of the configured ``peft.type``: adapter, LoRA, prompt
or BitFit) -- exactly what ``load_parts`` writes back.  A key whose part carries a namespace
(``"personal:adapter.global_adapter/..."``, ``"c/..."`` for a tensor that is no model part) is the
method's own: ``load`` leaves it alone.  What a method uploads is declared (``upload_spec``: keys
-> shapes, model parts and extra tensors such as SCAFFOLD's control variates); validation, the
payload audit and DP read that declaration.

Equal terms for every method: ``ClientContext.steps`` yields the same number of optimiser steps
per round (``train.local_steps``) and sets the learning rate from one schedule over the whole run,
indexed by the global step ``(round - 1) * local_steps + i`` -- it never restarts; a method that
trains two models (Ditto, TAP) asks for the budget twice and counts the second under its own
name.  The optimiser is AdamW over explicit parameter groups unless a method asks for another
(``ClientContext.optimizer(kind=...)``); gradients are reset to ``None`` (an unused parameter gets
no update from stale moments).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from fedmm.backbones import FusionVLModel, check_backbone_peft
from fedmm.config import ConfigError, FedmmConfig
from fedmm.methods.aggregation import ClientInfo, Reply
from fedmm.methods.context import ClientContext
from fedmm.methods.precision import PRECISIONS
from fedmm.methods.state import Arrays, State, load_parts, model_keys, num_params, part_shapes
from fedmm.peft import PEFT_TYPES
from fedmm.spec import METHOD_SPECS, SHARED, MethodSpec


# ---------------------------------------------------------------------- the interface
@dataclass
class ClientUpdate:
    """What a method's ``local_update`` returns: nothing else of a round leaves the method.

    ``upload``: the tensors sent to the server, exactly the keys of ``Method.upload_spec`` (TAP:
    those of the client's own modules); ``keep``: the client's whole private state for its next
    round (it replaces what it kept before; the ClientApp stores it, never the server)."""

    upload: State
    keep: State = field(default_factory=dict)


class Method(ABC):
    """A federated method: both halves of its protocol.  Subclasses set the class attributes and
    register with ``@register("name")``; ``options`` is the dataclass of their own config section
    (``cfg.<name>``), defined in their module."""

    name: str = ""  # set by ``register``
    # declared on the ground floor (``fedmm.spec.METHOD_SPECS[name]``) and set by ``register``:
    spec: MethodSpec = MethodSpec()
    options: type | None = None  # the method's options dataclass (config section ``name``)
    # what ``evaluate`` scores: kinds of VIEW_KINDS first, then the method's extras (an instance
    # may narrow it by its options: FedDAT with a federated head has no ``shared+head``)
    views: tuple[str, ...] = (SHARED,)
    # the names before fedmm 0.2, kept in results.json for one release (gone in 0.3): old -> new
    view_aliases: Mapping[str, str] = MappingProxyType({})
    adapter_sets: tuple[str, ...] = ()
    federated: bool = True  # False: trained without the round loop (centralised)
    # True: the server sends each client its own part of the global state (global_for_client)
    # and expects only that part back
    per_client_messages: bool = False
    # why record-level DP-SGD (site setting dp-mode=record, federation/dpsgd.py) cannot serve this
    # method's local update; "" = it can: the update is ``ctx.steps`` / ``ctx.step`` on one
    # plain loss over one model (data-independent terms passed as ``step(public=...)``)
    dp_sgd_refusal: str = "its local update is not declared to be one plain loss over one model"
    # why this method cannot train a generative model (fedmm.generation); "" = it can
    generative_refusal: str = ""
    # why this method cannot run under secure aggregation (fed.secure_aggregation, federation/
    # secagg.py); "" = it can: its ``aggregate`` reads the replies only through Σ_k w_k·upload_k
    # and Σ_k w_k (and plain sums of the ``secagg_summed`` keys), so ``aggregate_sum`` serves it
    secagg_refusal: str = "its server step is not declared to need only the sum of the uploads"
    # why fed.early_stopping_patience cannot apply ("" = it can: its last round is like any other)
    early_stopping_refusal: str = ""

    def __init__(self, cfg: FedmmConfig) -> None:
        self.cfg = cfg
        if cfg.peft.type not in PEFT_TYPES:
            raise ConfigError(
                f"unknown peft.type {cfg.peft.type!r}; choices: {', '.join(PEFT_TYPES)}"
            )
        if cfg.train.precision not in PRECISIONS or cfg.train.accumulation < 1:
            raise ConfigError(
                f"train.precision must be one of {PRECISIONS} (got {cfg.train.precision!r}) and "
                f"train.accumulation >= 1 (got {cfg.train.accumulation})"
            )
        check_backbone_peft(cfg.model, cfg.peft)  # e.g. prompt tuning on a dual encoder
        if self.generative_refusal and _generative_backbone(cfg.model.backbone):
            raise ConfigError(f"method {type(self).name!r} cannot train the generative backbone "
                              f"{cfg.model.backbone!r} yet: {self.generative_refusal}")  # fmt: skip
        if type(self).name in cfg.methods:  # its own options: intervals and choices
            from fedmm.validate import check_section

            check_section(type(self).name, cfg.methods[type(self).name])

    @classmethod
    def aliases_for(cls, flat_config: Mapping[str, object]) -> Mapping[str, str]:
        """The ``view_aliases`` of this method run with ``flat_config`` (a results.json run's
        ``config``), for renaming the views of runs stored before fedmm 0.2."""
        return cls.spec.aliases_for(flat_config)

    @classmethod
    def views_for(cls, flat_config: Mapping[str, object]) -> tuple[str, ...]:
        """The views this method scores when run with ``flat_config`` (reports mark a view the
        method has but an older run lacks)."""
        return cls.spec.views_for(flat_config)

    @property
    def opts(self):
        """This method's options section (``cfg.<name>``): that of the nearest class in its
        MRO that declares ``options`` (a subclass without its own reads its parent's)."""
        for cls in type(self).__mro__:
            if cls.__dict__.get("options") is not None:
                return self.cfg.methods[cls.name]
        raise AttributeError(f"{type(self).__name__} has no options")

    def prepare(self, model: FusionVLModel) -> None:
        """Make sure the model has this method's adapter sets, then reset every trainable part."""
        model.peft.ensure_sets(self.adapter_sets)
        model.reset_trainable(self.cfg.seed)

    # ------------------------------------------------------------------ declarations
    def upload_parts(self) -> tuple[str, ...]:
        """Model parts that leave the client."""
        return ()

    def extra_uploads(self, model: FusionVLModel) -> dict[str, tuple[int, ...]]:
        """Uploaded tensors that are no model part (SCAFFOLD's control-variate change): key ->
        shape.  Their keys are absent from the global state, so DP measures them from 0."""
        return {}

    def upload_spec(self, model: FusionVLModel) -> dict[str, tuple[int, ...]]:
        """Everything a training reply may carry, key -> shape: the ``upload_parts`` of
        ``model`` plus ``extra_uploads``.  Read by the server's reply validation, the payload
        audit and the upload-size bound."""
        return part_shapes(model, self.upload_parts()) | self.extra_uploads(model)

    def trainable_parts(self) -> tuple[str, ...]:
        """Parts this method trains (for parameter counts)."""
        return ("proj", "head", *(f"adapter.{s}" for s in self.adapter_sets))

    def count_trainable(self, model: FusionVLModel) -> int:
        """Trainable parameters of this method's model (one client's view)."""
        model.peft.ensure_sets(self.adapter_sets)
        return num_params(model, self.trainable_parts())

    # ------------------------------------------------------------------ server half
    @abstractmethod
    def init_global(self, model: FusionVLModel) -> Arrays:
        """The global state sent in round 1 (may be empty)."""

    @abstractmethod
    def aggregate(self, global_state: Arrays, replies: Sequence[Reply]) -> Arrays:
        """New global state from this round's replies."""

    def secagg_summed(self, key: str) -> bool:
        """Whether the server needs upload ``key`` summed over the sites, Σ_k x_k, rather than
        averaged with the weights, Σ_k w_k x_k / Σ_k w_k (default: averaged; SCAFFOLD's Δc)."""
        return False

    def aggregate_sum(self, global_state: Arrays, total: Reply) -> Arrays:
        """New global state from what secure aggregation reveals (``federation/secagg.py``):
        ``total.arrays[key]`` = Σ_k w_k x_k / Σ_k w_k (the weighted mean of the uploads;
        ``secagg_summed`` keys: Σ_k x_k) and ``total.num_examples`` = Σ_k w_k, never one
        site's upload (``total.client_index`` = -1).

        Default: ``aggregate`` with that one reply -- exact for a method whose ``aggregate`` is
        ``weighted_average`` of the replies (the mean of one reply is itself) followed by any
        step on that average, and plain sums of the summed keys; a method that declares
        ``secagg_refusal = ""`` vouches for that (its tests compare both paths)."""
        return self.aggregate(global_state, [total])

    def bind(self, tasks: Sequence[str], clients: Mapping[int, ClientInfo]) -> None:
        """The schema's tasks and the clients (server: all, from the query; client: itself), for
        methods whose modules depend on them (TAP).  Default: nothing to do."""
        return None

    def global_for_client(self, global_state: Arrays, client_index: int) -> Arrays:
        """What the server sends client ``client_index`` (default: the whole global state;
        a method that overrides it sets ``per_client_messages = True``)."""
        return global_state

    def server_state(self) -> Arrays:
        """State the server half keeps across rounds besides the global state (e.g. FedAdam's
        moments), for checkpoints; flat ``{name: array}``.  Default: none."""
        return {}

    def load_server_state(self, state: Arrays) -> None:
        """Restore what ``server_state`` returned (resuming a run)."""
        if state:
            raise ValueError(f"{self.name} keeps no server state, got {sorted(state)[:3]}")

    # ------------------------------------------------------------------ client half
    def client_train(self, ctx: ClientContext, received: State) -> ClientUpdate:
        """One round of local training, as the ClientApp runs it: reset the model, load what
        the client received and kept (``load``), then the method's ``local_update``."""
        self.prepare(ctx.model)
        self.load(ctx, received)
        return self.local_update(ctx, received)

    def client_evaluate(self, ctx: ClientContext, received: State) -> dict[str, float]:
        """Score per view, as the ClientApp runs it: reset, ``load``, the method's ``evaluate``."""
        self.prepare(ctx.model)
        self.load(ctx, received)
        return self.evaluate(ctx, received)

    def load(self, ctx: ClientContext, received: State) -> None:
        """Write the received model tensors, then the kept ones, into the freshly reset model.
        Namespaced keys (a method's own, e.g. ``personal:...``) are left to the method."""
        load_parts(ctx.model, model_keys(received))
        load_parts(ctx.model, model_keys(ctx.kept))

    @abstractmethod
    def local_update(self, ctx: ClientContext, received: State) -> ClientUpdate:
        """One round of local work on the loaded model: the upload and the new private state."""

    @abstractmethod
    def evaluate(self, ctx: ClientContext, received: State) -> dict[str, float]:
        """Test score per view (``ctx.view``) of the loaded model."""


def _generative_backbone(name: str) -> bool:
    from fedmm.backbones.generative import GENERATIVE_BACKBONES

    return name in GENERATIVE_BACKBONES


# ---------------------------------------------------------------------- the registry
METHODS: dict[str, type[Method]] = {}


def register(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: method ``name`` (``--method name``), implementing the declarations of
    ``fedmm.spec.METHOD_SPECS[name]`` (its ``options`` dataclass is config section ``name``:
    ``cfg.<name>``, ``--set <name>.<option>=...``; its views and old view names).

    Raises ``ValueError`` for a name registered twice or not declared in ``METHOD_SPECS``, and
    ``TypeError`` for a class that declares ``options`` or ``views`` itself (they are declared
    once, on the ground floor)."""

    def decorate(cls: type[Method]) -> type[Method]:
        if name in METHODS and METHODS[name] is not cls:
            raise ValueError(f"method {name!r} is registered twice")
        if name not in METHOD_SPECS:
            raise ValueError(f"method {name!r} is not declared in fedmm.spec.METHOD_SPECS")
        own = sorted({"options", "views", "view_aliases"} & set(cls.__dict__))
        if own:
            raise TypeError(f"{cls.__qualname__} sets {', '.join(own)}: declare them in "
                            f"fedmm.spec.METHOD_SPECS[{name!r}]")  # fmt: skip
        spec = METHOD_SPECS[name]
        cls.name, cls.spec = name, spec
        cls.views, cls.view_aliases = spec.views, spec.view_aliases
        if spec.options is not None:
            cls.options = spec.options
        METHODS[name] = cls
        return cls

    return decorate
