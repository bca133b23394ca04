import math

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    Losses,
    algorithm_trainer,
    bad_arguments_test,
    masked_token_data,
    text_info,
    tiny_language_model,
)
from speedup.algorithms.gated_linear_units import (
    GatedFeedForward,
    GatedLinearUnits,
    apply_gated_linear_units,
    glu_intermediate_size,
)
from torch import nn

from speedup.data import TensorBatchLoader
from speedup.engine import PlanError
from speedup.event import Event
from speedup.models.language import gpt2
from speedup.trainer import Trainer

SEQ, VOCAB = 16, 64
INFO = text_info(SEQ, VOCAB)
HIDDEN, FFN, LAYERS = 128, 512, 2  # BERT_SIZES["tiny"]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_bert(seed=0):
    return tiny_language_model(INFO, "bert", seed=seed)


def count(module):
    return sum(p.numel() for p in module.parameters())


def blocks(model):
    return [m for m in model.modules() if isinstance(m, GatedFeedForward)]


def test_hidden_width_keeps_the_parameter_count_at_two_thirds():
    assert glu_intermediate_size(3072) == 2048  # BERT-Base: 3 x 768 x 2048 == 2 x 768 x 3072
    assert 3 * 768 * glu_intermediate_size(3072) == 2 * 768 * 3072
    assert glu_intermediate_size(512) == 344  # 341.3 to the nearest multiple of 8
    assert glu_intermediate_size(3072, 1.0) == 3072
    assert glu_intermediate_size(4, 0.5) == 8


@pytest.mark.parametrize(
    ("kwargs", "width", "extra"),
    [
        ({}, 344, 0),  # no biases in the gated projections (the default)
        ({"gated_layer_bias": True}, 344, 344),
        (
            {"gated_layer_bias": True, "non_gated_layer_bias": True, "intermediate_scale": 1.0},
            512,
            1024,
        ),
    ],
)
def test_parameter_counts_of_the_replaced_blocks_follow_the_formula(kwargs, width, extra):
    model = tiny_bert()
    before = count(model)
    # BertIntermediate + BertOutput dense layers: d x f + f, f x d + d
    old_block = HIDDEN * FFN + FFN + FFN * HIDDEN + HIDDEN
    assert apply_gated_linear_units(model, **kwargs) == LAYERS
    # gated + value projections (2 x d x f'), output f' x d + d, the optional biases
    new_block = 2 * HIDDEN * width + width * HIDDEN + HIDDEN + extra
    assert count(model) == before - LAYERS * (old_block - new_block)
    for block in blocks(model):
        assert count(block) - count(block.LayerNorm) == new_block
        assert block.input.weight.shape == (2 * width, HIDDEN)


def test_the_block_computes_a_gated_unit_with_residual_and_layer_norm():
    torch.manual_seed(0)
    norm = nn.LayerNorm(8)
    block = GatedFeedForward(8, 16, F.gelu, norm, nn.Identity(), gated_layer_bias=True)
    with torch.no_grad():
        block.gated_bias.normal_()
    x, residual = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    w, v = block.input.weight[:16], block.input.weight[16:]
    gate = F.gelu(x @ w.T + block.gated_bias)
    expected = norm(block.output(gate * (x @ v.T)) + residual)
    torch.testing.assert_close(block(x, residual), expected)


def test_surgery_keeps_the_output_shape_the_layer_norm_and_bert_initialisation():
    model = tiny_bert()
    norms = [layer.output.LayerNorm for layer in model.net.bert.encoder.layer]
    input_ids = torch.randint(0, VOCAB, (3, SEQ))
    with torch.no_grad():
        before = model({"input_ids": input_ids})
    apply_gated_linear_units(model)
    with torch.no_grad():
        after = model({"input_ids": input_ids})
    assert after.shape == before.shape == (3, SEQ, VOCAB) and torch.isfinite(after).all()
    assert not torch.allclose(after, before)  # a different FFN
    for layer, norm in zip(model.net.bert.encoder.layer, norms, strict=True):
        assert isinstance(layer.intermediate, nn.Identity)
        assert layer.output.LayerNorm is norm  # kept, weights and all
        std = float(layer.output.input.weight.detach().std())
        assert abs(std - model.net.config.initializer_range) < 0.002
        assert torch.all(layer.output.output.bias == 0)
    assert apply_gated_linear_units(model) == 0  # nothing left to replace


def test_the_default_gate_is_the_models_activation_and_others_are_named():
    model = tiny_bert()
    act = model.net.bert.encoder.layer[0].intermediate.intermediate_act_fn
    apply_gated_linear_units(model)
    assert blocks(model)[0].activation is act  # BERT's GELU: GEGLU
    model = tiny_bert()
    apply_gated_linear_units(model, act_fn="relu")
    assert blocks(model)[0].activation is F.relu
    with pytest.raises(ValueError, match="act_fn must be one of"):
        apply_gated_linear_units(tiny_bert(), act_fn="tanh")


test_bad_arguments_raise_naming_the_argument = bad_arguments_test(
    GatedLinearUnits,
    [
        ({"act_fn": "squared_relu"}, "gated_linear_units.act_fn must be one of gelu"),
        ({"intermediate_scale": 0.0}, "gated_linear_units.intermediate_scale must be > 0"),
        ({"intermediate_scale": -1}, "intermediate_scale"),
    ],
)


def test_declaration():
    declaration = GatedLinearUnits().declare()
    assert declaration.events == {Event.INIT: declaration.events[Event.INIT]}
    assert declaration.events[Event.INIT].writes == {"model.modules"}
    assert declaration.model_kinds == {"bert"}
    assert declaration.runs_after == {"alibi", "relu_squared"}  # the activation swap first
    assert "low_precision_layernorm" in declaration.runs_before


def mlm_data(n=64, seed=0):
    return masked_token_data(n, SEQ, VOCAB, 0.15, seed)


def test_twenty_steps_train_the_gated_bert_and_the_optimizer_holds_its_parameters():
    model = tiny_bert()
    loader = TensorBatchLoader(mlm_data(), 8, shuffle=True, drop_last=True, seed=0)
    algorithm = GatedLinearUnits()
    losses = Losses()
    trainer = algorithm_trainer(
        model, loader, algorithm, callbacks=[losses], lr=1e-3, optimizer="adamw", data_kind="text"
    )
    model = trainer.state.model
    assert algorithm.replaced == LAYERS and len(blocks(model)) == LAYERS
    optimized = {id(p) for group in trainer.state.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.parameters() if p.requires_grad}
    start = {id(b): b.input.weight.detach().clone() for b in blocks(model)}
    trainer.fit()
    assert len(losses.losses) == 20 and all(math.isfinite(x) for x in losses.losses)
    assert losses.losses[-1] < losses.losses[0]
    for block in blocks(model):  # the new weights are the ones being trained
        assert not torch.equal(block.input.weight, start[id(block)])


def test_not_applicable_to_gpt2():
    model = gpt2(INFO, size="tiny")
    loader = TensorBatchLoader(mlm_data(16), 8, drop_last=True)
    with pytest.raises(PlanError, match="gated_linear_units does not apply to model kind 'gpt2'"):
        Trainer(model, loader, "1ba", algorithms=[GatedLinearUnits()], device="cpu")
