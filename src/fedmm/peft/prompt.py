"""Prompt tuning (Lester et al., 2021) as named sets: learned tokens prepended to the joint sequence.

A set is ``P ∈ R^{n×d}`` (``peft.prompt_length`` = n); the model's transformer runs over
``[P ; text tokens ; visual tokens]`` with position and token-type embeddings added as for text
(type 0).  Initialised from the embeddings of n random vocabulary tokens (Lester et al.'s
recommendation over random vectors).  Combining sets combines their tokens:

    single:  P_a            average: (1/n) Σ_i P_i

(``sum`` is not offered: summed token embeddings leave the embedding space.)  FedDAT with prompts:
the Dual-Adapter Teacher prepends the average of the two prompts.  FedPIA does not apply: prompt
tokens carry position embeddings, so permuting them changes the model.
"""

from __future__ import annotations

import torch
from torch import nn

from fedmm.peft.base import PeftBank


class PromptBank(PeftBank):
    kind = "prompt"
    combines = ("single", "average")

    def __init__(self, word_embeddings: nn.Embedding, length: int) -> None:
        super().__init__()
        if length < 1:
            raise ValueError(f"peft.prompt_length must be >= 1, got {length}")
        self.length = length
        self._vocab = [word_embeddings]  # frozen, owned by the backbone

    def _new_set(self, name: str) -> nn.Module:
        d = self._vocab[0].embedding_dim
        return nn.ParameterDict({"tokens": nn.Parameter(torch.zeros(self.length, d))})

    @torch.no_grad()
    def reset_set(self, name: str) -> None:
        table = self._vocab[0].weight
        rows = torch.randint(0, table.shape[0], (self.length,))
        self._get(name)["tokens"].copy_(table[rows])

    def prompt_tokens(self) -> torch.Tensor | None:
        active = self._active
        if not active.names:
            return None
        tokens = sum(self.sets[n]["tokens"] for n in active.names)
        return active.weight() * tokens
