import math

import pytest
import torch
from conftest import algorithm_trainer, masked_token_data, plan_of, text_info
from speedup.algorithms.alibi import Alibi
from speedup.algorithms.gated_linear_units import GatedFeedForward, GatedLinearUnits
from speedup.algorithms.low_precision_layernorm import (
    LowPrecisionLayerNorm,
    LPLayerNorm,
    apply_low_precision_layernorm,
)
from speedup.algorithms.seq_length_warmup import SeqLengthWarmup
from torch import nn

from speedup.algorithm import ALGORITHMS
from speedup.callback import Callback
from speedup.data import TensorBatchLoader
from speedup.event import Event
from speedup.models.language import bert, gpt2
from speedup.trainer import Trainer

SEQ, VOCAB = 16, 64
INFO = text_info(SEQ, VOCAB)


pytestmark = pytest.mark.usefixtures("one_thread")


def pair(shape=(4, 7, 32), seed=0):
    torch.manual_seed(seed)
    reference = nn.LayerNorm(shape[-1])
    with torch.no_grad():
        reference.weight.normal_(1.0, 0.2)
        reference.bias.normal_(0.0, 0.2)
    (low,) = [m for m in _converted(reference)]
    return reference, low, torch.randn(shape) * 3 + 1


def _converted(norm):
    holder = nn.Sequential(norm)
    assert apply_low_precision_layernorm(holder) == 1
    return [holder[0]]


def test_without_autocast_it_is_exactly_layer_norm():
    reference, low, x = pair()
    assert isinstance(low, LPLayerNorm) and isinstance(low, nn.LayerNorm)
    assert torch.equal(low(x), reference(x))


def test_under_bf16_autocast_it_computes_in_bf16_and_stays_close_to_fp32():
    reference, low, x = pair()
    expected = reference(x)  # fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = low(x)
        upcast = reference(x)
    assert out.dtype == torch.bfloat16
    assert upcast.dtype == torch.float32  # what plain LayerNorm does under autocast
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)
    assert not torch.equal(out.float(), expected)  # it really ran in bf16


def test_gradients_reach_the_shared_fp32_parameters():
    reference, low, x = pair()
    assert low.weight is reference.weight and low.bias is reference.bias
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low(x.requires_grad_()).float().pow(2).sum().backward()
    assert low.weight.grad.dtype == torch.float32 and torch.isfinite(low.weight.grad).all()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_surgery_counts_shares_and_keeps_state_dict_names():
    torch.manual_seed(0)
    model = bert(INFO, size="tiny")
    keys = list(model.state_dict())
    tensors = dict(model.named_parameters())
    # embeddings + 2 per layer (attention output, FFN output) + the MLM head transform
    assert apply_low_precision_layernorm(model) == 1 + 2 * 2 + 1
    assert list(model.state_dict()) == keys
    assert all(p is tensors[n] for n, p in model.named_parameters())
    assert not any(type(m) is nn.LayerNorm for m in model.modules())
    shared = nn.LayerNorm(4)
    twice = nn.ModuleDict({"a": shared, "b": nn.Sequential(shared)})
    assert apply_low_precision_layernorm(twice) == 1
    assert twice["a"] is twice["b"][0] and isinstance(twice["a"], LPLayerNorm)
    assert apply_low_precision_layernorm(twice) == 0  # already converted


def test_declaration():
    declaration = LowPrecisionLayerNorm().declare()
    assert declaration.events[Event.INIT].reads == {"precision"}
    assert declaration.events[Event.INIT].writes == {"model.modules"}
    assert declaration.model_kinds is None  # any model with LayerNorm
    assert {"alibi", "gated_linear_units"} <= declaration.runs_after


def data(n=32, seq=SEQ, seed=0):
    return masked_token_data(n, seq, VOCAB, 0.3, seed)


class NormDtypes(Callback):
    """Records the dtype of every LayerNorm output and the loss of every step."""

    def __init__(self):
        self.dtypes, self.losses, self.handles = set(), [], []

    def fit_start(self, state, logger):
        for module in state.model.modules():
            if isinstance(module, nn.LayerNorm):
                hook = module.register_forward_hook(lambda m, i, out: self.dtypes.add(out.dtype))
                self.handles.append(hook)

    def batch_end(self, state, logger):
        self.losses.append(float(state.train_metrics["loss"]))


