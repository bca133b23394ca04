import math

import pytest
import torch
import torch.nn.functional as F
from conftest import Losses, bad_arguments_test, text_info
from speedup.algorithms.factorize import (
    Factorize,
    FactorizedConv2d,
    FactorizedLinear,
    apply_factorization,
    factorize_conv2d,
    factorize_linear,
    latent_size,
    low_rank_factors,
    merge_factorization,
)
from torch import nn

from speedup.data import TensorBatchLoader
from speedup.event import Event
from speedup.models import Classifier
from speedup.models.nets import SmallCNN2d
from speedup.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def truncated_svd(matrix, rank):
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank], s


# -- the math ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("shape", "rank"), [((20, 12), 5), ((7, 30), 3), ((16, 16), 16)])
def test_factors_multiply_to_the_best_rank_r_approximation(shape, rank):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(*shape, generator=g)
    b, a = low_rank_factors(weight, rank)
    assert b.shape == (shape[0], rank) and a.shape == (rank, shape[1])
    best, s = truncated_svd(weight, rank)
    torch.testing.assert_close((b @ a).double(), best, rtol=1e-4, atol=1e-4)
    # Eckart-Young: the Frobenius error is the norm of the discarded singular values
    error = torch.linalg.matrix_norm(weight.double() - (b @ a).double())
    assert error.item() == pytest.approx(s[rank:].norm().item(), abs=1e-4)
    # the square-root split gives both factors the same Frobenius norm, sqrt(sum s_r)
    expected = math.sqrt(s[:rank].sum().item())
    assert b.norm().item() == pytest.approx(expected, rel=1e-4)
    assert a.norm().item() == pytest.approx(expected, rel=1e-4)


def test_low_rank_factors_rejects_bad_rank_and_shape():
    with pytest.raises(ValueError, match=r"rank must be in \[1, 4\]"):
        low_rank_factors(torch.randn(4, 6), 5)
    with pytest.raises(ValueError, match="matrix"):
        low_rank_factors(torch.randn(2, 3, 4), 1)


def test_latent_size_is_a_fraction_of_the_smaller_side_or_a_count():
    assert latent_size(0.25, 512, 1000) == 128
    assert latent_size(0.001, 64, 64) == 1  # at least one
    assert latent_size(128, 512, 1000) == 128
    with pytest.raises(ValueError, match="> 0"):
        latent_size(0, 8, 8)


def test_factorized_linear_counts_and_computes_the_truncated_product():
    torch.manual_seed(0)
    linear = nn.Linear(300, 260)
    pair = factorize_linear(linear, 64)
    assert isinstance(pair, FactorizedLinear)
    assert sum(p.numel() for p in pair.parameters()) == 64 * 300 + 260 * 64 + 260
    best, _ = truncated_svd(linear.weight.detach(), 64)
    torch.testing.assert_close(pair.merged_weight().double(), best, rtol=1e-4, atol=1e-4)
    x = torch.randn(5, 300)
    torch.testing.assert_close(pair(x), F.linear(x, pair.merged_weight(), linear.bias))


def test_full_rank_factorization_reproduces_the_layer():
    torch.manual_seed(0)
    linear, conv = nn.Linear(12, 9), nn.Conv2d(4, 6, 3, stride=2, padding=1)
    x, image = torch.randn(3, 12), torch.randn(2, 4, 7, 7)
    torch.testing.assert_close(factorize_linear(linear, 9)(x), linear(x), rtol=1e-5, atol=1e-5)
    pair = factorize_conv2d(conv, 6)  # min(4 * 3 * 3, 6) = 6: full rank
    torch.testing.assert_close(pair(image), conv(image), rtol=1e-5, atol=1e-5)


def test_factorized_conv_counts_keeps_geometry_and_computes_the_truncated_product():
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 48, 3, stride=2, padding=1)
    pair = factorize_conv2d(conv, 8)
    assert isinstance(pair, FactorizedConv2d)
    assert sum(p.numel() for p in pair.parameters()) == 8 * 32 * 9 + 48 * 8 + 48
    assert pair.first.stride == (2, 2) and pair.first.padding == (1, 1)
    assert pair.second.kernel_size == (1, 1) and pair.first.bias is None
    best, _ = truncated_svd(conv.weight.detach().flatten(1), 8)
    torch.testing.assert_close(pair.merged_weight().flatten(1).double(), best, rtol=1e-4, atol=1e-4)
    image = torch.randn(2, 32, 9, 9)
    expected = F.conv2d(image, pair.merged_weight(), conv.bias, stride=2, padding=1)
    out = pair(image)
    assert out.shape == conv(image).shape == (2, 48, 5, 5)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_transformers_conv1d_is_factorized_like_a_linear():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    layer = Conv1D(nf=10, nx=6)  # y = x @ W + b, W is 6 x 10
    nn.init.normal_(layer.bias)
    x = torch.randn(4, 6)
    pair = factorize_linear(layer, 6)
    torch.testing.assert_close(pair(x), layer(x), rtol=1e-5, atol=1e-5)


