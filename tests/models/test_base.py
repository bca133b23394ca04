"""The model protocol's losses."""

import torch


def test_soft_targets_of_dense_predictions_reduce_over_the_class_dim():
    """[N, K, H, W] logits with probability targets: the loss is cross-entropy over dim 1
    averaged over pixels, as F.cross_entropy computes it, and per sample it is each sample's
    pixel mean."""
    import torch.nn.functional as F

    from speedup.models.base import Classifier, soft_cross_entropy

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 3, 4, generator=generator)
    targets = torch.softmax(torch.randn(2, 5, 3, 4, generator=generator), dim=1)
    expected = F.cross_entropy(logits, targets)
    assert torch.allclose(soft_cross_entropy(logits, targets), expected, atol=1e-6)
    per_sample = Classifier(torch.nn.Identity(), 5).per_sample_loss(logits, {"targets": targets})
    by_hand = F.cross_entropy(logits, targets, reduction="none").mean(dim=(1, 2))
    assert per_sample.shape == (2,) and torch.allclose(per_sample, by_hand, atol=1e-6)
