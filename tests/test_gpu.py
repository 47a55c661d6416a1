"""What only CUDA can show (`gpu`-marked, skipped without a device; bench/gpu_check.sh runs them),
and a CPU smoke run of the GPU check's step benchmark so that it cannot rot."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cppo.precision import autocast
from cppo.response_stats import fused_head_stats
from cppo.rl.reporting import peak_memory_mb, reset_peak_memory

REPO = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda")


@pytest.mark.gpu
def test_fused_head_backward_on_cuda_runs_outside_autocast_and_matches_autograd():
    """On CUDA the backward runs on autograd's device threads, outside the caller's autocast: the
    head's backward must still compute in the forward's bf16 and return a float32 weight gradient."""
    g = torch.Generator(device="cuda").manual_seed(0)
    P, D, V = 64, 128, 1000
    h0 = torch.randn(P, D, device=CUDA, generator=g).bfloat16()
    w0 = torch.randn(V, D, device=CUDA, generator=g) * 0.05
    targets = torch.randint(V, (P,), device=CUDA, generator=g)
    grads = []
    for fused in (True, False):
        h, w = h0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        with autocast(CUDA, torch.bfloat16):
            if fused:
                mask = torch.ones(1, P, dtype=torch.bool, device=CUDA)
                lp = fused_head_stats(h[None], w, targets[None], mask, 1.0, chunk_size=16)[1][0]
            else:
                lp = torch.nn.functional.linear(h, w).float().log_softmax(-1)
                lp = lp.gather(-1, targets[:, None])[:, 0]
        lp.sum().backward()
        grads.append((h.grad, w.grad))
    (hf, wf), (hr, wr) = grads
    assert wf.dtype == torch.float32 and hf.dtype == torch.bfloat16
    torch.testing.assert_close(wf, wr, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(hf.float(), hr.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_bf16_compute_on_cuda_moves_float32_master_weights_at_lr_1e6():
    """Two AdamW updates at lr 1e-6 under bf16 autocast on CUDA move nearly every weight of a model
    held in float32 (on bf16 parameters ~1 % would move)."""
    from tests.helpers import tiny_model_and_processor

    model, _ = tiny_model_and_processor(seed=1)
    model = model.to(CUDA)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    ids = torch.randint(10, 400, (4, 24), device=CUDA)
    for _ in range(2):
        with autocast(CUDA, torch.bfloat16):
            logits = model.model.language_model(input_ids=ids).last_hidden_state @ model.lm_head.weight.T
        assert logits.dtype == torch.bfloat16
        loss = logits.float().log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None]).mean()
        opt.zero_grad()
        loss.backward()
        assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)
        opt.step()
    lm = {k: v for k, v in model.state_dict().items() if "visual" not in k}  # the tower saw no image
    moved = sum(int((v != start[k]).sum()) for k, v in lm.items())
    assert moved / sum(v.numel() for v in lm.values()) > 0.99


@pytest.mark.gpu
def test_cuda_peak_memory_is_this_steps():
    reset_peak_memory(CUDA)
    big = torch.empty(256 * 2**20, dtype=torch.uint8, device=CUDA)
    first = peak_memory_mb(CUDA)
    del big
    reset_peak_memory(CUDA)
    assert first - peak_memory_mb(CUDA) >= 255


def test_gpu_check_script_parses_and_its_step_benchmark_runs_on_cpu(tmp_path):
    """bench/gpu_check.sh is valid bash; bench/gpu_step.py (its benchmark) runs a tiny CPU setting and
    reports every phase, tokens/s and a memory peak for GRPO and CPPO, its generate calls, and the
    padded/trimmed update on mixed response lengths."""
    assert subprocess.run(["bash", "-n", str(REPO / "bench/gpu_check.sh")]).returncode == 0
    spec = importlib.util.spec_from_file_location("gpu_step", REPO / "bench/gpu_step.py")
    gpu_step = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(REPO / "bench"))
    spec.loader.exec_module(gpu_step)
    out = tmp_path / "gpu_step.json"
    argv = ["--size", "tiny", "--device", "cpu", "--max-new-tokens", "6", "--image-size", "56"]
    assert gpu_step.main([*argv, "--prompts", "3", "--group", "2", "--micro", "2", "--mini", "2",
                          "--generation-batch-size", "4", "--padding", "--json", str(out)]) == 0  # fmt: skip
    result = json.loads(out.read_text())
    for algo in ("grpo", "cppo"):
        (step,) = result["steps"][algo]
        assert set(gpu_step.REPORTED) <= set(step), set(gpu_step.REPORTED) - set(step)
        assert step["throughput/tokens_per_s"] > 0
        assert step["generate/calls"] == 2 and step["generate/rows_per_call"] == 4  # 2 groups, then 1
    assert result["steps"]["cppo"][0]["time/perception"] > 0  # the view passes ran
    padding = result["padding"]  # mixed response lengths: padded, trimmed, sorted by length
    assert padding["padded"]["update/padding_share"] > padding["trimmed"]["update/padding_share"]
    assert all(padding[v]["update/tokens_per_s"] > 0 for v in ("padded", "trimmed", "sorted"))
    assert padding["rows_per_call"] == [2, 4] and padding["same_samples_rows"] == [6, 6]
