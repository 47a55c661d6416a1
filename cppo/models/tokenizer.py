"""An offline Qwen2 tokenizer: byte-level BPE trained on the shapes task's text, Qwen's special tokens.

The real Qwen2.5-VL tokenizer (151,643 BPE tokens) cannot be downloaded here. This one keeps what
the model and every command depend on: the `Qwen2Tokenizer` class with Qwen's pre-tokenizer
(digits split one by one, byte-level fallback, so any text still encodes), the 14 special tokens
placed after the BPE vocabulary as in Qwen, `<|im_end|>` as end of turn, `<|endoftext|>` as
padding, and the official chat template. It departs in the vocabulary only: a few hundred merges
learned with the `tokenizers` library from a fixed corpus of the task's text (the docs/method.md
instruction, questions, reasoning, answers), so a colour word or a number is one token, as it is in
the real vocabulary, and prompts stay short enough for CPU training.
"""

from __future__ import annotations

import functools
import json

import numpy as np
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

from cppo.prompt import INSTRUCTION
from cppo.toy.shapes import make_item, target_response

# The 14 special tokens of Qwen2.5-VL, in Qwen's order (ids 151643..151656 there, right after the BPE).
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
VISION_TOKENS: tuple[str, ...] = (
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# The chat template shipped with Qwen2.5-VL-*-Instruct (chat_template.json), verbatim.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2's pre-tokenizer split (tokenization_qwen2.PRETOKENIZE_REGEX), restated so training sees
# exactly the pieces the Qwen2Tokenizer will later cut.
_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def tokenizer_corpus(n_items: int = 2000, seed: int = 0) -> list[str]:
    """The fixed text the BPE is learned from: chat scaffolding, instruction, and shapes items."""

    rng = np.random.default_rng(seed)
    # The scaffolding is in every prompt: weight it like the items so its words get merged too.
    lines = ["system\nYou are a helpful assistant.", "user\n", "assistant\n", INSTRUCTION] * (n_items // 10)
    for _ in range(n_items):
        item = make_item(rng)
        lines += [item.question, target_response(item)]
    return lines


@functools.lru_cache(maxsize=4)
def bpe_vocab_and_merges(vocab_size: int = 1024) -> tuple[str, tuple[tuple[str, str], ...]]:
    """(vocab JSON, merges) of a byte-level BPE trained on `tokenizer_corpus()`; deterministic."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    state = json.loads(tok.to_str())["model"]
    merges = tuple(tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"])
    return json.dumps(state["vocab"], sort_keys=True), merges


def build_tokenizer(vocab_size: int = 1024):
    """A `Qwen2Tokenizer` over the task BPE with Qwen2.5-VL-Instruct's special tokens and template.

    As in Qwen2.5-VL-Instruct: eos `<|im_end|>`, pad and unk `<|endoftext|>`, no bos, the other 13
    special tokens as additional special tokens, ids after the BPE vocabulary.
    """
    from transformers import Qwen2Tokenizer

    vocab_json, merges = bpe_vocab_and_merges(vocab_size)
    vocab = json.loads(vocab_json)
    vocab.update({t: len(vocab) + i for i, t in enumerate(SPECIAL_TOKENS)})  # Qwen's order, after the BPE
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=list(merges),
        unk_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        errors="replace",
        model_max_length=32768,
        extra_special_tokens=list(SPECIAL_TOKENS[1:]),
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok
