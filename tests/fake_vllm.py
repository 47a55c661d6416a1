"""A stand-in for the part of vLLM that TRL's colocate mode calls (`vllm.LLM`, `SamplingParams`), so
that TRL's own `VLLMGeneration` runs on the CPU: everything of the vLLM route but vLLM itself.

`FakeLLM(model=path, ...)` loads its own copy of the checkpoint, as vLLM does, and records the
arguments TRL built it with. `generate` answers TRL's `{"prompt_token_ids", "multi_modal_data"}`
prompts with cppo's rollout engine on that copy, sampled as the `SamplingParams` say, and hands back
each token's log-probability under the distribution it was drawn from (vLLM's `processed_logprobs`,
which TRL asks for); `llm_engine...model.load_weights` is where TRL's `sync_weights` pushes the
trainer's weights, by name. Used by tests/test_trl_vllm.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from cppo.models import load_model_and_processor, sample_groups


class FakeSamplingParams(SimpleNamespace):
    """vLLM's SamplingParams: the keyword arguments TRL passes, kept as attributes."""


class FakeLLM:
    instances: list[FakeLLM] = []

    def __init__(self, model: str, **kwargs):
        self.kwargs = {"model": model, **kwargs}
        self.model, self.processor = load_model_and_processor(model)
        self.model.eval()
        self.generate_calls, self.loaded, self.events = [], [], []
        runner = SimpleNamespace(model=SimpleNamespace(load_weights=self._load_weights))
        self.llm_engine = SimpleNamespace(
            model_executor=SimpleNamespace(driver_worker=SimpleNamespace(model_runner=runner))
        )
        FakeLLM.instances.append(self)

    def _load_weights(self, weights) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in weights:
                params[name].copy_(tensor)  # a name vLLM would not know raises here
                self.loaded.append(name)

    def sleep(self, level: int) -> None:
        self.events.append(f"sleep {level}")

    def wake_up(self, tags) -> None:
        self.events.append(f"wake_up {','.join(tags)}")

    def reset_prefix_cache(self) -> None:
        self.events.append("reset_prefix_cache")

    def generate(self, prompts: list[dict], sampling_params: FakeSamplingParams, use_tqdm: bool = False):
        """One request output per prompt, `n` = 1 completion each (TRL's colocate mode)."""
        sp = sampling_params
        assert sp.n == 1 and not sp.min_p and sp.logprobs == 0
        self.generate_calls.append(len(prompts))
        tok = self.processor.tokenizer
        pad, image_pad = (
            tok.convert_tokens_to_ids("<|endoftext|>"),
            tok.convert_tokens_to_ids("<|image_pad|>"),
        )
        L = max(len(p["prompt_token_ids"]) for p in prompts)
        ids = torch.tensor(
            [[pad] * (L - len(p["prompt_token_ids"])) + list(p["prompt_token_ids"]) for p in prompts]
        )
        attn = torch.tensor(
            [[0] * (L - len(p["prompt_token_ids"])) + [1] * len(p["prompt_token_ids"]) for p in prompts]
        )
        batch = {"input_ids": ids, "attention_mask": attn, "mm_token_type_ids": (ids == image_pad).long()}
        images = []
        for p in prompts:
            image = p.get("multi_modal_data", {}).get("image")
            images += [] if image is None else image if isinstance(image, list) else [image]
        if images:
            pixels = self.processor.image_processor(images=images, return_tensors="pt")
            batch.update(pixel_values=pixels["pixel_values"], image_grid_thw=pixels["image_grid_thw"])
        out_ids, mask, logp = sample_groups(
            self.model, self.processor, batch, 1, max_new_tokens=sp.max_tokens, temperature=sp.temperature,
            top_p=sp.top_p, top_k=max(0, sp.top_k or 0), repetition_penalty=sp.repetition_penalty,
            return_logprobs=True,
        )  # fmt: skip
        outputs = []
        for p, row_ids, row_mask, row_logp in zip(prompts, out_ids, mask, logp):
            tokens = row_ids[row_mask].tolist()
            lps = [
                {t: SimpleNamespace(logprob=float(lp), rank=1)} for t, lp in zip(tokens, row_logp[row_mask])
            ]
            completion = SimpleNamespace(token_ids=tokens, logprobs=lps)
            outputs.append(SimpleNamespace(prompt_token_ids=p["prompt_token_ids"], outputs=[completion]))
        return outputs
