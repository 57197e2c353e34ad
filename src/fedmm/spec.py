"""The ground floor: what every option and every method *declares*, with no torch and nothing of
fedmm above it.

Every option is a dataclass field made with ``option``: its default, its valid ``interval`` or
``choices``, its ``help`` (``fedmm list``), its **scope** -- who decides it -- and whether it
**affects results**:

* ``experiment``: the run's science (method, PEFT, model, hyper-parameters, rounds, the DP
  request); the server sends it to every site (``config.experiment_keys``);
* ``site``: a site's own business (its files, its device, its threads): set by the site's operator
  (Flower's node config), never carried by a server message;
* ``server``: the server process's (where results go, how long to wait, how evaluation is
  sampled, reply bounds) -- never sent either;
* ``display``: how a run is shown (progress bars).

``affects_results = False`` marks where things are and how they are shown (paths, the device,
progress): such an option may differ when a run is resumed and is no part of a finished run's
identity in ``fedmm bench``.  ``operational = True`` marks a server option a resumed run may change
(how long to wait, how few replies suffice, how evaluation is sampled).  ``flag``: the ``fedmm run``
flag that sets it.  Every list that used to be kept by hand -- the site/server allowlists, resume's
may-differ set, bench's volatile keys, the CLI's flags, validation's ranges and choices, ``fedmm
list`` and the generated ``[tool.flwr.app.config]`` -- is derived from these fields
(``fedmm.config``).

Each method's options dataclass and its report declarations (``MethodSpec``: views, old view
names) live here too, registered statically in ``METHOD_SPECS`` (one line a method), so
``FedmmConfig()``, ``fedmm list`` and reading results import no method and no torch; the method
module (``fedmm.methods.<name>``) implements the protocol and takes its declarations from here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

EXPERIMENT, SITE, SERVER, DISPLAY = SCOPES = ("experiment", "site", "server", "display")


def option(
    default: Any, interval: str = "", *, choices: tuple = (), help: str = "",
    scope: str = EXPERIMENT, affects_results: bool = True, operational: bool = False,
    flag: str = "",
) -> Any:  # fmt: skip
    """A dataclass field of an options section with its declaration (module docstring):
    ``interval`` like ``"(0, inf)"`` or ``"[0, 1]"`` (numbers; round brackets exclude the bound)
    or ``choices`` (strings), checked by ``validate_config``; ``help`` (``fedmm list``);
    ``scope``, ``affects_results``, ``operational`` and the ``fedmm run`` ``flag``.

    Raises ``ValueError`` for a scope that is not one of ``SCOPES``."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    metadata = {"interval": interval, "choices": tuple(choices), "help": help, "scope": scope,
                "affects_results": affects_results, "operational": operational, "flag": flag}  # fmt: skip
    return field(default=default, metadata=metadata)


def parse_interval(text: str) -> tuple[float, float, bool, bool]:
    """``"(0, inf)"`` -> ``(0.0, inf, True, True)``: (low, high, low open, high open)."""
    lo, hi = (float(x) for x in text[1:-1].split(","))
    return lo, hi, text[0] == "(", text[-1] == ")"


# ---------------------------------------------------------------------- choices of core options
PEFT_TYPE_NAMES = ("adapter", "lora", "prompt", "bitfit")  # fedmm.peft.PEFT_TYPES implements them
# fedmm.backbones registers them: the fusion backbones and the Hugging Face families
BACKBONE_NAMES = ("blip", "clip", "llava", "llava-next", "minilm-mobilenet", "paligemma", "qwen2-vl", "siglip",
                  "smollm2-mobilenet", "smolvlm", "tiny", "tiny-gen", "vilt")  # fmt: skip
