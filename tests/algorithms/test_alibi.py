import inspect
import math
import sys
import weakref

import pytest
import torch
from conftest import bad_arguments_test, text_info, tiny_language_model, token_ids
from speedup.algorithms.alibi import (
    Alibi,
    NoPositionEmbedding,
    alibi_bias,
    alibi_slopes,
    apply_alibi,
)
from torch import nn

from speedup.callback import Callback
from speedup.data import TensorBatchLoader
from speedup.engine import PlanError
from speedup.event import Event
from speedup.models.language import BERT_SIZES
from speedup.trainer import Trainer

SEQ, VOCAB = 32, 64
INFO = text_info(SEQ, VOCAB)


pytestmark = pytest.mark.usefixtures("one_thread")


def build(family, seed=0, attention=None, **kwargs):
    """A tiny model; ``attention`` builds it with that implementation."""
    return tiny_language_model(INFO, family, attention, seed, **kwargs)


def pretend_flash(model):
    """Make the model use flash attention, as transformers would have built it, without the
    flash-attn package: the config names it and, where a class per implementation exists,
    each attention module becomes that class (its forward is never reached)."""
    model.net.config._attn_implementation = "flash_attention_2"
    for module in model.modules():
        names = vars(sys.modules[type(module).__module__])
        table = names.get("GPT2_ATTENTION_CLASSES") or names.get("BERT_SELF_ATTENTION_CLASSES")
        if table and type(module) in table.values() and "flash_attention_2" in table:
            module.__class__ = table["flash_attention_2"]


def attention_modules(model):
    return [m for m in model.modules() if hasattr(m, "alibi_heads")]


def ids(rows=2, length=SEQ, seed=1):
    return token_ids(VOCAB, rows, length, seed)


# -- slopes and bias --------------------------------------------------------------------------


def test_slopes_of_power_of_two_head_counts_are_the_papers_geometric_sequence():
    # Press et al., section 3: 8 heads 1/2, 1/4, ..., 1/256; 16 heads start at 2^-0.5.
    assert alibi_slopes(8).tolist() == [2.0**-k for k in range(1, 9)]
    torch.testing.assert_close(
        alibi_slopes(16), torch.tensor([2.0 ** (-k / 2) for k in range(1, 17)])
    )
    assert alibi_slopes(1).tolist() == [2.0**-8]


@pytest.mark.parametrize(
    ("heads", "expected"),
    [
        # 12 = 8 + 4: the 8-head slopes, then 2^-0.5, 2^-1.5, ... from the 16-head sequence
        (12, [2.0**-k for k in range(1, 9)] + [2.0**-0.5, 2.0**-1.5, 2.0**-2.5, 2.0**-3.5]),
        # 6 = 4 + 2: 2^-2, 2^-4, 2^-6, 2^-8, then 2^-1, 2^-3 from the 8-head sequence
        (6, [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3]),
        (3, [2.0**-4, 2.0**-8, 2.0**-2]),
    ],
)
def test_slopes_of_other_head_counts_interleave_the_next_power_of_two(heads, expected):
    torch.testing.assert_close(alibi_slopes(heads), torch.tensor(expected))
    assert len(set(alibi_slopes(heads).tolist())) == heads  # every head its own slope


def test_bias_is_minus_slope_times_distance():
    bias = alibi_bias(torch.tensor([0.5, 0.25]), 3)
    expected = -torch.tensor([[0, 1, 2], [1, 0, 1], [2, 1, 0]], dtype=torch.float32)
    torch.testing.assert_close(bias, torch.stack([0.5 * expected, 0.25 * expected]))
    # decoding: two queries at positions 3 and 4 against keys 0..4
    shifted = alibi_bias(torch.tensor([1.0]), 2, offset=3)
    assert shifted.tolist() == [[[-3.0, -2.0, -1.0, -0.0, -1.0], [-4.0, -3.0, -2.0, -1.0, -0.0]]]
    with pytest.raises(ValueError, match="num_heads"):
        alibi_slopes(0)


# -- the bias inside a real model -------------------------------------------------------------


