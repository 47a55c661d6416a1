"""The fast paths the benchmarks measure equal their plain counterparts (docs/benchmarks.md).

- `share_images`: a group's repeated images encoded once vs once per row;
- the chunked head vs `full_logits` (the official code's way), the reference of bench/bench_step.py;
- `fused_head_stats` (hand-written backward) vs the checkpointed chunks of cppo.loss.entropy
  (`fused=False`).
"""

import torch

from cppo.batching import take_rows
from cppo.models import append_responses, generate_responses
from cppo.response_stats import response_stats
from tests.helpers import shapes_batch, tiny_model_and_processor


def _group_inputs(model, processor, group: int = 3, tokens: int = 8):
    _, batch = shapes_batch(processor, n=2, seed=3)
    rows = [b for b in range(2) for _ in range(group)]  # rows of a group are adjacent, as in rollouts
    batch = take_rows(batch, rows, model.config.image_token_id)
    ids, mask = generate_responses(model, processor, batch, max_new_tokens=tokens, generator_seed=0)
    return append_responses(batch, ids, mask), ids, mask


def _stats_and_grads(model, inputs, ids, mask, **kw):
    model.zero_grad(set_to_none=True)
    ent, logp = response_stats(model, inputs, ids, mask, temperature=0.8, chunk_size=5, **kw)
    (logp * torch.linspace(0.5, 1.5, logp.shape[1])).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return ent.detach(), logp.detach(), grads


def test_shared_image_features_equal_per_row_encoding():
    model, processor = tiny_model_and_processor()
    inputs, ids, mask = _group_inputs(model, processor)
    calls = []
    model.model.visual.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    fast = _stats_and_grads(model, inputs, ids, mask, share_images=True)
    slow = _stats_and_grads(model, inputs, ids, mask, share_images=False)
    assert calls[0] * 3 == calls[1]  # the tower saw 2 images instead of 6
    torch.testing.assert_close(fast[0], slow[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast[1], slow[1], atol=1e-5, rtol=1e-5)
    assert fast[2].keys() == slow[2].keys() and any("visual" in n for n in fast[2])
    for name in fast[2]:
        torch.testing.assert_close(fast[2][name], slow[2][name], atol=1e-5, rtol=1e-4, msg=name)


def test_distinct_images_are_not_shared():
    model, processor = tiny_model_and_processor()
    inputs, ids, mask = _group_inputs(model, processor, group=1)
    fast = _stats_and_grads(model, inputs, ids, mask, share_images=True)
    slow = _stats_and_grads(model, inputs, ids, mask, share_images=False)
    torch.testing.assert_close(fast[1], slow[1], atol=1e-6, rtol=1e-6)


def test_full_logits_reference_equals_chunked_head():
    model, processor = tiny_model_and_processor()
    inputs, ids, mask = _group_inputs(model, processor, group=2)
    fast = _stats_and_grads(model, inputs, ids, mask)
    slow = _stats_and_grads(model, inputs, ids, mask, full_logits=True)
    torch.testing.assert_close(fast[0], slow[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast[1], slow[1], atol=1e-5, rtol=1e-5)
    for name in fast[2]:
        torch.testing.assert_close(fast[2][name], slow[2][name], atol=1e-5, rtol=1e-4, msg=name)


def test_fused_head_equals_checkpointed_chunks():
    model, processor = tiny_model_and_processor()
    inputs, ids, mask = _group_inputs(model, processor, group=2, tokens=11)
    fast = _stats_and_grads(model, inputs, ids, mask)
    slow = _stats_and_grads(model, inputs, ids, mask, fused=False)
    torch.testing.assert_close(fast[0], slow[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast[1], slow[1], atol=1e-5, rtol=1e-5)
    assert fast[2].keys() == slow[2].keys() and any("embed_tokens" in n for n in fast[2])  # tied head
    for name in fast[2]:
        torch.testing.assert_close(fast[2][name], slow[2][name], atol=1e-5, rtol=1e-4, msg=name)