# the generative ones (fedmm.backbones.generative registers them): they answer in text, no head
# Hugging Face generative VLM families (fedmm.backbones.hf_generative): every method trains them
HF_GENERATIVE_BACKBONE_NAMES = ("smolvlm", "qwen2-vl", "llava", "llava-next", "paligemma")
GENERATIVE_BACKBONE_NAMES = ("smollm2-mobilenet", "tiny-gen", *HF_GENERATIVE_BACKBONE_NAMES)
PRECISIONS = ("fp32", "bf16", "auto")
COMPRESSIONS = ("none", "fp16", "int8")  # fedmm.federation.messages encodes them
SECURE_AGGREGATIONS = ("off", "secagg+")  # fedmm.federation.secagg implements them
SCHEDULES = ("cosine", "linear", "constant")
WEIGHTINGS = ("samples", "uniform")
TEST_SPLITS = ("standard", "image-disjoint")
DIRICHLET_BY = ("answer", "organ")
CLIENTS_BY = ("column", "iid", "dirichlet")

# ---------------------------------------------------------------------- views by kind
KINDS = ("shared", "shared+head", "personal")
SHARED, SHARED_HEAD, PERSONAL = KINDS
VIEW_KINDS = {
    SHARED: "every parameter the federation shares, with the shared head: the model a new client "
    "would receive",
    SHARED_HEAD: "the shared body (PEFT set, projection) with the client's own head: the head it "
    "trained locally in its last round and kept (a generative model has no head: the shared "
    "model with the client's own personal part, FedPer's personal projector / last decoder layers)",
    PERSONAL: "the client's own full model (FedAvg's locally trained copy, Ditto's v_k, FedDAT's "
    "DAT, FedPIA's local model, TAP's stage-1 model, local training's)",
}
"""The view kinds every method names the same way (docs/methods.md, "Views").  A method that has no
such model has no such view -- its table cell is "—", never another model under the name.
Method-specific extras: FedDAT ``client`` (A_c alone), TAP ``distilled`` (stage 2)."""
VIEW_ORDER = (*KINDS, "client", "distilled")


# ---------------------------------------------------------------------- method options
@dataclass
class DittoConfig:
    """Ditto (Li et al. 2021): personal models pulled towards the global one."""

    lam: float = option(
        0.1, "[0, inf)", help="λ of the proximal pull ‖v_k − θ‖²; 0 = independent personal models"
    )


@dataclass
class FedAdamConfig:
    """FedAdam (Reddi et al. 2021): Adam on the server over the averaged client update."""

    server_lr: float = option(0.01, "(0, inf)", help="η, the server learning rate")
    beta1: float = option(0.9, "[0, 1)", help="β₁, decay of the first moment")
    beta2: float = option(0.99, "[0, 1)", help="β₂, decay of the second moment")
    tau: float = option(1e-3, "(0, inf)", help="τ, adaptivity / stability constant")


@dataclass
class FedYogiConfig(FedAdamConfig):
    """FedYogi (Reddi et al. 2021): Yogi on the server over the averaged client update; the same
    options as FedAdam's (η, β₁, β₂, τ), its own section ``fedyogi``."""


@dataclass
class FedAvgMConfig:
    """FedAvgM (Hsu et al. 2019): server momentum over the averaged client update."""

    server_lr: float = option(1.0, "(0, inf)", help="η, the server learning rate")
    momentum: float = option(0.9, "[0, 1)", help="β, the server momentum; 0 = FedAvg (η = 1)")


@dataclass
class FedDATConfig:
    """FedDAT hyper-parameters (Chen et al. 2024); defaults are the reference's."""

    temperature: float = option(3.0, "(0, inf)", help="T of the mutual distillation")
    alpha: float = option(0.5, "[0, inf)", help="weight of the task loss in L_s (global adapter)")
    beta: float = option(0.5, "[0, inf)", help="weight of the task loss in L_DAT (client adapter)")
    dat_combine: str = option("average", choices=("average", "sum"),
                              help="how A_c and frozen A_s combine in the DAT")  # fmt: skip
    federate_head: bool = option(False, help="open choice: the reference keeps the head personal")


ANCHORS = ("global", "fedavg", "largest")  # FedPIA's alignment anchor
COSTS = ("sqeuclidean", "cosine")  # FedPIA's unit matching cost
SOLVERS = ("exact", "emd", "sinkhorn", "identity")  # FedPIA's assignment solver


FEDPER_PERSONAL = ("top", "proj", "top+proj")


