"""CPU threads on a busy machine: the no-argument run's step time alone and with one core kept busy by
another process, for the default thread choice (cppo.rl.threads: the cores others leave free, chosen
before each step), 1 thread and all threads (OMP_NUM_THREADS), and all threads with OpenMP's passive
wait policy.

    python bench/bench_threads.py --steps 4        # about 3 minutes on 2 cores; needs a quiet machine

Each configuration is one `cppo-train --max-steps STEPS` subprocess (no evaluation); the busy core
is a Python loop started before it and stopped after it. Reported: the median time/step of steps
2..STEPS (step 1 includes warm-up) and, per configuration, busy / alone. Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHOICES = {  # name -> environment
    "default (free cores)": {},
    "1 thread": {"OMP_NUM_THREADS": "1"},
    "all threads": {"OMP_NUM_THREADS": str(os.cpu_count())},
    "all threads, passive wait": {"OMP_NUM_THREADS": str(os.cpu_count()), "OMP_WAIT_POLICY": "PASSIVE"},
}


def step_time(env: dict, busy: bool, steps: int) -> float:
    """Median time/step of steps 2..steps of the no-argument run under `env`, with one core busy or not."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        with tempfile.TemporaryDirectory() as out:
            base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
            cmd = [sys.executable, "-m", "cli.train", "--max-steps", str(steps), "--output-dir", out]
            cmd += ["--eval-every", "0", "--eval-at-start", "false", "--no-tensorboard"]
            subprocess.run(cmd, cwd=REPO, env={**base, **env}, check=True, capture_output=True)
            rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    finally:
        if spinner is not None:
            spinner.kill()
    return statistics.median(r["time/step"] for r in rows if r.get("step", 0) >= 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    print(f"| threads ({os.cpu_count()} cores) | alone s/step | one core busy s/step | busy / alone |")
    print("|---|---|---|---|")
    for name, env in CHOICES.items():
        alone, busy = step_time(env, False, args.steps), step_time(env, True, args.steps)
        print(f"| {name} | {alone:.2f} | {busy:.2f} | {busy / alone:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
