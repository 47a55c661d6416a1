"""Two CPU processes (torchrun, gloo) train CPPOTrainer for 2 steps; each writes, per row of each
generation, the hash of its image and of its I- view, and the logged cpl/loss (tests/test_trl.py)."""

import hashlib
import json
import sys
import warnings

import torch
from datasets import Dataset
from ddp_train import exit_now
from transformers import Qwen2_5_VLForConditionalGeneration

from cppo.integrations.trl import CPPOConfig, CPPOTrainer
from cppo.models import ImageOnlyQwen2_5_VLProcessor, demo_model_path
from cppo.prompt import build_messages
from cppo.toy.shapes import split_items

warnings.filterwarnings("ignore")
out_dir = sys.argv[1]
items = split_items("train", 6)
dataset = Dataset.from_list(
    [{"prompt": build_messages(it.question), "image": it.image, "answer": it.answer} for it in items]
)


def reward(completions, answer, **kwargs):
    texts = [c[0]["content"] for c in completions]
    return [float(a in t) + 0.1 * min(len(t), 40) / 40 for t, a in zip(texts, answer)]


args = CPPOConfig(
    output_dir=out_dir, use_cpu=True, bf16=False, report_to=[], save_strategy="no", logging_steps=1,
    max_steps=2, per_device_train_batch_size=3, generation_batch_size=6, num_generations=2,
    max_completion_length=12, gradient_checkpointing=False, learning_rate=1e-4, temperature=2.0,
    cpl_lambda=0.5,
)  # fmt: skip
model = Qwen2_5_VLForConditionalGeneration.from_pretrained(demo_model_path(), dtype=torch.float32)
processor = ImageOnlyQwen2_5_VLProcessor.from_pretrained(demo_model_path(), padding_side="left")
trainer = CPPOTrainer(
    model=model, reward_funcs=[reward], args=args, train_dataset=dataset, processing_class=processor
)
rank, rows = trainer.accelerator.process_index, []
draw = trainer._views


def recording_views(inputs, out):
    views = draw(inputs, out)
    for x, minus in zip(inputs, views["cpl_pixel_values_minus"]):
        image = hashlib.md5(x["image"].tobytes()).hexdigest()
        rows.append([trainer.state.global_step, image, hashlib.md5(minus.numpy().tobytes()).hexdigest()])
    return views


trainer._views = recording_views
trainer.train()
cpl = [h["cpl/loss"] for h in trainer.state.log_history if "cpl/loss" in h]
with open(f"{out_dir}/rank{rank}.json", "w") as f:
    json.dump({"rows": rows, "cpl": cpl, "steps": trainer.state.global_step}, f)
exit_now()  # no interpreter teardown: see ddp_train.exit_now
