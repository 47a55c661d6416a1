"""The update's efficiency paths equal the plain path (docs/method.md §5.7–8)."""

import copy

import pytest
import torch

from cppo.perturb import get_preset
from cppo.rl.config import TrainConfig
from cppo.rl.data import open_dataset
from cppo.rl.perception import ContrastivePerception
from cppo.rl.rewards import RewardScorer
from cppo.rl.rollout import collect_rollouts
from cppo.rl.update import Timer, micro_batch_loss
from tests.helpers import shapes_dataset, tiny_model_and_processor


@pytest.fixture(scope="module")
def rollouts(tmp_path_factory):
    torch.manual_seed(0)
    model, processor = tiny_model_and_processor()
    paths = shapes_dataset(tmp_path_factory.mktemp("data"), n=8)
    ds = open_dataset(paths["train"])
    cfg = TrainConfig(
        algo="cppo",
        group_size=3,
        prompts_per_step=2,
        max_new_tokens=10,
        micro_batch_size=6,
        beta=0.0,
        logits_chunk_size=4,
    )
    samples = [ds[0], ds[1]]
    ro = collect_rollouts(
        model,
        processor,
        samples,
        [11, 12],
        cfg,
        get_preset("paper"),
        RewardScorer(cfg.rewards, cfg.reward_weights),
        generator_seed=0,
    )
    # A random model earns no reward, so every advantage would be 0 and the gate would close on every
    # row; fixed advantages open it on rows 0, 2 and 4 only.
    ro.advantages = torch.tensor([1.0, -0.5, 0.7, -1.0, 0.2, 0.0])
    return model, ro, cfg


def _loss_and_grads(model, ro, cfg, skip_views):
    """`skip_views=False`: the perception term that runs the views on every row, as the official code."""
    model.zero_grad(set_to_none=True)
    timer = Timer()
    term = None if skip_views else ContrastivePerception(every_row=True)
    loss, metrics = micro_batch_loss(model, ro, list(range(ro.num_rows)), cfg, timer, term=term)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), metrics, grads, timer


def test_skipping_gated_views_changes_nothing(rollouts):
    model, ro, cfg = rollouts
    cfg.cpl_lambda = 1.0  # make the CPL term dominate so that a difference would show
    fast_loss, fast_m, fast_g, _ = _loss_and_grads(model, ro, cfg, skip_views=True)
    slow_loss, slow_m, slow_g, _ = _loss_and_grads(model, ro, cfg, skip_views=False)
    assert fast_m["cpl/n_tokens"] == slow_m["cpl/n_tokens"] > 0
    assert fast_m["cpl/rows"] <= 3 < slow_m["cpl/rows"]  # fewer view passes, same selection
    torch.testing.assert_close(fast_loss, slow_loss, atol=1e-6, rtol=1e-6)
    assert fast_g.keys() == slow_g.keys()
    for name in fast_g:
        torch.testing.assert_close(fast_g[name], slow_g[name], atol=1e-6, rtol=1e-5, msg=name)
    # The CPL term really is in the gradient: without it the gradients differ.
    cfg.cpl_lambda = 0.0
    _, _, no_cpl_g, _ = _loss_and_grads(model, ro, cfg, skip_views=True)
    assert any(not torch.allclose(no_cpl_g[n], fast_g[n]) for n in fast_g)


def test_closed_gate_gives_zero_cpl_and_no_view_pass(rollouts):
    model, ro, cfg = rollouts
    cfg.cpl_lambda = 1.0
    saved = ro.advantages.clone()
    ro.advantages = torch.zeros(ro.num_rows)  # all rewards equal: no CPL at all (docs/method.md §5.3)
    try:
        loss, metrics, _, timer = _loss_and_grads(model, ro, cfg, skip_views=True)
    finally:
        ro.advantages = saved
    assert metrics["cpl/loss"] == 0.0
    assert timer.get("perception", 0.0) == 0.0  # neither I+ nor I- was run
    assert torch.isfinite(loss)


def test_one_update_moves_logprobs_the_way_the_advantages_point(rollouts):
    """After one plain-SGD step on the GRPO loss alone, responses with A > 0 gained log-probability
    and responses with A < 0 lost it (a sign error in the policy loss fails this)."""
    from cppo.rl.update import rollout_logprobs

    model, ro, cfg = rollouts
    model = copy.deepcopy(model)  # the fixture's model stays as it was for other tests
    cfg.cpl_lambda, cfg.beta = 0.0, 0.0
    before = rollout_logprobs(model, ro, cfg).sum(1)  # (N,)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.zero_grad(set_to_none=True)
    loss, _ = micro_batch_loss(model, ro, list(range(ro.num_rows)), cfg, Timer())
    loss.backward()
    opt.step()
    delta = rollout_logprobs(model, ro, cfg).sum(1) - before  # (N,)
    adv = ro.advantages
    assert bool((delta[adv > 0] > 0).all()), (delta, adv)
    assert bool((delta[adv < 0] < 0).all()), (delta, adv)
