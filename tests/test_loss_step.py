"""cppo.loss.step.cpl_step: the one CPL step both trainers call, against the loss written out by hand."""

import dataclasses

import pytest
import torch

import cppo.loss.step as step_module
from cppo.loss import CPLSettings, contrastive_perception_loss, cpl_step, perception_mask

N, T = 6, 5


def _batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    anchor = torch.randn(N, T, generator=g, dtype=torch.float64).neg().requires_grad_()
    entropy = torch.rand(N, T, generator=g, dtype=torch.float64)
    mask = torch.ones(N, T, dtype=torch.bool)
    mask[0, 3:] = False  # a shorter response
    adv = torch.tensor([1.0, -1.0, 0.5, 0.0, 2.0, 1.0], dtype=torch.float64)
    views = {  # per view: (entropy, logp) of every row, what a model pass would give
        v: (
            torch.rand(N, T, generator=g, dtype=torch.float64),
            torch.randn(N, T, generator=g, dtype=torch.float64),
        )
        for v in ("negative", "positive")
    }
    return anchor, entropy, mask, adv, views


class Scorer:
    """A single-process `score_view`: rows of the precomputed views, None for no rows; records calls.
    A pass told `lengths` returns 0 after each row's length, as a pass that stopped there would."""

    def __init__(self, views):
        self.views = {v: (e, lp.clone().requires_grad_()) for v, (e, lp) in views.items()}
        self.calls = []

    def __call__(self, rows, view, grad=True, lengths=None):
        self.calls.append((view, list(rows)))
        self.grads = [*getattr(self, "grads", []), grad]
        if not rows:
            return None
        e, lp = self.views[view]
        e, lp = (e[rows] if view == "negative" else None), lp[rows]
        if not grad:
            lp = lp.detach()
        if lengths is not None:
            lp = lp * (torch.arange(T) < lengths.unsqueeze(1))
        return e, lp


def _by_hand(anchor, entropy, mask, adv, views, settings, has_image):
    """The CPL of docs/method.md §2-3 on every row at once: the mask, then the loss."""
    m = perception_mask(
        entropy,
        views["negative"][0],
        mask,
        adv,
        gate=settings.cpl_gate,
        selector=settings.selector,
        top_percent=settings.top_percent,
    )
    m &= has_image.unsqueeze(1)
    loss, _ = contrastive_perception_loss(
        anchor,
        views["positive"][1],
        views["negative"][1],
        m,
        tau=settings.cpl_tau,
        divergence=settings.cpl_divergence,
        response_mask=mask,
    )
    return loss, m


@pytest.mark.parametrize("every_row", [False, True])
@pytest.mark.parametrize("gate", ["positive_advantage", "none"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_step_equals_the_loss_on_every_row_and_skips_the_passes_it_may(seed, gate, every_row):
    anchor, entropy, mask, adv, views = _batch(seed)
    has_image = torch.tensor([True, True, True, True, False, True])
    settings = CPLSettings(cpl_gate=gate, top_percent=0.4, cpl_rows=1.0)
    scorer = Scorer(views)
    got, metrics = cpl_step(
        anchor, entropy, mask, adv, scorer, settings, has_image=has_image, every_row=every_row
    )
    want, m = _by_hand(anchor, entropy, mask, adv, views, settings, has_image)
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-12, abs=1e-15)
    g_got = torch.autograd.grad(got, anchor, retain_graph=True)[0]
    g_want = torch.autograd.grad(want, anchor)[0]
    torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-12)
    assert metrics["cpl/mask_frac"] == pytest.approx(float(m.sum()) / float(mask.sum()))
    (neg, neg_rows), (pos, pos_rows) = scorer.calls  # the I+ pass stopped at each row's last selected token
    assert (neg, pos) == ("negative", "positive")
    gated = [i for i in range(N) if has_image[i] and (gate == "none" or adv[i] > 0)]
    if every_row:
        assert neg_rows == pos_rows == list(range(N))
    else:
        assert neg_rows == gated  # I- only on the rows that can carry CPL
        assert pos_rows == [i for i in gated if m[i].any()]  # I+ only on rows with a selected token
    assert metrics["cpl/rows"] == len(pos_rows)


def test_no_gated_row_runs_no_pass_and_gives_an_exact_zero_in_the_graph():
    anchor, entropy, mask, _, views = _batch(3)
    scorer = Scorer(views)
    loss, metrics = cpl_step(anchor, entropy, mask, torch.zeros(N), scorer, CPLSettings())
    assert float(loss.detach()) == 0.0 and metrics["cpl/loss"] == 0.0
    assert scorer.calls == [("negative", [])]
    assert torch.equal(torch.autograd.grad(loss, anchor)[0], torch.zeros(N, T, dtype=torch.float64))


