"""`ImageOnlyQwen2_5_VLProcessor`: the stock `Qwen2_5_VLProcessor` without its video processor.

In transformers 5 the stock processor always builds a video processor, and the video processor needs
torchvision, so `AutoProcessor.from_pretrained` fails on a machine without torchvision. This class is
a subclass of the stock processor whose constructor takes only the image processor and the tokenizer
(`ProcessorMixin` reads a processor's parts from its `__init__` signature), so:

- `from_pretrained` loads a Qwen2.5-VL checkpoint without torchvision (image processor, tokenizer,
  chat template);
- it IS a `ProcessorMixin` and a `Qwen2_5_VLProcessor`, so TRL's trainers (and anything else that
  checks the type) accept it;
- `__call__`, `apply_chat_template(..., tokenize=True)` with images in the messages, decoding and the
  image-token expansion are the stock processor's own code, so its outputs are the stock outputs
  (tests/test_vl_processor.py compares them with the image processor + tokenizer called directly, and
  with the stock `AutoProcessor` where torchvision is installed); videos raise a clear error;
- `save_pretrained` names `Qwen2_5_VLProcessor` as the processor class (and also writes
  `preprocessor_config.json`), so a checkpoint saved with it loads with the stock `AutoProcessor`
  where torchvision is installed.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import Qwen2_5_VLProcessor
from transformers.processing_utils import ProcessorMixin

STOCK_PROCESSOR_CLASS = "Qwen2_5_VLProcessor"


class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):  # noqa: N801  (transformers' naming)
    """Qwen2.5-VL's processor for text and images; no video processor, so no torchvision."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        # The stock __init__ would pass a video processor on to ProcessorMixin; set what it sets
        # (the two placeholder tokens and their ids) and register only the two parts we have.
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)

    def __call__(self, images=None, text=None, videos=None, **kwargs):
        if videos is not None:
            raise NotImplementedError(
                f"{type(self).__name__} has no video processor; install torchvision and use AutoProcessor"
            )
        _check_image_count(text, images, self.image_token)
        return super().__call__(images=images, text=text, **kwargs)

    def to_dict(self):
        out = super().to_dict()
        out["processor_class"] = STOCK_PROCESSOR_CLASS
        return out

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        files = super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        d = Path(save_directory)
        tok_cfg = d / "tokenizer_config.json"  # ProcessorMixin writes this class's name there
        if tok_cfg.is_file():
            cfg = json.loads(tok_cfg.read_text())
            cfg["processor_class"] = STOCK_PROCESSOR_CLASS
            tok_cfg.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
        self.tokenizer.init_kwargs["processor_class"] = STOCK_PROCESSOR_CLASS
        self.image_processor.save_pretrained(d)  # preprocessor_config.json, for older loaders
        return files


def _leaves(images) -> int:
    """How many images `images` holds: one image, a list of them, or a list of lists per text."""
    if images is None:
        return 0
    if isinstance(images, (list, tuple)):
        return sum(_leaves(x) for x in images)
    return 1


def _check_image_count(text, images, image_token: str) -> None:
    """ValueError when the texts' image placeholders and the images differ in number.

    transformers 5.25's processor says so itself; 5.17's runs out of images mid-text and raises a
    bare StopIteration. Checked here so that every accepted release gives the same one line."""
    if text is None:
        return
    texts = [text] if isinstance(text, str) else list(text)
    tokens, given = sum(t.count(image_token) for t in texts), _leaves(images)
    if tokens != given:
        raise ValueError(
            f"the prompts hold {tokens} {image_token} tokens and {given} images: give one image per "
            "placeholder in the chat template"
        )