def test_twenty_bf16_steps_run_every_layer_norm_in_bf16():
    torch.manual_seed(0)
    model = gpt2(INFO, size="tiny")
    loader = TensorBatchLoader(data(), 8, shuffle=True, drop_last=True, seed=0)
    algorithm, taps = LowPrecisionLayerNorm(), NormDtypes()
    trainer = algorithm_trainer(
        model,
        loader,
        algorithm,
        callbacks=[taps],
        lr=1e-3,
        optimizer="adamw",
        precision="bf16",
        data_kind="text",
    )
    assert algorithm.replaced == 2 * 2 + 1  # ln_1, ln_2 per block, ln_f
    optimized = {id(p) for group in trainer.state.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in trainer.state.model.parameters() if p.requires_grad}
    trainer.fit()
    assert taps.dtypes == {torch.bfloat16}
    assert len(taps.losses) == 20 and all(math.isfinite(x) for x in taps.losses)
    assert all(p.dtype == torch.float32 for p in trainer.state.model.parameters())


def test_fp32_runs_warn_that_it_has_no_effect():
    loader = TensorBatchLoader(data(16), 8, drop_last=True)
    with pytest.warns(UserWarning, match="no effect with precision fp32"):
        Trainer(gpt2(INFO), loader, "1ba", algorithms=[LowPrecisionLayerNorm()], device="cpu")


# -- the four language-model algorithms together ----------------------------------------------


def test_the_surgeries_order_themselves_whatever_the_recipe_order():
    algorithms = [LowPrecisionLayerNorm(), SeqLengthWarmup(), GatedLinearUnits(), Alibi()]
    plan = plan_of(
        algorithms,
        "bert",
        "text",
        known_names=set(ALGORITHMS.names()) | {a.name for a in algorithms},
    )
    assert plan.conflicts == [] and plan.warnings == []
    assert plan.order[Event.INIT] == ["alibi", "gated_linear_units", "low_precision_layernorm"]
    assert plan.order[Event.AFTER_DATALOADER] == ["alibi", "seq_length_warmup"]


def test_all_four_train_a_bert_together():
    torch.manual_seed(0)
    model = bert(INFO, size="tiny")
    # sequences of 32: twice the model's position table, which ALiBi removes
    loader = TensorBatchLoader(data(64, seq=32), 8, shuffle=True, drop_last=True, seed=0)
    shapes = []

    class Shapes(NormDtypes):
        def batch_start(self, state, logger):
            shapes.append(tuple(state.batch["input_ids"].shape))

    taps = Shapes()
    trainer = Trainer(
        model,
        loader,
        "12ba",
        algorithms=[
            SeqLengthWarmup(duration="0.5dur", min_seq_length=8, step_size=8),
            LowPrecisionLayerNorm(),
            GatedLinearUnits(),
            Alibi(train_sequence_length_scaling=0.5),
        ],
        callbacks=[taps],
        optimizer={"name": "adamw", "lr": 1e-3},
        precision="bf16",
        data_kind="text",
        device="cpu",
    )
    trainer.fit()
    model = trainer.state.model
    # ALiBi reshapes [8, 32] into [16, 16]; the warmup then ramps from 8 to that length over
    # 6 batches: 8 + 8 * floor((16 - 8) * b / (8 * 6)) is 8 until batch 6
    assert shapes == [(16, 8)] * 6 + [(16, 16)] * 6
    gated = [m for m in model.modules() if isinstance(m, GatedFeedForward)]
    assert len(gated) == 2 and all(isinstance(g.LayerNorm, LPLayerNorm) for g in gated)
    assert taps.dtypes == {torch.bfloat16}
    assert all(math.isfinite(x) for x in taps.losses)


def test_a_run_of_all_four_resumed_from_a_checkpoint_is_bit_exact(tmp_path):
    class StopAt(Callback):
        def batch_end(self, state, logger):
            if state.timestamp.batch == 3:  # mid-warmup, mid-epoch
                state.stop_training("test")

    def trainer(seed, callbacks=()):
        torch.manual_seed(seed)
        model = bert(INFO, size="tiny")
        loader = TensorBatchLoader(data(64, seq=32), 8, shuffle=True, drop_last=True, seed=0)
        algorithms = [
            Alibi(train_sequence_length_scaling=0.5),
            GatedLinearUnits(),
            LowPrecisionLayerNorm(),
            SeqLengthWarmup(duration="0.5dur"),
        ]
        return Trainer(
            model,
            loader,
            "10ba",
            algorithms=algorithms,
            callbacks=list(callbacks),
            optimizer={"name": "adamw", "lr": 1e-3},
            precision="bf16",
            data_kind="text",
            device="cpu",
            seed=seed,
        )

    straight = trainer(0)
    straight.fit()
    first = trainer(0, [StopAt()])
    first.fit()
    assert first.state.timestamp.batch == 3
    path = first.save_checkpoint(tmp_path / "ck")
    second = trainer(1)  # other initial weights and surgery draws: the checkpoint restores all
    second.load_checkpoint(path)
    second.fit()
    assert second.state.timestamp.batch == 10
    expected = straight.state.model.state_dict()
    for name, tensor in second.state.model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
