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
    # The training loop (issue 6) is wired in here once it lands; until then only the config is checked.
    print(
        "cppo-train: the training loop is not wired in yet; the config is valid (--print-config shows it)",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
