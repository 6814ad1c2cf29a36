"""The losses equal the tutorial's formulas where those are finite, and stay finite."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mnist_cnn.losses import batch_loss, ce_loss, kl_loss, summed_loss


def seed_kl(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The tutorial's loss: sum(p * log(p / q + 1e-15)) on softmax probabilities."""
    prob1 = torch.zeros(labels.shape[0], 10, dtype=logits.dtype)
    prob1[range(labels.shape[0]), labels] = 1
    prob2 = F.softmax(logits, dim=1)
    return torch.sum(prob1 * torch.log(prob1 / prob2 + 1e-15))


def test_kl_equals_the_seed_formula_wherever_it_is_finite():
    generator = torch.Generator().manual_seed(0)
    for scale in (0.1, 1.0, 5.0, 15.0):
        logits = torch.randn(256, 10, generator=generator, dtype=torch.float64) * scale
        labels = torch.randint(0, 10, (256,), generator=generator)
        theirs = seed_kl(logits, labels)
        assert torch.isfinite(theirs)
        torch.testing.assert_close(kl_loss(logits, labels), theirs, rtol=1e-10, atol=1e-10)


def test_kl_is_finite_where_the_seed_formula_is_not():
    logits = torch.tensor([[0.0] * 9 + [200.0]])  # softmax underflows to 0 for class 0
    labels = torch.tensor([0])
    assert not torch.isfinite(seed_kl(logits, labels))
    assert torch.isclose(kl_loss(logits, labels), torch.tensor(200.0))
    logits.requires_grad_(True)
    kl_loss(logits, labels).backward()
    assert torch.isfinite(logits.grad).all()


def test_kl_for_one_hot_is_the_summed_negative_log_likelihood_and_ce_the_mean():
    logits = torch.randn(32, 10)
    labels = torch.randint(0, 10, (32,))
    nll_sum = F.cross_entropy(logits, labels, reduction="sum")
    torch.testing.assert_close(kl_loss(logits, labels), nll_sum)
    torch.testing.assert_close(ce_loss(logits, labels), nll_sum / 32)
    torch.testing.assert_close(batch_loss("ce", logits, labels), nll_sum / 32)
    torch.testing.assert_close(summed_loss("ce", logits, labels), nll_sum)
    torch.testing.assert_close(summed_loss("kl", logits, labels), nll_sum)
