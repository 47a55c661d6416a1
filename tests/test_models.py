"""Tiny Qwen2.5-VL: tokenizer, processor equivalence, round trip, training, generation, batch helpers."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image
from transformers import Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from cppo.models import (
    SPECIAL_TOKENS,
    TinyVLMConfig,
    append_responses,
    encode_images,
    encode_prompts,
    generate_responses,
    load_model_and_processor,
    response_logits,
)
from cppo.prompt import build_messages
from tests.helpers import shapes_batch, shapes_items, tiny_model_and_processor

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None


# ---------------------------------------------------------------- tokenizer and template


def test_tokenizer_has_qwen_special_tokens_after_the_bpe():
    _, processor = tiny_model_and_processor()
    tok = processor.tokenizer
    ids = [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert len(SPECIAL_TOKENS) == 14
    assert ids == list(range(ids[0], ids[0] + 14))  # contiguous, in Qwen's order, after the BPE
    assert ids[-1] == len(tok) - 1
    for t in SPECIAL_TOKENS:
        assert tok(t, add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids(t)]
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert type(tok).__name__ == "Qwen2Tokenizer"


def test_task_words_are_single_tokens_and_any_text_round_trips():
    _, processor = tiny_model_and_processor()
    tok = processor.tokenizer
    for word in [" red", " blue", " circle", " triangle", " shapes", "3", "{yes", " left", " reasoning"]:
        assert len(tok(word, add_special_tokens=False)["input_ids"]) == 1, word
    assert len(tok("12", add_special_tokens=False)["input_ids"]) == 2  # digits split one by one, as in Qwen
    text = "Ünïcödé ✓ text the BPE never saw: 漢字 \\frac{1}{2}"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text  # byte-level fallback


def test_bpe_is_deterministic_across_processes():
    from cppo.models.tokenizer import bpe_vocab_and_merges

    code = "from cppo.models.tokenizer import bpe_vocab_and_merges as f; print(repr(f()))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert other.strip() == repr(bpe_vocab_and_merges())


def test_chat_template_is_qwen25vl_with_default_system_prompt():
    _, processor = tiny_model_and_processor()
    text = processor.apply_chat_template(
        build_messages("Q?", 2, instruction=None), add_generation_prompt=True
    )
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|image_pad|><|vision_end|>"
        "Q?<|im_end|>\n<|im_start|>assistant\n"
    )
    own_system = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}]
    assert (
        processor.apply_chat_template(own_system)
        == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
    )


# ---------------------------------------------------------------- processor


def _images():
    # sizes chosen to exercise smart_resize: kept, rounded, upscaled to min_pixels, downscaled to max_pixels
    return [
        Image.new("RGB", size, (i * 40, 100, 200))
        for i, size in enumerate([(112, 112), (84, 56), (30, 40), (224, 160)])
    ]


def test_processor_matches_a_manual_expansion_of_image_pads():
    _, processor = tiny_model_and_processor()
    tok, ip = processor.tokenizer, processor.image_processor
    imgs = _images()
    per_prompt = [[imgs[0]], [imgs[1], imgs[2]], [imgs[3]]]
    texts = [
        processor.apply_chat_template(
            build_messages(f"question {i}" + " long" * i * 3, len(p)), add_generation_prompt=True
        )
        for i, p in enumerate(per_prompt)
    ]
    out = processor(text=texts, images=per_prompt, padding=True, padding_side="left", return_tensors="pt")

    pad_id = tok.convert_tokens_to_ids("<|image_pad|>")
    manual, grids = [], []
    image_iter = iter(imgs)
    for text in texts:
        row = []
        for t in tok(text, add_special_tokens=False)["input_ids"]:
            if t != pad_id:
                row.append(t)
                continue
            w, h = next(image_iter).size
            rh, rw = smart_resize(h, w, factor=28, min_pixels=56 * 56, max_pixels=112 * 112)
            grids.append([1, rh // 14, rw // 14])
            row += [pad_id] * (rh // 14 * rw // 14 // 4)  # grid_t*grid_h*grid_w / merge**2
        manual.append(row)
    L = max(len(r) for r in manual)
    expect_ids = torch.tensor([[tok.pad_token_id] * (L - len(r)) + r for r in manual])
    expect_attn = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in manual])
    assert torch.equal(out["input_ids"], expect_ids)
    assert torch.equal(out["attention_mask"], expect_attn)
    assert torch.equal(out["mm_token_type_ids"], (expect_ids == pad_id).long())
    assert out["image_grid_thw"].tolist() == grids
    assert grids[0] == [1, 8, 8] and grids[2] == [1, 6, 4] and grids[3][1] * grids[3][2] <= 64
    direct = ip(images=imgs, return_tensors="pt")
    assert out["pixel_values"].shape == (sum(g[1] * g[2] for g in grids), 1176)
    assert torch.equal(out["pixel_values"], direct["pixel_values"])


def test_processor_refuses_placeholder_image_mismatch():
    _, processor = tiny_model_and_processor()
    text = processor.apply_chat_template(build_messages("q", 2), add_generation_prompt=True)
    # checked before the stock processor (5.17 would raise a bare StopIteration)
    with pytest.raises(ValueError, match="2 <\\|image_pad\\|> tokens and 1 images"):
        processor(text=[text], images=[_images()[0]])


@pytest.mark.skipif(not HAS_TORCHVISION, reason="stock AutoProcessor for Qwen2.5-VL needs torchvision")
def test_processor_matches_stock_autoprocessor(tmp_path):
    from transformers import AutoProcessor

    _, processor = tiny_model_and_processor()
    processor.save_pretrained(tmp_path)
    stock = AutoProcessor.from_pretrained(tmp_path)
    assert type(stock).__name__ == "Qwen2_5_VLProcessor"
    items = shapes_items(3, seed=7)
    ours = encode_prompts(processor, [it.question for it in items], [[it.image] for it in items])
    theirs = encode_prompts(stock, [it.question for it in items], [[it.image] for it in items])
    for k in ours:
        assert torch.allclose(ours[k].float(), theirs[k].float(), atol=1e-5), k


# ---------------------------------------------------------------- loading and saving


def test_save_load_round_trip_gives_identical_logits(tmp_path):
    model, processor = tiny_model_and_processor()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_proc = load_model_and_processor(tmp_path)
    assert isinstance(loaded, Qwen2_5_VLForConditionalGeneration)
    items = shapes_items(3, seed=8)
    a = encode_prompts(processor, [it.question for it in items], [[it.image] for it in items])
    b = encode_prompts(loaded_proc, [it.question for it in items], [[it.image] for it in items])
    for k in a:
        assert torch.equal(a[k], b[k]), k
    with torch.no_grad():
        assert torch.equal(model(**a).logits, loaded(**b).logits)


def test_missing_model_path_fails_at_once_with_a_clear_message(monkeypatch, tmp_path):
    t0 = time.time()
    with pytest.raises(FileNotFoundError, match="model path '/no/such/model' does not exist"):
        load_model_and_processor("/no/such/model")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model_and_processor(tmp_path / "typo")  # looks like org/name, but its folder is local
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="not a local directory and not in the hub cache"):
        load_model_and_processor("nobody-org/no-such-model-xyz")
    assert time.time() - t0 < 2.0  # no hub retries


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model_and_processor(tmp_path)


def test_config_validation_says_what_to_change():
    with pytest.raises(ValueError, match="must equal hidden_size"):
        TinyVLMConfig(out_hidden_size=64)
    with pytest.raises(ValueError, match="multiple of 28"):
        TinyVLMConfig(image_size=100)


# ---------------------------------------------------------------- training and generation


def test_model_trains_loss_falls():
    torch.manual_seed(0)
    model, processor = tiny_model_and_processor()
    model.train()
    items, batch = shapes_batch(processor, 4, seed=1)
    tok = processor.tokenizer
    rows = [tok(f"<think>x</think> \\boxed{{{it.answer}}}<|im_end|>")["input_ids"] for it in items]
    T = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_token_id] * (T - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows]).bool()
    inputs = append_responses(batch, ids, mask)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        loss = torch.nn.functional.cross_entropy(response_logits(model, inputs)[mask], ids[mask])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses
    vision_grad = model.model.visual.patch_embed.proj.weight
    assert vision_grad.grad is not None and vision_grad.grad.abs().sum() > 0  # the image is in the graph


def test_left_padded_batch_generates_what_each_prompt_generates_alone():
    model, processor = tiny_model_and_processor(seed=3)
    items = shapes_items(3, seed=2)
    qs = [items[0].question, items[1].question + " Be brief and careful.", "Count."]
    imgs = [[it.image] for it in items]
    batch = encode_prompts(processor, qs, imgs)
    assert len(set(batch["attention_mask"].sum(1).tolist())) == 3  # three prompt lengths: real padding
    together, _ = generate_responses(model, processor, batch, max_new_tokens=12, do_sample=False)
    for i in range(3):
        alone, _ = generate_responses(
            model,
            processor,
            encode_prompts(processor, [qs[i]], [imgs[i]]),
            max_new_tokens=12,
            do_sample=False,
        )
        T = alone.shape[1]
        assert torch.equal(together[i, :T], alone[0]), i


def test_teacher_forced_logits_equal_generation_scores():
    model, processor = tiny_model_and_processor(seed=4)
    _, batch = shapes_batch(processor, 3, seed=3)
    gen = model.generate(
        **batch,
        max_new_tokens=8,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
        eos_token_id=[],
        pad_token_id=processor.tokenizer.pad_token_id,
    )
    L = batch["input_ids"].shape[1]
    ids = gen.sequences[:, L:]  # (N, T)
    mask = torch.ones_like(ids, dtype=torch.bool)
    inputs = append_responses(batch, ids, mask)
    assert inputs["prompt_length"] == L
    assert torch.equal(inputs["mm_token_type_ids"][:, L:], torch.zeros_like(ids))
    with torch.no_grad():
        logits = response_logits(model, inputs)  # (N, T, V)
    scores = torch.stack(gen.scores, 1)  # (N, T, V)
    assert torch.allclose(logits.log_softmax(-1), scores.log_softmax(-1), atol=1e-4)
    # without mm_token_type_ids Qwen2.5-VL falls back to 1-D positions: the logits change
    no_mm = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}
    with pytest.raises(ValueError, match="mm_token_type_ids"):
        append_responses({k: v for k, v in batch.items() if k != "mm_token_type_ids"}, ids, mask)
    with torch.no_grad():
        fwd = {k: v for k, v in no_mm.items() if k != "prompt_length"}
        assert not torch.allclose(model(**fwd).logits[:, L - 1 : -1], logits, atol=1e-4)


def test_generate_responses_stops_at_im_end_and_masks_vision_tokens(monkeypatch):
    model, processor = tiny_model_and_processor()
    tok = processor.tokenizer
    _, batch = shapes_batch(processor, 2, seed=5)
    L = batch["input_ids"].shape[1]
    (a,), (b,) = (tok(w, add_special_tokens=False)["input_ids"] for w in (" red", "3"))
    end, pad, img, vs = (
        tok.convert_tokens_to_ids(t)
        for t in ("<|im_end|>", "<|endoftext|>", "<|image_pad|>", "<|vision_start|>")
    )
    scripted = torch.tensor(
        [
            [a, img, b, end, a, b],  # vision token mid-response, then end, then junk
            [vs, a, a, b, a, b],
        ]
    )  # never ends: all kept but the vision token
    monkeypatch.setattr(model, "generate", lambda **kw: torch.cat([kw["input_ids"], scripted], 1))
    ids, mask = generate_responses(model, processor, batch, max_new_tokens=6)
    assert mask.tolist() == [[True, False, True, True, False, False], [False, True, True, True, True, True]]
    assert ids.tolist() == [[a, pad, b, end, pad, pad], [pad, a, a, b, a, b]]
    inputs = append_responses(batch, ids, mask)  # a masked vision token inside stays attended to
    assert inputs["attention_mask"][:, L:].tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]
    with torch.no_grad():
        response_logits(model, inputs)  # and the forward pass finds no stray image token


def test_generate_responses_real_model_masks_after_the_end():
    """Invariants on a real sampled batch (the exact cases are scripted in the test above)."""
    model, processor = tiny_model_and_processor(seed=5)
    tok = processor.tokenizer
    _, batch = shapes_batch(processor, 4, seed=6)
    ids, mask = generate_responses(model, processor, batch, max_new_tokens=10, generator_seed=0)
    again, _ = generate_responses(model, processor, batch, max_new_tokens=10, generator_seed=0)
    assert torch.equal(ids, again)  # seeded sampling is reproducible
    assert (
        ids.shape == mask.shape
        and ids.shape[1] <= 10
        and ids.dtype == torch.long
        and mask.dtype == torch.bool
    )
    ends = {tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id}  # <|endoftext|> also ends a response
    for row, m in zip(ids.tolist(), mask.tolist()):
        if not ends & set(row):
            assert len(row) == 10 and all(m)
        else:
            k = min(row.index(e) for e in ends & set(row))
            assert all(m[: k + 1]) and not any(m[k + 1 :])
            assert all(t == tok.pad_token_id for t in row[k + 1 :])


def test_encode_images_gives_the_prompt_batch_pixels():
    _, processor = tiny_model_and_processor()
    items, batch = shapes_batch(processor, 3, seed=9)
    pixels, grid = encode_images(processor, [[it.image] for it in items])
    assert torch.equal(pixels, batch["pixel_values"]) and torch.equal(grid, batch["image_grid_thw"])
    assert pixels.shape == (3 * 64, 1176) and grid.tolist() == [[1, 8, 8]] * 3


# ---------------------------------------------------------------- warm-start pieces


def test_warmstart_targets_end_with_im_end_and_describe_items_list_the_scene_left_to_right():
    import numpy as np

    from cppo.models.warmstart import describe_item, lr_at, response_batch

    _, processor = tiny_model_and_processor()
    tok = processor.tokenizer
    rng = np.random.default_rng(0)
    items = [describe_item(rng) for _ in range(5)] + shapes_items(3)
    ids, mask = response_batch(tok, items)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    for row, m, it in zip(ids.tolist(), mask.tolist(), items):
        n = sum(m)
        assert row[n - 1] == end and all(m[:n]) and not any(m[n:])
        assert all(x == tok.pad_token_id for x in row[n:])  # right-padded (cppo.models.inputs.right_pad)
        assert tok.decode(row[: n - 1]).endswith(f"\\boxed{{{it.answer}}}")
    for it in items[:5]:
        xs = sorted(it.scene.shapes, key=lambda s: s.x)
        assert it.answer == str(len(xs))
        positions = [it.reasoning.index(f"{s.color} {s.kind}") for s in xs]
        assert positions == sorted(positions)
    # warmup is linear to the peak, then cosine down to 10 % of it
    assert lr_at(0, 100, 10, 1.0) == 0.1 and lr_at(9, 100, 10, 1.0) == 1.0
    assert abs(lr_at(100, 100, 10, 1.0) - 0.1) < 1e-9 and lr_at(50, 100, 10, 1.0) < 1.0


def test_a_second_warmstart_stage_continues_the_first_and_the_card_gives_both_commands(tmp_path):
    """--init trains on from an earlier stage's weights; warmstart.json lists every stage, and the
    card prints one command per stage, the second reading the first's folder."""
    from cppo.models.card import render_card
    from cppo.models.warmstart import main as warmstart_main

    common = ["--batch-size", "2", "--threads", "1", "--eval-n", "0", "--log-every", "1", "--hidden", "64"]
    one, two = tmp_path / "one", tmp_path / "two"
    vision = ["--vision-hidden", "32", "--vision-depth", "3"]
    assert warmstart_main(["--out", str(one), "--steps", "2", "--warmup", "1", *common, *vision]) == 0
    first = load_model_and_processor(one)[0].state_dict()
    assert (
        warmstart_main(
            [
                "--out",
                str(two),
                "--init",
                str(one),
                "--steps",
                "3",
                "--warmup",
                "1",
                "--seed",
                "1",
                *common[:-2],
            ]
            + ["--relabel-frac", "0.5", "--type-weights", "0", "0", "1", "0"]
        )
        == 0
    )
    second = load_model_and_processor(two)[0].state_dict()
    assert second.keys() == first.keys() and any(not torch.equal(first[k], second[k]) for k in first)
    meta = json.loads((two / "warmstart.json").read_text())
    assert [s["steps"] for s in meta["stages"]] == [2, 3] and len(meta["stage_seconds"]) == 2
    assert meta["model"]["hidden_size"] == 64  # the first stage's shape, whatever --hidden says
    assert (meta["model"]["vision_hidden_size"], meta["model"]["vision_depth"]) == (32, 3)
    assert meta["model"]["vision_intermediate_size"] == 64
    ev = {"accuracy": 0.5, "format": 1.0, "chance": 0.4, "n": 2, "seed": 0, "blank_image_accuracy": 0.4}
    ev["per_type"] = {"further_left": {"n": 2, "accuracy": 0.5, "format": 1.0, "chance": 0.5}}
    for name in ("eval.json", "eval_slice.json"):
        (two / name).write_text(json.dumps(ev))
    card = render_card(two)
    assert "--out runs/warmstart-stage1 --steps 2" in card
    assert (
        "--out cppo/assets/demo-model --steps 3 --seed 1" in card and "--init runs/warmstart-stage1" in card
    )
    assert "--type-weights 0 0 1 0" in card and "Stage 2 of 2 (from the previous stage" in card
    first_cmd, second_cmd = [line for line in card.splitlines() if "cppo.models.warmstart --out" in line]
    assert "--vision-hidden 32 --vision-depth 3" in first_cmd  # the recipe rebuilds the same shape
    assert "--vision-hidden" not in second_cmd  # a later stage takes the shape from --init


def test_type_weights_draw_only_the_weighted_question_types():
    import numpy as np

    from cppo.models.warmstart import _question_type

    rng = np.random.default_rng(0)
    drawn = {_question_type(rng, np.array([0.0, 0.0, 1.0, 0.0])) for _ in range(20)}
    assert drawn == {"further_left"} and _question_type(rng, None) is None
