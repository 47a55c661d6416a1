"""cppo.loss: the Contrastive Perception Loss, its divergences, the gates and the PAPO terms."""

import math

import pytest
import torch

from cppo.loss import (
    AGGREGATIONS,
    DIVERGENCES,
    GATES,
    contrastive_perception_loss,
    contrastive_perception_loss_full,
    entropy_bonus,
    gate_responses,
    get_divergence,
    get_gate,
    implicit_perception_loss,
    k3,
    perception_mask,
    select_perception_tokens,
)


def _views(seed, n=3, t=6, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    a, p, q = (torch.randn(n, t, generator=g, dtype=dtype).mul(0.7).sub(1.5) for _ in range(3))
    mask = torch.rand(n, t, generator=g) > 0.4
    return a.requires_grad_(), p.requires_grad_(), q.requires_grad_(), mask


# ---------------------------------------------------------------- worked numbers


def test_cpl_worked_example():
    # a = ln .5, p = ln .4, n = ln .1
    # D+ = k3: u = ln(.4/.5) = -0.223144 -> .8 + .223144 - 1 = 0.023144
    # D- = k3: u = ln(.1/.5) = -1.609438 -> .2 + 1.609438 - 1 = 0.809438
    # CPL = softplus((0.023144 - 0.809438) / 0.1) = softplus(-7.862944) = ln(1 + 3.8475e-4) = 3.8467e-4
    a, p, n = (torch.tensor([[math.log(x)]]) for x in (0.5, 0.4, 0.1))
    loss, m = contrastive_perception_loss(a, p, n, torch.ones(1, 1, dtype=torch.bool))
    assert loss.item() == pytest.approx(3.8467e-4, rel=1e-4)
    assert m["cpl/d_pos"] == pytest.approx(0.023144, abs=1e-5)
    assert m["cpl/d_neg"] == pytest.approx(0.809438, abs=1e-5)
    assert m["cpl/margin"] == pytest.approx(0.786294, abs=1e-5)
    assert m["cpl/acc"] == 1.0 and m["cpl/mask_frac"] == 1.0 and m["cpl/n_tokens"] == 1.0
    # k1: D = a - b -> D+ = ln 1.25, D- = ln 5; (D+ - D-) / .1 = 10 ln .25 -> ln(1 + 4^-10) = 9.5367e-7
    loss1, _ = contrastive_perception_loss(a, p, n, torch.ones(1, 1), divergence="k1")
    assert loss1.item() == pytest.approx(9.5367e-7, rel=1e-4)


def test_metrics_are_namespaced_python_floats():
    a, p, q, mask = _views(0)
    resp = torch.ones_like(mask)
    resp[:, -1] = False  # the last column is padding
    _, m = contrastive_perception_loss(a, p, q, mask, response_mask=resp)
    assert set(m) == {
        "cpl/loss",
        "cpl/mask_frac",
        "cpl/n_tokens",
        "cpl/d_pos",
        "cpl/d_neg",
        "cpl/margin",
        "cpl/acc",
    }
    assert all(type(v) is float for v in m.values())
    sel = mask & resp
    assert m["cpl/n_tokens"] == sel.sum().item()
    assert m["cpl/mask_frac"] == pytest.approx(sel.sum().item() / resp.sum().item())


# ---------------------------------------------------------------- equivalences and references


@pytest.mark.parametrize("seed", range(3))
def test_softplus_form_equals_two_candidate_infonce(seed):
    g = torch.Generator().manual_seed(seed)
    d_pos, d_neg = torch.rand(4, 5, generator=g) * 3, torch.rand(4, 5, generator=g) * 3
    tau = 0.1
    sims = torch.stack([-d_pos / tau, -d_neg / tau], dim=-1)  # (N, T, 2), the positive is candidate 0
    infonce = -torch.log_softmax(sims, dim=-1)[..., 0]  # (N, T)
    from cppo.loss import cpl_from_divergences

    mask = torch.ones(4, 5, dtype=torch.bool)
    loss, _ = cpl_from_divergences(d_pos, d_neg, mask, tau)
    assert loss.item() == pytest.approx(infonce.mean().item(), rel=1e-5)


def _loop_cpl(a, p, n, mask, tau):
    total, count = 0.0, 0
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            if not mask[i, j]:
                continue

            def k3_(x, y):
                u = min(max(y - x, -20.0), 20.0)
                return min(max(math.exp(u) - u - 1.0, -10.0), 10.0)

            dp, dn = k3_(float(a[i, j]), float(p[i, j])), k3_(float(a[i, j]), float(n[i, j]))
            z = (dp - dn) / tau
            total += max(z, 0.0) + math.log1p(math.exp(-abs(z)))  # stable softplus
            count += 1
    return total / count if count else 0.0


@pytest.mark.parametrize("seed", range(5))
def test_cpl_matches_loop_reference(seed):
    g = torch.Generator().manual_seed(100 + seed)
    n, t = 1 + seed, 2 + 3 * seed
    a, p, q = (torch.randn(n, t, generator=g) * 3 for _ in range(3))  # some hit the clamps
    mask = torch.rand(n, t, generator=g) > 0.5
    tau = [0.1, 0.5, 1.0][seed % 3]
    loss, _ = contrastive_perception_loss(a, p, q, mask, tau=tau)
    assert loss.item() == pytest.approx(_loop_cpl(a, p, q, mask, tau), rel=1e-5, abs=1e-7)


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("divergence", DIVERGENCES.names())
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_gradcheck_float64(divergence, agg):
    a, p, q, mask = _views(1)  # log-probs around -1.5: inside the k3 clamps
    fn = lambda a, p, q: contrastive_perception_loss(a, p, q, mask, 0.3, divergence, agg)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (a, p, q))


