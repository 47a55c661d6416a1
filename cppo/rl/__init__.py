"""cppo.rl: a lean GRPO / CPPO / PAPO training loop for Qwen2.5-VL.

Files, each read top to bottom:
    loop.py       the training loop (`run_training`), one step after another
    run.py        `setup_run(cfg) -> Run`: processes, data, policy, reference, optimizer, resume
    config.py     TrainConfig: every field documented, with its rule; bounds.py holds the rules
    flags.py      flags and YAML files into a TrainConfig (defaults < --config < flags), config.yaml out
    launch.py     the checks that need the launch (`check_launch`), max_steps from epochs
    plan.py       what a run will do, before it does it (`--dry-run`); memory.py its per-GPU memory
    data.py       the samples of a run, checked up front (`PromptDataset`, `open_dataset`, `shapes_data`)
    checks.py     the check and preprocessing of one sample, run by datasets' Dataset.map and cached
    prompt_count.py  the processor as the data meets it: pixel bounds, model positions, prompt tokens
    sources.py    where samples come from: hub ids, JSONL, parquet files and dataset folders,
                  save_to_disk folders, each with an optional @split; jsonl.py reads JSON Lines
    sampler.py    the resumable prompt order, with each prompt's view seed
    prefetch.py   the next step's host work (images, views, processor) in a background thread
    rollout.py    views, G samples per prompt, rewards and advantages of one step
    generation.py how many rows one `generate` call takes, and what seeds them
    rewards.py    the reward registry (accuracy, format, user functions), the weighted scorer, hangs
    update.py     the policy update: mini-batches of micro-batches, PPO-clip + KL + perception term
    passes.py     how each pass of the update runs (rows, views, trimming, FSDP stand-ins): MicroBatch
    perception.py the perception-term registry (--algo): grpo (none), cppo (cppo.loss.cpl_step), papo
    clip.py       gradient clipping by the global norm, sharded or not
    policy.py     the policy and its reference: loaded, float32 master weights, sharded under FSDP
    reference.py  the frozen reference: where it lives (sharded, or in CPU memory: --ref-offload)
    fsdp.py       FSDP2 sharding, switched on by an accelerate config
    ranks.py      what the processes agree on: metrics over every rank, decisions from rank 0, timeouts
    reporting.py  what a step reports (`StepLogger`), the run's `Counters`; logfiles.py writes the
                  files, curves.py draws curves.png, trackers.py feeds --report-to, summary.py the end
    checkpoint.py, manifest.py, atomic.py  checkpoints on disk, their COMPLETE manifest, atomic writes
    sharded.py    an FSDP run's checkpoints: each process writes its shards
    resume.py     the trainer state and resuming; signals.py stopping on a signal; rundir.py whose run
                  directory it is; threads.py the CPU threads, the cores other work leaves free
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
