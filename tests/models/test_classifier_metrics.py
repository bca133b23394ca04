import torch
from torch import nn

from speedup.models.base import Classifier, infer_kind


def test_metrics_are_sums_and_counts_with_top5_only_beyond_ten_classes():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]])
    batch = {"targets": torch.tensor([1, 2])}
    metrics = Classifier(nn.Identity(), 3).metrics(logits, batch)
    assert set(metrics) == {"accuracy", "loss"}
    assert metrics["accuracy"] == (torch.tensor(1.0), 2)
    many = torch.zeros(2, 20)
    many[0, 7] = 5  # target 7 ranked first
    many[1, :6] = torch.arange(6, 0, -1).float()  # target 5 ranked sixth: not in the top 5
    out = Classifier(nn.Identity(), 20).metrics(many, {"targets": torch.tensor([7, 5])})
    assert out["top5_accuracy"][0].item() == 1.0 and out["accuracy"][0].item() == 1.0


def test_kind_is_inferred_from_the_network():
    assert infer_kind(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())) == "cnn"
    assert infer_kind(nn.Sequential(nn.Linear(4, 2))) == "mlp"
    assert infer_kind(nn.Identity()) == "generic"