# -- which layers are replaced ----------------------------------------------------------------


def mixed_model():
    torch.manual_seed(0)
    return nn.ModuleDict(
        {
            "big": nn.Linear(64, 64),  # rank 16: 16 * 128 < 64^2
            "head": nn.Linear(64, 4),  # min(in, out) = 4 < min_features
            "square": nn.Linear(32, 32),  # 16 * 64 == 32^2: no saving, kept
            "odd": nn.Linear(33, 33),  # 16 * 66 < 33^2
            "pointwise": nn.Conv2d(32, 32, 1),  # rank 0.25 * 32 = 8: 8 * 64 < 32^2
            "grouped": nn.Conv2d(32, 32, 1, groups=2),  # grouped: kept
            "narrow": nn.Conv2d(16, 16, 3),  # 16 < min_channels
        }
    )


#: Composer's thresholds scaled down 8x (256 -> 32, 128 -> 16) so the SVDs stay tiny.
SMALL = {"min_features": 32, "latent_features": 16, "min_channels": 32, "latent_channels": 0.25}


def test_only_layers_where_the_pair_is_cheaper_are_replaced():
    model = mixed_model()
    before = sum(p.numel() for p in model.parameters())
    replaced = apply_factorization(model, **SMALL)
    assert replaced == ["big", "odd", "pointwise"]
    assert isinstance(model["big"], FactorizedLinear) and model["big"].latent_features == 16
    assert isinstance(model["odd"], FactorizedLinear)
    assert isinstance(model["pointwise"], FactorizedConv2d)
    assert model["pointwise"].latent_channels == 8
    for kept in ("head", "square"):
        assert type(model[kept]) is nn.Linear
    for kept in ("grouped", "narrow"):
        assert type(model[kept]) is nn.Conv2d
    saved = (64 * 64 - 16 * 128) + (33 * 33 - 16 * 66) + (32 * 32 - 8 * 64)
    assert sum(p.numel() for p in model.parameters()) == before - saved


def test_switches_and_tied_weights():
    model = mixed_model()
    assert apply_factorization(model, factorize_convs=False, **SMALL) == ["big", "odd"]
    model = mixed_model()
    assert apply_factorization(model, factorize_linears=False, **SMALL) == ["pointwise"]
    tied = nn.ModuleDict({"a": nn.Linear(64, 64), "b": nn.Linear(64, 64)})
    tied["b"].weight = tied["a"].weight
    assert apply_factorization(tied, **SMALL) == []  # untying would change the model


# -- the algorithm ----------------------------------------------------------------------------


test_rejects_invalid_arguments = bad_arguments_test(
    Factorize,
    [
        ({"latent_features": 1.5}, "latent_features must be a fraction in"),
        ({"latent_channels": 0}, "latent_channels must be a fraction in"),
        ({"latent_features": -0.5}, "latent_features"),
        ({"min_channels": 0}, "min_channels must be an integer >= 1"),
        ({"min_features": 2.5}, "min_features"),
        ({"factorize_convs": False, "factorize_linears": False}, "enable at least one"),
    ],
)


def test_declares_surgery_at_init_only():
    decl = Factorize().declare()
    assert set(decl.events) == {Event.INIT}
    assert "model.modules" in decl.events[Event.INIT].writes
    assert {"channels_last", "no_op_model", "weight_standardization"} <= decl.runs_before
    assert "gated_linear_units" in decl.runs_after
    assert not decl.runs_before & decl.runs_after
    assert decl.model_kinds is None and decl.data_kinds is None


def mlp(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)
    )
    return Classifier(net, 4, kind="mlp")


def blobs(n=64, features=16, image=False):
    g = torch.Generator().manual_seed(0)
    targets = torch.arange(n) % 4
    if image:
        inputs = torch.randn(n, 3, 8, 8, generator=g) + targets.view(-1, 1, 1, 1).float()
    else:
        inputs = torch.randn(4, features, generator=g)[targets] * 3 + torch.randn(
            n, features, generator=g
        )
    return TensorBatchLoader(
        {"inputs": inputs, "targets": targets}, 16, shuffle=True, drop_last=True, seed=0
    )


