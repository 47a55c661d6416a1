"""GRPO + lambda * CPL in a plain PyTorch loop, on a tiny toy "VLM" built from a config.

The model is a 2-layer transformers ``Qwen2ForCausalLM`` (random weights, no download) whose input
is prefixed by ``K`` "image" embeddings: a linear projection of an 8-value image vector. The task:
say token ``ANSWER0 + argmax(image[:4])`` somewhere in the response. Everything CPPO-specific goes through
``cppo.loss`` and ``cppo.detect``:

    rollout (sample G responses per image)  -> rewards -> group_advantages
    teacher-force under I (with grad)       -> anchor log-probs a_t and entropies H_t(I)
    gate_responses(A > 0)                   -> only those responses get the I+ / I- passes
    teacher-force under I- and I+           -> n_t, H_t(I-) and p_t
    perception_mask + contrastive_perception_loss, grpo_loss -> loss = GRPO + lambda * CPL

Views: I+ adds small noise (information kept), I- is a blank image (information removed).
Departures from the paper, for a CI-sized run: lambda = 0.1 rather than 0.01 so the term is
visible in the log, 2 updates per rollout batch, responses of 6 tokens.

Run:  python examples/cpl_plain_pytorch.py --steps 4
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
import torch.nn as nn
from transformers import Qwen2Config, Qwen2ForCausalLM

from cppo.detect import chunked_entropy_and_logprob
from cppo.loss import (
    contrastive_perception_loss,
    gate_responses,
    group_advantages,
    grpo_loss,
    perception_mask,
)

V, D, K, PIX = 64, 32, 2, 8  # vocabulary, hidden size, image prefix tokens, image values
EOS, ANSWER0 = 0, 10
PROMPT = [1, 2, 3]


class ToyVLM(nn.Module):
    def __init__(self):
        super().__init__()
        cfg = Qwen2Config(
            vocab_size=V,
            hidden_size=D,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=64,
        )
        self.lm = Qwen2ForCausalLM(cfg)
        self.vision = nn.Linear(PIX, K * D)  # the "image encoder + projector"

    def embed(self, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        prefix = self.vision(images).view(-1, K, D)  # (N, K, D)
        return torch.cat([prefix, self.lm.get_input_embeddings()(ids)], dim=1)  # (N, K + L, D)

    def hidden(self, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.lm.model(inputs_embeds=self.embed(images, ids)).last_hidden_state  # (N, K + L, D)


@torch.no_grad()
def rollout(model: ToyVLM, images: torch.Tensor, t: int, temperature: float) -> torch.Tensor:
    """Sample t tokens after the prompt for each row; no KV cache, the model is tiny."""
    ids = torch.tensor(PROMPT).repeat(images.shape[0], 1)  # (N, 3)
    for _ in range(t):
        logits = model.lm.lm_head(model.hidden(images, ids)[:, -1]) / temperature  # (N, V)
        ids = torch.cat([ids, torch.multinomial(logits.softmax(-1), 1)], dim=1)
    return ids[:, len(PROMPT) :]  # (N, T)


def response_logp(model: ToyVLM, images: torch.Tensor, resp: torch.Tensor, temperature: float):
    """Entropy (detached) and log-prob (with grad) of each response token under ``images``."""
    ids = torch.cat([torch.tensor(PROMPT).repeat(resp.shape[0], 1), resp], dim=1)  # (N, 3 + T)
    h = model.hidden(images, ids)  # (N, K + 3 + T, D)
    start = K + len(PROMPT) - 1  # the state before response token 0
    h = h[:, start : start + resp.shape[1]]  # (N, T, D)
    return chunked_entropy_and_logprob(h, model.lm.lm_head.weight, resp, temperature, chunk_size=16)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=4, help="B")
    ap.add_argument("--group", type=int, default=4, help="G")
    ap.add_argument("--tokens", type=int, default=6, help="T")
    ap.add_argument("--lam", type=float, default=0.1, help="lambda, the CPL weight")
    ap.add_argument("--beta", type=float, default=0.01, help="weight of the k3 KL to the reference")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    temperature, updates = 1.0, 2

    model = ToyVLM()
    ref = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)

    for step in range(args.steps):
        images = torch.rand(args.prompts, PIX).repeat_interleave(
            args.group, dim=0
        )  # (N, PIX), groups adjacent
        plus = images + 0.05 * torch.randn(args.prompts, PIX).repeat_interleave(args.group, dim=0)  # I+
        minus = torch.zeros_like(images)  # I-: the information is gone
        resp = rollout(model, images, args.tokens, temperature)  # (N, T)
        # response mask: everything up to and including the first EOS
        after_eos = (resp == EOS).long().cumsum(-1) - (resp == EOS).long()  # EOS tokens strictly before t
        resp_mask = after_eos == 0  # (N, T)
        answer = ANSWER0 + images[:, :4].argmax(-1, keepdim=True)  # (N, 1) the token the image asks for
        rewards = ((resp == answer) & resp_mask).any(-1).float()  # (N,) 1 if the answer was said
        adv = group_advantages(rewards, args.group)  # (N,)
        with torch.no_grad():
            _, old_logp = response_logp(model, images, resp, temperature)  # (N, T)
            _, ref_logp = response_logp(ref, images, resp, temperature)  # (N, T)

        for _ in range(updates):
            ent, logp = response_logp(model, images, resp, temperature)  # (N, T) each
            loss, metrics = grpo_loss(old_logp, logp, adv, resp_mask, ref_logp=ref_logp, beta=args.beta)
            keep = gate_responses(adv)  # (N,) responses with A > 0: the only ones CPL can touch
            if keep.any():
                ent_minus, neg = response_logp(model, minus[keep], resp[keep], temperature)  # I-
                _, pos = response_logp(model, plus[keep], resp[keep], temperature)  # I+
                mask = perception_mask(ent[keep], ent_minus, resp_mask[keep], adv[keep])  # (n, T) bool
                cpl, cpl_metrics = contrastive_perception_loss(
                    logp[keep], pos, neg, mask, response_mask=resp_mask[keep]
                )
                loss = loss + args.lam * cpl
                metrics.update(cpl_metrics)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        print(
            f"step {step} loss={loss.item():.5f} pg={metrics['grpo/pg_loss']:.5f} "
            f"kl={metrics.get('grpo/kl', 0.0):.5f} cpl={metrics.get('cpl/loss', 0.0):.5f} "
            f"mask_frac={metrics.get('cpl/mask_frac', 0.0):.3f} reward={rewards.mean().item():.3f}",
            flush=True,
        )
    moved = max((p - q).abs().max().item() for p, q in zip(model.parameters(), ref.parameters()))
    print(f"max |param - initial| = {moved:.3e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