def test_gradient_through_all_three_views_and_zero_at_masked_positions():
    a, p, q, mask = _views(2, dtype=torch.float32)
    loss, _ = contrastive_perception_loss(a, p, q, mask)
    ga, gp, gq = torch.autograd.grad(loss, (a, p, q))
    for gr in (ga, gp, gq):
        assert (gr[~mask] == 0).all()
        assert (gr[mask] != 0).all()  # the anchor is NOT detached under k3
    # under k1 the anchor cancels: D+ - D- = (a - p) - (a - n) = n - p
    loss1, _ = contrastive_perception_loss(a, p, q, mask, divergence="k1")
    ga1 = torch.autograd.grad(loss1, a)[0]
    assert (ga1.abs() < 1e-6).all()


@pytest.mark.parametrize("divergence", DIVERGENCES.names())
@pytest.mark.parametrize("agg", AGGREGATIONS.names())
def test_empty_mask_gives_exact_zero_and_finite_zero_grads(divergence, agg):
    a, p, q, _ = _views(3, dtype=torch.float32)
    with torch.no_grad():
        a[0, 0] = -1e4  # an extreme value at an unselected position must not leak
    loss, m = contrastive_perception_loss(
        a, p, q, torch.zeros(3, 6, dtype=torch.bool), agg=agg, divergence=divergence
    )
    assert loss.item() == 0.0
    assert m["cpl/loss"] == 0.0 and m["cpl/d_pos"] == 0.0 and m["cpl/mask_frac"] == 0.0
    for gr in torch.autograd.grad(loss, (a, p, q)):
        assert torch.isfinite(gr).all() and (gr == 0).all()


# ---------------------------------------------------------------- the k3 clamps


