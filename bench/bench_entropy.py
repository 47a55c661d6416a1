"""Chunked against naive per-token entropy at Qwen2.5-VL's vocabulary: examples/s and peak memory.

    python bench/bench_entropy.py                       # CPU: T = 512..4096, about 4 minutes
    python bench/bench_entropy.py --device cuda --hidden 2048 --lengths 512 1024 2048 4096 8192

One "example" is one response of T tokens: the (T, D) hidden states that predict its tokens and the
(V, D) output head, V = 151,936 (the real Qwen2.5-VL vocabulary). Both methods return the entropy
and the log-prob of the sampled token in float32 (what the detector and the trainer need):

- naive: ``logits = hidden @ W.T`` for the whole response, float32 (T, V), then
  ``token_entropy`` and a gather: the (T, V) logits and several (T, V) temporaries exist at once.
- chunked: ``cppo.loss.entropy.chunked_entropy_and_logprob`` with ``--chunk`` positions at a time.

The hidden size only changes the matmul (small by default so the CPU run stays short); the memory
that grows with T is the (T, V) float32 work, which does not depend on D.

Each (method, T) runs in its own subprocess, so one peak does not hide another. Peak memory is the
process's high-water RSS (``VmHWM``) minus its RSS just before the first call, on CPU, or
``torch.cuda.max_memory_allocated`` minus the allocation before the call, on CUDA. Speed: the
median of ``--repeats`` timed calls after the untimed first call (which is the one whose peak is
read). The two methods' outputs are compared at T <= 1024. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

V = 151_936


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def _one(method: str, T: int, D: int, chunk: int, repeats: int, device: str, threads: int) -> dict:
    import torch

    from cppo.loss.entropy import chunked_entropy_and_logprob, token_entropy

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, T, D, generator=g).to(device)  # (1, T, D)
    head = (torch.randn(V, D, generator=g) / D**0.5).to(device)  # (V, D)
    targets = torch.randint(0, V, (1, T), generator=g).to(device)  # (1, T)

    def naive():
        logits = hidden @ head.T  # (1, T, V) float32, all at once
        ent = token_entropy(logits)  # (1, T)
        lp = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (1, T)
        return ent, lp

    def chunked():
        return chunked_entropy_and_logprob(hidden, head, targets, chunk_size=chunk)

    fn = naive if method == "naive" else chunked
    cuda = device.startswith("cuda")
    with torch.no_grad():
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = _rss_kib("VmRSS") * 1024
        out = fn()
        if cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
        else:
            peak = _rss_kib("VmHWM") * 1024 - base
        del out
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        err = float("nan")
        if T <= 1024:  # agreement of the two methods (after the peak was read, so it does not count)
            ref = naive() if method == "chunked" else chunked()
            err = max(float((a - b).abs().max()) for a, b in zip(fn(), ref))
    sec = statistics.median(times)
    return {
        "method": method,
        "T": T,
        "sec": sec,
        "examples_per_s": 1.0 / sec,
        "peak_mib": peak / 2**20,
        "max_abs_diff": err,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    ap.add_argument("--hidden", type=int, default=64, help="D, hidden size of the synthetic states")
    ap.add_argument("--chunk", type=int, default=256, help="positions per chunk")
    ap.add_argument("--repeats", type=int, default=1, help="timed calls (median); 1 keeps the CPU run short")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--one", nargs=2, metavar=("METHOD", "T"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        r = _one(
            args.one[0], int(args.one[1]), args.hidden, args.chunk, args.repeats, args.device, args.threads
        )
        print(json.dumps(r))
        return 0
    rows = []
    for T in args.lengths:
        for method in ("naive", "chunked"):
            cmd = [
                sys.executable,
                __file__,
                "--one",
                method,
                str(T),
                "--hidden",
                str(args.hidden),
                "--chunk",
                str(args.chunk),
                "--repeats",
                str(args.repeats),
                "--device",
                args.device,
                "--threads",
                str(args.threads),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{method} T={T} failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                continue
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(
                f"{method:>7} T={T:>5}: {r['examples_per_s']:.2f} examples/s, peak {r['peak_mib']:.0f} MiB",
                file=sys.stderr,
            )
    print(
        f"\nV = {V:,}, D = {args.hidden}, chunk = {args.chunk}, device {args.device}, "
        f"{args.threads} threads, median of {args.repeats}\n"
    )
    print("| T | naive examples/s | chunked examples/s | naive peak MiB | chunked peak MiB | max abs diff |")
    print("|---:|---:|---:|---:|---:|---:|")
    for T in args.lengths:
        n = next((r for r in rows if r["T"] == T and r["method"] == "naive"), None)
        c = next((r for r in rows if r["T"] == T and r["method"] == "chunked"), None)

        def f(r, key, fmt):
            return format(r[key], fmt) if r else "failed"

        print(
            f"| {T} | {f(n, 'examples_per_s', '.2f')} | {f(c, 'examples_per_s', '.2f')} | "
            f"{f(n, 'peak_mib', '.0f')} | {f(c, 'peak_mib', '.0f')} | "
            f"{f(c, 'max_abs_diff', '.1e').replace('nan', '-')} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