@dataclass
class FedPerConfig:
    """FedPer (Arivazhagan et al. 2019): which layers stay on the client (the personalisation
    layers); the rest is federated.  ``top`` is the paper's: the layers nearest the output."""

    personal: str = option(
        "top", choices=FEDPER_PERSONAL,
        help="what stays on the client: top = the layers nearest the output (a classifier's "
        "task head; a generative model's PEFT sets in its last fedper.personal_layers decoder "
        "layers), proj = the visual projector, top+proj = both",
    )  # fmt: skip
    personal_layers: int = option(
        1, "[1, inf)", help="generative backbones, personal = top or top+proj: k, the decoder "
        "layers (counted from the last) whose PEFT sets are personal",
    )  # fmt: skip


@dataclass
class FedPIAConfig:
    """FedPIA (Saha et al. 2025) -- a reconstruction: the paper has no public code."""

    anchor: str = option(
        "global",
        choices=ANCHORS,
        help="global (previous global adapter) | "
        "fedavg (plain average) | largest (the largest client's upload)",
    )
    lam: float = option(
        0.5, "[0, 1]", help="client integration: L <- lam * L + (1 - lam) * aligned global"
    )
    iterations: int = option(
        1, "[1, inf)", help="server alignment passes; > 1 re-anchors on the merged result"
    )
    cost: str = option(
        "sqeuclidean",
        choices=COSTS,
        help="unit matching cost: sqeuclidean | cosine (1 - cosine similarity)",
    )
    solver: str = option(
        "exact",
        choices=SOLVERS,
        help="exact (scipy assignment) | emd (POT ot.emd) | sinkhorn (POT, soft plan) | "
        "identity (no alignment: the ablation)",
    )
    reg: float = option(
        0.05, "(0, inf)", help="Sinkhorn entropic regularisation, relative to the mean cost"
    )


@dataclass
class FedProxConfig:
    """FedProx (Li et al. 2020)."""

    mu: float = option(0.01, "[0, inf)", help="proximal weight μ; 0 reduces FedProx to FedAvg")


@dataclass
class ScaffoldConfig:
    """SCAFFOLD (Karimireddy et al. 2020): control variates against client drift."""

    variant: str = option(
        "II",
        choices=("I", "II"),
        help="control-variate update: I = "
        "gradient at the server model, II = from the local steps (cheaper)",
    )
    optimizer: str = option(
        "sgd",
        choices=("sgd", "adamw"),
        help="the local optimiser: sgd (the paper's) or adamw (needs variant I)",
    )
    local_lr: float = option(
        0.5,
        "(0, inf)",
        help="η_l, the peak local learning rate of sgd "
        "(on the run's schedule); adamw uses train.lr",
    )
    server_lr: float = option(
        1.0, "(0, inf)", help="η_g, the server learning rate; 1 = FedAvg's average"
    )


@dataclass
class TAPConfig:
    """TAP (Lee et al. 2025): modality-task-pair modules, adaptive replacement, distillation."""

    val_frac: float = option(
        0.15, "(0, 1)", help="held-out share of each client's training data for replacement"
    )
    margin: float = option(
        0.01, "[0, inf)", help="replace when global score > personal score * (1 + margin)"
    )
    replacement: bool = option(
        True, help="adaptive replacement; false: the ablation that never replaces"
    )
    combine: str = option(
        "sum", choices=("sum", "average"), help="how a client's modality/task modules combine"
    )
    teacher_steps: int = option(
        15, "[0, inf)", help="stage 2: local finetuning steps of the global model (teacher)"
    )
    distill_steps: int = option(
        15, "[0, inf)", help="stage 2: distillation steps into the personalised model"
    )
    distill_lr: float = option(
        2e-4, "(0, inf)", help="stage 2 learning rate (cosine over its own steps)"
    )
    temperature: float = option(2.0, "(0, inf)", help="T of the stage-2 distillation")
    lam: float = option(1.0, "[0, inf)", help="λ: task loss + λ·T²·KL(teacher ‖ student)")


# ---------------------------------------------------------------------- what a method declares
Views = tuple[str, ...]
Aliases = Mapping[str, str]