def test_a_stand_in_joins_both_passes_at_weight_zero():
    """A process without rows whose peers need the passes: it is asked for both views with no rows,
    and what its stand-in passes return stays in the graph (so a sharded backward runs) with zero grad."""
    anchor, entropy, mask, _, _ = _batch(4)
    stand_in = torch.randn(1, T, dtype=torch.float64, requires_grad=True)
    calls = []

    def score_view(rows, view, grad=True, lengths=None):
        calls.append((view, rows))
        return None, stand_in * (2.0 if view == "positive" else 1.0)

    loss, _ = cpl_step(anchor, entropy, mask, -torch.ones(N), score_view, CPLSettings(cpl_rows=1.0))
    assert calls == [("negative", []), ("positive", [])]
    assert float(loss.detach()) == 0.0
    grad = torch.autograd.grad(loss, stand_in)[0]
    assert torch.equal(grad, torch.zeros_like(stand_in))


def test_editing_perception_mask_changes_the_step(monkeypatch):
    """`perception_mask` is the step's mask: no token selected there, no I+ pass and no loss."""
    anchor, entropy, mask, adv, views = _batch(5)
    monkeypatch.setattr(
        step_module, "perception_mask", lambda e, *a, **k: torch.zeros_like(e, dtype=torch.bool)
    )
    scorer = Scorer(views)
    loss, _ = cpl_step(anchor, entropy, mask, adv, scorer, CPLSettings())
    assert float(loss.detach()) == 0.0
    assert scorer.calls[-1] == ("positive", [])


def test_one_step_and_one_set_of_settings_for_both_trainers():
    """The trainer's perception term and the TRL integration call the same step object, and both configs
    take the CPL fields (defaults and help) from CPLSettings."""
    pytest.importorskip("trl")
    import cppo.integrations.trl as trl_integration
    import cppo.rl.perception as perception
    from cppo.rl.config import TrainConfig

    assert perception.cpl_step is trl_integration.cpl_step is step_module.cpl_step
    cpl_fields = {f.name: f for f in dataclasses.fields(CPLSettings)}
    for config in (TrainConfig, trl_integration.CPPOConfig):
        assert issubclass(config, CPLSettings)
        fields = {f.name: f for f in dataclasses.fields(config)}
        for name, f in cpl_fields.items():
            assert fields[name].default == f.default and fields[name].metadata["help"] == f.metadata["help"]


def test_cpl_rows_is_a_fraction_or_a_whole_count():
    assert CPLSettings(cpl_rows=2.5).cpl_problems() == [
        "cpl_rows must be a fraction in (0, 1] or a whole number of rows, got 2.5"
    ]
    assert CPLSettings(cpl_rows=0).cpl_problems() and not CPLSettings(cpl_rows=4).cpl_problems()


@pytest.mark.parametrize("cpl_rows", [0.5, 2])
def test_the_sampled_term_is_an_unbiased_estimate_of_the_full_one(cpl_rows):
    """Over many draws the mean of the sampled loss and of its gradient (anchor and both views) equal
    the full term's within 4 standard errors; each draw runs the view passes with grad on its sample only."""
    anchor, entropy, mask, adv, views = _batch(6)
    adv = torch.tensor([1.0, 0.5, 2.0, 1.0, 0.3, 0.7], dtype=torch.float64)  # every row gated
    full_scorer = Scorer(views)
    full, _ = cpl_step(anchor, entropy, mask, adv, full_scorer, CPLSettings(top_percent=0.4, cpl_rows=1.0))
    grads_full = torch.autograd.grad(
        full, [anchor, *(full_scorer.views[v][1] for v in ("negative", "positive"))]
    )
    settings = CPLSettings(top_percent=0.4, cpl_rows=cpl_rows)
    generator = torch.Generator().manual_seed(0)
    losses, grads, counts = [], [], []
    for _ in range(3000):
        scorer = Scorer(views)
        loss, metrics = cpl_step(anchor, entropy, mask, adv, scorer, settings, generator=generator)
        wrt = [anchor, *(scorer.views[v][1] for v in ("negative", "positive"))]
        g = torch.autograd.grad(loss, wrt, allow_unused=True)  # no row drawn: only the anchor's exact 0
        g = [torch.zeros_like(w) if x is None else x for x, w in zip(g, wrt)]
        losses.append(float(loss.detach()))
        grads.append(torch.cat([x.flatten() for x in g]))
        (_, first), (_, sampled), (_, plus) = scorer.calls
        assert scorer.grads == [False, True, True] and first == list(range(N))
        assert sampled == plus and (len(sampled) == 2 if cpl_rows == 2 else len(sampled) <= N)
        counts.append(len(sampled))
        assert metrics["cpl/rows"] == len(sampled)
    if cpl_rows == 0.5:  # each of the 6 rows drawn with chance 0.5
        assert abs(sum(counts) / len(counts) - 3.0) < 0.1 and 0 in counts
    losses, grads = torch.tensor(losses, dtype=torch.float64), torch.stack(grads)
    assert losses.std() > 0  # the draws differ: the test can fail
    assert abs(losses.mean() - float(full.detach())) < 4 * losses.std() / len(losses) ** 0.5
    want = torch.cat([x.flatten() for x in grads_full])
    sem = grads.std(dim=0) / len(grads) ** 0.5
    assert bool(((grads.mean(dim=0) - want).abs() <= 4 * sem + 1e-12).all())


