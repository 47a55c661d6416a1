"""cppo.detect.select: entropy, chunked entropy/log-prob/KL, and the perception-token selection."""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from cppo.detect.select import (
    SELECTORS,
    chunked_entropy_and_logprob,
    chunked_kl,
    get_selector,
    select_perception_tokens,
    token_entropy,
    top_fraction_per_row,
)

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


# ---------------------------------------------------------------- selection: worked examples


def _sel(h, hm, resp=None, **kw):
    h, hm = torch.tensor(h, dtype=torch.float32), torch.tensor(hm, dtype=torch.float32)
    resp = torch.ones_like(h, dtype=torch.bool) if resp is None else torch.tensor(resp, dtype=torch.bool)
    return select_perception_tokens(h, hm, resp, **kw).tolist()


def test_selection_paper_example():
    # dH = [1, .5, 0, -.5, 2]; C = {0, 1, 4}, k = max(1, floor(.5 * 3)) = 1
    # r = [1/2, .5/1.5, -, -, 2/3] -> token 4
    h, hm = [[1.0, 1, 1, 1, 1]], [[2.0, 1.5, 1, 0.5, 3]]
    assert _sel(h, hm) == [[False, False, False, False, True]]
    assert _sel(h, hm, top_percent=1.0) == [[True, True, False, False, True]]  # all of C, never dH <= 0


def test_relative_and_raw_rank_differently():
    # dH = [.5, 1]; r = [.5/.6 = .833, 1/3 = .333]: relative picks token 0, raw picks token 1
    h, hm = [[0.1, 2.0]], [[0.6, 3.0]]
    assert _sel(h, hm, score="relative") == [[True, False]]
    assert _sel(h, hm, score="raw") == [[False, True]]


def test_ties_at_threshold_are_included():
    # dH = [1, 1, 1, .5], r = [.5, .5, .5, .333]; |C| = 4, k = 2, the 2nd score .5 ties with the 3rd
    assert _sel([[1.0, 1, 1, 1]], [[2.0, 2, 2, 1.5]]) == [[True, True, True, False]]


def test_no_candidates_and_one_candidate():
    assert _sel([[1.0, 2, 3]], [[1.0, 1, 3]]) == [[False, False, False]]  # dH <= 0 everywhere
    # one candidate: k = max(1, floor(.5 * 1)) = 1, it is selected
    assert _sel([[1.0, 2, 3]], [[1.0, 2.5, 3]]) == [[False, True, False]]


def test_padding_and_prompt_never_selected_and_not_counted():
    # positions 0 (prompt) and 5, 6 (padding) have the largest shifts but are outside the response.
    # Within the response dH = [.1, .2, .3, .4]: |C| = 4 -> k = 2 -> tokens 3 and 4.
    h = [[9.0, 1, 1, 1, 1, 0, 9]]
    hm = [[18.0, 1.1, 1.2, 1.3, 1.4, 9, 18]]
    resp = [[0, 1, 1, 1, 1, 0, 0]]
    assert _sel(h, hm, resp, score="raw") == [[False, False, False, True, True, False, False]]
    # entropy selector: every response token has H = 1, k = 2 but the tie keeps all four; the
    # prompt and padding positions with H = 9 would win if they were ranked
    assert _sel(h, hm, resp, score="entropy") == [[False, True, True, True, True, False, False]]


def test_selection_is_per_response_not_per_batch():
    # row 0 has shifts ~10, row 1 ~0.1; a batch-wide top-k would take nothing from row 1
    h = [[0.0, 0, 0, 0], [1.0, 1, 1, 1]]
    hm = [[10.0, 11, 12, 13], [1.1, 1.2, 1.0, 1.05]]
    assert _sel(h, hm, score="raw") == [[False, False, True, True], [False, True, False, False]]


def test_entropy_selector_is_the_80_20_rule():
    h = torch.arange(10.0).unsqueeze(0)  # (1, 10), entropies 0..9
    sel = select_perception_tokens(h, None, torch.ones(1, 10, dtype=torch.bool), 0.2, "entropy")
    assert sel.nonzero()[:, 1].tolist() == [8, 9]  # k = floor(.2 * 10) = 2 highest


