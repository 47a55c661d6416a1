"""cppo.loss.entropy: per-token entropy and the chunked entropy/log-prob/KL through the output head."""

import math

import numpy as np
import pytest
import torch

from cppo.loss.entropy import chunked_entropy_and_logprob, chunked_kl, token_entropy

# ---------------------------------------------------------------- entropy


def test_entropy_worked_examples():
    # uniform over 4 tokens: ln 4 = 1.386294; a one-hot-ish row with -inf elsewhere: exactly 0.
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [3.0, -math.inf, -math.inf, -math.inf]], requires_grad=True)
    h = token_entropy(logits)
    assert h[0].item() == pytest.approx(math.log(4), abs=1e-6)
    assert h[1].item() == 0.0
    h.sum().backward()
    assert torch.isfinite(logits.grad).all()  # no 0 * inf in the backward
    # temperature 2 on logits (2 ln 3, 0): probs (3/4, 1/4) -> H = -(.75 ln .75 + .25 ln .25) = 0.562335
    t = token_entropy(torch.tensor([2 * math.log(3.0), 0.0]), temperature=2.0)
    assert t.item() == pytest.approx(0.562335, abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", [0, 1])
def test_entropy_matches_float64_reference(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(3, 5, 50, generator=g) * 4).to(dtype)
    h = token_entropy(logits, temperature=0.7)
    assert h.dtype == torch.float32 and h.shape == (3, 5)
    z = logits.double().numpy() / 0.7
    z = z - z.max(-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    ref = -(p * np.log(p)).sum(-1)
    np.testing.assert_allclose(h.numpy(), ref, atol=1e-5)


# ---------------------------------------------------------------- chunked == unchunked


def _setup(seed=0, n=3, t=7, d=16, v=40):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, t, d, generator=g, dtype=torch.float64).float().requires_grad_()
    w = (torch.randn(v, d, generator=g) * 0.5).requires_grad_()
    tgt = torch.randint(0, v, (n, t), generator=g)
    mask = torch.rand(n, t, generator=g) > 0.3
    return hidden, w, tgt, mask


@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
@pytest.mark.parametrize("checkpoint", [True, False])
def test_chunked_entropy_logprob_equals_unchunked(chunk_size, checkpoint):
    hidden, w, tgt, mask = _setup()
    ent, lp = chunked_entropy_and_logprob(
        hidden, w, tgt, temperature=0.8, chunk_size=chunk_size, mask=mask, checkpoint=checkpoint
    )
    logits = hidden @ w.T / 0.8  # (N, T, V) the naive way
    ref_lp = torch.log_softmax(logits, -1).gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
    ref_ent = token_entropy(logits)
    torch.testing.assert_close(ent, torch.where(mask, ref_ent, 0.0).detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(lp, torch.where(mask, ref_lp, 0.0), atol=1e-5, rtol=0)
    assert not ent.requires_grad  # entropy_grad=False: detached
    # the gradient of the log-prob reaches hidden and the head exactly as unchunked
    gw = torch.randn_like(lp)
    g1 = torch.autograd.grad((lp * gw).sum(), (hidden, w))
    g2 = torch.autograd.grad((torch.where(mask, ref_lp, 0.0) * gw).sum(), (hidden, w))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_chunked_entropy_with_grad_callable_head_and_logits_input():
    hidden, w, tgt, _ = _setup(seed=1)
    head = torch.nn.Linear(16, 40)
    ent, lp = chunked_entropy_and_logprob(hidden, head, tgt, chunk_size=5, entropy_grad=True)
    ref = token_entropy(head(hidden))
    torch.testing.assert_close(ent, ref, atol=1e-5, rtol=0)
    g1 = torch.autograd.grad(ent.sum(), head.weight)[0]
    g2 = torch.autograd.grad(ref.sum(), head.weight)[0]
    torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-5)
    # head=None: the input already holds logits
    logits = head(hidden).detach()
    e2, l2 = chunked_entropy_and_logprob(logits, None, tgt, chunk_size=3)
    torch.testing.assert_close(e2, token_entropy(logits), atol=1e-5, rtol=0)
    torch.testing.assert_close(l2, torch.log_softmax(logits, -1).gather(-1, tgt[..., None])[..., 0])


def test_chunked_with_empty_mask_gives_zeros():
    hidden, w, tgt, _ = _setup()
    ent, lp = chunked_entropy_and_logprob(hidden, w, tgt, mask=torch.zeros(3, 7, dtype=torch.bool))
    assert ent.shape == lp.shape == (3, 7) and not ent.any() and not lp.any()
    kl = chunked_kl(hidden, hidden, head=w, mask=torch.zeros(3, 7, dtype=torch.bool))
    assert kl.shape == (3, 7) and not kl.any()


def test_chunked_kl_matches_direct_formula_and_is_zero_for_equal_views():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(2, 6, 30, generator=g, requires_grad=True)
    b = torch.randn(2, 6, 30, generator=g, requires_grad=True)
    kl = chunked_kl(a, b, temperature=1.3, chunk_size=4)
    la, lb = torch.log_softmax(a / 1.3, -1), torch.log_softmax(b / 1.3, -1)
    ref = (la.exp() * (la - lb)).sum(-1)
    torch.testing.assert_close(kl, ref, atol=1e-5, rtol=0)
    ga = torch.autograd.grad(kl.sum(), (a, b))
    gr = torch.autograd.grad(ref.sum(), (a, b))
    for x, y in zip(ga, gr):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    assert chunked_kl(a, a).abs().max().item() < 1e-6
    # a token with zero probability under view a adds nothing, whatever view b says
    x = torch.tensor([[[0.0, -math.inf]]])
    y = torch.tensor([[[0.0, 5.0]]])
    assert chunked_kl(x, y).item() == pytest.approx(-math.log(1 / (1 + math.exp(5))), abs=1e-5)