@dataclass(frozen=True)
class Variant:
    """A named configuration of ``method`` (``fedmm bench``'s ablations): ``overrides`` (flat
    config keys) on top of the bench's options; ``isolates``: what comparing it with its method
    (or a baseline) measures."""

    method: str
    overrides: dict = field(default_factory=dict)
    isolates: str = ""


# a like-with-like comparison a bench report makes when both sides are in the grid: (name, view)
# pairs of the same view kind -- or of the models a claim compares -- and what the difference
# measures
Comparison = tuple[tuple[str, str], tuple[str, str], str]


@dataclass(frozen=True)
class MethodSpec:
    """What a method declares about itself, readable without importing it.

    ``options``: its options dataclass (config section ``<name>``), None when it has none;
    ``views``: what its ``evaluate`` scores, kinds of ``VIEW_KINDS`` first, then its extras;
    ``view_aliases``: its view names before fedmm 0.2 -> today's (kept in results.json for one
    release); ``narrow``: for a method whose views depend on its options, ``flat config ->
    (views, view_aliases)`` of a run made with them, or None for the declared ones; ``extras``:
    what each of its views beyond ``VIEW_KINDS`` is; ``variants``: its ablations (``fedmm bench
    --method NAME``), ``comparisons``: the comparisons its claims call for (bench reports)."""

    options: type | None = None
    views: Views = (SHARED,)
    view_aliases: Aliases = field(default_factory=lambda: MappingProxyType({}))
    narrow: Callable[[Mapping[str, object]], tuple[Views, Aliases] | None] | None = None
    extras: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    variants: Mapping[str, Variant] = field(default_factory=lambda: MappingProxyType({}))
    comparisons: tuple[Comparison, ...] = ()

    def views_for(self, flat_config: Mapping[str, object]) -> Views:
        """The views the method scores when run with ``flat_config`` (a results.json run's)."""
        narrowed = self.narrow(flat_config) if self.narrow else None
        return narrowed[0] if narrowed else self.views

    def aliases_for(self, flat_config: Mapping[str, object]) -> Aliases:
        """The ``view_aliases`` of the method run with ``flat_config``."""
        narrowed = self.narrow(flat_config) if self.narrow else None
        return narrowed[1] if narrowed else self.view_aliases


def _feddat_views(flat_config: Mapping[str, object]) -> tuple[Views, Aliases] | None:
    """FedDAT with ``feddat.federate_head`` (a string too, as stored) or on a generative backbone
    (no head at all): A_s is the whole shared model, so ``shared`` instead of ``shared+head``."""
    value = flat_config.get("feddat.federate_head", False)
    generative = flat_config.get("model.backbone") in GENERATIVE_BACKBONE_NAMES
    if generative or value is True or str(value).strip().lower() in ("true", "1", "yes"):
        aliases = {"global": SHARED, "personalized": PERSONAL, "dat": PERSONAL}
        return (SHARED, PERSONAL, "client"), MappingProxyType(aliases)
    return None


_AVERAGED = dict(
    views=(SHARED, SHARED_HEAD, PERSONAL),
    view_aliases=MappingProxyType({"global": SHARED, "personalized": PERSONAL}),
)  # FedAvg and the methods built on it

