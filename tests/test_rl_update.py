"""The update's efficiency paths equal the plain path (docs/method.md §5.7–8), trimmed micro-batches
included (cppo.rl.passes._entropy_and_logp)."""

import copy
import types

import pytest
import torch

from cppo.batching import ROW_KEYS
from cppo.models import append_responses
from cppo.perturb import get_preset
from cppo.rl.config import TrainConfig
from cppo.rl.data import open_dataset
from cppo.rl.perception import ContrastivePerception, ImplicitPerception
from cppo.rl.rewards import RewardScorer
from cppo.rl.rollout import collect_rollouts, micro_batches, prepare_prompts
from cppo.rl.update import Passes, Timer, micro_batch_loss, rollout_logprobs
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
        cpl_rows=1.0,  # the full term, to compare with references
    )
    samples = [ds[0], ds[1]]
    ro = collect_rollouts(
        model,
        processor,
        prepare_prompts(processor, samples, [11, 12], cfg.algo, get_preset("paper")),
        cfg,
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
    loss, metrics = micro_batch_loss(model, ro, list(range(ro.num_rows)), cfg, timer, Passes(term=term))
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


def _mixed_lengths(ro, lengths):
    """The rollouts with row i's response cut to lengths[i] tokens (padding after), as in a step whose
    responses have mixed lengths."""
    ro = copy.copy(ro)
    ids, mask = ro.response_ids.clone(), ro.response_mask.clone()
    cut = torch.arange(ids.shape[1])[None] >= torch.tensor(lengths)[:, None]
    mask &= ~cut
    ids[cut] = tiny_model_and_processor()[1].tokenizer.convert_tokens_to_ids("<|endoftext|>")
    L = ro.inputs["prompt_length"]
    prompt = {k: ro.inputs[k][:, :L] for k in ROW_KEYS}
    ro.inputs, ro.response_ids, ro.response_mask = append_responses(prompt, ids, mask), ids, mask
    return ro


@pytest.mark.parametrize("term", ["cppo", "papo"])
def test_trimmed_sorted_micro_batches_equal_the_padded_path(rollouts, term):
    """Each micro-batch cut to its own rows' tokens gives the loss and gradients of the same
    micro-batch padded to the step's longest prompt and response (CPPO's I-/I+ and PAPO's view passes
    included), with old and reference log-probs and advantages aligned with their rows after sorting."""
    model, ro, cfg = rollouts
    ro = _mixed_lengths(ro, [10, 3, 7, 1, 9, 5])
    cfg.cpl_lambda, cfg.beta = 1.0, 0.05
    perception = ContrastivePerception() if term == "cppo" else ImplicitPerception()
    ro.old_logp = rollout_logprobs(model, ro, cfg, Passes(trim=False)) + 0.01 * torch.randn(
        ro.response_ids.shape
    )
    ro.ref_logp = rollout_logprobs(model, ro, cfg, Passes(trim=False)) - 0.02
    cfg.micro_batch_size = 2
    micro = micro_batches(ro, list(range(ro.num_rows)), 2, by_length=True)
    assert [len(m) for m in micro] == [2, 2, 2] and sorted(sum(micro, [])) == list(range(6))
    columns = []
    hook = model.model.language_model.embed_tokens.register_forward_hook(
        lambda m, a, o: columns.append(a[0].numel())
    )
    out = {}
    try:
        for trim in (True, False):
            model.zero_grad(set_to_none=True)
            columns.clear()
            total, metrics = 0.0, []
            for rows in micro:
                loss, m = micro_batch_loss(model, ro, rows, cfg, Timer(), Passes(trim=trim, term=perception))
                (loss * len(rows) / ro.num_rows).backward()
                total, metrics = total + float(loss.detach()) * len(rows) / ro.num_rows, metrics + [m]
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            out[trim] = (total, metrics, grads, sum(columns))
    finally:
        hook.remove()
        cfg.beta, cfg.micro_batch_size = 0.0, 6
    (loss_t, m_t, g_t, tok_t), (loss_p, m_p, g_p, tok_p) = out[True], out[False]
    assert tok_t < tok_p, (tok_t, tok_p)  # the trimmed passes ran on fewer token columns
    assert loss_t == pytest.approx(loss_p, rel=1e-6, abs=1e-7)
    for a, b in zip(m_t, m_p):
        assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6) for k in a)
    assert any(m.get("cpl/rows", 0) > 0 or m.get("papo/kl_prcp", 0) != 0 for m in m_t)  # views ran
    assert g_t.keys() == g_p.keys()
    for name in g_t:
        torch.testing.assert_close(g_t[name], g_p[name], atol=1e-6, rtol=1e-5, msg=name)


