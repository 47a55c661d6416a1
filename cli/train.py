"""cppo-train: RL finetuning of a vision-language model with GRPO, CPPO or PAPO.

    cppo-train                                   # CPPO, bundled tiny demo model, shapes task, CPU: runs/cppo
    cppo-train --algo grpo                       # the baseline, into runs/grpo
    cppo-train --resume auto                     # continue runs/cppo from its latest checkpoint
    cppo-train --overwrite                       # delete the earlier run in runs/cppo, start again
    cppo-train --config run.yaml --max-steps 200 # a YAML file for defaults, flags on top
    cppo-train --report-to wandb --project vlm-rl # also to W&B (pip install 'cppo[wandb]'; trackio, mlflow)
    cppo-train --algo grpo --group-size 8 --print-config
    cppo-train --config examples/configs/cppo-3b.yaml --dry-run --dry-run-gpus 8   # the plan, no model

Every field of ``cppo.rl.config.TrainConfig`` is a flag (``cppo.rl.flags``); ``--help`` lists them with
their defaults.
The run directory (``--output-dir``, default ``runs/<algo>``) belongs to one run: a fresh run into a
folder that holds an earlier one (config.yaml, logs, tb/, curves.png, checkpoints/) is refused unless
``--resume auto`` continues it or ``--overwrite`` deletes those files (nothing else) and starts again.

Exit status, each with one line on stderr saying what happened and what to do:

- 0: done;
- 2: the config, the data, the run directory (unwritable, full), the resume point or a ``--report-to``
  tracker (not installed: the line names its extra) cannot be used, found before training (or a
  checkpoint write that failed: the previous checkpoint is intact);
- 3: stopped after ``max_bad_steps`` consecutive steps with a non-finite loss or gradient norm;
- 4: a collective between the processes waited longer than ``--dist-timeout`` (another process
  stalled or died); the line names this process's rank, the step and the phase it was in, and the
  operation. Under NCCL without ``TORCH_NCCL_BLOCKING_WAIT=1`` the process is aborted by torch's
  watchdog instead: its log names the timed-out collective and ``Timeout(ms)``;
- 5: a reward function timed out before returning anything ``--reward-hang-steps`` steps in a row
  (the line names it and its file; ``--drop-hung-rewards`` goes on without it instead);
- 130 / 143: stopped by SIGINT (Ctrl-C) / SIGTERM after checkpointing the last completed step.
"""

from __future__ import annotations

import sys

from cppo.rl.config import ConfigError
from cppo.rl.flags import parse_command, to_yaml


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, options = parse_command(argv)
    except ConfigError as e:
        print(f"cppo-train: error: {e}", file=sys.stderr)
        return 2
    if options.print_config:
        print(to_yaml(cfg), end="")
        return 0
    if options.dry_run:  # the plan: data, steps, updates, memory per GPU; no model is loaded
        from cppo.rl.plan import describe

        try:  # the plan first: a model config.json it cannot read is one line, with nothing printed
            plan = describe(cfg, options.dry_run_gpus)
        except ConfigError as e:
            print(f"cppo-train: error: {e}", file=sys.stderr)
            return 2
        print(f"# resolved config\n{to_yaml(cfg)}", end="")
        print(f"# plan\n{plan}")
        return 0
    status = _train(cfg)
    if status != 4:  # a group with a timed-out collective can hang in its destruction: left alone
        _end_process_group()  # alive at exit, a rank's group can abort in its teardown (SIGABRT)
    return status


def _train(cfg) -> int:
    """Run the training; the exit status, with the one line for each way it can end."""
    from cppo.rl.checkpoint import RunDirError
    from cppo.rl.loop import BadStepsError, train
    from cppo.rl.ranks import CollectiveTimeoutError, collective_timeout_line
    from cppo.rl.rewards import RewardHungError
    from cppo.rl.signals import RunInterrupted
    from cppo.rl.sources import DataError

    try:
        run_dir = train(cfg)
    except (ConfigError, DataError, FileNotFoundError, RunDirError) as e:
        print(f"cppo-train: error: {e}", file=sys.stderr)
        return 2
    except BadStepsError as e:
        print(f"cppo-train: error: {e}", file=sys.stderr)
        return 3
    except RewardHungError as e:
        print(f"cppo-train: error: {e}", file=sys.stderr)
        return 5
    except CollectiveTimeoutError as e:
        print(f"cppo-train: error: {e}", file=sys.stderr)
        return 4
    except RunInterrupted as e:
        print(f"cppo-train: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # a second signal: no save, the previous checkpoint stays the latest
        print(
            "cppo-train: stopped at once by a second signal; resume from the latest checkpoint",
            file=sys.stderr,
        )
        return 130
    except RuntimeError as e:  # a timeout outside the loop's steps
        line = collective_timeout_line(e, cfg.dist_timeout)
        if line is None:
            raise
        print(f"cppo-train: error: {line}", file=sys.stderr)
        return 4
    print(f"cppo-train: done; look at {run_dir / 'curves.png'} and {run_dir / 'summary.json'}")
    return 0


def _end_process_group() -> None:
    """Destroy the process group this run started, if any, before the interpreter exits."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
