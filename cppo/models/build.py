"""Tiny Qwen2.5-VL models built from a config, and the one loader every command uses.

`build_tiny_model` returns the real `Qwen2_5_VLForConditionalGeneration` (vision tower with window
attention and 2x2 patch merger, M-RoPE text decoder) at a size that trains on two CPU cores, with
the offline tokenizer of `cppo.models.tokenizer` and the Qwen2-VL image processor (PIL backend).
Departures from Qwen2.5-VL-3B, all of size only: hidden sizes, depths and head counts are small;
the vocabulary is a task BPE (see `tokenizer.py`); the image processor caps images at
`image_size`**2 pixels so a 112 px image gives 8 x 8 patches and 16 image tokens.

`load_model_and_processor` loads a directory written by `save_pretrained` (or a hub id already
in the cache) with the stock `AutoProcessor` where it loads (torchvision installed), and with
`ImageOnlyQwen2_5_VLProcessor` (the stock class without its video processor) otherwise; both give
the same tensors.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from cppo.models.model_dir import ModelError, check_model_path, check_processor, config_of
from cppo.models.tokenizer import build_tokenizer
from cppo.models.versions import check_transformers
from cppo.models.vl_processor import ImageOnlyQwen2_5_VLProcessor


@dataclass
class TinyVLMConfig:
    """Sizes of a tiny Qwen2.5-VL. Defaults: the 0.72 M-parameter model of docs/models.md."""

    hidden_size: int = field(default=128, metadata={"help": "text decoder width"})
    num_layers: int = field(default=2, metadata={"help": "text decoder layers"})
    num_heads: int = field(
        default=4, metadata={"help": "attention heads (head_dim = hidden_size / num_heads)"}
    )
    num_kv_heads: int = field(default=2, metadata={"help": "key/value heads (grouped-query attention)"})
    intermediate_size: int = field(default=384, metadata={"help": "text MLP width"})
    vocab_size: int | None = field(
        default=None, metadata={"help": "embedding rows; None: the tokenizer's length rounded up to 64"}
    )
    bpe_vocab_size: int = field(
        default=1024, metadata={"help": "target size of the task BPE (may stop short)"}
    )
    vision_hidden_size: int = field(default=64, metadata={"help": "vision tower width"})
    vision_depth: int = field(
        default=2, metadata={"help": "vision tower blocks (the last one full attention)"}
    )
    vision_heads: int = field(default=4, metadata={"help": "vision attention heads"})
    vision_intermediate_size: int = field(default=128, metadata={"help": "vision MLP width"})
    out_hidden_size: int | None = field(
        default=None, metadata={"help": "patch merger output; must equal hidden_size (None: hidden_size)"}
    )
    image_size: int = field(
        default=112, metadata={"help": "largest image side, in px, kept without downscaling"}
    )
    max_position_embeddings: int = field(default=2048, metadata={"help": "rope positions"})
    tie_word_embeddings: bool = field(default=True, metadata={"help": "as in Qwen2.5-VL-3B"})

    def __post_init__(self):
        if self.out_hidden_size is None:
            self.out_hidden_size = self.hidden_size
        if self.out_hidden_size != self.hidden_size:
            raise ValueError(
                f"out_hidden_size ({self.out_hidden_size}) must equal hidden_size ({self.hidden_size}): "
                "the merger's output is spliced into the text embeddings"
            )
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must divide by num_heads ({self.num_heads}) and "
                f"num_heads by num_kv_heads ({self.num_kv_heads})"
            )
        if (self.hidden_size // self.num_heads) % 4:
            raise ValueError(
                f"head_dim ({self.hidden_size // self.num_heads}) must be a multiple of 4 for M-RoPE"
            )
        if self.vision_hidden_size % self.vision_heads:
            raise ValueError(
                f"vision_hidden_size ({self.vision_hidden_size}) must divide by vision_heads "
                f"({self.vision_heads})"
            )
        if self.image_size % 28:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of 28 (patch 14 x merge 2)")


def mrope_section(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies over (time, height, width) as Qwen does (16/24/24 of 64)."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def build_processor(config: TinyVLMConfig | None = None) -> ImageOnlyQwen2_5_VLProcessor:
    from transformers import Qwen2VLImageProcessorPil

    config = config or TinyVLMConfig()
    tokenizer = build_tokenizer(config.bpe_vocab_size)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=config.image_size**2)
    return ImageOnlyQwen2_5_VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template
    )


def qwen_config(config: TinyVLMConfig, tokenizer):
    """The `Qwen2_5_VLConfig` of a tiny model whose special-token ids come from `tokenizer`."""
    from transformers import Qwen2_5_VLConfig

    ids = {
        t: tokenizer.convert_tokens_to_ids(t)
        for t in (
            "<|endoftext|>",
            "<|im_end|>",
            "<|image_pad|>",
            "<|video_pad|>",
            "<|vision_start|>",
            "<|vision_end|>",
        )
    }
    vocab = config.vocab_size or -(-len(tokenizer) // 64) * 64
    if vocab < len(tokenizer):
        raise ValueError(f"vocab_size ({vocab}) is smaller than the tokenizer ({len(tokenizer)} tokens)")
    head_dim = config.hidden_size // config.num_heads
    text = dict(
        vocab_size=vocab,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        max_position_embeddings=config.max_position_embeddings,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 1_000_000.0,
            "mrope_section": mrope_section(head_dim),
        },
        rms_norm_eps=1e-6,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=config.tie_word_embeddings,
    )
    vision = dict(
        depth=config.vision_depth,
        hidden_size=config.vision_hidden_size,
        num_heads=config.vision_heads,
        intermediate_size=config.vision_intermediate_size,
        out_hidden_size=config.out_hidden_size,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        fullatt_block_indexes=[config.vision_depth - 1],
    )
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=config.tie_word_embeddings,
    )


def build_tiny_model(config: TinyVLMConfig | None = None, seed: int = 0):
    """(model, processor): a randomly initialised tiny Qwen2.5-VL in float32, eval mode, and its processor.

    The same config and seed give the same weights and the same tokenizer on every machine.
    """
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration

    config = config or TinyVLMConfig()
    processor = build_processor(config)
    tok = processor.tokenizer
    qcfg = qwen_config(config, tok)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(qcfg).float().eval()
    end, pad = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    # As Qwen2.5-VL-Instruct's generation_config.json: stop at either end token, pad with <|endoftext|>.
    model.generation_config = GenerationConfig(
        eos_token_id=[end, pad],
        pad_token_id=pad,
        bos_token_id=pad,
        do_sample=False,
    )
    model.config.tiny_vlm = asdict(config)  # recorded in config.json for the model card
    return model, processor


def demo_model_path() -> Path:
    """The bundled warm-started checkpoint (cppo/assets/demo-model), the default model of every command."""
    return Path(__file__).resolve().parent.parent / "assets" / "demo-model"


def model_path_or_demo(model: str | None) -> str:
    """A command's ``--model``: the checked path or hub id (`check_model_path`), or the bundled demo
    model when None; FileNotFoundError (one line, what to pass) when that is not installed."""
    if model is not None:
        return check_model_path(model)
    path = demo_model_path()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"the bundled demo model is not at {path} (not trained yet, or an install without assets): "
            "pass --model DIR_OR_HUB_ID"
        )
    return str(path)


def _torchvision_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("torchvision") is not None


def load_processor(path_or_id: str | os.PathLike, weights_required: bool = False):
    """The stock `AutoProcessor` where it loads, otherwise `ImageOnlyQwen2_5_VLProcessor` (same tensors).

    The path or hub id is checked first (`check_model_path`: the weight files that are there too, and,
    with `weights_required`, that there are some: a sharded checkpoint's folder has none), the
    processor against the config after: ModelError (a ValueError) with one line when unusable."""
    return _load_processor(check_model_path(path_or_id, weights_required))


def _load_processor(path: str):
    processor = None
    if _torchvision_available():
        from transformers import AutoProcessor

        try:
            processor = AutoProcessor.from_pretrained(path)
        except Exception:  # a broken torchvision install (or a bad file, which the image-only
            pass  # processor's load below then names in one line)
    if processor is None:
        try:
            processor = ImageOnlyQwen2_5_VLProcessor.from_pretrained(path)
        except Exception as e:  # a library's error on a file the checks let through: one line
            raise ModelError(f"{path}: cannot load its processor ({_first_line(e)})") from e
    config = config_of(path)
    if config is not None:
        check_processor(processor, config, path)
    return processor


def load_model_and_processor(
    path_or_id: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None
):
    """(model in eval mode on `device`, processor) from a saved directory or a cached hub id.

    `dtype=None` loads float32 (what CPU training needs, whatever the checkpoint was saved in);
    pass `torch.bfloat16` (or "auto": the saved dtype) for GPU runs. The folder is checked before
    anything loads (cppo.models.model_dir: config, then tokenizer, then the weights' headers); a
    load that fails all the same (weights that do not fit the config) is a ModelError with one line.
    """
    from transformers import Qwen2_5_VLForConditionalGeneration
    from transformers.utils import logging as hf_logging

    check_transformers()  # a release below the floor would score without the image: refused first
    path = check_model_path(path_or_id)
    processor = _load_processor(path)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its table of missing keys: one line below says it instead
    try:
        model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            path, dtype=dtype or torch.float32, output_loading_info=True, ignore_mismatched_sizes=True
        )
    except Exception as e:  # SafetensorError, OSError: one line
        raise ModelError(f"{path}: cannot load the model's weights ({_first_line(e)})") from e
    finally:
        hf_logging.set_verbosity(verbosity)
    _check_loaded(path, info)
    return model.to(device).eval(), processor


def meta_model(path_or_id: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """The model `load_model_and_processor` would return for `path_or_id`, built on the meta device:
    its config.json and generation config read, not one weight (every tensor is a meta tensor, so
    it costs no memory). For FSDP, which shards it and then fills the shards (cppo.rl.fsdp)."""
    from transformers import GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    path = check_model_path(path_or_id)
    try:
        config = Qwen2_5_VLConfig.from_pretrained(path)
    except Exception as e:  # a config the checks let through that the library refuses: one line
        raise ModelError(f"{path}: cannot read its config ({_first_line(e)})") from e
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype)
    try:  # from_pretrained reads generation_config.json too (end tokens, sampling defaults)
        model.generation_config = GenerationConfig.from_pretrained(path)
    except OSError:  # none saved: the defaults derived from the config, as from_pretrained keeps
        pass
    return model.eval()


def _check_loaded(path: str, info: dict) -> None:
    """Refuse a model whose config asks for weights the files lack or hold in another shape:
    transformers would start those at random, without a word but a warning table."""
    missing, mismatched = info["missing_keys"], info["mismatched_keys"]
    if not (missing or mismatched):
        return
    parts = [f"{len(missing)} missing (e.g. {sorted(missing)[0]})"] if missing else []
    if mismatched:
        key, saved, wanted = sorted(mismatched, key=lambda m: m[0])[0]
        parts.append(
            f"{len(mismatched)} of another shape (e.g. {key}: saved {list(saved)}, config {list(wanted)})"
        )
    raise ModelError(
        f"{path}: its weights do not fit its config.json ({'; '.join(parts)}): the config was edited "
        "or comes from another model; restore the config saved with these weights"
    )


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")
