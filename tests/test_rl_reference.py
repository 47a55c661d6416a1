"""cppo.rl.reference: the frozen reference copy, and --ref-offload's host copy that `reference_on`
puts on the device for a pass and drops after it.

The move to the GPU and back, and an FSDP-sharded reference with its shards offloaded, are
`gpu`-marked (bench/gpu_check.sh runs them); the sharded reference is tested on two CPU processes
in tests/test_rl_fsdp.py."""

import pytest
import torch
import torch.distributed as dist

from cppo.models import append_responses, generate_responses
from cppo.precision import autocast
from cppo.response_stats import response_stats
from cppo.rl.fsdp import compute_device, is_sharded
from cppo.rl.reference import build_reference, keep_on_host, place_reference, reference_on
from tests.helpers import shapes_batch, tiny_model_and_processor


def test_the_reference_is_a_frozen_copy_in_the_compute_dtype():
    policy, _ = tiny_model_and_processor()
    ref = build_reference(policy, torch.bfloat16)
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    assert all(p.dtype == torch.bfloat16 for p in ref.parameters())
    for (name, p), q in zip(policy.named_parameters(), ref.parameters()):
        assert torch.equal(p.to(torch.bfloat16), q), name
        assert p.data_ptr() != q.data_ptr()  # a copy: training the policy leaves it as it was


@pytest.mark.gpu
def test_offloaded_reference_visits_the_gpu_for_its_pass_and_comes_back_without_a_copy():
    policy, processor = tiny_model_and_processor()
    cuda = torch.device("cuda")
    on_gpu = build_reference(policy, torch.float32).to(cuda)
    ref = place_reference(build_reference(policy, torch.float32), cuda, False, torch.float32, True)
    tensors = [*ref.parameters(), *ref.buffers()]
    assert {t.device.type for t in tensors} == {"cpu"} and all(t.is_pinned() for t in tensors)
    before = [t.data_ptr() for t in tensors]
    _, batch = shapes_batch(processor, n=2)
    batch = {k: v.to(cuda) for k, v in batch.items()}
    with torch.no_grad(), reference_on(ref, cuda):
        assert {t.device.type for t in [*ref.parameters(), *ref.buffers()]} == {"cuda"}
        assert torch.equal(ref(**batch).logits, on_gpu(**batch).logits)
    assert [t.data_ptr() for t in [*ref.parameters(), *ref.buffers()]] == before  # the same host copy


def test_a_host_kept_reference_stays_where_it_is_for_a_pass_on_the_cpu():
    ref = build_reference(tiny_model_and_processor()[0], torch.float32)
    keep_on_host(ref)  # what --ref-offload does on CUDA
    before = [t.data_ptr() for t in ref.parameters()]
    with reference_on(ref, torch.device("cpu")):
        assert [t.data_ptr() for t in ref.parameters()] == before
    assert [t.data_ptr() for t in ref.parameters()] == before


def test_reference_offload_changes_nothing_on_a_cpu_run_or_without_the_option():
    ref = build_reference(tiny_model_and_processor()[0], torch.float32)
    for offload in (False, True):
        placed = place_reference(ref, torch.device("cpu"), False, torch.float32, offload)
        assert placed is ref and not hasattr(ref, "_cppo_host")
        with reference_on(ref, torch.device("meta")):  # not offloaded: reference_on leaves it alone
            assert next(ref.parameters()).device.type == "cpu"


@pytest.mark.gpu
def test_fsdp_offloaded_reference_scores_on_the_gpu_as_the_unsharded_one(tmp_path):
    """--ref-offload under FSDP: the shards stay in CPU memory (CPUOffloadPolicy), the passes run on
    the GPU (compute_device), and the log-probs are the unsharded reference's. One process (NCCL,
    world 1), so that one GPU checks the path the trainer takes on several."""
    cuda = torch.device("cuda", 0)
    torch.cuda.set_device(cuda)
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        policy, processor = tiny_model_and_processor()
        plain = build_reference(policy, torch.bfloat16).to(cuda)
        ref = place_reference(build_reference(policy, torch.bfloat16), cuda, True, torch.bfloat16, True)
        assert is_sharded(ref) and compute_device(ref) == cuda
        assert {p.to_local().device.type for p in ref.parameters()} == {"cpu"}
        _, batch = shapes_batch(processor, n=2)
        batch = {k: v.to(cuda) for k, v in batch.items()}
        ids, mask = generate_responses(plain, processor, batch, max_new_tokens=6, generator_seed=0)
        inputs = append_responses(batch, ids, mask)
        with torch.no_grad(), autocast(cuda, torch.bfloat16):
            want = response_stats(plain, inputs, ids, mask)[1]
            got = response_stats(ref, inputs, ids, mask)[1]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    finally:
        dist.destroy_process_group()
