"""ImageOnlyQwen2_5_VLProcessor: a real ProcessorMixin (no torchvision) whose outputs are the stock ones."""

import json

import pytest
import torch
from transformers import AutoTokenizer, ProcessorMixin, Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil

from cppo.models import ImageOnlyQwen2_5_VLProcessor, demo_model_path
from cppo.prompt import build_messages
from cppo.toy.shapes import split_items


@pytest.fixture(scope="module")
def proc():
    return ImageOnlyQwen2_5_VLProcessor.from_pretrained(demo_model_path())


@pytest.fixture(scope="module")
def batch():
    items = split_items("train", 2)
    images = [items[0].image, items[1].image.resize((84, 140)).convert("L")]  # two sizes, one greyscale
    return [it.question for it in items], images


def _texts(processor, questions):
    return [processor.apply_chat_template(build_messages(q), add_generation_prompt=True) for q in questions]


def _same(a, b, keys):
    for k in keys:
        assert torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])), k


def test_is_a_processor_mixin_without_a_video_processor(proc):
    assert isinstance(proc, ProcessorMixin) and isinstance(proc, Qwen2_5_VLProcessor)
    assert proc.get_attributes() == ["image_processor", "tokenizer"]
    assert not hasattr(proc, "video_processor")
    with pytest.raises(NotImplementedError, match="no video processor"):
        proc(text=["x"], videos=[torch.zeros(2, 3, 28, 28)])


def test_outputs_equal_image_processor_and_tokenizer_called_directly(proc, batch):
    questions, images = batch
    texts = _texts(proc, questions)
    out = proc(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt")
    image_proc = Qwen2VLImageProcessorPil.from_pretrained(demo_model_path())
    tok = AutoTokenizer.from_pretrained(demo_model_path())
    img = image_proc(images=images, return_tensors="pt")
    counts = (img["image_grid_thw"].prod(-1) // image_proc.merge_size**2).tolist()
    expanded = [t.replace("<|image_pad|>", "<|image_pad|>" * n) for t, n in zip(texts, counts)]
    enc = tok(expanded, padding=True, padding_side="left", return_tensors="pt")
    _same(out, {**img, **enc}, ["input_ids", "attention_mask", "pixel_values", "image_grid_thw"])
    pad_id = tok.convert_tokens_to_ids("<|image_pad|>")
    assert torch.equal(out["mm_token_type_ids"], (enc["input_ids"] == pad_id).long())


def test_chat_template_with_images_tokenizes_like_call(proc, batch):
    questions, images = batch
    content = [{"type": "image", "image": images[0]}, {"type": "text", "text": questions[0]}]
    conv = [[{"role": "user", "content": content}]]
    out = proc.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True,
                                   return_tensors="pt")
    text = proc.apply_chat_template(conv, add_generation_prompt=True)
    ref = proc(text=text, images=[images[0]], return_tensors="pt")
    _same(out, ref, ["input_ids", "pixel_values", "image_grid_thw"])


def test_saved_checkpoint_names_the_stock_class_and_reloads(proc, batch, tmp_path):
    proc.save_pretrained(tmp_path)
    for name in ("processor_config.json", "tokenizer_config.json"):
        assert json.loads((tmp_path / name).read_text())["processor_class"] == "Qwen2_5_VLProcessor"
    assert (tmp_path / "preprocessor_config.json").is_file()
    questions, images = batch
    texts = _texts(proc, questions)
    again = ImageOnlyQwen2_5_VLProcessor.from_pretrained(tmp_path)
    a = proc(text=texts, images=images, padding=True, return_tensors="pt")
    _same(a, again(text=texts, images=images, padding=True, return_tensors="pt"), a.keys())


def test_stock_auto_processor_agrees_where_torchvision_is_installed(proc, batch):
    pytest.importorskip("torchvision")
    from transformers import AutoProcessor

    stock = AutoProcessor.from_pretrained(demo_model_path())
    questions, images = batch
    texts = _texts(stock, questions)
    a = proc(text=texts, images=images, padding=True, return_tensors="pt")
    b = stock(text=texts, images=images, padding=True, return_tensors="pt")
    _same(a, b, ["input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids"])
