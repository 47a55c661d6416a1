"""cppo.loss: group advantages, PPO-clip, the reference KL, agg_loss, and the registries."""

import math
import statistics

import pytest
import torch

from cppo.loss import (
    AGGREGATIONS,
    DIVERGENCES,
    GATES,
    POLICY_LOSSES,
    Registry,
    agg_loss,
    get_aggregation,
    get_divergence,
    get_policy_loss,
    group_advantages,
    grpo_loss,
    kl_to_reference,
    ppo_clip_loss,
)

# ---------------------------------------------------------------- advantages


def test_group_advantages_worked_example():
    # group 1: rewards (1, 0, 0, 1), mean .5, unbiased std = sqrt(4 * .25 / 3) = 0.577350
    #   -> A = +-.5 / (0.577350 + 1e-6) = +-0.866024
    # group 2: all 1 -> exactly 0
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]), group_size=4)
    assert adv[:4].tolist() == pytest.approx([0.866024, -0.866024, -0.866024, 0.866024], abs=1e-5)
    assert adv[4:].tolist() == [0.0, 0.0, 0.0, 0.0]
    # Dr. GRPO: no std scaling -> +-.5
    dr = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), group_size=4, scale_by_std=False)
    assert dr.tolist() == [0.5, -0.5, -0.5, 0.5]


def test_all_equal_rewards_are_exactly_zero_even_when_the_mean_is_inexact():
    # mean(.1, .1, .1) is not exactly .1 in floating point; the advantage must still be exactly 0
    for g in (3, 5, 7):
        adv = group_advantages(torch.full((2 * g,), 0.1), group_size=g)
        assert (adv == 0).all()
        assert not (adv > 0).any()  # so the A > 0 gate stays shut


def test_groups_of_one_get_zero_advantage():
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.9]), group_size=1)
    assert adv.tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("seed", range(4))
def test_advantages_match_statistics_module(seed):
    g = torch.Generator().manual_seed(seed)
    gs = 2 + seed
    r = torch.rand(3 * gs, generator=g, dtype=torch.float64)
    adv = group_advantages(r, gs)
    for b in range(3):
        grp = r[b * gs : (b + 1) * gs].tolist()
        mu, sd = statistics.mean(grp), statistics.stdev(grp)
        for j, x in enumerate(grp):
            assert adv[b * gs + j].item() == pytest.approx((x - mu) / (sd + 1e-6), rel=1e-5)


def test_advantage_errors():
    with pytest.raises(ValueError, match="divisible by group_size"):
        group_advantages(torch.zeros(5), group_size=2)


# ---------------------------------------------------------------- PPO-clip


def test_ppo_clip_worked_example():
    old = torch.zeros(1, 5)
    # ratios e^logp = (1.5, 0.5, 5, 1.25, 1.0)
    logp = torch.log(torch.tensor([[1.5, 0.5, 5.0, 1.25, 1.0]])).requires_grad_()
    adv = torch.tensor([[1.0, -1.0, -1.0, 1.0, 2.0]])
    mask = torch.ones(1, 5)
    # token 0: A=1,  max(-1.5, -1.2) = -1.2 (clipped)
    # token 1: A=-1, max(0.5, 0.8)   =  0.8 (clipped)
    # token 2: A=-1, max(5, 1.2)     =  5   (not clipped)
    # token 3: A=1,  max(-1.25, -1.2) = -1.2 (clipped)
    # token 4: A=2,  ratio 1         = -2
    loss, m = ppo_clip_loss(old, logp, adv, mask)
    assert loss.item() == pytest.approx((-1.2 + 0.8 + 5 - 1.2 - 2) / 5)
    assert m["grpo/clip_frac"] == pytest.approx(3 / 5)
    (g,) = torch.autograd.grad(loss, logp)
    assert g[0, [0, 1, 3]].eq(0).all()  # clipped tokens get no gradient
    assert g[0, 2].item() == pytest.approx(5 / 5)  # d/dlogp (-A e^logp) / 5 = 5 / 5
    # DAPO clip-higher 0.28: token 3 (ratio 1.25) is no longer clipped, token 0 is clipped at 1.28
    loss_h, m_h = ppo_clip_loss(old, logp, adv, mask, clip_high=0.28)
    assert loss_h.item() == pytest.approx((-1.28 + 0.8 + 5 - 1.25 - 2) / 5)
    assert m_h["grpo/clip_frac"] == pytest.approx(2 / 5)
    # dual clip c = 3: token 2 (A = -1, ratio 5) is capped at -A * 3 = 3
    loss_d, m_d = ppo_clip_loss(old, logp, adv, mask, dual_clip=3.0)
    assert loss_d.item() == pytest.approx((-1.2 + 0.8 + 3 - 1.2 - 2) / 5)
    assert m_d["grpo/dual_clip_frac"] == pytest.approx(1 / 5)
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        ppo_clip_loss(old, logp, adv, mask, dual_clip=0.5)


