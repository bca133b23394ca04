"""ReLU^2 (So et al. 2021, Primer): the feed-forward activation becomes max(x, 0)^2."""

import pytest
import torch
from conftest import text_info, tiny_language_model, token_ids
from speedup.algorithms.relu_squared import (
    ReLUSquared,
    ReLUSquaredActivation,
    apply_relu_squared,
    relu_squared,
)
from torch import nn

from speedup.data import TensorBatchLoader
from speedup.engine import PlanError
from speedup.models import Classifier
from speedup.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

SEQ, VOCAB = 16, 64
INFO = text_info(SEQ, VOCAB)


def build(family, seed=0):
    return tiny_language_model(INFO, family, seed=seed)


def ids(rows=2, seed=1):
    return token_ids(VOCAB, rows, SEQ, seed)


def test_the_activation_is_the_square_of_the_positive_part():
    x = torch.tensor([-3.0, -0.5, 0.0, 0.5, 2.0, 3.0])
    assert relu_squared(x).tolist() == [0.0, 0.0, 0.0, 0.25, 4.0, 9.0]
    assert ReLUSquaredActivation()(x).tolist() == [0.0, 0.0, 0.0, 0.25, 4.0, 9.0]


def test_gpt2_mlp_computes_the_primer_block_by_hand():
    model = build("gpt2")
    assert apply_relu_squared(model) == 2  # one MLP per layer of the 2-layer model
    mlp = model.net.transformer.h[1].mlp
    x = torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(2))
    # GPT-2's Conv1D computes x @ weight + bias with weight [in, out].
    hidden = torch.clamp(x @ mlp.c_fc.weight + mlp.c_fc.bias, min=0) ** 2
    expected = hidden @ mlp.c_proj.weight + mlp.c_proj.bias
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), expected)


def test_bert_intermediate_computes_the_squared_relu_of_its_projection():
    model = build("bert")
    assert apply_relu_squared(model) == 2
    block = model.net.bert.encoder.layer[0].intermediate
    x = torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(3))
    expected = torch.clamp(x @ block.dense.weight.T + block.dense.bias, min=0) ** 2
    with torch.no_grad():
        torch.testing.assert_close(block(x), expected)


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_a_saved_model_reloads_with_the_same_function(family, tmp_path):
    model = build(family)
    apply_relu_squared(model)
    assert apply_relu_squared(model) == 0  # applying twice changes nothing more
    model.net.save_pretrained(tmp_path)
    reloaded = type(model.net).from_pretrained(tmp_path)
    if family == "bert":  # hidden_act also sets the MLM head's activation: surgery again
        assert apply_relu_squared(reloaded) == 2
    else:  # transformers' own relu2 rebuilds it from GPT-2's config alone
        assert reloaded.config.activation_function == "relu2"
    mask = torch.ones(2, SEQ, dtype=torch.long)
    with torch.no_grad():
        before = model.net(input_ids=ids(), attention_mask=mask).logits
        after = reloaded(input_ids=ids(), attention_mask=mask).logits
        # and the squared ReLU is what changed: the GELU model computes something else
        plain = build(family).net(input_ids=ids(), attention_mask=mask).logits
    torch.testing.assert_close(after, before)
    assert not torch.allclose(plain, before)


def test_a_model_without_transformer_mlps_is_refused():
    net = nn.Sequential(nn.Linear(4, 4), nn.GELU())
    assert apply_relu_squared(net) == 0
    data = {"inputs": torch.randn(8, 4), "targets": torch.zeros(8, dtype=torch.long)}
    loader = TensorBatchLoader(data, 4)
    # a plain network is refused by the plan, before INIT ...
    with pytest.raises(PlanError, match="relu_squared does not apply to model kind 'mlp'"):
        Trainer(net, loader, "1ba", algorithms=[ReLUSquared()], device="cpu")
    # ... and a model claiming to be GPT-2 without its MLPs by the surgery
    fake = Classifier(net, 4, kind="gpt2")
    with pytest.raises(ValueError, match="relu_squared: found no Hugging Face GPT2MLP"):
        Trainer(fake, loader, "1ba", algorithms=[ReLUSquared()], device="cpu")


def test_a_glu_built_after_it_gates_with_the_squared_relu():
    # Recipe order puts GLU first; the declared order runs relu_squared first anyway.
    model = build("bert")
    data = {
        "input_ids": ids(4),
        "attention_mask": torch.ones(4, SEQ, dtype=torch.long),
        "labels": ids(4, seed=5),
    }
    trainer = Trainer(
        model,
        TensorBatchLoader(data, 2),
        "1ba",
        algorithms=["gated_linear_units", "relu_squared"],
        device="cpu",
        data_kind="text",
    )
    from speedup.algorithms.gated_linear_units import GatedFeedForward

    blocks = [m for m in trainer.state.model.modules() if isinstance(m, GatedFeedForward)]
    assert len(blocks) == 2
    x = torch.tensor([-1.0, 2.0])
    assert all(block.activation(x).tolist() == [0.0, 4.0] for block in blocks)
