"""An image-only stand-in for `Qwen2_5_VLProcessor`, for machines without torchvision.

In transformers 5 the stock processor always builds a video processor, which needs torchvision;
this project never installs torchvision on CPU machines, so `AutoProcessor` cannot load there.
`ImageTextProcessor` does the stock processor's image path only, with the same pieces: the
Qwen2-VL image processor (PIL backend), the tokenizer, and the same expansion of each
`<|image_pad|>` into grid_t * grid_h * grid_w / merge_size**2 pads before tokenising. It returns
the same `input_ids`, `attention_mask`, `pixel_values`, `image_grid_thw` and `mm_token_type_ids`
(1 on image pads, 2 on video pads, 0 elsewhere). It saves the files the stock processor saves
(tokenizer, `preprocessor_config.json`, `chat_template.jinja`, `processor_config.json` naming
`Qwen2_5_VLProcessor`), so a checkpoint saved here loads with `AutoProcessor` where torchvision
is installed. Videos are refused with an error.

Letters: N prompts, L tokens, P image patches of the whole batch.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image
from transformers import BatchFeature

IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"
PROCESSOR_CLASS = "Qwen2_5_VLProcessor"


def flatten_images(images) -> list[Image.Image]:
    """One flat list of images from an image, a list, or a list of per-prompt lists."""
    if images is None:
        return []
    if isinstance(images, Image.Image):
        return [images]
    flat = []
    for x in images:
        flat.extend(flatten_images(x) if isinstance(x, (list, tuple)) else [x])
    return flat


class ImageTextProcessor:
    """Qwen2.5-VL's processor for text and images (no video), built from an image processor and tokenizer."""

    def __init__(self, image_processor, tokenizer, chat_template: str | None = None):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.chat_template = chat_template or tokenizer.chat_template
        self.image_token = IMAGE_TOKEN
        self.video_token = VIDEO_TOKEN
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.video_token_id = tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)

    # ---- text + images -> model inputs ----
    def __call__(
        self,
        text=None,
        images=None,
        videos=None,
        padding=False,
        return_tensors=None,
        padding_side: str | None = None,
        **kwargs,
    ) -> BatchFeature:
        if videos is not None:
            raise NotImplementedError(
                "ImageTextProcessor handles images only; install torchvision for videos"
            )
        if text is None:
            raise ValueError("text is required (the chat-templated prompt with one <|image_pad|> per image)")
        texts = [text] if isinstance(text, str) else list(text)
        flat = flatten_images(images)
        data: dict = {}
        if flat:
            img = self.image_processor(images=flat, return_tensors="pt")
            data["pixel_values"] = img["pixel_values"]  # (P, C*t*p*p) = (P, 1176)
            data["image_grid_thw"] = img["image_grid_thw"]  # (num_images, 3)
            texts = self.expand_image_tokens(texts, img["image_grid_thw"])
        elif any(IMAGE_TOKEN in t for t in texts):
            raise ValueError("the text has <|image_pad|> placeholders but no images were given")
        tok_kwargs = dict(padding=padding, **kwargs)
        if padding_side is not None:
            tok_kwargs["padding_side"] = padding_side
        enc = self.tokenizer(texts, **tok_kwargs)
        data["input_ids"] = enc["input_ids"]
        data["attention_mask"] = enc["attention_mask"]
        data["mm_token_type_ids"] = [
            [1 if t == self.image_token_id else 2 if t == self.video_token_id else 0 for t in row]
            for row in enc["input_ids"]
        ]
        order = ["input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"]
        return BatchFeature({k: data[k] for k in order if k in data}, tensor_type=return_tensors)

    def expand_image_tokens(self, texts: list[str], image_grid_thw: torch.Tensor) -> list[str]:
        """Replace the i-th `<|image_pad|>` of the batch by grid_t*grid_h*grid_w/merge**2 pads."""
        merge = self.image_processor.merge_size
        counts = (image_grid_thw.prod(-1) // merge**2).tolist()
        n_placeholders = sum(t.count(IMAGE_TOKEN) for t in texts)
        if n_placeholders != len(counts):
            raise ValueError(
                f"{n_placeholders} <|image_pad|> placeholders in the text but {len(counts)} images"
            )
        out, i = [], 0
        for t in texts:
            pieces = t.split(IMAGE_TOKEN)
            expanded = pieces[0]
            for piece in pieces[1:]:
                expanded += IMAGE_TOKEN * counts[i] + piece
                i += 1
            out.append(expanded)
        return out

    # ---- chat template and decoding, delegated to the tokenizer ----
    def apply_chat_template(
        self, conversation, add_generation_prompt: bool = False, tokenize: bool = False, **kwargs
    ):
        if tokenize:
            raise NotImplementedError(
                "tokenize=True needs the images: render text here, then call the processor"
            )
        kwargs.setdefault("chat_template", self.chat_template)
        return self.tokenizer.apply_chat_template(
            conversation, add_generation_prompt=add_generation_prompt, tokenize=False, **kwargs
        )

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids"]

    # ---- files ----
    def save_pretrained(self, save_directory: str | Path, **kwargs) -> None:
        d = Path(save_directory)
        d.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(d)
        self.image_processor.save_pretrained(d)
        (d / "chat_template.jinja").write_text(self.chat_template)
        (d / "processor_config.json").write_text(
            json.dumps({"processor_class": PROCESSOR_CLASS}, indent=2) + "\n"
        )

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> ImageTextProcessor:
        from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(path, **kwargs)
        template_file = Path(path) / "chat_template.jinja"
        template = template_file.read_text() if template_file.is_file() else None
        return cls(image_processor, tokenizer, chat_template=template or tokenizer.chat_template)

    def __repr__(self) -> str:
        return (
            f"ImageTextProcessor(tokenizer={type(self.tokenizer).__name__}, "
            f"image_processor={type(self.image_processor).__name__}, vocab={len(self.tokenizer)})"
        )