def test_on_policy_ppo_gradient_equals_reinforce():
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(4, 6, generator=g).requires_grad_()
    adv = torch.randn(4, generator=g)  # (N,) broadcast over tokens
    mask = torch.rand(4, 6, generator=g) > 0.3
    g1 = torch.autograd.grad(ppo_clip_loss(logp.detach(), logp, adv, mask)[0], logp)[0]
    g2 = torch.autograd.grad(get_policy_loss("reinforce")(logp.detach(), logp, adv, mask)[0], logp)[0]
    torch.testing.assert_close(g1, g2)
    # and for a 1-token mean it is -A / (number of tokens) at each token
    assert (g1[~mask] == 0).all()
    torch.testing.assert_close(g1[mask], (-adv[:, None].expand(4, 6) / mask.sum())[mask])


@pytest.mark.parametrize("name", POLICY_LOSSES.names())
def test_every_policy_loss_follows_the_convention(name):
    g = torch.Generator().manual_seed(1)
    old, logp = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g).requires_grad_()
    fn = get_policy_loss(name)
    loss, m = fn(
        old, logp, torch.randn(3, generator=g), torch.ones(3, 4), clip_low=0.2, clip_high=0.3, dual_clip=3.0
    )
    assert loss.dim() == 0 and loss.requires_grad
    assert m and all(k.startswith("grpo/") and type(v) is float for k, v in m.items())
    empty, _ = fn(old, logp, torch.ones(3), torch.zeros(3, 4))
    assert empty.item() == 0.0


# ---------------------------------------------------------------- KL to the reference


def test_kl_to_reference_worked_example_and_total():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-1.0, -1.0]])
    # k3 with u = ref - logp = (0, 1): (0, e - 2 = 0.718282); mean 0.359141
    kl, m = kl_to_reference(logp, ref, torch.ones(1, 2))
    assert kl.item() == pytest.approx(0.359141, abs=1e-5) and m["grpo/kl"] == pytest.approx(
        0.359141, abs=1e-5
    )
    kl1, _ = kl_to_reference(logp, ref, torch.ones(1, 2), divergence="k1")
    assert kl1.item() == pytest.approx(-0.5)  # mean of logp - ref = (0, -1)
    old, adv = logp.detach(), torch.tensor([1.0])
    total, mt = grpo_loss(old, logp, adv, torch.ones(1, 2), ref_logp=ref, beta=0.1)
    pg, _ = ppo_clip_loss(old, logp, adv, torch.ones(1, 2))
    assert total.item() == pytest.approx(pg.item() + 0.1 * 0.359141, abs=1e-6)
    assert mt["grpo/loss"] == pytest.approx(total.item()) and "grpo/kl" in mt
    no_ref, m0 = grpo_loss(old, logp, adv, torch.ones(1, 2))
    assert no_ref.item() == pytest.approx(pg.item()) and "grpo/kl" not in m0


# ---------------------------------------------------------------- agg_loss


RAGGED_LOSS = torch.tensor([[1.0, 2, 3, 4], [5, 6, 100, 100], [7, 7, 7, 7]])
RAGGED_MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)


