import torch

from cppo.loss.entropy import token_entropy
from cppo.models import append_responses, generate_responses, response_logits
from cppo.response_stats import response_stats
from tests.helpers import shapes_batch, tiny_model_and_processor


def test_response_stats_equal_full_logits_path():
    torch.manual_seed(0)
    model, processor = tiny_model_and_processor()
    _, batch = shapes_batch(processor, n=3, seed=1)
    ids, mask = generate_responses(model, processor, batch, max_new_tokens=12, generator_seed=0)
    inputs = append_responses(batch, ids, mask)
    temperature = 0.7
    ent, logp = response_stats(model, inputs, ids, mask, temperature=temperature, chunk_size=5)
    # Reference: the model's own full forward, every response logit at once.
    logits = response_logits(model, inputs).float() / temperature  # (N, T, V)
    ref_logp = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    ref_ent = token_entropy(logits)
    torch.testing.assert_close(logp[mask], ref_logp[mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent[mask], ref_ent[mask], atol=1e-5, rtol=1e-5)
    assert bool((logp[~mask] == 0).all()) and bool((ent[~mask] == 0).all())


def test_response_stats_gradient_matches_full_logits_path():
    model, processor = tiny_model_and_processor()
    _, batch = shapes_batch(processor, n=2, seed=2)
    ids, mask = generate_responses(model, processor, batch, max_new_tokens=8, generator_seed=1)
    inputs = append_responses(batch, ids, mask)
    _, logp = response_stats(model, inputs, ids, mask, chunk_size=3)
    logp[mask].sum().backward()
    fast = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    ref = torch.log_softmax(response_logits(model, inputs).float(), -1).gather(-1, ids.unsqueeze(-1))
    ref.squeeze(-1)[mask].sum().backward()
    slow = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    assert len(fast) == len(slow) > 0
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
