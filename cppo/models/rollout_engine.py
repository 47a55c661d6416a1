"""G responses to each of B prompts: each prompt prefilled once, finished rows out of the batch.

`sample_groups` is what `model.generate` does for a batch that repeats each prompt G times
(`cppo.models.generate_responses`), without its waste:

- each distinct prompt is prefilled once (its images through the vision tower once), and its KV
  cache is then repeated for its G rows (`Cache.batch_repeat_interleave`);
- a row that ends leaves the running batch (`Cache.batch_select_indices`, at the step it ends), so
  a decode step costs the rows still running, not all N until the longest one ends;
- every forward is transformers' own `Qwen2_5_VLForConditionalGeneration` with its own cache
  classes; the engine passes the M-RoPE positions itself: the prompt's (text row and three vision
  rows, `get_rope_index`, as `generate` builds them) and, for new token t of a row, its last
  prompt position + 1 + t in all four rows (the text position plus the row's `rope_deltas`), which
  is what `generate` feeds. The positions, the attention mask and the running ids follow each row
  through the repeats and the drops.

The sampler is the one `generate` runs with our settings (float32 logits; the repetition penalty,
then transformers' temperature, top-k and top-p warpers; `torch.multinomial` on the softmax, or
argmax when greedy), so a greedy response is `generate`'s. Where the rows are drawn from:
- `seeds` (one per prompt): each group draws from its own generator, one `multinomial` over the
  group's running rows per token. While every row of a group runs this is exactly
  `cppo.models.sampling.BlockSampler`'s draw; after one ends, the group draws for its running rows
  only, so its samples depend on the group alone (not on the batch, the row order or when rows are
  dropped), but they are other draws than `generate`'s, which keeps sampling for finished rows;
- otherwise torch's global generator (seeded from `generator_seed` if given), one `multinomial`
  over the running rows per token: `generate`'s draws until the first row ends, other draws from
  the same distribution after.

`decode="cuda-graphs"` (CUDA only): the decode step runs on a `StaticCache` of prompt +
max_new_tokens columns and is compiled with `torch.compile(mode="reduce-overhead")`, which captures
it as a CUDA graph, so a step costs its kernels and not transformers' Python. Shapes must stay fixed
for a graph, so finished rows stay in the batch (fed padding, their tokens unused) until three
quarters of the batch have ended, and the batch is then cut to the running rows (one capture per
batch size: at most log4 N + 1). `decode="static"` is the same without the compilation (what the
CPU tests check against the dynamic path). Not yet measured on a GPU (bench/gpu_check.sh).

No collective runs inside (a sharded FSDP model is refused: call it inside `cppo.rl.fsdp.gathered`).

Letters: B prompts, G group, N = B·G rows, n running rows, L prompt columns, T response columns,
V vocabulary.
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache, StaticCache
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from cppo.batching import mrope_positions
from cppo.models.inputs import END_TOKENS, VISION_TOKENS, _refuse_sharded, _token_ids
from cppo.models.sampling import sampling_warpers

DECODES = ("dynamic", "static", "cuda-graphs")


def _base(model):
    """The `Qwen2_5_VLForConditionalGeneration` under a peft wrapper (itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def cache_argument(model) -> str:
    """The forward's name for the KV cache: `cache` from transformers 5.25, `past_key_values` before."""
    names = inspect.signature(type(_base(model)).forward).parameters
    return "cache" if "cache" in names else "past_key_values"


def prompt_positions(model, batch: dict) -> torch.Tensor:
    """(4, B, L) positions of left-padded prompts, as `generate` builds them: row 0 the text position
    (attended tokens counted from 0, padding 0), rows 1-3 Qwen2.5-VL's M-RoPE (temporal, height,
    width; `get_rope_index`) where any prompt has an image, else the text position three times."""
    return mrope_positions(_base(model).model, batch)


class GroupDraws:
    """Picks each running row's next token from its (n, V) float32 logits (module docstring).

    `rows` (n,) are the running rows' indices among the N, ascending (a group's rows adjacent);
    `history` (n, S) their ids so far (prompt and response), read by the repetition penalty only.
    Returns (tokens (n,), log-probabilities (n,) of each token under the distribution it was drawn
    from)."""

    def __init__(self, group_size: int, temperature: float, top_k: int, top_p: float, do_sample: bool,
                 repetition_penalty: float, seeds: list[int] | None):  # fmt: skip
        self.G = group_size
        self.do_sample = do_sample
        self.penalty = (
            RepetitionPenaltyLogitsProcessor(repetition_penalty) if repetition_penalty != 1.0 else None
        )
        self.warpers = sampling_warpers(temperature, top_k, top_p) if do_sample else []
        self.seeds = None if seeds is None else [int(s) for s in seeds]
        self.generators: list[torch.Generator] = []  # one per prompt, made on the logits' device

    def __call__(self, logits: torch.Tensor, rows: torch.Tensor, history: torch.Tensor | None):
        scores = logits if self.penalty is None else self.penalty(history, logits)  # (n, V)
        for warp in self.warpers:
            scores = warp(history, scores)
        if not self.do_sample:
            tokens = scores.argmax(-1)  # (n,)
        elif self.seeds is None:
            tokens = torch.multinomial(torch.softmax(scores, -1), 1).squeeze(1)
        else:
            tokens = self._per_group(torch.softmax(scores, -1), rows)
        logp = scores.log_softmax(-1).gather(1, tokens.unsqueeze(1)).squeeze(1)  # (n,)
        return tokens, logp

    def _per_group(self, probs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """(n,) tokens, each group's running rows drawn by one `multinomial` from the group's generator."""
        if not self.generators:
            self.generators = [torch.Generator(device=probs.device).manual_seed(s) for s in self.seeds]
        groups, counts = torch.unique_consecutive(rows // self.G, return_counts=True)
        blocks = probs.split(counts.tolist())
        drawn = [
            torch.multinomial(p, 1, generator=self.generators[g]) for p, g in zip(blocks, groups.tolist())
        ]
        return torch.cat(drawn).squeeze(1)


@torch.no_grad()
def sample_groups(
    model,
    processor,
    batch: dict,
    group_size: int,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    do_sample: bool = True,
    repetition_penalty: float = 1.0,
    generator_seed: int | None = None,
    seeds: list[int] | None = None,
    return_logprobs: bool = False,
    decode: str = "dynamic",
):
    """(response_ids (N, T) long, response_mask (N, T) bool[, logp (N, T) float32]): G responses to each
    of the B left-padded prompts of `batch` (images included), rows of a group adjacent.

    Same contract as `generate_responses` on the batch with each prompt repeated G times: a response
    keeps its end token (mask True), later columns are `<|endoftext|>` with mask False, a generated
    vision token is masked out and replaced by padding, T is the longest response; `logp` is each
    token's log-probability under the distribution it was drawn from (0 outside the mask), with or
    without `seeds`. `seeds`: one per prompt (module docstring); `generator_seed` seeds torch's
    global generator otherwise. `decode`: "dynamic" (DynamicCache, rows dropped as they end),
    "static" or "cuda-graphs" (module docstring)."""
    _refuse_sharded(model, "sample_groups")
    if seeds is not None and len(seeds) != batch["input_ids"].shape[0]:
        raise ValueError(f"{len(seeds)} seeds for {batch['input_ids'].shape[0]} prompts: give one per prompt")
    if decode not in DECODES:
        raise ValueError(f"decode {decode!r} is not one of {', '.join(DECODES)}")
    if decode == "cuda-graphs" and next(model.parameters()).device.type != "cuda":
        raise ValueError("CUDA graphs need the model on a CUDA device: use --rollout-engine cppo on the CPU")
    tok = processor.tokenizer
    end_ids, pad_id = _token_ids(tok, END_TOKENS), tok.convert_tokens_to_ids("<|endoftext|>")
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
    G, (B, L) = group_size, batch["input_ids"].shape
    N = B * G
    draws = GroupDraws(G, temperature, top_k, top_p, do_sample, repetition_penalty, seeds)
    if generator_seed is not None and seeds is None:
        torch.manual_seed(generator_seed)
    cache_key = cache_argument(model)
    positions = prompt_positions(model, batch)  # (4, B, L)
    cache = DynamicCache()
    out = model(**batch, position_ids=positions, **{cache_key: cache}, use_cache=True, logits_to_keep=1)
    logits = out.logits[:, -1].float().repeat_interleave(G, 0)  # (N, V): one prefill per prompt
    del out
    cache.batch_repeat_interleave(G)
    state = _Running(
        rows=torch.arange(N, device=device),
        attn=batch["attention_mask"].repeat_interleave(G, 0),  # (N, L)
        next_position=positions[:, :, -1:].repeat_interleave(G, 1) + 1,  # (4, N, 1)
        history=batch["input_ids"].repeat_interleave(G, 0) if draws.penalty is not None else None,
    )
    if decode == "dynamic":
        steps = _DynamicDecode(model, cache, cache_key)
    else:
        steps = _StaticDecode(
            model, cache, cache_key, state, L + max_new_tokens, pad_id, decode == "cuda-graphs"
        )
    ids, logp, T = _decode(steps, draws, state, logits, max_new_tokens, end_ids, pad_id, N)
    ids, logp = ids[:, :T], logp[:, :T]
    is_end = torch.isin(ids, torch.tensor(end_ids, device=device))
    after_end = (is_end.long().cumsum(1) - is_end.long()) > 0  # strictly after the first end token
    is_vision = torch.isin(ids, torch.tensor(_token_ids(tok, VISION_TOKENS), device=device))
    mask = ~after_end & ~is_vision
    ids = ids.masked_fill(~mask, pad_id)
    if return_logprobs:
        return ids, mask, logp.masked_fill(~mask, 0.0)
    return ids, mask


class _Running:
    """What follows each running row through the drops: its index among the N, attention mask
    (n, L + t), next position (4, n, 1) and, for the repetition penalty, its ids (n, L + t)."""

    def __init__(self, rows, attn, next_position, history):
        self.rows, self.attn, self.next_position, self.history = rows, attn, next_position, history

    def keep(self, keep: torch.Tensor) -> None:
        self.rows, self.attn = self.rows[keep], self.attn[keep]
        self.next_position = self.next_position[:, keep]
        if self.history is not None:
            self.history = self.history[keep]


def _decode(decode, draws: GroupDraws, state: _Running, logits, max_new_tokens, end_ids, pad_id, N):
    """Token by token until every row has ended or has `max_new_tokens`; returns (ids (N, T_max),
    logp (N, T_max), T) with T the steps taken."""
    device = logits.device
    ids = torch.full((N, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logp = torch.zeros(N, max_new_tokens, dtype=torch.float32, device=device)
    ends = torch.tensor(end_ids, device=device)
    for t in range(max_new_tokens):
        tokens, token_logp = draws(logits, state.rows, state.history)  # (n,), (n,)
        ids[state.rows, t], logp[state.rows, t] = tokens, token_logp
        if t == max_new_tokens - 1:
            return ids, logp, t + 1
        running = ~torch.isin(tokens, ends)  # (n,)
        if state.history is not None:
            state.history = torch.cat([state.history, tokens.unsqueeze(1)], 1)
        state.attn = torch.cat([state.attn, state.attn.new_ones(state.attn.shape[0], 1)], 1)
        if not bool(running.all()):
            if not bool(running.any()):
                return ids, logp, t + 1
            tokens = decode.keep(running, state, tokens)
        logits = decode.step(tokens, state)  # (n, V) float32
        state.next_position = state.next_position + 1
    return ids, logp, max_new_tokens


class _DynamicDecode:
    """Decode steps on transformers' DynamicCache; a finished row leaves the batch at once."""

    def __init__(self, model, cache, cache_key: str):
        self.model, self.cache, self.cache_key = model, cache, cache_key

    def keep(self, keep: torch.Tensor, state: _Running, tokens: torch.Tensor) -> torch.Tensor:
        self.cache.batch_select_indices(keep.nonzero().squeeze(1))
        state.keep(keep)
        return tokens[keep]

    def step(self, tokens: torch.Tensor, state: _Running) -> torch.Tensor:
        out = self.model(
            input_ids=tokens.unsqueeze(1),  # (n, 1)
            attention_mask=state.attn,  # (n, L + t + 1)
            position_ids=state.next_position,  # (4, n, 1)
            **{self.cache_key: self.cache},
            use_cache=True,
        )
        return out.logits[:, -1].float()


def _decode_step(model, cache, cache_key: str, tokens, attn, position):
    """(p, V) logits of one decode step of p rows; what `torch.compile` captures as a CUDA graph."""
    return model(input_ids=tokens, attention_mask=attn, position_ids=position, **{cache_key: cache},
                 use_cache=True).logits[:, -1]  # fmt: skip


_COMPILED: dict = {}  # "step": the compiled `_decode_step`, made once per process


class _StaticDecode:
    """Decode steps on transformers' StaticCache, compiled (CUDA graphs) if `compiled`: the physical
    batch keeps finished rows (fed padding) until 3/4 of it has ended, then is cut to the running
    rows (a new cache of that many rows). `live` (p,) marks the physical rows still running."""

    def __init__(
        self, model, cache, cache_key: str, state: _Running, max_len: int, pad_id: int, compiled: bool
    ):
        self.model, self.cache_key, self.max_len, self.pad_id = model, cache_key, max_len, pad_id
        self.length = cache.get_seq_length()  # columns filled: L, then + 1 a step
        N = state.rows.shape[0]
        self.live = torch.ones(N, dtype=torch.bool, device=state.rows.device)
        self.attn = state.attn.new_zeros(N, max_len)  # (p, L + T): a fixed shape for the graph
        self.attn[:, : self.length] = state.attn
        self.position = state.next_position.clone()  # (4, p, 1)
        self.cache = self._static([(layer.keys, layer.values) for layer in cache.layers])
        if compiled and "step" not in _COMPILED:
            _COMPILED["step"] = torch.compile(_decode_step, mode="reduce-overhead")
        self.forward = _COMPILED["step"] if compiled else _decode_step

    def _static(self, keys_values) -> StaticCache:
        """A StaticCache of `max_len` columns holding `keys_values` ((p, h, S, d) pairs, per layer)."""
        static = StaticCache(config=_base(self.model).config, max_cache_len=self.max_len)
        for layer, (k, v) in zip(static.layers, keys_values):
            layer.update(k, v)  # allocates (p, h, max_len, d) and writes columns 0 .. S-1
        return static

    def keep(self, keep: torch.Tensor, state: _Running, tokens: torch.Tensor) -> torch.Tensor:
        self.live[self.live.nonzero().squeeze(1)[~keep]] = False
        state.keep(keep)
        if 4 * int(self.live.sum()) <= self.live.numel():  # cut the batch to the running rows
            idx = self.live.nonzero().squeeze(1)
            S = self.length
            self.cache = self._static(
                [(layer.keys[idx, :, :S], layer.values[idx, :, :S]) for layer in self.cache.layers]
            )
            self.attn, self.position, self.live = self.attn[idx], self.position[:, idx], self.live[idx]
        return tokens[keep]

    def step(self, tokens: torch.Tensor, state: _Running) -> torch.Tensor:
        physical = torch.full((self.live.numel(), 1), self.pad_id, dtype=torch.long, device=tokens.device)
        physical[self.live, 0] = tokens
        self.attn[:, self.length] = 1
        logits = self.forward(self.model, self.cache, self.cache_key, physical, self.attn, self.position)
        self.length += 1
        self.position = self.position + 1
        return logits[self.live].float()  # (n, V), a copy (a graph's output is overwritten by its next run)