def test_cpl_rows_one_is_the_full_term_and_a_stand_in_joins_every_sampled_pass():
    """1.0 is the paper's term (the official every-row passes give the same loss, with no sampled pass);
    the default (0.25) samples."""
    anchor, entropy, mask, adv, views = _batch(7)
    a, b, c = Scorer(views), Scorer(views), Scorer(views)
    full, _ = cpl_step(anchor, entropy, mask, adv, a, CPLSettings(), every_row=True)
    same, _ = cpl_step(anchor, entropy, mask, adv, b, CPLSettings(cpl_rows=1.0))
    assert float(same.detach()) == pytest.approx(float(full.detach()), rel=1e-12)
    assert b.grads == [True, True]  # no pass without gradient: nothing sampled
    cpl_step(anchor, entropy, mask, adv, c, CPLSettings())
    assert CPLSettings().cpl_rows == 0.25 and c.grads[0] is False  # the default samples

    calls = []

    def stand_in(rows, view, grad=True, lengths=None):
        calls.append((view, rows, grad))
        return None, torch.zeros(1, T, dtype=torch.float64, requires_grad=True)

    loss, _ = cpl_step(anchor, entropy, mask, -torch.ones(N), stand_in, CPLSettings(cpl_rows=0.5))
    assert calls == [("negative", [], False), ("negative", [], True), ("positive", [], True)]
    assert float(loss.detach()) == 0.0


def test_rows_own_draws_decide_the_sample_whatever_the_split():
    """With `row_draws`, row i is drawn iff its uniform < p: the same rows whether the batch comes whole
    or cut in two (as micro-batches or processes would cut it), each half's loss its own token mean."""
    anchor, entropy, mask, adv, views = _batch(8)
    adv = torch.tensor([1.0, 0.5, 2.0, 1.0, 0.3, 0.7], dtype=torch.float64)  # every row gated
    draws = torch.tensor([0.9, 0.1, 0.3, 0.05, 0.6, 0.2], dtype=torch.float64)  # p = 0.25: rows 1, 3, 5
    settings = CPLSettings(top_percent=0.4, cpl_rows=0.25)
    whole = Scorer(views)
    cpl_step(anchor, entropy, mask, adv, whole, settings, row_draws=draws)
    assert whole.calls[1:] == [("negative", [1, 3, 5]), ("positive", [1, 3, 5])]
    for half in ([0, 1, 2], [3, 4, 5]):
        part = {v: (e[half], lp[half]) for v, (e, lp) in views.items()}
        scorer = Scorer(part)
        loss, _ = cpl_step(
            anchor[half], entropy[half], mask[half], adv[half], scorer, settings, row_draws=draws[half]
        )
        drawn = [half.index(r) for r in (1, 3, 5) if r in half]
        assert scorer.calls[1:] == [("negative", drawn), ("positive", drawn)]
        assert loss.requires_grad
    # every row drawn (all uniforms below p): the full term's token mean, times 1 / p
    full, _ = cpl_step(anchor, entropy, mask, adv, Scorer(views), CPLSettings(top_percent=0.4, cpl_rows=1.0))
    every, _ = cpl_step(anchor, entropy, mask, adv, Scorer(views), settings, row_draws=torch.zeros(N))
    assert float(every.detach()) == pytest.approx(float(full.detach()) / 0.25, rel=1e-12)


def test_cpl_row_draws_follow_the_prompt_seed_not_the_batch():
    from cppo.rl.rollout import cpl_row_draws

    both = cpl_row_draws([11, 12], G=3)
    assert both.shape == (6,) and bool(((both >= 0) & (both < 1)).all())
    assert torch.equal(both[3:], cpl_row_draws([12], G=3)) and torch.equal(both[:3], cpl_row_draws([11], G=3))
    assert not torch.equal(cpl_row_draws([11], G=3), cpl_row_draws([13], G=3))