def attentions(model, input_ids, **kwargs):
    assert model.net.config._attn_implementation == "eager"  # eager returns the probabilities
    with torch.no_grad():
        return model.net(input_ids=input_ids, output_attentions=True, **kwargs).attentions


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_with_vanishing_scores_attention_is_the_softmax_of_the_bias(family):
    model = build(family, attention="eager")
    apply_alibi(model)
    with torch.no_grad():  # query weights 0: every raw score is 0, only the bias remains
        for module in attention_modules(model):
            if family == "bert":
                module.query.weight.zero_()
                module.query.bias.zero_()
            else:
                module.c_attn.weight[:, : module.embed_dim].zero_()
                module.c_attn.bias[: module.embed_dim].zero_()
    probs = attentions(model, ids(length=8))[0]  # layer 0: [N, heads, 8, 8]
    heads = probs.shape[1]
    i, j = torch.arange(8)[:, None], torch.arange(8)[None, :]
    for h, slope in enumerate(alibi_slopes(heads).tolist()):
        logits = -slope * (i - j).abs().float()
        if family == "gpt2":  # causal: the future is masked
            logits = logits.masked_fill(j > i, -math.inf)
        expected = torch.softmax(logits, dim=-1)
        torch.testing.assert_close(probs[0, h], expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(probs[1, h], expected, rtol=1e-5, atol=1e-6)
    if family == "bert":  # the bias is symmetric: i attends to i-d and i+d alike
        assert torch.allclose(probs[0, :, 3, 1], probs[0, :, 3, 5])


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_attention_scores_equal_a_reference_computed_from_the_projections(family):
    model = build(family, attention="eager")
    apply_alibi(model)
    module = attention_modules(model)[0]
    seen = {}

    def keep_input(module, args, kwargs):
        seen["hidden"] = args[0] if args else kwargs["hidden_states"]

    module.register_forward_pre_hook(keep_input, with_kwargs=True)
    input_ids = ids(length=12)
    probs = attentions(model, input_ids)[0]
    hidden = seen["hidden"]
    n, length, width = hidden.shape
    heads = module.alibi_heads
    with torch.no_grad():
        if family == "bert":
            q, k = module.query(hidden), module.key(hidden)
        else:
            q, k, _ = module.c_attn(hidden).split(width, dim=2)
        q = q.view(n, length, heads, -1).transpose(1, 2)
        k = k.view(n, length, heads, -1).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    i, j = torch.arange(length)[:, None], torch.arange(length)[None, :]
    bias = -alibi_slopes(heads)[:, None, None] * (i - j).abs().float()
    if family == "gpt2":
        scores = (scores + bias).masked_fill(j > i, -math.inf)  # causal form: -m (i - j)
    else:
        scores = scores + bias  # symmetric form: -m |i - j|
    torch.testing.assert_close(probs, torch.softmax(scores, dim=-1), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_sdpa_and_eager_agree_with_and_without_padding(family):
    input_ids = ids(rows=3, length=16)
    mask = torch.ones_like(input_ids)
    mask[0, 10:] = 0
    outputs = {}
    for implementation in ("sdpa", "eager"):
        model = build(family, attention=implementation)
        apply_alibi(model)
        with torch.no_grad():
            for name, batch_mask in (("plain", None), ("padded", mask)):
                batch = {"input_ids": input_ids, "attention_mask": batch_mask}
                outputs[implementation, name] = model(batch)
    for name in ("plain", "padded"):
        torch.testing.assert_close(outputs["sdpa", name], outputs["eager", name])
    # rows without padding are untouched by another row's padding
    torch.testing.assert_close(outputs["sdpa", "padded"][1:], outputs["sdpa", "plain"][1:])
    assert not torch.allclose(outputs["sdpa", "padded"][0], outputs["sdpa", "plain"][0])


def test_without_positions_order_matters_only_through_the_bias():
    # BERT with ALiBi has no position embedding: a cyclic shift of the tokens changes the
    # outputs only because the bias sees distances (a position-free model would just shift).
    model = build("bert")
    apply_alibi(model)
    model.eval()
    input_ids = ids(rows=1, length=8)
    with torch.no_grad():
        out = model({"input_ids": input_ids})
        shifted = model({"input_ids": input_ids.roll(1, dims=1)})
        for module in attention_modules(model):
            module._forward_pre_hooks.clear()  # no bias left: permutation-equivariant
        flat = model({"input_ids": input_ids})
        flat_shifted = model({"input_ids": input_ids.roll(1, dims=1)})
    torch.testing.assert_close(flat_shifted, flat.roll(1, dims=1), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(shifted, out.roll(1, dims=1), atol=1e-3)


# -- surgery ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "table"), [("gpt2", "wpe"), ("bert", "position_embeddings")])
def test_position_tables_leave_the_model_and_the_optimizer(family, table):
    model = build(family)
    before = sum(p.numel() for p in model.parameters())
    positions = {n: p for n, p in model.named_parameters() if table in n}
    assert len(positions) == 1
    (weight,) = positions.values()
    loader = TensorBatchLoader(token_batch(16), 8, drop_last=True)
    trainer = Trainer(model, loader, "1ba", algorithms=[Alibi()], device="cpu", data_kind="text")
    model = trainer.state.model
    assert (
        sum(p.numel() for p in model.parameters()) == before - weight.numel() == before - SEQ * 128
    )
    assert not [n for n, _ in model.named_parameters() if table in n]
    assert sum(isinstance(m, NoPositionEmbedding) for m in model.modules()) == 1
    optimized = {id(p) for group in trainer.state.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.parameters() if p.requires_grad}
    assert len(attention_modules(model)) == 2  # one per layer of the tiny models
    assert Alibi().declare().events[Event.INIT].writes == {"model.modules"}


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_gpt2_evaluates_beyond_its_position_table(attention):
    # eager GPT-2 (4.40 to 5.0 at least) slices its causal mask from an n_positions^2 table
    model = build("gpt2", attention=attention)
    assert model.net.config.n_positions == SEQ
    long = ids(length=4 * SEQ)
    with pytest.raises(IndexError):
        model({"input_ids": long})  # the plain model has no position 32
    apply_alibi(model)
    with torch.no_grad():
        logits = model({"input_ids": long, "labels": long})
    assert logits.shape == (2, 4 * SEQ, VOCAB) and torch.isfinite(logits).all()
    # causal: the first SEQ positions see exactly what they would in a short input
    with torch.no_grad():
        short = model({"input_ids": long[:, :SEQ]})
    torch.testing.assert_close(logits[:, :SEQ], short, rtol=1e-4, atol=1e-5)


def test_bert_takes_inputs_up_to_max_sequence_length():
    model = build("bert")
    apply_alibi(model, max_sequence_length=3 * SEQ)
    assert model.net.config.max_position_embeddings == 3 * SEQ
    with torch.no_grad():
        logits = model({"input_ids": ids(length=3 * SEQ)})
    assert logits.shape == (2, 3 * SEQ, VOCAB) and torch.isfinite(logits).all()


def cache_argument(net):
    """The name of the cache argument and output: ``past_key_values`` before transformers
    5.x renamed it ``cache`` (the old name warns there)."""
    return "cache" if "cache" in inspect.signature(net.forward).parameters else "past_key_values"


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("padded", [False, True], ids=["plain", "left-padded"])
def test_cached_decoding_matches_the_full_forward(attention, padded):
    # The new queries sit after the cached keys: their bias is -m (past + i - j). A bias
    # computed as if they were the first positions differs from the full forward's.
    model = build("gpt2", attention=attention)
    apply_alibi(model)
    model.eval()
    input_ids = ids(length=10)
    mask = torch.ones_like(input_ids)
    if padded:
        mask[0, :3] = 0  # left padding: the new tokens of row 0 must not see its pads
    name = cache_argument(model.net)
    with torch.no_grad():
        full = model.net(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
        prefix = model.net(input_ids=input_ids[:, :7], attention_mask=mask[:, :7], use_cache=True)
        past = getattr(prefix, name)
        assert past is not None
        step = model.net(input_ids=input_ids[:, 7:], attention_mask=mask, **{name: past})
        # and token by token, the cache growing one key per step
        past = getattr(model.net(input_ids=input_ids[:, :7], attention_mask=mask[:, :7]), name)
        tokens = []
        for t in range(7, 10):
            out = model.net(
                input_ids=input_ids[:, t : t + 1], attention_mask=mask[:, : t + 1], **{name: past}
            )
            tokens.append(out.logits)
            past = getattr(out, name)
    torch.testing.assert_close(step.logits, full[:, 7:], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.cat(tokens, 1), full[:, 7:], rtol=1e-4, atol=1e-5)


def test_generate_scores_each_new_token_as_the_full_forward_does():
    # generate() drives whatever cache the installed transformers uses.
    model = build("gpt2")
    apply_alibi(model)
    model.eval()
    prompt = ids(length=6)
    with torch.no_grad():
        out = model.net.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=4,
            min_new_tokens=4,
            do_sample=False,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
        full = model.net(input_ids=out.sequences, use_cache=False).logits
    assert out.sequences.shape == (2, 10)
    # step t scored the token at 6 + t from position 5 + t
    torch.testing.assert_close(torch.stack(out.logits, 1), full[:, 5:9], rtol=1e-4, atol=1e-5)
    assert torch.equal(out.sequences[:, 6:], full[:, 5:9].argmax(-1))


def test_bert_cross_attention_gets_no_bias():
    # queries and keys of cross-attention come from different sequences: no distance between
    # them (transformers 4 builds it from BertSelfAttention too)
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=VOCAB, is_decoder=True, add_cross_attention=True, **BERT_SIZES["tiny"]
    )
    torch.manual_seed(0)
    net = BertModel(config)
    assert apply_alibi(net) == 2
    patched = {id(m) for m in attention_modules(net)}
    assert patched == {id(layer.attention.self) for layer in net.encoder.layer}
    encoded = torch.randn(2, 5, config.hidden_size)
    with torch.no_grad():
        out = net(input_ids=ids(length=8), encoder_hidden_states=encoded).last_hidden_state
    assert out.shape == (2, 8, config.hidden_size) and torch.isfinite(out).all()


def test_applying_twice_changes_nothing_more_and_a_fresh_model_loads_the_state_dict():
    model = build("gpt2")
    assert apply_alibi(model) == 2
    hooks = [len(m._forward_pre_hooks) for m in attention_modules(model)]
    assert apply_alibi(model) == 2
    assert [len(m._forward_pre_hooks) for m in attention_modules(model)] == hooks == [1, 1]
    fresh = build("gpt2", seed=5)
    apply_alibi(fresh)
    fresh.load_state_dict(model.state_dict())  # strict: the same keys, slopes not saved
    x = {"input_ids": ids()}
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))


def test_refuses_flash_attention_and_models_without_hf_attention():
    model = build("gpt2")
    pretend_flash(model)
    with pytest.raises(ValueError, match="flash_attention_2"):
        apply_alibi(model)
    model = build("gpt2")  # switched after the surgery: the forward refuses
    apply_alibi(model)
    pretend_flash(model)
    with pytest.raises(RuntimeError, match="'flash_attention_2' cannot add a bias"):
        model({"input_ids": ids()})
    with pytest.raises(ValueError, match="no Hugging Face BERT or GPT-2"):
        apply_alibi(nn.Sequential(nn.Linear(4, 4)))


test_bad_arguments_raise_naming_the_argument = bad_arguments_test(
    Alibi,
    [
        ({"max_sequence_length": 0}, "alibi.max_sequence_length must be >= 1"),
        ({"train_sequence_length_scaling": 0.0}, r"alibi.train_sequence_length_scaling must be"),
        ({"train_sequence_length_scaling": 1.5}, r"in \(0, 1\], got 1.5"),
    ],
)


def test_declaration():
    declaration = Alibi().declare()
    assert declaration.model_kinds == {"bert", "gpt2"}
    assert declaration.events[Event.AFTER_DATALOADER].writes == {"batch"}
    assert {"gated_linear_units", "low_precision_layernorm"} <= declaration.runs_before
    assert "seq_length_warmup" in declaration.runs_before
    assert Event.AFTER_DATALOADER not in Alibi(train_sequence_length_scaling=1.0).declare().events


# -- in a run ---------------------------------------------------------------------------------


def token_batch(n, seed=0, mlm=False):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    labels = input_ids.clone()
    if mlm:  # 15% of positions carry a label, as masked LM data does
        labels[torch.rand(n, SEQ, generator=g) > 0.15] = -100
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


class Watch(Callback):
    def __init__(self):
        self.shapes, self.losses = [], []

    def batch_start(self, state, logger):
        self.shapes.append(tuple(state.batch["input_ids"].shape))

    def batch_end(self, state, logger):
        self.losses.append(float(state.train_metrics["loss"]))


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_twenty_steps_train_short_and_evaluate_at_full_length(family):
    model = build(family)
    data = token_batch(64, mlm=family == "bert")
    train = TensorBatchLoader(data, 8, shuffle=True, drop_last=True, seed=0)
    evaluation = TensorBatchLoader(token_batch(16, seed=1, mlm=family == "bert"), 16)
    watch = Watch()
    trainer = Trainer(
        model,
        train,
        "20ba",
        eval_dataloader=evaluation,
        algorithms=[Alibi()],
        callbacks=[watch],
        optimizer={"name": "adamw", "lr": 1e-3},
        eval_interval="0ba",
        data_kind="text",
        device="cpu",
    )
    metrics = trainer.fit()
    assert watch.shapes == [(32, 8)] * 20  # [8, 32] cut into segments of 32 / 4 tokens
    assert all(math.isfinite(loss) for loss in watch.losses)
    assert watch.losses[-1] < watch.losses[0]
    assert math.isfinite(metrics["loss"])  # evaluated on [16, 32]: 4x the trained length
    assert trainer.state.timestamp.token == 20 * 8 * SEQ  # every token still trained on


def test_scaling_below_one_refuses_sequence_classification_batches():
    model = build("bert", task="classification", vocab_size=VOCAB)
    data = {"input_ids": token_batch(16)["input_ids"], "labels": torch.randint(0, 2, (16,))}
    loader = TensorBatchLoader(data, 8, drop_last=True)
    trainer = Trainer(model, loader, "1ba", algorithms=[Alibi()], device="cpu")
    with pytest.raises(ValueError, match="set it to 1.0"):
        trainer.fit()
    trainer = Trainer(
        build("bert", task="classification", vocab_size=VOCAB),
        loader,
        "2ba",
        algorithms=[Alibi(train_sequence_length_scaling=1.0)],
        device="cpu",
    )
    trainer.fit()  # full length: classification trains
    assert trainer.state.timestamp.batch == 2


def test_not_applicable_to_other_models():
    from conftest import loaders, make_blobs, tiny_model

    train, _ = loaders(make_blobs(n=32))
    with pytest.raises(PlanError, match="alibi does not apply to model kind 'mlp'"):
        Trainer(tiny_model(), train, "1ba", algorithms=[Alibi()])


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_layers_of_one_forward_share_one_bias_that_nothing_keeps(monkeypatch, family, attention):
    import speedup.algorithms.alibi as module

    built, handed = [], []

    def counting(*args, **kwargs):
        built.append(args[1:])
        return alibi_bias(*args, **kwargs)

    original = module._AddAlibiBias.bias

    def watching(self, *args):
        bias = original(self, *args)
        handed.append(weakref.ref(bias))
        return bias

    monkeypatch.setattr(module, "alibi_bias", counting)
    monkeypatch.setattr(module._AddAlibiBias, "bias", watching)
    model = build(family, attention=attention)
    apply_alibi(model)
    logits = model({"input_ids": ids()})
    assert len(built) == 1 and len(handed) == 2  # two layers, one bias
    logits.sum().backward()
    del logits
    assert all(ref() is None for ref in handed)  # gone with the graph: not cached
    mask = torch.ones(2, SEQ, dtype=torch.long)
    mask[0, -3:] = 0  # padding: each layer combines the shared bias with its mask
    with torch.no_grad():
        model({"input_ids": ids(), "attention_mask": mask})
    assert len(built) == 2 and len(handed) == 4
    assert all(ref() is None for ref in handed)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_bf16_models_and_bf16_autocast_run_with_both_attention_implementations(family, attention):
    model = build(family, attention=attention)
    apply_alibi(model)
    input_ids = ids(rows=3, length=16)
    mask = torch.ones_like(input_ids)
    mask[0, 10:] = 0
    batch = {"input_ids": input_ids, "attention_mask": mask}
    with torch.no_grad():
        reference = model(batch)  # fp32
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = model(batch)
        model.to(torch.bfloat16)  # no autocast: the masks follow the model's dtype
        low = model(batch)
    for out in (autocast, low):
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
        torch.testing.assert_close(out.float(), reference, rtol=0.1, atol=0.1)
