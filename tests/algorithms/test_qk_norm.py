"""QK-norm: each head's queries and keys normalised before their dot product (Dehghani et al.
2023; modded-nanogpt's parameter-free RMS form), checked against attention written by hand."""

import math

import pytest
import torch
from conftest import capture, cli_refusal_test, text_info, tiny_language_model, token_ids
from speedup.algorithms.qk_norm import QKNorm, apply_qk_norm, rms_norm_heads

from speedup.data import TensorBatchLoader
from speedup.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

SEQ, VOCAB = 12, 64
INFO = text_info(SEQ, VOCAB)
EPS = 1e-6


def build(family, attention, seed=0):
    """A tiny model computing attention with ``attention``, in eval mode."""
    return tiny_language_model(INFO, family, attention, seed).eval()


def ids(rows=2, seed=1):
    return token_ids(VOCAB, rows, SEQ, seed)


def by_hand_rms(x):
    """RMS norm written from its definition: x * sqrt(d) / sqrt(|x|^2 + d eps)."""
    d = x.shape[-1]
    return x * math.sqrt(d) / torch.sqrt((x * x).sum(-1, keepdim=True) + d * EPS)


def by_hand_layer_norm(x, gain, bias):
    centred = x - x.mean(-1, keepdim=True)
    variance = (centred * centred).mean(-1, keepdim=True)
    return centred / torch.sqrt(variance + EPS) * gain + bias


def reference_attention(x, wq, bq, wk, bk, wv, bv, heads, causal, normalize, scale):
    """softmax(scale * norm(q) norm(k)^T [+ causal mask]) v, head by head, from the weights:
    ``w*`` are [in, out] (x @ w + b)."""
    n, t, width = x.shape
    d = width // heads

    def split(y):
        return y.view(n, t, heads, d).transpose(1, 2)  # [n, heads, t, d]

    q, k, v = split(x @ wq + bq), split(x @ wk + bk), split(x @ wv + bv)
    q, k = normalize(q, "query"), normalize(k, "key")
    scores = scale * q @ k.transpose(-1, -2)
    if causal:
        future = torch.ones(t, t, dtype=torch.bool).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    out = scores.softmax(-1) @ v
    return out.transpose(1, 2).reshape(n, t, width)


def test_the_rms_norm_matches_its_definition_and_has_norm_sqrt_d():
    x = torch.randn(3, 5, 4, 32, generator=torch.Generator().manual_seed(0)) * 7
    y = rms_norm_heads(x, EPS)
    torch.testing.assert_close(y, by_hand_rms(x))
    torch.testing.assert_close(y.norm(dim=-1), torch.full((3, 5, 4), math.sqrt(32)))
    bf16 = rms_norm_heads(x.bfloat16(), EPS)
    assert bf16.dtype == torch.bfloat16


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize(
    ("norm", "scale"), [("rms", None), ("rms", 0.12), ("layernorm", None), ("layernorm", 0.3)]
)
def test_gpt2_attention_equals_hand_written_attention_on_normalised_heads(attention, norm, scale):
    model = build("gpt2", attention)
    assert apply_qk_norm(model, norm, scale, EPS) == 2
    attn = model.net.transformer.h[1].attn
    if norm == "layernorm":  # gains and biases away from their 1/0 init, so they count
        with torch.no_grad():
            for module in (attn.query_norm, attn.key_norm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    seen = capture(attn, attn.c_attn)
    with torch.no_grad():
        model.net(input_ids=ids())
        w, b = attn.c_attn.weight, attn.c_attn.bias
        e = w.shape[0]

        def normalize(y, role):
            if norm == "rms":
                return by_hand_rms(y)
            module = attn.query_norm if role == "query" else attn.key_norm
            return by_hand_layer_norm(y, module.weight, module.bias)

        d = e // 4
        expected = reference_attention(
            seen["x"], w[:, :e], b[:e], w[:, e : 2 * e], b[e : 2 * e], w[:, 2 * e :], b[2 * e :],
            heads=4, causal=True, normalize=normalize, scale=scale or 1 / math.sqrt(d),
        )  # fmt: skip
        expected = expected @ attn.c_proj.weight + attn.c_proj.bias
    torch.testing.assert_close(seen["out"], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("scale", [None, 0.12])
def test_bert_self_attention_equals_hand_written_attention_on_normalised_heads(attention, scale):
    model = build("bert", attention)
    assert apply_qk_norm(model, "rms", scale, EPS) == 2
    attn = model.net.bert.encoder.layer[0].attention.self
    seen = capture(attn, attn.query)
    with torch.no_grad():
        model.net(input_ids=ids(), attention_mask=torch.ones(2, SEQ, dtype=torch.long))
        expected = reference_attention(
            seen["x"], attn.query.weight.T, attn.query.bias, attn.key.weight.T, attn.key.bias,
            attn.value.weight.T, attn.value.bias, heads=2, causal=False,
            normalize=lambda y, role: by_hand_rms(y), scale=scale or 1 / math.sqrt(64),
        )  # fmt: skip
    torch.testing.assert_close(seen["out"], expected, rtol=1e-4, atol=1e-5)


def test_applying_twice_changes_nothing_more_and_layernorm_adds_trained_parameters():
    model = build("gpt2", "sdpa")
    before = sum(p.numel() for p in model.parameters())
    assert apply_qk_norm(model, "layernorm") == 2
    assert apply_qk_norm(model, "layernorm") == 0
    # a gain and a bias of head size 32 for queries and for keys, in each of 2 layers
    assert sum(p.numel() for p in model.parameters()) - before == 2 * 2 * 2 * 32
    rms = build("gpt2", "sdpa")
    apply_qk_norm(rms, "rms")
    assert sum(p.numel() for p in rms.parameters()) == before  # parameter-free


def test_in_a_trainer_the_layernorm_gains_are_optimised():
    model = build("gpt2", "sdpa").train()
    data = {"input_ids": ids(4), "attention_mask": torch.ones(4, SEQ, dtype=torch.long)}
    data["labels"] = data["input_ids"].clone()
    trainer = Trainer(
        model,
        TensorBatchLoader(data, 2),
        "2ba",
        optimizer={"name": "adamw", "lr": 1e-2},
        algorithms=[QKNorm(norm="layernorm")],
        device="cpu",
        data_kind="text",
    )
    gain = trainer.state.model.net.transformer.h[0].attn.query_norm.weight
    assert any(gain is p for g in trainer.state.optimizer.param_groups for p in g["params"])
    trainer.fit()
    assert not torch.equal(gain.detach(), torch.ones_like(gain))


test_bad_arguments_exit_2_with_one_line_naming_the_key = cli_refusal_test(
    "stdlib-gpt",
    [
        ("algorithms.qk_norm.norm=batch", ["algorithms.qk_norm", "rms, layernorm", "'batch'"]),
        ("algorithms.qk_norm.scale=-1", ["algorithms.qk_norm", "scale", "> 0"]),
        ("algorithms.qk_norm.eps=0", ["algorithms.qk_norm", "eps", "> 0"]),
    ],
)
