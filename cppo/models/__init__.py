"""Tiny Qwen2.5-VL models, the loader every command uses, batch helpers, and the bundled demo model.

- `build_tiny_model(config, seed)`, `TinyVLMConfig`: a real Qwen2.5-VL at CPU size (`build.py`).
- `load_model_and_processor(path_or_id, device, dtype)`, `demo_model_path()`, `model_path_or_demo(model)`
  (a command's --model, checked, or the demo) (`build.py`).
- `ImageOnlyQwen2_5_VLProcessor`: the stock `Qwen2_5_VLProcessor` without its video processor, a real
  `ProcessorMixin` that loads without torchvision (TRL accepts it) (`vl_processor.py`); the processor
  every command uses where `AutoProcessor` cannot load.
- `encode_prompts`, `encode_images`, `append_responses`, `generate_responses` (`inputs.py`).
- `sample_groups(model, processor, prompts, G, ...)` (`rollout_engine.py`): G responses to each prompt,
  the prompt prefilled once and finished rows out of the batch; the trainer's rollouts.
- `evaluate(model, processor, dataset, samples=K)` (`evaluate.py`): avg@K accuracy, format and
  pass@K per question type, the one evaluator of `cppo-eval`, the trainer and the demo model.
- `python -m cppo.models.warmstart` and `python -m cppo.models.evaluate`: the demo model's recipe.
"""

from cppo.models.build import (
    TinyVLMConfig,
    build_processor,
    build_tiny_model,
    check_model_path,
    demo_model_path,
    load_model_and_processor,
    load_processor,
    model_path_or_demo,
)
from cppo.models.inputs import (
    append_responses,
    encode_images,
    encode_prompts,
    generate_responses,
    response_logits,
)
from cppo.models.rollout_engine import sample_groups
from cppo.models.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, VISION_TOKENS, build_tokenizer
from cppo.models.vl_processor import ImageOnlyQwen2_5_VLProcessor

__all__ = [
    "CHAT_TEMPLATE",
    "SPECIAL_TOKENS",
    "VISION_TOKENS",
    "ImageOnlyQwen2_5_VLProcessor",
    "TinyVLMConfig",
    "append_responses",
    "build_processor",
    "build_tiny_model",
    "build_tokenizer",
    "check_model_path",
    "demo_model_path",
    "encode_images",
    "encode_prompts",
    "generate_responses",
    "load_model_and_processor",
    "load_processor",
    "model_path_or_demo",
    "response_logits",
    "sample_groups",
]
