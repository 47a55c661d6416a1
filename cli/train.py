"""cppo-train: RL finetuning of a vision-language model with GRPO, CPPO or PAPO.

    cppo-train                                   # CPPO, bundled tiny demo model, shapes task, CPU
    cppo-train --config run.yaml --max-steps 200 # a YAML file for defaults, flags on top
    cppo-train --algo grpo --group-size 8 --print-config

Every field of ``cppo.rl.config.TrainConfig`` is a flag; ``--help`` lists them with their defaults.
A config the trainer cannot run exits with status 2 and a message saying what to change.
"""

from __future__ import annotations

import sys

from cppo.rl.config import ConfigError, parse_args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        cfg = parse_args(argv)
    except ConfigError as e:
        print(f"cppo-train: error: {e}", file=sys.stderr)
        return 2
    if "--print-config" in argv:
        print(cfg.to_yaml(), end="")
        return 0
    from cppo.rl.data import DataError
    from cppo.rl.loop import train

    try:
        run_dir = train(cfg)
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"cppo-train: error: {e}", file=sys.stderr)
        return 2
    print(f"cppo-train: done; run directory {run_dir} (metrics.jsonl, curves.png, checkpoints/)")
    return 0

if __name__ == "__main__":
    sys.exit(main())
