"""Rotary position embeddings (Su et al. 2021, RoFormer): queries and keys rotated pairwise by
position, values not; checked against complex-number rotations and attention written by hand."""

import math

import pytest
import torch
from conftest import capture, cli_refusal_test, text_info, tiny_language_model, token_ids
from speedup.algorithms.qk_norm import apply_qk_norm
from speedup.algorithms.rotary import (
    Rotary,
    RotaryPositions,
    apply_rotary,
    rotary_frequencies,
    rotate,
)

from speedup.data import TensorBatchLoader
from speedup.engine import PlanError
from speedup.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

SEQ, VOCAB = 12, 64
INFO = text_info(SEQ, VOCAB)


def build(family, attention="sdpa", seed=0, **kwargs):
    """A tiny model computing attention with ``attention``, in eval mode."""
    return tiny_language_model(INFO, family, attention, seed, **kwargs).eval()


def ids(rows=2, length=SEQ, seed=1):
    return token_ids(VOCAB, rows, length, seed)


def by_hand_rotation(x, positions, pairing="interleaved", rotated=None, base=10000.0):
    """RoPE as multiplication of each dimension pair, read as a complex number, by
    exp(i m theta_j), theta_j = base^(-2j/r): ``x`` [T, heads, d], ``positions`` [T]."""
    d = x.shape[-1]
    r = rotated or d
    theta = torch.tensor([base ** (-2.0 * j / r) for j in range(r // 2)], dtype=torch.float64)
    turn = torch.polar(torch.ones(len(positions), r // 2, dtype=torch.float64),
                       positions.double()[:, None] * theta)[:, None, :]  # fmt: skip
    part = x[..., :r].double()
    if pairing == "interleaved":
        z = torch.complex(part[..., 0::2], part[..., 1::2]) * turn
        out = torch.stack((z.real, z.imag), dim=-1).flatten(-2)
    else:
        z = torch.complex(part[..., : r // 2], part[..., r // 2 :]) * turn
        out = torch.cat((z.real, z.imag), dim=-1)
    return torch.cat((out.to(x.dtype), x[..., r:]), dim=-1)


def rotated_by_the_module(x, positions, pairing="interleaved", fraction=1.0):
    theta = rotary_frequencies(x.shape[-1], 10000.0, fraction)
    angles = positions.float()[:, None] * theta
    return rotate(x, angles.cos()[:, None, :], angles.sin()[:, None, :], pairing)


def test_frequencies_are_base_to_the_minus_two_i_over_d():
    expected = [10000.0 ** (-2 * i / 8) for i in range(4)]  # 1, 0.1, 0.01, 0.001
    torch.testing.assert_close(rotary_frequencies(8), torch.tensor(expected))
    # fraction 0.5 of 16 dimensions: the same frequencies over the 8 rotated ones
    torch.testing.assert_close(rotary_frequencies(16, fraction=0.5), torch.tensor(expected))
    torch.testing.assert_close(rotary_frequencies(4, base=100.0), torch.tensor([1.0, 0.1]))


@pytest.mark.parametrize("pairing", ["interleaved", "half"])
@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_rotate_multiplies_each_pair_by_a_unit_complex_number(pairing, fraction):
    x = torch.randn(7, 3, 16, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(7) * 3 + 2
    got = rotated_by_the_module(x, positions, pairing, fraction)
    expected = by_hand_rotation(x, positions, pairing, rotated=int(16 * fraction))
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got.norm(dim=-1), x.norm(dim=-1))  # a rotation
    if fraction < 1:
        assert torch.equal(got[..., 8:], x[..., 8:])  # the rest is position-free


@pytest.mark.parametrize("pairing", ["interleaved", "half"])
def test_scores_depend_only_on_the_offset_between_positions(pairing):
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(6, 1, 32, generator=g), torch.randn(6, 1, 32, generator=g)
    positions = torch.arange(6)

    def scores(shift):
        rq = rotated_by_the_module(q, positions + shift, pairing)[:, 0]
        rk = rotated_by_the_module(k, positions + shift, pairing)[:, 0]
        return rq @ rk.T

    torch.testing.assert_close(scores(37), scores(0), rtol=1e-4, atol=1e-4)
    # while the vectors themselves do move with the absolute position
    assert not torch.allclose(rotated_by_the_module(q, positions + 37), q, atol=1e-2)


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_a_rotary_model_sees_only_relative_positions(family):
    shift = 9
    kwargs = {"max_position_embeddings": 32}
    plain, rotary = build(family, **kwargs), build(family, **kwargs)
    assert apply_rotary(rotary) == 2

    def logits(model, offset):
        extra = {"token_type_ids": torch.zeros(2, SEQ, dtype=torch.long)}  # BERT's, by position
        positions = (torch.arange(SEQ) + offset)[None]
        with torch.no_grad():
            return model.net(input_ids=ids(), position_ids=positions, **extra).logits

    torch.testing.assert_close(logits(rotary, shift), logits(rotary, 0), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(logits(plain, shift), logits(plain, 0), atol=1e-3)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("pairing", ["interleaved", "half"])
def test_gpt2_attention_equals_hand_written_rotary_attention(attention, pairing):
    model = build("gpt2", attention)
    apply_rotary(model, pairing=pairing)
    attn = model.net.transformer.h[1].attn
    seen = capture(attn, attn.c_attn)
    with torch.no_grad():
        model.net(input_ids=ids())
        x, e, heads = seen["x"], 128, 4
        d = e // heads
        qkv = x @ attn.c_attn.weight + attn.c_attn.bias
        q, k, v = (qkv[..., i * e : (i + 1) * e].reshape(2, SEQ, heads, d) for i in range(3))
        positions = torch.arange(SEQ)
        q = torch.stack([by_hand_rotation(row, positions, pairing) for row in q])
        k = torch.stack([by_hand_rotation(row, positions, pairing) for row in k])
        scores = torch.einsum("nthd,nshd->nhts", q, k) / math.sqrt(d)
        future = torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1)
        weights = scores.masked_fill(future, float("-inf")).softmax(-1)
        out = torch.einsum("nhts,nshd->nthd", weights, v).reshape(2, SEQ, e)  # v not rotated
        expected = out @ attn.c_proj.weight + attn.c_proj.bias
    torch.testing.assert_close(seen["out"], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_cached_decoding_matches_the_uncached_forward(attention):
    model = build("gpt2", attention, max_position_embeddings=32)
    apply_rotary(model)
    apply_qk_norm(model)
    net = model.net
    prompt = ids(2, 6)
    # An explicit mask: generate would otherwise mask prompt tokens equal to the pad id.
    common = {"attention_mask": torch.ones_like(prompt), "max_new_tokens": 10}
    common.update(do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = net.generate(
            prompt, use_cache=True, output_logits=True, return_dict_in_generate=True, **common
        )
        uncached = net.generate(prompt, use_cache=False, **common)
        full = net(input_ids=cached.sequences).logits
    assert torch.equal(cached.sequences, uncached)
    # each decoding step's logits (one token on top of the cache) equal the full forward's
    steps = torch.stack(cached.logits, dim=1)  # [2, 10, vocab]
    torch.testing.assert_close(steps, full[:, 5:-1], rtol=1e-4, atol=1e-4)


def test_left_padded_generation_continues_like_the_unpadded_prompt():
    model = build("gpt2", "sdpa", max_position_embeddings=32)
    apply_rotary(model)
    prompt = ids(1, 6)
    padded = torch.cat((torch.zeros(1, 3, dtype=torch.long), prompt), dim=1)
    mask = torch.cat((torch.zeros(1, 3), torch.ones(1, 6)), dim=1).long()
    with torch.no_grad():
        alone = model.net.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=0,
        )
        left = model.net.generate(
            padded, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0
        )
    assert torch.equal(left[:, 3:], alone)


def test_the_position_table_leaves_the_model():
    model = build("gpt2")
    before = sum(p.numel() for p in model.parameters())
    assert apply_rotary(model) == 2
    assert apply_rotary(model) == 0  # applying twice changes nothing more
    assert isinstance(model.net.transformer.wpe, RotaryPositions)
    assert sum(p.numel() for p in model.parameters()) == before - SEQ * 128
    assert not any("wpe" in key for key in model.state_dict())


def test_with_qk_norm_heads_are_normalised_then_rotated_in_either_order():
    for first_rotary in (True, False):
        model = build("gpt2")
        steps = [apply_rotary, lambda m: apply_qk_norm(m, "layernorm")]
        for step in steps if first_rotary else steps[::-1]:
            step(model)
        attn = model.net.transformer.h[0].attn
        assert attn.qk_transforms.names() == ["qk_norm", "rotary"]
        with torch.no_grad():
            attn.query_norm.weight.uniform_(0.5, 1.5)  # a gain: the order matters now
            x = torch.randn(1, SEQ, 128)
            model.net.transformer.wpe(torch.arange(SEQ)[None])  # this forward's positions
            q = attn.c_attn(x)[..., :128].reshape(SEQ, 4, 32)
            raw = (x @ attn.c_attn.weight + attn.c_attn.bias)[0, :, :128].reshape(SEQ, 4, 32)
            expected = by_hand_rotation(attn.query_norm(raw), torch.arange(SEQ))
            swapped = attn.query_norm(by_hand_rotation(raw, torch.arange(SEQ)))
        torch.testing.assert_close(q, expected, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(q, swapped, atol=1e-3)


def test_rotary_and_alibi_are_refused_together():
    data = {"input_ids": ids(4), "attention_mask": torch.ones(4, SEQ, dtype=torch.long)}
    data["labels"] = data["input_ids"].clone()
    with pytest.raises(PlanError, match="rotary and alibi are declared incompatible"):
        Trainer(
            build("gpt2"),
            TensorBatchLoader(data, 2),
            "1ba",
            algorithms=[Rotary(), "alibi"],
            device="cpu",
            data_kind="text",
        )


def test_a_fraction_rotating_no_pair_is_refused():
    with pytest.raises(ValueError, match="rotates no dimension pair"):
        apply_rotary(build("gpt2"), fraction=0.01)  # 0.01 of 32 dimensions


test_bad_arguments_exit_2_with_one_line_naming_the_key = cli_refusal_test(
    "stdlib-gpt",
    [
        ("algorithms.rotary.pairing=zigzag", ["algorithms.rotary", "interleaved, half"]),
        ("algorithms.rotary.fraction=0", ["algorithms.rotary", "fraction", "(0, 1]"]),
        ("algorithms.rotary.base=1", ["algorithms.rotary", "base", "> 1"]),
    ],
)
