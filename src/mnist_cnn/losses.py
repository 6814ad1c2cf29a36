"""Losses, always computed from log-probabilities (the tutorial's log(softmax) overflows)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mnist_cnn import MnistCnnError


def kl_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """KL(one-hot(labels) || softmax(logits)), summed over the batch, as the tutorial's
    `sum(p * log(p / q + 1e-15))` but finite for any logits."""
    log_probs = F.log_softmax(logits, dim=1)
    one_hot = F.one_hot(labels, logits.shape[1]).to(log_probs.dtype)
    return F.kl_div(log_probs, one_hot, reduction="sum")


def ce_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy over the batch."""
    return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)


def batch_loss(name: str, logits: torch.Tensor, labels: torch.Tensor, *,
               label_smoothing: float = 0.0) -> torch.Tensor:
    """The loss to optimise: summed over the batch for kl, the mean for ce."""
    if name == "kl":
        return kl_loss(logits, labels)
    if name == "ce":
        return ce_loss(logits, labels, label_smoothing)
    raise MnistCnnError(f"unknown loss {name!r}; choose kl or ce")


def summed_loss(name: str, logits: torch.Tensor, labels: torch.Tensor, *,
                label_smoothing: float = 0.0) -> torch.Tensor:
    """The same loss summed over the batch, for reporting per-sample means over a split."""
    loss = batch_loss(name, logits, labels, label_smoothing=label_smoothing)
    return loss if name == "kl" else loss * labels.shape[0]


def outlier_loss(logits: torch.Tensor, *, summed: bool = False) -> torch.Tensor:
    """Outlier exposure's term (Hendrycks et al. 2019): cross-entropy from the uniform
    distribution to softmax(logits), the mean over the batch (or its sum, beside kl)."""
    per_image = -F.log_softmax(logits, dim=1).mean(dim=1)
    return per_image.sum() if summed else per_image.mean()
