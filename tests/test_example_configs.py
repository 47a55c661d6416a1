"""examples/configs: each loads, validates and holds the paper's settings (docs/method.md §4), every
line cites its source; cppo-train --dry-run prints the plan without loading a model."""

import re
from pathlib import Path

import pytest
import yaml

from cli.train import main
from cppo.rl.flags import config_from_yaml
from cppo.rl.memory import GIB, SHAPES, estimate
from cppo.rl.plan import run_shape

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "configs"
NAMES = ["cppo-3b", "grpo-3b", "cppo-7b", "cppo-3b-lora-1gpu"]

# docs/method.md §4 and the official launch scripts (vbdi/cppo verl/examples/cppo/run_qwen2_5_vl-*_virl39k.sh)
PAPER = {
    "lr": 1e-6,
    "lr_schedule": "constant",
    "warmup_steps": 0,
    "freeze_vision": False,
    "prompts_per_step": 512,
    "group_size": 5,
    "mini_batch_size": 64 * 5,  # 64 prompts
    "ppo_epochs": 1,
    "clip_low": 0.2,
    "clip_high": 0.2,
    "dual_clip": 3.0,
    "beta": 0.01,
    "kl_estimator": "k3",
    "loss_agg": "token-mean",
    "adv_std_scale": True,
    "cpl_lambda": 0.01,
    "cpl_tau": 0.1,
    "top_percent": 0.5,
    "cpl_rows": 1.0,
    "cpl_gate": "positive_advantage",
    "selector": "relative",
    "cpl_divergence": "k3",
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "max_prompt_length": 512,
    "max_new_tokens": 4096,
    "epochs": 2,
    "drop_last": True,  # verl's train dataloader: floor(N / 512) steps an epoch
    "max_steps": None,  # from epochs and the data
    "eval_data": "hiyouga/geometry3k@test",
    "eval_limit": None,  # the whole split, as verl's validation
    "eval_samples": 1,  # greedy, one answer per item
    "dtype": "bfloat16",
    "gradient_checkpointing": True,
    "weight_decay": 0.01,
    "grad_clip": 1.0,
    "reward_weights": [0.9, 0.1],
    "rewards": ["accuracy_mathruler", "format"],
    "drop_multi_image": True,
    "min_image_side": 28,
    "boxed_answer": True,
    "min_pixels": 3136,
    "max_pixels": 12845056,
}
PER_CONFIG = {
    "cppo-3b": dict(
        algo="cppo", model="Qwen/Qwen2.5-VL-3B-Instruct", micro_batch_size=8, eval_every=31, lora_r=0
    ),
    "grpo-3b": dict(
        algo="grpo", model="Qwen/Qwen2.5-VL-3B-Instruct", micro_batch_size=8, eval_every=31, lora_r=0
    ),
    "cppo-7b": dict(
        algo="cppo", model="Qwen/Qwen2.5-VL-7B-Instruct", micro_batch_size=2, eval_every=10, lora_r=0
    ),
    "cppo-3b-lora-1gpu": dict(
        algo="cppo", model="Qwen/Qwen2.5-VL-3B-Instruct", micro_batch_size=8, lora_r=64
    ),
}


@pytest.mark.parametrize("name", NAMES)
def test_each_config_validates_and_holds_the_papers_settings(name):
    cfg = config_from_yaml(CONFIGS / f"{name}.yaml")  # validated as it is built
    expected = {**PAPER, **PER_CONFIG[name]}
    actual = {key: getattr(cfg, key) for key in expected}
    assert actual == expected
    assert cfg.rollouts // cfg.mini_batch_size == 8  # 8 optimizer updates per step


@pytest.mark.parametrize("name", NAMES)
def test_every_setting_cites_its_source(name):
    text = (CONFIGS / f"{name}.yaml").read_text()
    tags = set(re.findall(r"^#\s+\[(\w+)\]", text, flags=re.M))  # the legend in the header
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert len(lines) == len(yaml.safe_load(text))
    for line in lines:
        cited = re.findall(r"\[(\w+)\]", line.partition("  # ")[2])
        assert cited and set(cited) <= tags, line


def test_the_grpo_baseline_is_the_cppo_run_without_cpl():
    cppo, grpo = (yaml.safe_load((CONFIGS / f"{n}.yaml").read_text()) for n in ("cppo-3b", "grpo-3b"))
    differ = {k for k in cppo if cppo[k] != grpo[k]}
    assert differ == {"algo", "output_dir"} and grpo["algo"] == "grpo"