@pytest.mark.parametrize(
    "mode,expected",
    [
        ("token-mean", 21 / 6),  # (1 + 2 + 3 + 4 + 5 + 6) / 6 tokens
        ("seq-mean-token-mean", (2.5 + 5.5) / 2),  # row means, the empty row excluded
        ("seq-mean-token-sum", (10 + 11) / 2),  # row sums, the empty row excluded
        ("seq-mean-token-sum-norm", 21 / (3 * 4)),  # sum / (N * T), Dr. GRPO's constant
    ],
)
def test_agg_modes_on_a_ragged_mask(mode, expected):
    assert agg_loss(RAGGED_LOSS, RAGGED_MASK, mode).item() == pytest.approx(expected)


def test_agg_norm_and_nan_at_padding():
    assert agg_loss(RAGGED_LOSS, RAGGED_MASK, "seq-mean-token-sum-norm", norm=7).item() == pytest.approx(
        21 / 21
    )
    poisoned = RAGGED_LOSS.clone()
    poisoned[1, 2], poisoned[2, 0] = float("nan"), float("inf")
    for mode in AGGREGATIONS.names():
        assert math.isfinite(agg_loss(poisoned, RAGGED_MASK, mode).item())


def _loop_agg(loss, mask, mode):
    rows = [[float(loss[i, j]) for j in range(loss.shape[1]) if mask[i, j]] for i in range(loss.shape[0])]
    nonempty = [r for r in rows if r]
    if mode == "token-mean":
        flat = [x for r in rows for x in r]
        return sum(flat) / len(flat) if flat else 0.0
    if mode == "seq-mean-token-mean":
        return sum(sum(r) / len(r) for r in nonempty) / len(nonempty) if nonempty else 0.0
    if mode == "seq-mean-token-sum":
        return sum(sum(r) for r in nonempty) / len(nonempty) if nonempty else 0.0
    return sum(sum(r) for r in rows) / (loss.shape[0] * loss.shape[1])


@pytest.mark.parametrize("mode", AGGREGATIONS.names())
@pytest.mark.parametrize("seed", range(4))
def test_agg_matches_loop_reference(mode, seed):
    g = torch.Generator().manual_seed(seed)
    n, t = 1 + seed, 2 + 2 * seed
    loss = torch.randn(n, t, generator=g, dtype=torch.float64)
    mask = torch.rand(n, t, generator=g) > 0.5
    assert agg_loss(loss, mask, mode).item() == pytest.approx(
        _loop_agg(loss, mask, mode), rel=1e-6, abs=1e-12
    )


@pytest.mark.parametrize("mode", AGGREGATIONS.names())
def test_agg_gradcheck_and_empty_mask(mode):
    loss = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: agg_loss(x, RAGGED_MASK, mode), (loss,))
    (g,) = torch.autograd.grad(agg_loss(loss, RAGGED_MASK, mode), loss)
    assert (g[~RAGGED_MASK] == 0).all()
    out = agg_loss(loss, torch.zeros(3, 4, dtype=torch.bool), mode)
    assert out.item() == 0.0
    assert (torch.autograd.grad(out, loss)[0] == 0).all()


def test_agg_shape_check():
    with pytest.raises(ValueError, match="must have one shape"):
        agg_loss(torch.zeros(2, 3), torch.ones(2, 4))


# ---------------------------------------------------------------- registries


@pytest.mark.parametrize(
    "getter,kind,names",
    [
        (get_divergence, "divergence", "k1, k2, k3"),
        (
            get_aggregation,
            "aggregation",
            "seq-mean-token-mean, seq-mean-token-sum, seq-mean-token-sum-norm, token-mean",
        ),
        (get_policy_loss, "policy loss", "reinforce, vanilla"),
    ],
)
def test_unknown_name_lists_the_valid_ones(getter, kind, names):
    with pytest.raises(ValueError) as e:
        getter("nope")
    assert str(e.value) == f"unknown {kind} 'nope'; valid: {names}"


def test_registry_refuses_duplicates_and_registers():
    reg = Registry("thing")

    @reg.register("a")
    def a():
        return 1

    assert reg.get("a") is a and "a" in reg and reg.names() == ["a"]
    with pytest.raises(ValueError, match="thing 'a' is already registered"):
        reg.register("a")(lambda: 2)
    # the shipped registries hold what the docs promise
    assert DIVERGENCES.names() == ["k1", "k2", "k3"]
    assert GATES.names() == ["correct", "none", "positive_advantage"]