def test_rows_keep_their_own_values_in_any_order(rollouts):
    """A micro-batch's loss does not depend on the order of its rows: advantages, old and reference
    log-probs follow each row (as sorting by length reorders rows)."""
    model, ro, cfg = rollouts
    ro = _mixed_lengths(ro, [10, 3, 7, 1, 9, 5])
    ro.old_logp = rollout_logprobs(model, ro, cfg) + 0.01 * torch.randn(ro.response_ids.shape)
    try:
        a, _ = micro_batch_loss(model, ro, [0, 1, 2, 3, 4, 5], cfg, Timer())
        b, _ = micro_batch_loss(model, ro, [5, 3, 0, 4, 1, 2], cfg, Timer())
    finally:
        ro.old_logp = None
    torch.testing.assert_close(a.detach(), b.detach(), atol=1e-6, rtol=1e-6)


def test_rollout_logprobs_sorted_and_trimmed_equal_the_padded_ones(rollouts):
    model, ro, cfg = rollouts
    ro = _mixed_lengths(ro, [2, 10, 4, 8, 1, 6])
    cfg.micro_batch_size = 4  # 4 + 2 rows: the sorted cut differs from the plain one
    try:
        trimmed, padded = (
            rollout_logprobs(model, ro, cfg),
            rollout_logprobs(model, ro, cfg, Passes(trim=False)),
        )
    finally:
        cfg.micro_batch_size = 6
    assert bool((padded != 0).any())
    torch.testing.assert_close(trimmed, padded, atol=1e-6, rtol=1e-5)


def test_sorted_micro_batches_keep_their_number_and_sizes():
    ro = types.SimpleNamespace(inputs={"attention_mask": torch.tensor([[1] * n + [0] * (9 - n) for n in
                                                                       (3, 9, 1, 5, 7, 2, 8)])})  # fmt: skip
    rows = list(range(7))
    assert micro_batches(ro, rows, 3, by_length=False) == [[0, 1, 2], [3, 4, 5], [6]]
    assert micro_batches(ro, rows, 3, by_length=True) == [[1, 4, 6], [0, 3, 5], [2]]  # 9 8 7 | 5 3 2 | 1


def test_token_mean_is_taken_per_micro_batch_and_scaled_by_its_share_of_rows():
    """The official code (vbdi/cppo verl/recipe/cppo/cppo_dp_actor.py, as verl's dp_actor) takes the
    token mean within each micro-batch (agg_loss) and scales it by 1 / gradient_accumulation =
    micro rows / mini-batch rows; so does this update. Worked numbers with a one-parameter policy
    whose log-prob of every token is theta (on-policy: ratio 1, d pg_t / d theta = -A_row):

        micro-batch 1: rows 0, 1 with 1 + 3 tokens, A = 1, 0  -> token mean -(1·1 + 0·3) / 4 = -0.25
        micro-batch 2: rows 2, 3 with 2 + 6 tokens, A = 0, 1  -> token mean -(0·2 + 1·6) / 8 = -0.75
        gradient = 2/4 · (-0.25) + 2/4 · (-0.75) = -0.5

    A token mean over the whole mini-batch would give -(1 + 6) / 12 = -0.583."""
    import types

    from cppo.rl.rewards import RewardResult
    from cppo.rl.rollout import Rollouts
    from cppo.rl.update import policy_update

    class OneParameter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.theta = torch.nn.Parameter(torch.zeros(()))
            self.config = types.SimpleNamespace(image_token_id=-1)

    def forward(model, inputs, ids, mask, temperature, chunk, entropy_grad=False):
        n, t = ids.shape
        return torch.zeros(n, t), model.theta.expand(n, t)  # (entropy, logp), each (n, T)

    lengths, T, L = torch.tensor([1, 3, 2, 6]), 6, 3
    mask = torch.arange(T) < lengths[:, None]  # (4, T)
    ids = torch.ones(4, L + T, dtype=torch.long)
    ro = Rollouts(
        inputs={"input_ids": ids, "attention_mask": torch.ones_like(ids), "prompt_length": L},
        response_ids=torch.ones(4, T, dtype=torch.long),
        response_mask=mask,
        has_image=torch.zeros(4, dtype=torch.bool),
        truncated=torch.zeros(4, dtype=torch.bool),
        pixel_values=None,
        image_grid_thw=None,
        images_per_prompt=[0, 0],
        views={},
        rewards=torch.zeros(4),
        advantages=torch.tensor([1.0, 0.0, 0.0, 1.0]),
        texts=[""] * 4,
        samples=[None, None],  # B = 2 prompts, G = 2
        view_records=[[], []],
        reward_result=RewardResult([0.0] * 4, {}),
    )
    cfg = TrainConfig(
        algo="grpo", group_size=2, prompts_per_step=2, micro_batch_size=2, beta=0.0, grad_clip=0.0
    )
    seen = []
    optimizer = types.SimpleNamespace(
        zero_grad=lambda set_to_none: None, step=lambda: seen.append(model.theta.grad)
    )
    scheduler = types.SimpleNamespace(step=lambda: None, get_last_lr=lambda: [0.0])
    model = OneParameter()
    metrics = policy_update(
        model, optimizer, scheduler, ro, cfg, Timer(), passes=Passes(forward=forward, trim=False)
    )
    assert len(seen) == 1 and float(seen[0]) == pytest.approx(-0.5)
    assert metrics["grad_norm"] == pytest.approx(0.5)
    assert float(seen[0]) != pytest.approx(-7 / 12)  # not the whole mini-batch's token mean