def test_k3_clamps_at_extreme_inputs():
    a = torch.zeros(5, requires_grad=True)
    b = torch.tensor([50.0, 21.0, -2.0, -50.0, 1e6])
    d = k3(a, b)
    # b - a = 50 -> u = 20 -> e^20 - 21 = 4.85e8 -> clamped to 10
    # b - a = -2 -> e^-2 + 2 - 1 = 1.135335 (inside both clamps)
    # b - a = -50 -> u = -20 -> e^-20 + 19 = 19.0 -> clamped to 10
    assert d.tolist() == pytest.approx([10.0, 10.0, 1.135335, 10.0, 10.0], abs=1e-5)
    (g,) = torch.autograd.grad(d.sum(), a)
    assert torch.isfinite(g).all()
    assert g[[0, 1, 3, 4]].eq(0).all()  # beyond the value clamp: no gradient
    assert g[2].item() == pytest.approx(-(math.exp(-2) - 1), abs=1e-5)  # d/da (e^(b-a) - (b-a) - 1)
    # and CPL stays finite when every token is at the clamps
    loss, _ = contrastive_perception_loss(
        torch.zeros(1, 2), torch.tensor([[1e9, -1e9]]), torch.zeros(1, 2), torch.ones(1, 2)
    )
    assert math.isfinite(loss.item())
    # D+ = 10, D- = 0 -> softplus(100) = 100
    assert loss.item() == pytest.approx(100.0, abs=1e-4)


def test_k1_k2_values():
    a, b = torch.tensor([-1.0]), torch.tensor([-3.0])
    assert get_divergence("k1")(a, b).item() == pytest.approx(2.0)  # a - b
    assert get_divergence("k2")(a, b).item() == pytest.approx(2.0)  # (b - a)^2 / 2 = 4 / 2


# ---------------------------------------------------------------- full-vocabulary KL variant


