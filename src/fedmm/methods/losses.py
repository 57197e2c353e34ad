"""The losses and metrics methods share: the task loss (cross-entropy / BCE), the proximal term
(FedProx, Li et al. 2020, Eq. 2), distillation KL (Hinton et al. 2015) and multi-label scores."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.nn import functional as F


def multilabel_scores(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """``{"": mean AUROC, ".f1": macro-F1}`` of multi-label ``logits`` against 0/1 ``targets``.

    AUROC per label by the rank statistic (ties get average ranks), averaged over the labels that
    have both a positive and a negative example; F1 per label at logit 0 (probability 0.5),
    averaged over labels with any positive example or prediction (0 when there is none).
    """
    from scipy.stats import rankdata

    y, z = targets.numpy().astype(bool), logits.numpy()
    aucs, f1s = [], []
    for j in range(y.shape[1]):
        pos, n_pos = y[:, j], int(y[:, j].sum())
        n_neg = len(pos) - n_pos
        if n_pos and n_neg:
            ranks = rankdata(z[:, j])
            aucs.append((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
        pred = z[:, j] > 0
        tp, fp, fn = int((pred & pos).sum()), int((pred & ~pos).sum()), int((~pred & pos).sum())
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return {
        "": float(np.mean(aucs)) if aucs else 0.5,
        ".f1": float(np.mean(f1s)) if f1s else 0.0,
    }


def proximal_term(
    params: Sequence[torch.Tensor], anchor: Sequence[torch.Tensor], weight: float
) -> Callable[[], torch.Tensor] | None:
    """``() -> (weight/2)·‖params − anchor‖²`` for ``supervised_update``; None when weight is 0."""
    if weight == 0:
        return None
    anchor = [a.detach() for a in anchor]
    return lambda: 0.5 * weight * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))


def task_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The task's loss: cross-entropy for single-label tasks (``labels`` long ``(B,)``),
    BCE-with-logits for multi-label tasks (``labels`` float 0/1 ``(B, K)``)."""
    if labels.is_floating_point():
        return F.binary_cross_entropy_with_logits(logits, labels)
    if labels.ndim == 2:  # generative: next-token labels per position, -100 off the answer
        from fedmm.generation import token_loss

        return token_loss(logits, labels)
    return F.cross_entropy(logits, labels)


def supervised_loss(
    model: torch.nn.Module, feats: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
    labels: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """``task_loss(model(feats, ids, mask), labels)``.  For a generative model (labels ``(B, L')``
    next-token ids, -100 off the answer) the logits are computed at the answer positions only
    (``GenerativeVLModel.forward``'s ``keep``): the same mean cross-entropy over answer tokens,
    without the output layer and softmax at every prompt and image position."""
    if labels.ndim == 2 and not labels.is_floating_point():
        from fedmm.generation import IGNORE

        labels = labels[:, : ids.shape[1]]
        keep = labels != IGNORE
        return F.cross_entropy(model(feats, ids, mask, keep=keep).float(), labels[keep])
    return task_loss(model(feats, ids, mask), labels)


def distill_kl(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float, multilabel: bool = False
) -> torch.Tensor:
    """``T² · KL(softmax(teacher/T) ‖ softmax(student/T))``, batch mean; teacher not detached here.

    ``multilabel``: each logit is its own Bernoulli, ``T² · mean_j KL(σ(t_j/T) ‖ σ(s_j/T))``.
    """
    t = temperature
    if multilabel:
        s, q = student / t, teacher / t
        p_t = torch.sigmoid(q)
        kl = p_t * (F.logsigmoid(q) - F.logsigmoid(s)) + (1 - p_t) * (
            F.logsigmoid(-q) - F.logsigmoid(-s)
        )
        return (t * t) * kl.mean()
    return (t * t) * F.kl_div(
        F.log_softmax(student / t, dim=-1), F.log_softmax(teacher / t, dim=-1),
        reduction="batchmean", log_target=True,
    )  # fmt: skip