# the registry, in ``fedmm list``'s order: adding a method is its module plus one line here
METHOD_SPECS: dict[str, MethodSpec] = {
    "local": MethodSpec(views=(PERSONAL,), view_aliases=MappingProxyType({"personalized": PERSONAL})),
    "centralized": MethodSpec(views=(SHARED,), view_aliases=MappingProxyType({"global": SHARED})),
    "fedavg": MethodSpec(**_AVERAGED),
    "fedprox": MethodSpec(FedProxConfig, **_AVERAGED),
    "fedadam": MethodSpec(FedAdamConfig, **_AVERAGED),
    "ditto": MethodSpec(DittoConfig, (SHARED, PERSONAL), _AVERAGED["view_aliases"]),
    "fedper": MethodSpec(FedPerConfig, (SHARED_HEAD,), view_aliases=MappingProxyType({"personalized": SHARED_HEAD})),
    "feddat": MethodSpec(
        FedDATConfig, (SHARED_HEAD, PERSONAL, "client"),
        MappingProxyType({"global": SHARED_HEAD, "personalized": PERSONAL, "dat": PERSONAL}),
        _feddat_views, extras=MappingProxyType({"client": "A_c alone"}),
        variants=MappingProxyType({
            "feddat-fedhead": Variant(
                "feddat", {"feddat.federate_head": True},
                "FedDAT with a federated head, so it has a `shared` view: A_s + shared head "
                "against FedAvg's `shared` (the dual-adapter teacher without a personal head)",
            ),
            "feddat-nodistill": Variant(
                "feddat", {"feddat.alpha": 1.0, "feddat.beta": 1.0},
                "FedDAT without mutual distillation (α = β = 1: A_s and the DAT each on the task "
                "loss only) against FedDAT",
            ),
        }),
        comparisons=(
            (("feddat-fedhead", "shared"), ("fedavg", "shared"),
             "FedDAT's training (dual adapters + distillation), nothing personal in the shared "
             "model"),
            (("feddat", "shared+head"), ("fedper", "shared+head"),
             "FedDAT vs FedPer, both A_s/body + own head: what the DAT and distillation add"),
            (("feddat", "shared+head"), ("fedavg", "shared+head"),
             "FedDAT vs FedAvg's body with the locally trained head"),
            (("feddat", "shared+head"), ("feddat-fedhead", "shared"),
             "FedDAT's own head vs a federated head"),
            (("feddat", "personal"), ("fedper", "shared+head"), "the DAT vs FedPer"),
            (("feddat", "personal"), ("fedavg", "personal"), "the DAT vs FedAvg fine-tuned"),
            (("feddat", "shared+head"), ("feddat-nodistill", "shared+head"),
             "mutual distillation, A_s + own head"),
            (("feddat", "personal"), ("feddat-nodistill", "personal"),
             "mutual distillation, the DAT"),
        ),
    ),
    "fedpia": MethodSpec(
        FedPIAConfig, **_AVERAGED,
        variants=MappingProxyType({"fedpia-identity": Variant(
            "fedpia", {"fedpia.solver": "identity"},
            "FedPIA without alignment (units matched by index; the server merge is FedAvg's) "
            "against FedPIA's optimal-transport alignment",
        )}),
        comparisons=(
            (("fedpia", "shared"), ("fedpia-identity", "shared"), "OT alignment, merged model"),
            (("fedpia", "personal"), ("fedpia-identity", "personal"),
             "OT alignment, local model"),
            (("fedpia-identity", "shared"), ("fedavg", "shared"),
             "FedPIA's client integration (λ·L + (1 − λ)·G) without alignment vs FedAvg"),
            (("fedpia", "shared"), ("fedavg", "shared"), "FedPIA vs FedAvg, merged model"),
        ),
    ),
    "tap": MethodSpec(
        TAPConfig, (SHARED, PERSONAL, "distilled"), _AVERAGED["view_aliases"],
        extras=MappingProxyType({"distilled": "stage 2"}),
        variants=MappingProxyType({"tap-noreplace": Variant(
            "tap", {"tap.replacement": False},
            "TAP without adaptive replacement against TAP (TAP without stage 2 is the "
            "`personal` view of either)",
        )}),
        comparisons=(
            (("tap", "personal"), ("tap-noreplace", "personal"), "adaptive replacement"),
            (("tap", "distilled"), ("tap", "personal"),
             "stage 2 (distillation after the last round)"),
        ),
    ),
    "fedavgm": MethodSpec(FedAvgMConfig, **_AVERAGED),
    "fedyogi": MethodSpec(FedYogiConfig, **_AVERAGED),
    "scaffold": MethodSpec(ScaffoldConfig, **_AVERAGED),
}  # fmt: skip


def method_sections() -> dict[str, type]:
    """Every method's options dataclass by section name (the methods that have options)."""
    return {name: s.options for name, s in METHOD_SPECS.items() if s.options is not None}
