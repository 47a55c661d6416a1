"""cppo.rl: a lean GRPO / CPPO / PAPO training loop for Qwen2.5-VL.

Files, each read top to bottom:
    loop.py     the training loop (`run_training`), one step after another
    run.py      `setup_run(cfg) -> Run`: processes, data, policy, reference, optimizer, resume
    config.py   TrainConfig: every field documented, with its rule (bounds.py) and the checks across fields
    flags.py    flags and YAML files into a TrainConfig (defaults < --config < flags), config.yaml out
    launch.py   the checks that need the launch (`check_launch`), max_steps from epochs
    data.py     samples checked up front, with the paper's preprocessing (multi-image, small images,
                boxed answers, prompts over max_prompt_length tokens)
    checks.py   the check of one sample, run by datasets' Dataset.map and cached by its fingerprint
    prompt_count.py  the processor as the data meets it: pixel bounds, model positions, prompt tokens
    sources.py  where samples come from: hub ids (datasets.load_dataset), JSONL, parquet files and
                dataset folders, save_to_disk folders, each with an optional @split
    sampler.py  the resumable prompt order, with each prompt's view seed
    rollout.py  views, G samples per prompt, rewards and advantages of one step
    rewards.py  the reward registry (accuracy, format, user functions) and the weighted scorer
    update.py   the policy update: mini-batches of micro-batches, PPO-clip + KL + perception term
    perception.py  the perception-term registry (--algo): grpo (none), cppo (CPL), papo
    reporting.py  what a step reports (`StepLogger`), the run's `Counters`; logfiles.py writes the files
    checkpoint.py, resume.py, signals.py, atomic.py   checkpoints, the trainer state and resuming,
                stopping on a signal, atomic writes
    sharded.py  an FSDP run's checkpoints: each process writes its shards (torch.distributed.checkpoint)
    fsdp.py     FSDP2 sharding of the policy and the reference
    reference.py  the frozen reference: built, sharded under FSDP or kept in CPU memory (--ref-offload)
    evaluate.py avg@K accuracy and format per question type (cppo-eval; imported on demand, it loads
                transformers)
"""

from cppo.rl.config import ConfigError, TrainConfig
from cppo.rl.data import PromptDataset, Sample, open_dataset, shapes_data
from cppo.rl.flags import parse_args
from cppo.rl.rewards import REWARDS, RewardResult, RewardScorer, get_reward, register_reward
from cppo.rl.sampler import Draw, PromptSampler, view_seed
from cppo.rl.sources import DataError, find_split

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
