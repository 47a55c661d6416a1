"""cppo.rl: a lean GRPO / CPPO / PAPO training loop for Qwen2.5-VL.

Files, each read top to bottom:
    config.py   TrainConfig (every field documented and a flag), YAML < flags, validation
    data.py     datasets (JSONL, HF save_to_disk, parquet) checked up front, the resumable sampler
    rewards.py  the reward registry (accuracy, format, user functions) and the weighted scorer
    evaluate.py avg@K accuracy and format per question type (cppo-eval; imported on demand, it loads
                transformers)
"""

from cppo.rl.config import ConfigError, TrainConfig, parse_args
from cppo.rl.data import (
    DataError,
    Draw,
    PromptDataset,
    PromptSampler,
    Sample,
    find_split,
    open_dataset,
    shapes_data,
    view_seed,
)
from cppo.rl.rewards import REWARDS, RewardResult, RewardScorer, get_reward, register_reward

__all__ = [
    "REWARDS",
    "ConfigError",
    "DataError",
    "Draw",
    "PromptDataset",
    "PromptSampler",
    "RewardResult",
    "RewardScorer",
    "Sample",
    "TrainConfig",
    "find_split",
    "get_reward",
    "open_dataset",
    "parse_args",
    "register_reward",
    "shapes_data",
    "view_seed",
]