def test_the_optimizer_holds_exactly_the_factorized_model_parameters():
    model = mlp()
    originals = {id(p) for p in model.parameters()}
    algorithm = Factorize(min_features=16, latent_features=4)
    trainer = Trainer(model, blobs(), "1ba", algorithms=[algorithm], device="cpu")
    assert algorithm.replaced == ["net.0", "net.2"]
    in_optimizer = [p for g in trainer.state.optimizer.param_groups for p in g["params"]]
    trainable = [p for p in trainer.state.model.parameters() if p.requires_grad]
    assert {id(p) for p in in_optimizer} == {id(p) for p in trainable}
    assert len(in_optimizer) == len(trainable)
    # the replaced layers' weights are gone from both; the head's survive
    replaced = {id(model.net[4].weight), id(model.net[4].bias)}
    assert {id(p) for p in in_optimizer} & originals == replaced
    assert sum(p.numel() for p in trainable) == (4 * 16 + 32 * 4 + 32) + (4 * 32 + 32 * 4 + 32) + (
        32 * 4 + 4
    )


def test_twenty_steps_train_the_factors_of_an_mlp():
    losses = Losses()
    algorithm = Factorize(min_features=16, latent_features=4)
    trainer = Trainer(
        mlp(),
        blobs(),
        "20ba",
        algorithms=[algorithm],
        callbacks=[losses],
        optimizer={"name": "sgd", "lr": 0.1},
        device="cpu",
    )
    first = trainer.state.model.net[2].first.weight.detach().clone()
    trainer.fit()
    assert len(losses.losses) == 20 and all(math.isfinite(v) for v in losses.losses)
    assert sum(losses.losses[-5:]) < sum(losses.losses[:5])
    assert not torch.equal(trainer.state.model.net[2].first.weight, first)  # factors train


def test_twenty_steps_on_a_cnn_with_factorized_convolutions():
    torch.manual_seed(0)
    model = Classifier(SmallCNN2d(3, 4, channels=8), 4)
    algorithm = Factorize(min_channels=8, latent_channels=0.5)
    losses = Losses()
    trainer = Trainer(
        model, blobs(image=True), "20ba", algorithms=[algorithm], callbacks=[losses], device="cpu"
    )
    assert algorithm.replaced == ["net.features.3", "net.features.7", "net.features.10"]
    convs = [m for m in trainer.state.model.modules() if isinstance(m, FactorizedConv2d)]
    assert [c.latent_channels for c in convs] == [4, 4, 8]
    trainer.fit()
    assert len(losses.losses) == 20 and all(math.isfinite(v) for v in losses.losses)


def test_no_qualifying_layer_warns():
    with pytest.warns(UserWarning, match="no layer qualified"):
        Trainer(mlp(), blobs(), "1ba", algorithms=[Factorize()], device="cpu")


def test_gpt2_attention_and_mlp_are_factorized_but_not_the_tied_head():
    from speedup.models.language import gpt2

    torch.manual_seed(0)
    info = text_info(16, 64)
    model = gpt2(info, size="tiny")  # width 128, 2 layers, head tied to the embedding
    batch = {"input_ids": torch.randint(0, 64, (2, 16))}
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    replaced = apply_factorization(model, min_features=64, latent_features=32)
    per_block = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    assert replaced == [f"net.transformer.h.{i}.{name}" for i in (0, 1) for name in per_block]
    head = model.net.lm_head
    assert type(head) is nn.Linear and head.weight is model.net.transformer.wte.weight
    factorized = model(batch)
    assert factorized.shape == (2, 16, 64)
    # merged back, the weights load into a plain GPT-2 and compute the same logits
    assert merge_factorization(model) == replaced
    plain = gpt2(info, size="tiny")
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(plain(batch), factorized, rtol=1e-4, atol=1e-4)


def test_merging_gives_back_layers_of_the_original_types_with_the_product():
    model = mixed_model()
    apply_factorization(model, **SMALL)
    pairs = {name: model[name] for name in ("big", "odd", "pointwise")}
    x, image = torch.randn(3, 64), torch.randn(2, 32, 4, 4)
    before = model["big"](x), model["pointwise"](image)
    assert merge_factorization(model) == ["big", "odd", "pointwise"]
    assert type(model["big"]) is nn.Linear and type(model["pointwise"]) is nn.Conv2d
    torch.testing.assert_close(model["big"].weight, pairs["big"].merged_weight())
    torch.testing.assert_close(model["big"](x), before[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model["pointwise"](image), before[1], rtol=1e-4, atol=1e-5)
    assert torch.linalg.matrix_rank(model["odd"].weight.detach()).item() == 16