def _sampled_grads(model, ro, cfg, term):
    """Gradients of one mini-batch of every row, micro-batches of `cfg.micro_batch_size`, the term's
    `prepare` first as policy_update does; and the summed cpl metrics."""
    from cppo.rl.update import MicroBatch

    model.zero_grad(set_to_none=True)
    mini, passes = list(range(ro.num_rows)), Passes(term=term)
    stored = term.prepare(MicroBatch(model, ro, mini, cfg, Timer(), None, None, passes))
    rows_drawn, cpl = 0.0, 0.0
    for rows in micro_batches(ro, mini, cfg.micro_batch_size, by_length=False):
        loss, metrics = micro_batch_loss(model, ro, rows, cfg, Timer(), passes, stored)
        (loss * len(rows) / len(mini)).backward()
        rows_drawn, cpl = rows_drawn + metrics["cpl/rows"], cpl + metrics["cpl/loss"]
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return grads, rows_drawn, cpl, stored


def test_batched_selection_and_fused_views_equal_per_micro_batch_passes(rollouts):
    """A sampled term (--cpl-rows 0.75): the selection's I- pass run once for the mini-batch and the
    drawn rows' I- and I+ passes in one forward give the gradients of each micro-batch running its
    own passes one view at a time, in fewer forwards."""
    model, ro, cfg = rollouts
    cfg = copy.copy(cfg)
    cfg.cpl_rows, cfg.micro_batch_size, cfg.cpl_lambda = 0.75, 2, 1.0
    calls = []
    hook = model.model.visual.register_forward_hook(lambda m, a, o: calls.append(1))  # once a pass
    try:
        batched = _sampled_grads(model, ro, cfg, ContrastivePerception())
        n_batched, calls[:] = len(calls), []
        apart = _sampled_grads(model, ro, cfg, ContrastivePerception(batch_passes=False))
        n_apart = len(calls)
    finally:
        hook.remove()
    grads, rows_drawn, cpl, stored = batched
    assert rows_drawn > 0 and cpl != 0  # the term was on some rows
    assert set(stored) == {"negative"}
    assert stored["negative"][2].tolist() == [True, False, True, False, True, False]  # the gated rows
    assert rows_drawn == apart[1] and cpl == pytest.approx(apart[2], rel=1e-6, abs=1e-7)
    assert grads.keys() == apart[0].keys()
    for name in grads:
        torch.testing.assert_close(grads[name], apart[0][name], atol=1e-6, rtol=1e-5, msg=name)
    # apart: 3 anchors, 3 selection passes, 2 view passes per micro-batch with a drawn row;
    # batched: 3 anchors, 1 selection pass, 1 view pass per such micro-batch
    with_draws = sum(1 for r in (0, 2, 4) if float(ro.row_draws[r]) < 0.75)
    assert n_apart == 3 + 3 + 2 * with_draws and n_batched == 3 + 1 + with_draws


def test_a_frozen_towers_images_are_encoded_once_a_step(rollouts, monkeypatch):
    """With the vision tower frozen (--freeze-vision, the demo's default) each image of the step is
    encoded once per tower, original and views, and every pass reuses its features: the gradients
    of encoding in every pass, with the tower run far fewer times."""
    import cppo.rl.passes as passes_module

    model, ro, cfg = rollouts
    model = copy.deepcopy(model)
    model.model.visual.requires_grad_(False)
    cfg = copy.copy(cfg)
    cfg.cpl_rows, cfg.micro_batch_size, cfg.cpl_lambda = 0.75, 2, 1.0
    images = []  # images each tower call encodes
    model.model.visual.register_forward_hook(
        lambda m, a, kw, o: images.append(len(kw["grid_thw"] if "grid_thw" in kw else a[1])), with_kwargs=True
    )
    ro = copy.copy(ro)
    ro.image_features = {}
    cached = _sampled_grads(model, ro, cfg, ContrastivePerception())
    encoded, images[:] = list(images), []
    assert len(ro.image_features) == 2 * 3  # 2 prompts x (I, I-, I+), each encoded once
    assert sum(encoded) == 6 and {k[1:4] for k in ro.image_features} == {
        (v, p, 0) for v in (None, "negative", "positive") for p in (0, 1)
    }
    monkeypatch.setattr(passes_module, "_frozen_tower", lambda model: None)  # encode in every pass
    ro.image_features = {}
    plain = _sampled_grads(model, ro, cfg, ContrastivePerception())
    assert sum(images) >= 2 * sum(encoded) and not ro.image_features
    assert cached[1] == plain[1] and cached[2] == pytest.approx(plain[2], rel=1e-6, abs=1e-7)
    assert cached[0].keys() == plain[0].keys() and not any("visual" in n for n in cached[0])
    for name in cached[0]:
        torch.testing.assert_close(cached[0][name], plain[0][name], atol=1e-6, rtol=1e-5, msg=name)
