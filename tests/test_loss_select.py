"""cppo.loss.select: the selectors and the per-response selection of perception tokens."""

import math
import subprocess
import sys

import pytest
import torch

from cppo.loss.select import (
    SELECTORS,
    get_selector,
    select_perception_tokens,
    top_fraction_per_row,
)

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
    assert _sel(h, hm, selector="relative") == [[True, False]]
    assert _sel(h, hm, selector="raw") == [[False, True]]


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
    assert _sel(h, hm, resp, selector="raw") == [[False, False, False, True, True, False, False]]
    # entropy selector: every response token has H = 1, k = 2 but the tie keeps all four; the
    # prompt and padding positions with H = 9 would win if they were ranked
    assert _sel(h, hm, resp, selector="entropy") == [[False, True, True, True, True, False, False]]


def test_selection_is_per_response_not_per_batch():
    # row 0 has shifts ~10, row 1 ~0.1; a batch-wide top-k would take nothing from row 1
    h = [[0.0, 0, 0, 0], [1.0, 1, 1, 1]]
    hm = [[10.0, 11, 12, 13], [1.1, 1.2, 1.0, 1.05]]
    assert _sel(h, hm, selector="raw") == [[False, False, True, True], [False, True, False, False]]


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
    # cppo.detect imports cppo.loss (never the reverse); both use cppo.registry.
    code = (
        "import cppo.detect, cppo.loss, torch;"
        "m = cppo.loss.perception_mask(torch.zeros(1,2), torch.ones(1,2), torch.ones(1,2), torch.ones(1));"
        "print(m.tolist())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[[True, True]]"


def test_loss_never_imports_detect():
    code = "import sys, cppo.loss; print(any(m.startswith('cppo.detect') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
