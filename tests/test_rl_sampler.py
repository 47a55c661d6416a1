"""The prompt sampler: a seeded per-epoch order, exact resumption, view seeds (cppo/rl/sampler.py)."""

import json

import pytest

from cppo.rl.sampler import PromptSampler, view_seed


def test_sampler_is_deterministic_covers_each_epoch_and_crosses_boundaries():
    a, b = PromptSampler(7, 3, seed=1), PromptSampler(7, 3, seed=1)
    batches = [a.next_batch() for _ in range(7)]  # 21 draws = 3 epochs of 7
    assert batches == [b.next_batch() for _ in range(7)]
    flat = [d for batch in batches for d in batch]
    for epoch in range(3):
        assert sorted(d.index for d in flat if d.epoch == epoch) == list(range(7))
    assert [d.epoch for d in batches[2]] == [0, 1, 1]  # draws 6, 7, 8 straddle the boundary
    assert [d.index for d in flat[:7]] != [d.index for d in flat[7:14]]  # a new order per epoch
    other = PromptSampler(7, 3, seed=2).next_batch()
    assert [d.index for d in other] != [d.index for d in batches[0]]


def test_sampler_resumes_exactly_and_refuses_a_changed_dataset():
    full = PromptSampler(10, 4, seed=3)
    expected = [full.next_batch() for _ in range(6)]
    first = PromptSampler(10, 4, seed=3)
    head = [first.next_batch() for _ in range(4)]
    state = json.loads(json.dumps(first.state_dict()))  # it must survive a JSON checkpoint
    resumed = PromptSampler(10, 4, seed=3)
    resumed.load_state_dict(state)
    assert head + [resumed.next_batch() for _ in range(2)] == expected
    with pytest.raises(ValueError, match="num_samples=10, this run 11"):
        PromptSampler(11, 4, seed=3).load_state_dict(state)


def test_drop_last_ends_each_epoch_at_its_last_full_step():
    # 10 samples, 4 a step: 2 whole steps an epoch (verl's drop_last=True), the last 2 of each
    # epoch's permutation left out; no step mixes two epochs
    sampler = PromptSampler(10, 4, seed=5, drop_last=True)
    batches = [sampler.next_batch() for _ in range(6)]  # 3 epochs
    for step, batch in enumerate(batches):
        assert {d.epoch for d in batch} == {step // 2}
    for epoch in range(3):
        drawn = [d.index for b in batches[2 * epoch : 2 * epoch + 2] for d in b]
        assert drawn == sampler.permutation(epoch)[:8].tolist()  # the epoch's order, its first 8
    upcoming = sampler.peek()  # the epoch boundary is crossed inside peek too, and undone
    assert upcoming == sampler.next_batch() and {d.epoch for d in upcoming} == {3}
    # one stream on the same data: the third step takes 2 of epoch 0 and 2 of epoch 1
    stream = PromptSampler(10, 4, seed=5)
    third = [stream.next_batch() for _ in range(3)][2]
    assert [d.epoch for d in third] == [0, 0, 1, 1]
    # an exact multiple drops nothing, and resuming mid-run continues the same order
    exact = PromptSampler(8, 4, seed=5, drop_last=True)
    assert [d.epoch for _ in range(4) for d in exact.next_batch()] == [0] * 8 + [1] * 8
    head = PromptSampler(10, 4, seed=5, drop_last=True)
    head.next_batch(), head.next_batch(), head.next_batch()
    resumed = PromptSampler(10, 4, seed=5, drop_last=True)
    resumed.load_state_dict(json.loads(json.dumps(head.state_dict())))
    assert [resumed.next_batch() for _ in range(3)] == batches[3:]
    with pytest.raises(ValueError, match="drop_last: 3 samples make no full step of 4"):
        PromptSampler(3, 4, drop_last=True)


def test_view_seeds_depend_on_seed_epoch_and_index_only():
    assert view_seed(0, 1, 5) == view_seed(0, 1, 5)
    seeds = {view_seed(s, e, i) for s in range(2) for e in range(3) for i in range(10)}
    assert len(seeds) == 60
    draw = PromptSampler(4, 4, seed=9).next_batch()[0]
    assert draw.view_seed == view_seed(9, 0, draw.index)
