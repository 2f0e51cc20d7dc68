"""Chunked log-probs / entropy agree with the naive full log-softmax (values and gradients)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.core.logprobs import logprobs_and_entropy, logprobs_from_hidden, naive_logprobs_and_entropy


def test_hand_computed_uniform_and_temperature():
    # Uniform logits over V = 4: log p = -log 4, H = log 4, whatever the temperature.
    z = torch.zeros(2, 4)
    lp, ent = logprobs_and_entropy(z, torch.tensor([0, 3]), temperature=0.5, chunk_size=1)
    torch.testing.assert_close(lp, torch.full((2,), -math.log(4)))
    torch.testing.assert_close(ent, torch.full((2,), math.log(4)))
    # Logits [log 1, log 3] at T = 1: p = [1/4, 3/4]; at T = 0.5 -> [1, 9] / 10.
    z = torch.tensor([[0.0, math.log(3)]])
    lp, ent = logprobs_and_entropy(z, torch.tensor([1]), temperature=0.5)
    assert lp.item() == pytest.approx(math.log(0.9), abs=1e-6)
    assert ent.item() == pytest.approx(-(0.1 * math.log(0.1) + 0.9 * math.log(0.9)), abs=1e-6)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    b=st.integers(1, 3),
    t=st.integers(1, 9),
    v=st.integers(2, 40),
    chunk=st.integers(1, 8),
    temperature=st.sampled_from([1.0, 0.6, 1.7]),
    scale=st.sampled_from([1.0, 8.0]),
)
def test_chunked_matches_naive_values_and_grads(seed, b, t, v, chunk, temperature, scale):
    g = torch.Generator().manual_seed(seed)
    z = (scale * torch.randn(b, t, v, generator=g)).requires_grad_(True)
    y = torch.randint(0, v, (b, t), generator=g)
    w1, w2 = torch.randn(b, t, generator=g), torch.randn(b, t, generator=g)

    lp, ent = logprobs_and_entropy(z, y, temperature=temperature, chunk_size=chunk)
    lp_n, ent_n = naive_logprobs_and_entropy(z, y, temperature=temperature)
    torch.testing.assert_close(lp, lp_n, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, ent_n, atol=1e-5, rtol=1e-5)
    (g_c,) = torch.autograd.grad((w1 * lp + w2 * ent).sum(), z)
    (g_n,) = torch.autograd.grad((w1 * lp_n + w2 * ent_n).sum(), z)
    # the entropy gradient p * (log p + H) sums terms of opposite sign over the vocabulary: with logits up to
    # ~50 (scale 8, temperature 0.6) fp32 round-off differs by ~1e-5 between the two summation orders
    # (seed 298: 1.2e-5 on a gradient of 0.09)
    torch.testing.assert_close(g_c, g_n, atol=5e-5, rtol=1e-4)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(1, 13),
    d=st.integers(1, 8),
    v=st.integers(2, 30),
    chunk=st.integers(1, 6),
    temperature=st.sampled_from([1.0, 0.7]),
)
def test_from_hidden_matches_naive_values_and_grads(seed, n, d, v, chunk, temperature):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g).requires_grad_(True)
    w = torch.randn(v, d, generator=g).requires_grad_(True)
    y = torch.randint(0, v, (n,), generator=g)
    c1, c2 = torch.randn(n, generator=g), torch.randn(n, generator=g)

    lp, ent = logprobs_from_hidden(h, w, y, temperature=temperature, chunk_size=chunk)
    lp_n, ent_n = naive_logprobs_and_entropy(h @ w.t(), y, temperature=temperature)
    torch.testing.assert_close(lp, lp_n, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, ent_n, atol=1e-5, rtol=1e-5)
    gh, gw = torch.autograd.grad((c1 * lp + c2 * ent).sum(), (h, w))
    gh_n, gw_n = torch.autograd.grad((c1 * lp_n + c2 * ent_n).sum(), (h, w))
    # fp32 sums over chunks vs one matmul: gradients of O(1) entries differ by ~1e-5
    torch.testing.assert_close(gh, gh_n, atol=5e-5, rtol=1e-4)
    torch.testing.assert_close(gw, gw_n, atol=5e-5, rtol=1e-4)


def test_without_entropy_and_no_grad_and_bf16():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 7, generator=g)
    y = torch.randint(0, 7, (5,), generator=g)
    lp, ent = logprobs_and_entropy(z, y, with_entropy=False, chunk_size=2)
    assert ent is None
    torch.testing.assert_close(lp, naive_logprobs_and_entropy(z, y)[0])
    with torch.no_grad():
        lp16, ent16 = logprobs_and_entropy(z.bfloat16(), y, chunk_size=3)
    assert lp16.dtype == torch.float32 and ent16.dtype == torch.float32
    lp_ref, ent_ref = naive_logprobs_and_entropy(z.bfloat16(), y)
    torch.testing.assert_close(lp16, lp_ref)
    torch.testing.assert_close(ent16, ent_ref)


def test_bad_arguments_raise():
    z, y = torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="temperature"):
        logprobs_and_entropy(z, y, temperature=0.0)
    with pytest.raises(ValueError, match="leading dims"):
        logprobs_and_entropy(z, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="weight"):
        logprobs_from_hidden(torch.zeros(2, 3), torch.zeros(4, 5), y)


@pytest.mark.parametrize("use", ["logp", "entropy"])
def test_grad_through_one_output_only(use):
    # Backward gets None for the unused output; the gradient must still match the naive one.
    g = torch.Generator().manual_seed(1)
    z = torch.randn(6, 9, generator=g).requires_grad_(True)
    y = torch.randint(0, 9, (6,), generator=g)
    lp, ent = logprobs_and_entropy(z, y, chunk_size=4, temperature=0.8)
    lp_n, ent_n = naive_logprobs_and_entropy(z, y, temperature=0.8)
    (g_c,) = torch.autograd.grad((lp if use == "logp" else ent).sum(), z)
    (g_n,) = torch.autograd.grad((lp_n if use == "logp" else ent_n).sum(), z)
    torch.testing.assert_close(g_c, g_n, atol=1e-5, rtol=1e-5)
    # Only the weight needs a gradient (frozen hidden states): still correct.
    h, w = torch.randn(6, 3, generator=g), torch.randn(9, 3, generator=g).requires_grad_(True)
    lp, ent = logprobs_from_hidden(h, w, y, chunk_size=4)
    lp_n, ent_n = naive_logprobs_and_entropy(h @ w.t(), y)
    (g_c,) = torch.autograd.grad((lp if use == "logp" else ent).sum(), w)
    (g_n,) = torch.autograd.grad((lp_n if use == "logp" else ent_n).sum(), w)
    torch.testing.assert_close(g_c, g_n, atol=1e-5, rtol=1e-5)