def test_kl_shift_selector_needs_kl():
    h = torch.zeros(1, 4)
    kl = torch.tensor([[0.0, 0.3, 0.1, 0.2]])  # C = {1, 2, 3}, k = 1
    sel = select_perception_tokens(h, h, torch.ones(1, 4), 0.5, "kl_shift", kl=kl)
    assert sel.tolist() == [[False, True, False, False]]
    with pytest.raises(ValueError, match="needs kl"):
        select_perception_tokens(h, h, torch.ones(1, 4), 0.5, "kl_shift")


def test_selection_detaches_and_validates():
    h = torch.rand(2, 5, requires_grad=True)
    out = select_perception_tokens(h, h * 2, torch.ones(2, 5))
    assert out.dtype == torch.bool and not out.requires_grad
    with pytest.raises(ValueError, match=r"top_percent must be in \(0, 1\]"):
        select_perception_tokens(h, h, torch.ones(2, 5), top_percent=0.0)
    with pytest.raises(ValueError, match="unknown selector 'nope'; valid: entropy, kl_shift, raw, relative"):
        get_selector("nope")


def test_floor_tolerance():
    # 0.29 * 100 = 28.999999999999996 in floating point; k must be 29
    s = torch.arange(100.0).unsqueeze(0)
    assert top_fraction_per_row(s, torch.ones(1, 100, dtype=torch.bool), 0.29).sum().item() == 29


@pytest.mark.parametrize("name", SELECTORS.names())
def test_every_selector_stays_inside_the_response(name):
    g = torch.Generator().manual_seed(3)
    h, hm, kl = (torch.rand(4, 9, generator=g) for _ in range(3))
    resp = torch.rand(4, 9, generator=g) > 0.4
    sel = select_perception_tokens(h, hm, resp, 0.5, name, kl=kl)
    assert sel.dtype == torch.bool and sel.shape == (4, 9)
    assert not (sel & ~resp).any()


# ---------------------------------------------------------------- selection: slow loop reference


def _reference_selection(h, hm, resp, rho, score):
    n, t = h.shape
    out = torch.zeros(n, t, dtype=torch.bool)
    for i in range(n):
        cands = []
        for j in range(t):
            dh = float(hm[i, j]) - float(h[i, j])
            if resp[i, j] and dh > 0:
                s = dh if score == "raw" else max(dh, 0.0) / (float(hm[i, j]) + 1e-6)
                cands.append((s, j))
        if not cands:
            continue
        k = max(1, math.floor(rho * len(cands) + 1e-9))
        thr = sorted((s for s, _ in cands), reverse=True)[k - 1]
        for s, j in cands:
            if s >= thr:
                out[i, j] = True
    return out


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("score", ["relative", "raw"])
def test_selection_matches_loop_reference(seed, score):
    g = torch.Generator().manual_seed(seed)
    n, t = 1 + seed, 3 + 4 * seed
    # quantised entropies so that ties and zero shifts actually occur
    h = torch.randint(0, 6, (n, t), generator=g).float() / 2
    hm = torch.randint(0, 6, (n, t), generator=g).float() / 2
    resp = torch.rand(n, t, generator=g) > 0.25
    rho = [0.5, 0.2, 1.0, 0.34][seed % 4]
    got = select_perception_tokens(h, hm, resp, rho, score)
    assert torch.equal(got, _reference_selection(h, hm, resp, rho, score))


def test_import_cycle_free_in_either_order():
    # cppo.detect.select uses cppo.loss.registry; cppo.loss uses cppo.detect.select lazily.
    code = (
        "import cppo.detect, cppo.loss, torch;"
        "m = cppo.loss.perception_mask(torch.zeros(1,2), torch.ones(1,2), torch.ones(1,2), torch.ones(1));"
        "print(m.tolist())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[[True, True]]"
