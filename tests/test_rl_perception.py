"""The perception-term registry (cppo/rl/perception.py): every entry is run by the same update, its
rollouts carry exactly the views it names, and `--algo` picks an entry by its registered name."""

import pytest
import torch

from cppo.perturb import get_preset
from cppo.rl.config import ALGOS, ConfigError, TrainConfig
from cppo.rl.data import open_dataset
from cppo.rl.perception import (
    PERCEPTION_TERMS,
    ContrastivePerception,
    PerceptionTerm,
    get_perception_term,
    register_perception_term,
)
from cppo.rl.rewards import RewardScorer
from cppo.rl.rollout import collect_rollouts, prepare_prompts
from cppo.rl.update import Passes, Timer, micro_batch_loss
from tests.helpers import shapes_dataset, tiny_model_and_processor


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    torch.manual_seed(0)
    model, processor = tiny_model_and_processor()
    ds = open_dataset(shapes_dataset(tmp_path_factory.mktemp("data"), n=4)["train"])
    return model, processor, [ds[0], ds[1]]


def _config(algo: str) -> TrainConfig:
    return TrainConfig(
        algo=algo,
        group_size=2,
        prompts_per_step=2,
        max_new_tokens=6,
        micro_batch_size=4,
        beta=0.0,
        cpl_gate="none",  # a random model earns no reward: open CPL on every row
        cpl_rows=1.0,  # the full term, to compare with references
        logits_chunk_size=4,
    )


def _rollouts(setting, cfg):
    model, processor, samples = setting
    preset = get_preset(getattr(cfg, get_perception_term(cfg.algo).preset_option))
    scorer = RewardScorer(cfg.rewards, cfg.reward_weights)
    prompts = prepare_prompts(processor, samples, [5, 6], cfg.algo, preset)
    ro = collect_rollouts(model, processor, prompts, cfg, scorer, generator_seed=0)
    ro.advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    return ro


def test_config_algos_are_the_registered_names():
    assert list(ALGOS) == PERCEPTION_TERMS.names()
    with pytest.raises(ConfigError, match="algo: unknown algo 'ppo'; valid: cppo, grpo, papo"):
        _config("ppo")


@pytest.mark.parametrize("name", PERCEPTION_TERMS.names())
def test_every_term_draws_its_views_and_adds_a_finite_term(setting, name):
    term = get_perception_term(name)
    cfg = _config(name)
    ro = _rollouts(setting, cfg)
    assert set(ro.views) == set(term.views)  # a GRPO rollout encodes no view
    model = setting[0]
    model.zero_grad(set_to_none=True)
    loss, metrics = micro_batch_loss(model, ro, list(range(ro.num_rows)), cfg, Timer())
    loss.backward()
    assert torch.isfinite(loss) and "grpo/pg_loss" in metrics
    grpo_only, _ = micro_batch_loss(
        model, ro, list(range(ro.num_rows)), cfg, Timer(), Passes(term=PerceptionTerm())
    )
    if term.views:  # a perception term changes the loss, GRPO's does not
        assert not torch.isclose(loss.detach(), grpo_only.detach())
    else:
        torch.testing.assert_close(loss.detach(), grpo_only.detach())


def test_a_registered_term_is_chosen_by_its_name(setting):
    register_perception_term("cppo_every_row")(ContrastivePerception(every_row=True))
    try:
        cfg = _config("cppo_every_row")  # the config accepts the new name
        ro = _rollouts(setting, cfg)
        assert set(ro.views) == {"positive", "negative"}
        rows = list(range(ro.num_rows))
        _, every = micro_batch_loss(setting[0], ro, rows, cfg, Timer())
        _, gated = micro_batch_loss(setting[0], ro, rows, _config("cppo"), Timer())
        assert every["cpl/rows"] == len(rows) and every["cpl/n_tokens"] == gated["cpl/n_tokens"]
    finally:
        PERCEPTION_TERMS.unregister("cppo_every_row")
