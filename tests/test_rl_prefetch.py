"""Host work off the critical path: the next step's prompts prepared in a background thread with the
results of preparing them in turn (cppo/rl/prefetch.py), and images held once per prompt
(cppo/rl/rollout.py)."""

import copy
import json
import threading

import pytest
import torch

from cli.train import main as train_main
from cppo.batching import take_rows
from cppo.models import load_model_and_processor
from cppo.perturb import get_preset
from cppo.rl.config import TrainConfig
from cppo.rl.data import open_dataset
from cppo.rl.prefetch import Prefetcher
from cppo.rl.rewards import RewardScorer
from cppo.rl.rollout import collect_rollouts, prepare_prompts, select_rows
from cppo.rl.sampler import Draw, PromptSampler
from cppo.rl.update import Timer, micro_batch_loss
from tests.helpers import shapes_dataset, tiny_model_and_processor


def _draws(*indices):
    return [Draw(i, 0, 1000 + i) for i in indices]


def test_prefetcher_hands_back_the_thread_result_only_for_its_draws():
    threads = []

    def prepare(draws):
        threads.append(threading.current_thread().name)
        if draws[0].index < 0:
            raise FileNotFoundError("missing image")
        return [d.index for d in draws]

    p = Prefetcher(prepare)
    try:
        p.submit(_draws(1, 2))
        assert p.get(_draws(1, 2)) == [1, 2] and p.hits == 1
        assert threads[-1].startswith("cppo-prefetch")
        p.submit(_draws(3))
        assert p.get(_draws(4)) == [4] and p.hits == 1  # other draws: prepared in turn
        assert threads[-1] == threading.current_thread().name
        p.submit(_draws(-1))
        with pytest.raises(FileNotFoundError):  # raised at the step that needs the prompts
            p.get(_draws(-1))
    finally:
        p.close()
    off = Prefetcher(prepare, enabled=False)
    off.submit(_draws(5))
    assert off.get(_draws(5)) == [5] and off.hits == 0
    off.close()


def test_sampler_peek_returns_the_next_batch_without_moving_on():
    s = PromptSampler(5, 3, seed=4)
    s.next_batch()
    state = s.state_dict()
    ahead = s.peek()  # crosses the epoch boundary
    assert s.state_dict() == state
    assert s.next_batch() == ahead


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    model, processor = tiny_model_and_processor(seed=4)
    ds = open_dataset(shapes_dataset(tmp_path_factory.mktemp("data"), n=4)["train"])
    return model, processor, [ds[0], ds[1]]


def test_prompts_prepared_in_a_thread_equal_those_prepared_in_turn(setting):
    _, processor, samples = setting
    preset = get_preset("paper")
    serial = prepare_prompts(processor, samples, [5, 6], "cppo", preset)
    p = Prefetcher(lambda draws: prepare_prompts(copy.deepcopy(processor), samples, [5, 6], "cppo", preset))
    try:
        p.submit(_draws(0, 1))
        threaded = p.get(_draws(0, 1))
    finally:
        p.close()
    assert p.hits == 1
    assert serial.batch.keys() == threaded.batch.keys() and serial.views.keys() == {"positive", "negative"}
    for key in serial.batch:
        assert torch.equal(serial.batch[key], threaded.batch[key]), key
    for view in serial.views:
        assert torch.equal(serial.views[view], threaded.views[view]), view
    assert serial.view_records == threaded.view_records


def test_images_and_views_are_held_once_per_prompt_and_expanded_per_pass(setting):
    model, processor, samples = setting
    cfg = TrainConfig(algo="cppo", group_size=3, prompts_per_step=2, max_new_tokens=6, beta=0.0,
                      micro_batch_size=6)  # fmt: skip
    prompts = prepare_prompts(processor, samples, [5, 6], "cppo", get_preset("paper"))
    ro = collect_rollouts(
        model, processor, prompts, cfg, RewardScorer(cfg.rewards, cfg.reward_weights), generator_seed=0
    )
    assert torch.equal(ro.pixel_values, prompts.batch["pixel_values"])  # B prompts' patches, not N rows'
    assert ro.views["negative"].shape == ro.pixel_values.shape and "pixel_values" not in ro.inputs
    token = model.config.image_token_id
    rows = [4, 0, 1, 5]
    per_row = take_rows(prompts.batch, [r // 3 for r in rows], token)  # what the N-row tensors held
    for view, pixels in ((None, prompts.batch["pixel_values"]), ("negative", ro.views["negative"])):
        got = select_rows(ro, rows, token, view)
        want = take_rows({**prompts.batch, "pixel_values": pixels}, [r // 3 for r in rows], token)
        assert torch.equal(got["pixel_values"], want["pixel_values"])
        assert torch.equal(got["image_grid_thw"], per_row["image_grid_thw"])
        assert torch.equal(got["input_ids"], ro.inputs["input_ids"][rows])
    patches = []  # a pass over both groups runs the vision tower once per prompt, not per row
    hook = model.model.visual.register_forward_hook(lambda m, a, o: patches.append(a[0].shape[0]))
    try:
        micro_batch_loss(model, ro, list(range(6)), cfg, Timer())
    finally:
        hook.remove()
    assert patches == [prompts.batch["pixel_values"].shape[0]]


def _flags(tiny_dir, data, out, *extra):
    return ["--model", str(tiny_dir), "--data", str(data), "--output-dir", str(out), "--max-steps", "3",
            "--prompts-per-step", "2", "--group-size", "2", "--micro-batch-size", "2", "--max-new-tokens",
            "6", "--lr", "1e-3", "--no-tensorboard", "--seed", "0", "--algo", "cppo", "--cpl-gate", "none",
            "--beta", "0.01", *extra]  # fmt: skip


def test_a_run_with_prefetching_equals_one_without(tiny_dir, data, tmp_path):
    """Three CPPO steps with the next step's prompts prepared in the background log the same metrics
    and end with the same weights as three steps that prepare them in turn."""
    runs = {}
    for name, extra in (("on", []), ("off", ["--no-prefetch"])):
        assert train_main(_flags(tiny_dir, data, tmp_path / name, *extra)) == 0
        lines = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        (ckpt,) = sorted((tmp_path / name / "checkpoints").glob("step-*"))
        runs[name] = lines, load_model_and_processor(ckpt)[0].state_dict()
    (on, w_on), (off, w_off) = runs["on"], runs["off"]
    assert len(on) == len(off) == 3
    for a, b in zip(on, off):
        kept = [k for k in a if not k.startswith(("time/", "throughput/", "memory/"))]
        assert {k: a[k] for k in kept} == {k: b[k] for k in kept}
    for name in w_on:
        assert torch.equal(w_on[name], w_off[name]), name
