"""The model's processor as the data meets it: loaded with the run's pixel bounds
(``data_processor``), the positions of its model (``processor_positions``, ``check_response_room``),
and the token count of each prompt, images included (``prompt_token_counts``), which
cppo.rl.data's ``max_prompt_length`` drop and positions skip are decided by."""

from __future__ import annotations

from contextlib import contextmanager

from cppo.models import demo_model_path, load_processor
from cppo.models.model_dir import ModelError, model_positions
from cppo.models.prompt_tokens import prompt_lengths, set_pixel_bounds
from cppo.prompt import instruction_for
from cppo.rl.config import ConfigError

_CHUNK = 512  # prompts per tokenizer call


@contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def prompt_token_counts(processor, records, instruction: bool = True):
    """The tokens of each record's prompt (``question``, image ``sizes``), chat template, instruction
    and image tokens included, counted with the pixel bounds the processor has now; only the text is
    tokenised, no pixel is encoded."""
    for start in range(0, len(records), _CHUNK):
        chunk = records[start : start + _CHUNK]
        questions, sizes = [r.question for r in chunk], [r.sizes for r in chunk]
        with _quiet_transformers():  # its "longer than the maximum" warning: the count is the point
            yield from prompt_lengths(processor, questions, sizes, instruction_for(instruction))


def processor_positions(processor) -> int | None:
    """``max_position_embeddings`` of the model a processor was loaded from (its tokenizer's
    ``name_or_path``), or None for a processor built in memory or a model whose config is not at hand."""
    name = getattr(getattr(processor, "tokenizer", None), "name_or_path", "")
    try:
        return model_positions(name) if name else None
    except ModelError:
        return None


def data_processor(cfg):
    """The run's processor: the model's (``cfg.model``; None = the demo model) with the run's pixel
    bounds, which the data's prompt lengths are counted with and the rollouts encode with."""
    try:  # config, processor files and the weights' headers, before any data is read
        processor = load_processor(cfg.model or demo_model_path(), weights_required=True)
    except ModelError as e:
        raise ConfigError(str(e)) from None
    try:
        set_pixel_bounds(processor, cfg.min_pixels, cfg.max_pixels)
    except ValueError as e:
        raise ConfigError(f"min_pixels/max_pixels: {e}") from None
    return processor


def check_response_room(cfg, processor) -> None:
    """ConfigError when max_new_tokens alone fills the positions of the model the processor was
    loaded from: no prompt could come before such a response."""
    positions = processor_positions(processor)
    if positions is not None and cfg.max_new_tokens >= positions:
        raise ConfigError(
            f"max_new_tokens {cfg.max_new_tokens} leaves no room for a prompt in the model's {positions} "
            "positions (max_position_embeddings): lower it"
        )
