"""Token packing: the frozen transformer's per-token work on the real tokens only.

A batch of ``B`` joint sequences padded to ``L`` positions holds ``N = Σ_b n_b`` real tokens
(text, visual, prompt) and ``B·L − N`` padding.  In a BERT layer every operation but attention
acts on each position alone -- the Q/K/V and output projections, the FFN, the LayerNorms, the
residual adds, the adapters after the FFN -- so for those the padding is pure waste: on
fmnist-domain 18 % of a batch's positions are padding, on VQA-RAD 30 % (batch 32).
``PackedBertLayer`` gathers the real tokens into ``(N, d)`` once per layer, runs every
per-position operation on them, and spreads Q, K and V back to ``(B, heads, L, d_head)`` (zeros
at the padding) only for attention, with the same attention function and mask as Hugging Face's
``BertLayer``.  Real tokens never attend to padding (the mask), and what a padding position holds
is never read, so the real tokens' states are the padded layer's to float rounding (tested to
1e-5, values and gradients).  The technique is the "unpadding" of packed-sequence BERT
implementations (NVIDIA's BERT, FlashAttention's ``bert_padding``); here it is exact on a CPU
(no variable-length attention kernel: attention, a few percent of the step, stays padded).

When it runs -- otherwise the layer is Hugging Face's own ``BertLayer.forward``:

* the model switched it on for this forward (``FusionVLModel`` does, see ``pack``), the mask is
  SDPA's boolean ``(B, 1, L, L)`` one (no mask at all means no padding: nothing to gain), and the
  layer is an encoder layer (no cross-attention, no cache);
* no dropout draws in the layer: eval mode, or ``model.backbone_dropout = 0``.  With the
  backbone's dropout on, packing would draw its masks over ``N`` instead of ``B·L`` positions --
  a different random stream than fedmm's stored results were trained with -- so a training
  forward at the default ``model.backbone_dropout = -1`` stays padded, draws identical.

Padding positions of a packed layer's output are 0 (the padded layer leaves values there that
nothing reads).  Row blocks (``AdapterBank.row_blocks``: FedDAT's batched step) chunk the packed
rows; that is right when every block repeats the same rows, which ``FusionVLModel.forward``
checks before it packs.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.bert.modeling_bert import BertLayer, eager_attention_forward


def dropout_draws(module: nn.Module) -> bool:
    """Whether a forward of ``module`` in its current mode draws dropout masks."""
    return module.training and any(isinstance(m, nn.Dropout) and m.p > 0 for m in module.modules())


def _real_tokens(attention_mask: object) -> torch.Tensor | None:
    """The real positions ``(B, L)`` of SDPA's bidirectional boolean mask ``(B, 1, L, L)`` (every
    query row of an encoder's mask is the same key mask), or None: no mask, another layout, or
    no padding."""
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dtype != torch.bool:
        return None
    if attention_mask.dim() != 4 or attention_mask.shape[1] != 1:
        return None
    keep = attention_mask[:, 0, 0, :]
    if attention_mask.shape[2] != keep.shape[1] or bool(keep.all()):
        return None
    return keep


class PackedBertLayer(BertLayer):
    """``BertLayer`` whose per-position work runs on the real tokens only (module docstring).

    ``pack`` is set by the owning model around a forward; the state dict, the submodules and
    every hook on them are ``BertLayer``'s (the class of a built layer is swapped:
    ``pack_layers``)."""

    pack = False

    def forward(  # type: ignore[override]
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        keep = None
        if (
            self.pack
            and encoder_hidden_states is None
            and kwargs.get("past_key_values") is None
            and not self.is_decoder
            and not dropout_draws(self)
        ):
            keep = _real_tokens(attention_mask)
        if keep is None:
            return super().forward(hidden_states, attention_mask, encoder_hidden_states, **kwargs)
        return self._packed(hidden_states, attention_mask, keep)

    def _packed(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, keep: torch.Tensor
    ) -> torch.Tensor:
        b, length, d = hidden.shape
        idx = keep.reshape(-1).nonzero().squeeze(1)  # (N,) positions in the flat (B·L) layout
        x = hidden.reshape(b * length, d).index_select(0, idx)  # (N, d)
        att = self.attention.self

        def spread(t: torch.Tensor) -> torch.Tensor:  # (N, e) -> (B, heads, L, d_head)
            full = t.new_zeros(b * length, t.shape[1]).index_copy(0, idx, t)
            return full.view(b, length, -1, att.attention_head_size).transpose(1, 2)

        attention = ALL_ATTENTION_FUNCTIONS.get_interface(
            att.config._attn_implementation, eager_attention_forward
        )
        context, _ = attention(
            att,
            spread(att.query(x)),
            spread(att.key(x)),
            spread(att.value(x)),
            attention_mask,
            dropout=0.0,  # dropout_draws(self) is False here
            scaling=att.scaling,
        )  # (B, L, heads, d_head)
        context = context.reshape(b * length, -1).index_select(0, idx)
        attended = self.attention.output(context, x)
        out = self.feed_forward_chunk(attended)  # (r·N, d): r row blocks after a shared prefix
        reps, rest = divmod(out.shape[0], idx.numel())
        if rest:
            raise RuntimeError(f"a packed layer's output has {out.shape[0]} rows for "
                               f"{idx.numel()} tokens")  # fmt: skip
        if reps > 1:  # AdapterBank.row_blocks copied the shared prefix's output to every block
            idx = torch.cat([idx + r * b * length for r in range(reps)])
        full = out.new_zeros(reps * b * length, d).index_copy(0, idx, out)
        return full.view(reps * b, length, d)


def pack_layers(layers: nn.ModuleList | list[nn.Module]) -> list[PackedBertLayer]:
    """Swap every layer that is exactly a Hugging Face ``BertLayer`` to ``PackedBertLayer`` (in
    place: same parameters, same hooks) and return those; other layer classes are left as they
    are (their model runs padded)."""
    packed = []
    for layer in layers:
        if type(layer) is BertLayer:
            layer.__class__ = PackedBertLayer
        if isinstance(layer, PackedBertLayer):
            packed.append(layer)
    return packed