def test_full_kl_variant_equals_direct_kl():
    g = torch.Generator().manual_seed(4)
    la, lp, ln = (torch.randn(2, 5, 11, generator=g, requires_grad=True) for _ in range(3))
    mask = torch.tensor([[1, 1, 0, 0, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    loss, m = contrastive_perception_loss_full(la, lp, ln, mask, tau=0.5, temperature=0.9, chunk_size=2)

    def kl(x, y):
        x, y = torch.log_softmax(x / 0.9, -1), torch.log_softmax(y / 0.9, -1)
        return (x.exp() * (x - y)).sum(-1)

    d_pos, d_neg = kl(la, lp)[mask], kl(la, ln)[mask]
    ref = torch.nn.functional.softplus((d_pos - d_neg) / 0.5).mean()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert m["cpl/d_pos"] == pytest.approx(d_pos.mean().item(), rel=1e-5)
    g1 = torch.autograd.grad(loss, (la, lp, ln))
    g2 = torch.autograd.grad(ref, (la, lp, ln))
    for x, y in zip(g1, g2):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)
        assert (x[~mask] == 0).all()


# ---------------------------------------------------------------- gates and the perception mask


def test_gates_worked_examples():
    adv = torch.tensor([0.5, 0.0, -0.3, 1e-9])
    rew = torch.tensor([1.0, 0.9, 0.0, 1.0])
    assert gate_responses(adv).tolist() == [True, False, False, True]  # strict A > 0
    assert gate_responses(adv, rew, "correct").tolist() == [True, False, False, True]
    assert gate_responses(adv, rew, "correct", max_reward=0.9).tolist() == [True, True, False, True]
    assert gate_responses(adv, gate="none").tolist() == [True] * 4
    with pytest.raises(ValueError, match="needs rewards"):
        gate_responses(adv, None, "correct")
    with pytest.raises(ValueError, match=r"advantages must be \(N,\)"):
        gate_responses(adv.unsqueeze(-1).expand(4, 3))
    with pytest.raises(ValueError, match="unknown gate 'x'; valid: correct, none, positive_advantage"):
        get_gate("x")


@pytest.mark.parametrize("gate", GATES.names())
def test_perception_mask_is_selection_and_gate(gate):
    g = torch.Generator().manual_seed(5)
    h, hm = torch.rand(4, 8, generator=g), torch.rand(4, 8, generator=g) * 2
    resp = torch.rand(4, 8, generator=g) > 0.2
    adv, rew = torch.tensor([1.0, -1.0, 0.0, 2.0]), torch.tensor([1.0, 0.0, 1.0, 0.5])
    m = perception_mask(h, hm, resp, adv, rew, gate=gate)
    expected = select_perception_tokens(h, hm, resp) & gate_responses(adv, rew, gate).unsqueeze(-1)
    assert torch.equal(m, expected)


def test_all_equal_rewards_give_no_cpl():
    from cppo.loss import group_advantages

    adv = group_advantages(torch.tensor([0.1, 0.1, 0.1, 1.0, 1.0, 1.0]), group_size=3)  # both groups equal
    h = torch.zeros(6, 4)
    m = perception_mask(h, h + 1.0, torch.ones(6, 4), adv)
    assert not m.any()
    a, p, q, _ = _views(6, n=6, t=4, dtype=torch.float32)
    loss, _ = contrastive_perception_loss(a, p, q, m)
    assert loss.item() == 0.0


def test_skipping_gated_out_responses_does_not_change_the_loss():
    # docs/method.md §5.7: responses with gate 0 contribute nothing, so their I+/I- passes can be skipped
    g = torch.Generator().manual_seed(7)
    a, p, q = (torch.randn(6, 5, generator=g) for _ in range(3))
    h, hm = torch.rand(6, 5, generator=g), torch.rand(6, 5, generator=g) * 2
    resp = torch.ones(6, 5, dtype=torch.bool)
    adv = torch.tensor([1.0, -1.0, 0.5, 0.0, -2.0, 0.3])
    full, _ = contrastive_perception_loss(a, p, q, perception_mask(h, hm, resp, adv))
    keep = gate_responses(adv)
    sub, _ = contrastive_perception_loss(
        a[keep], p[keep], q[keep], perception_mask(h[keep], hm[keep], resp[keep], adv[keep])
    )
    assert full.item() == pytest.approx(sub.item(), rel=1e-6)


# ---------------------------------------------------------------- PAPO and entropy


def test_implicit_perception_loss_and_clip():
    a = torch.tensor([[-1.0, -1.0, -1.0]], requires_grad=True)
    b = torch.tensor([[-1.0, -2.0, -5.0]], requires_grad=True)
    resp = torch.ones(1, 3)
    # k3 with u = b - a = [0, -1, -4]: [0, e^-1 + 0 = 0.367879, e^-4 + 3 = 3.018316]
    loss, m = implicit_perception_loss(a, b, resp)
    assert loss.item() == pytest.approx(-(0.367879 + 3.018316) / 3, abs=1e-5)
    assert m["papo/kl_prcp"] == pytest.approx((0.367879 + 3.018316) / 3, abs=1e-5)
    # with clip = 1 the third token is capped: no gradient there, clip_frac = 1/3
    loss_c, mc = implicit_perception_loss(a, b, resp, clip=1.0)
    assert loss_c.item() == pytest.approx(-(0.367879 + 1.0) / 3, abs=1e-5)
    assert mc["papo/clip_frac"] == pytest.approx(1 / 3)
    ga, gb = torch.autograd.grad(loss_c, (a, b))
    assert ga[0, 2] == 0 and gb[0, 2] == 0 and ga[0, 1] != 0 and gb[0, 1] != 0


def test_entropy_bonus_sign():
    h = torch.tensor([[1.0, 2.0, 9.0]], requires_grad=True)
    resp = torch.tensor([[1, 1, 0]])
    loss, m = entropy_bonus(h, resp)
    assert loss.item() == pytest.approx(-1.5) and m["entropy/mean"] == pytest.approx(1.5)
    (g,) = torch.autograd.grad(loss, h)
    assert g[0].tolist() == pytest.approx([-0.5, -0.5, 0.0])  # descending the loss raises entropy
