"""FedPer (Arivazhagan et al., 2019, arXiv 1912.00818): federated base layers, personal layers.

The model's trainable state θ = {adapter ``global_adapter``, visual projection, head} splits into
personalisation layers θ_P,k, which stay on client k across rounds and are never uploaded, and
base layers θ_B, which are federated.  ``fedper.personal`` says which is which:

* ``top`` (default, the paper's: the layers nearest the output) -- a classifier's task head; a
  generative model (no head; its output layer is the frozen LM's) the PEFT tensors acting in its
  last ``fedper.personal_layers`` = k decoder layers (LoRA on their projections, or the adapters
  after them; prompt tuning has no per-layer set and is refused);
* ``proj`` -- the visual projector (the input path: the rest, head included, is federated);
* ``top+proj`` -- both.

Round t on client k: θ_B ← θ_B^t, θ_P ← θ_P,k (its own; the common init in round 1), then
``train.local_steps`` AdamW steps on the task loss ``L(f(x; θ_B, θ_P), y)`` (cross-entropy; next-
token cross-entropy on the answer tokens for a generative model); keep θ_P,k, upload θ_B and n_k.
Server: θ_B^{t+1} = Σ_k w_k θ_B,k (samples or uniform weights, as FedAvg).

View: ``shared+head`` -- the federated θ_B with the client's own θ_P (``fedmm.spec.VIEW_KINDS``:
the shared body with the client's own part).  There is no shared θ_P, so no ``shared`` view, and
no model of the client's own beyond that one, so no ``personal`` view.  A client that has not
trained yet has no θ_P: it scores nothing.
"""

from __future__ import annotations

from fedmm.backbones import FusionVLModel
from fedmm.config import ConfigError
from fedmm.methods.base import ClientUpdate, register
from fedmm.methods.context import ClientContext, supervised_update  # fmt: skip
from fedmm.methods.fedavg import PARTS, FedAvg
from fedmm.methods.state import (
    Arrays,
    State,
    get_parts,
    load_parts,
    model_keys,
    part_shapes,
    to_numpy,
)
from fedmm.spec import GENERATIVE_BACKBONE_NAMES, SHARED_HEAD

GLOBAL = "adapter.global_adapter"


@register("fedper")
class FedPer(FedAvg):
    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.generative = cfg.model.backbone in GENERATIVE_BACKBONE_NAMES
        if self.generative and "top" in cfg.fedper.personal and cfg.peft.type == "prompt":
            raise ConfigError(
                f"fedper.personal={cfg.fedper.personal!r} on the generative backbone "
                f"{cfg.model.backbone!r} personalises the PEFT sets of the last decoder layers, "
                "and prompt tuning has none per layer: use fedper.personal=proj, or peft.type "
                "lora or adapter"
            )

    # ------------------------------------------------------------------ declarations
    def personal_keys(self, model: FusionVLModel) -> set[str]:
        """State keys of θ_P (``fedper.personal``), on ``model``.

        Raises ``ConfigError`` when ``fedper.personal_layers`` exceeds the decoder's layers, or
        when nothing would be left to federate."""
        opts = self.cfg.fedper
        keys = set(part_shapes(model, ("proj",))) if "proj" in opts.personal else set()
        if "top" in opts.personal and not self.generative:
            keys |= set(part_shapes(model, ("head",)))
        elif "top" in opts.personal:
            n, k = model.num_layers, opts.personal_layers
            if k > n:
                raise ConfigError(
                    f"fedper.personal_layers={k}: {self.cfg.model.backbone!r} has {n} decoder "
                    f"layers; choose 1..{n}"
                )
            layers = model.peft_layers(GLOBAL.removeprefix("adapter."))
            keys |= {f"{GLOBAL}/{key}" for key, j in layers.items() if j >= n - k}
        if not set(part_shapes(model, PARTS)) - keys:
            raise ConfigError(
                f"fedper.personal={opts.personal!r} with fedper.personal_layers="
                f"{opts.personal_layers} keeps every trainable tensor on the client: nothing is "
                "left to federate (lower fedper.personal_layers or personalise less)"
            )
        return keys

    def upload_spec(self, model: FusionVLModel) -> dict[str, tuple[int, ...]]:
        """θ_B: every tensor of adapter, projector and head except θ_P's."""
        personal = self.personal_keys(model)
        return {k: s for k, s in part_shapes(model, PARTS).items() if k not in personal}

    # ------------------------------------------------------------------ server
    def init_global(self, model: FusionVLModel) -> Arrays:
        self.prepare(model)
        shared = self.upload_spec(model)
        return to_numpy({k: v for k, v in get_parts(model, PARTS).items() if k in shared})

    # ------------------------------------------------------------------ client
    def load(self, ctx: ClientContext, received: State) -> None:
        """θ_B^t from the server, then the client's own θ_P (a part may come in two halves:
        a generative model's adapter set is split by decoder layer)."""
        shared, personal = self.upload_spec(ctx.model), self.personal_keys(ctx.model)
        got, kept = model_keys(received), model_keys(ctx.kept)
        if set(got) != set(shared) or not set(kept) <= personal:
            raise ValueError(
                f"fedper: received {len(got)} tensors for {len(shared)} federated ones, kept "
                f"{len(set(kept) - personal)} that are not personal (fedper.personal changed?)"
            )
        load_parts(ctx.model, got, partial=True)
        load_parts(ctx.model, kept, partial=True)

    def local_update(self, ctx: ClientContext, received: State) -> ClientUpdate:
        supervised_update(ctx, "global_adapter")
        state, personal = get_parts(ctx.model, PARTS), self.personal_keys(ctx.model)
        return ClientUpdate(
            {k: v for k, v in state.items() if k not in personal},
            keep={k: v for k, v in state.items() if k in personal},
        )

    def evaluate(self, ctx: ClientContext, received: State) -> dict[str, float]:
        if not ctx.kept:  # not trained yet: no personal layers of its own, nothing to score
            return ctx.views
        with ctx.model.active("global_adapter"):
            return ctx.view(SHARED_HEAD)
