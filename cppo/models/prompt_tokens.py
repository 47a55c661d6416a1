"""How many tokens a prompt takes, images included, without encoding its pixels; the processor's pixel bounds.

    set_pixel_bounds(processor, min_pixels=3136, max_pixels=12845056)
    prompt_lengths(processor, ["Find x."], [[(640, 480)]])   # -> [token count of encode_prompts' row]

A prompt is the chat template around `cppo.prompt.build_messages` (what `encode_prompts` sends), and
each image's ``<|image_pad|>`` becomes (H'/14)·(W'/14)/2² pads, where (H', W') is the image's size
after Qwen2.5-VL's ``smart_resize`` to multiples of patch x merge (28) within the processor's pixel
bounds (``size["shortest_edge"]`` is min_pixels, ``size["longest_edge"]`` max_pixels). Counting from
the image sizes lets a dataset's prompts be measured (the official code drops those over 512 tokens)
without running the image processor on every image; tests/test_rl_sources.py checks the count against
the processor's own ``input_ids``.
"""

from __future__ import annotations

import dataclasses

from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from cppo.prompt import INSTRUCTION, build_messages


def pixel_bounds(processor) -> tuple[int, int]:
    """(min_pixels, max_pixels) the processor resizes images into."""
    size = processor.image_processor.size
    get = size.get if isinstance(size, dict) else lambda key: getattr(size, key, None)
    return int(get("shortest_edge")), int(get("longest_edge"))


def set_pixel_bounds(processor, min_pixels: int | None = None, max_pixels: int | None = None) -> None:
    """Resize images into [min_pixels, max_pixels] from now on (None keeps the processor's own); saved
    with the processor, so a checkpoint's processor keeps the bounds it was trained with."""
    ip = processor.image_processor
    low, high = pixel_bounds(processor)
    low, high = min_pixels or low, max_pixels or high
    factor = ip.patch_size * ip.merge_size
    if not factor * factor <= high or low > high:
        raise ValueError(
            f"pixel bounds [{low}, {high}] cannot hold an image: need {factor}x{factor} = {factor * factor} "
            "<= max_pixels and min_pixels <= max_pixels"
        )
    if isinstance(ip.size, dict):
        ip.size = {**ip.size, "shortest_edge": low, "longest_edge": high}
    else:
        ip.size = dataclasses.replace(ip.size, shortest_edge=low, longest_edge=high)


def image_tokens(processor, width: int, height: int) -> int:
    """The ``<|image_pad|>`` tokens of one image of this size."""
    ip = processor.image_processor
    low, high = pixel_bounds(processor)
    h, w = smart_resize(height, width, factor=ip.patch_size * ip.merge_size, min_pixels=low, max_pixels=high)
    return (h // ip.patch_size) * (w // ip.patch_size) // ip.merge_size**2


def prompt_lengths(
    processor,
    questions: list[str],
    image_sizes: list[list[tuple[int, int]]],
    instruction: str | None = INSTRUCTION,
) -> list[int]:
    """Tokens of each prompt as `encode_prompts` builds it: the chat-templated question and
    `instruction` plus every image's pads. ``image_sizes`` are (width, height) per image, as PIL
    gives them."""
    texts = [
        processor.apply_chat_template(
            build_messages(q, len(sizes), instruction), add_generation_prompt=True, tokenize=False
        )
        for q, sizes in zip(questions, image_sizes)
    ]
    ids = processor.tokenizer(texts)["input_ids"] if texts else []  # as the processor tokenises
    # each image's one <|image_pad|> in the text becomes image_tokens(...) pads
    return [
        len(row) + sum(image_tokens(processor, w, h) - 1 for w, h in sizes)
        for row, sizes in zip(ids, image_sizes)
    ]