def test_the_lora_variant_changes_only_lora_and_the_run_directory():
    full, lora = (
        yaml.safe_load((CONFIGS / f"{n}.yaml").read_text()) for n in ("cppo-3b", "cppo-3b-lora-1gpu")
    )
    assert {k for k in full if full[k] != lora[k]} == {"output_dir"}
    assert set(lora) - set(full) == {"lora_r", "lora_alpha", "lora_dropout", "lora_targets"}


def test_dry_run_prints_the_plan_without_loading_a_model(capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("--dry-run loaded a model")

    monkeypatch.setattr("transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained", refuse)
    assert main(["--config", str(CONFIGS / "cppo-3b.yaml"), "--dry-run", "--dry-run-gpus", "8"]) == 0
    out = capsys.readouterr().out
    resolved, _, plan = out.partition("# plan\n")
    assert yaml.safe_load(resolved)["prompts_per_step"] == 512
    assert "steps per epoch: unknown (the data is not readable here)" in plan  # ./data/ViRL39K is not here
    assert "max_steps: unknown until the data is read (2 epochs)" in plan
    assert "updates per step: 8 (2560 rollouts = 512 prompts x 5, mini-batches of 320" in plan
    assert "processes: 8 (--dry-run-gpus); rollouts per process: 320" in plan
    assert "Qwen2.5-VL-3B's published sizes" in plan
    cfg = config_from_yaml(CONFIGS / "cppo-3b.yaml")
    for layout, fsdp in (("FSDP2", True), ("replicated", False)):
        row = next(line for line in plan.splitlines() if line.startswith(f"| {layout} |"))
        peak = float(row.rstrip(" |").rsplit("|", 1)[1])
        assert peak == pytest.approx(
            estimate(SHAPES["3b"], run_shape(cfg, SHAPES["3b"], 8, fsdp))["peak"] / GIB, abs=0.05
        )


def test_dry_run_counts_the_data_and_sets_max_steps_from_epochs(tmp_path, capsys):
    from tests.published_data import write_virl39k

    virl = write_virl39k(tmp_path / "ViRL39K")
    flags = ["--config", str(CONFIGS / "cppo-3b-lora-1gpu.yaml"), "--model", "none", "--data", str(virl)]
    assert (
        main(
            [
                *flags,
                "--prompts-per-step",
                "2",
                "--mini-batch-size",
                "10",
                "--micro-batch-size",
                "2",
                "--dry-run",
            ]
        )
        == 0
    )
    plan = capsys.readouterr().out.partition("# plan\n")[2]
    assert "6 samples; dropped by the preprocessing 2: 1 multi-image, 1 prompt over 512 tokens" in plan
    assert "steps per epoch: 3.0 (6 samples / 2 prompts a step, whole steps: drop_last)" in plan
    assert "max_steps: 6 (2 epochs)" in plan
    assert "| 1 GPU |" in plan and "(MiB)" in plan  # the demo model (--model none), one process


@pytest.mark.slow
def test_dry_run_of_the_paper_config_on_virl39k_sized_data_prints_the_official_150_steps(
    tmp_path, capsys, monkeypatch
):
    # the 38,870 samples of ViRL39K after the official preprocessing, in its layout at the config's
    # ./data/ViRL39K; verl's dataloader (drop_last=True) makes floor(38,870 / 512) = 75 steps an
    # epoch, 150 over 2 epochs (one stream would make ceil(77,740 / 512) = 152)
    import datasets
    from PIL import Image

    root = tmp_path / "data" / "ViRL39K"
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (64, 48), "white").save(root / "images" / "Processed-0-0.jpg")
    n = 38_870
    rows = {
        "question": ["<image>How many shapes are there?"] * n,
        "answer": ["\\boxed{3}"] * n,
        "image": [["images/Processed-0-0.jpg"]] * n,
        "category": ["counting"] * n,
        "qid": [f"q{i}" for i in range(n)],
    }
    datasets.Dataset.from_dict(rows).to_parquet(str(root / "39Krelease.parquet"))
    monkeypatch.chdir(tmp_path)
    assert main(["--config", str(CONFIGS / "cppo-3b.yaml"), "--dry-run"]) == 0
    plan = capsys.readouterr().out.partition("# plan\n")[2]
    assert "data/ViRL39K@train: 38870 samples" in plan
    assert "steps per epoch: 75.0 (38870 samples / 512 prompts a step, whole steps: drop_last)" in plan
    assert "max_steps: 150 (2 epochs)" in plan
    capsys.readouterr()
    assert main(["--config", str(CONFIGS / "cppo-3b.yaml"), "--no-drop-last", "--dry-run"]) == 0
    assert "max_steps: 152 (2 epochs)" in capsys.readouterr().out
