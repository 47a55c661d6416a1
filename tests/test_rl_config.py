import ast
import dataclasses
import re
from pathlib import Path

import pytest
import torch

from cli.train import main
from cppo.rl import config
from cppo.rl.bounds import Bound, above, at_least
from cppo.rl.config import ALGOS, ConfigError, TrainConfig
from cppo.rl.flags import build_parser, config_from_yaml, field_names, parse_args, save_config, to_yaml
from cppo.rl.launch import check_launch
from cppo.rl.policy import use_gradient_checkpointing


def test_defaults_are_valid_and_match_the_paper_where_the_demo_allows():
    cfg = TrainConfig()
    assert cfg.algo == "cppo" and cfg.rollouts == cfg.prompts_per_step * cfg.group_size
    assert (cfg.cpl_lambda, cfg.cpl_tau, cfg.cpl_divergence, cfg.top_percent) == (0.01, 0.1, "k3", 0.5)
    assert (cfg.rewards, cfg.reward_weights) == (["accuracy", "format"], [0.9, 0.1])
    assert (cfg.clip_low, cfg.clip_high, cfg.beta, cfg.grad_clip) == (0.2, 0.2, 0.01, 1.0)


def test_every_field_has_help():
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata.get("help"), f"{f.name} has no help text"


def test_rollouts_not_divisible_by_group_size_says_what_to_change():
    with pytest.raises(ConfigError) as e:
        TrainConfig(rollouts_per_step=12, group_size=5)
    assert str(e.value) == (
        "batch of 12 rollouts is not divisible by group size 5: set --rollouts-per-step "
        "to a multiple of 5 (e.g. 10)"
    )
    assert TrainConfig(rollouts_per_step=12, group_size=4).prompts_per_step == 3


def test_mini_and_micro_batch_divisibility():
    with pytest.raises(
        ConfigError,
        match=r"batch of 15 rollouts \(3 prompts x group size 5\) is not divisible "
        r"by mini_batch_size 4: use one of 1, 3, 5, 15",
    ):
        TrainConfig(prompts_per_step=3, group_size=5, mini_batch_size=4, micro_batch_size=1)
    with pytest.raises(
        ConfigError,
        match="mini-batch of 10 rollouts is not divisible by micro_batch_size 4: use one of 1, 2, 5, 10",
    ):
        TrainConfig(prompts_per_step=4, group_size=5, mini_batch_size=10, micro_batch_size=4)
    cfg = TrainConfig(prompts_per_step=4, group_size=5, mini_batch_size=10, micro_batch_size=5)
    assert cfg.rollouts // cfg.mini_batch_size == 2  # two optimizer updates per step


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mini_batch_size=0), "mini_batch_size must be >= 1"),
        (dict(micro_batch_size=0), "micro_batch_size must be >= 1, got 0"),
        (dict(group_size=0), "group_size must be >= 1, got 0"),
        (dict(betas=(0.9,)), "betas must be two numbers"),
    ],
)
def test_zero_sizes_are_errors_not_crashes(kwargs, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        TrainConfig(**kwargs)


def test_all_errors_are_reported_at_once():
    with pytest.raises(ConfigError) as e:
        TrainConfig(algo="ppo", cpl_lambda=-0.1, group_size=1, top_p=0, reward_weights=[1.0])
    text = str(e.value)
    assert f"unknown algo 'ppo'; valid: {', '.join(ALGOS)}" in text
    assert "cpl_lambda must be >= 0 (0 turns it off), got -0.1" in text
    assert "--group-size 2 or more" in text and "top_p must be in (0, 1]" in text
    assert "2 reward functions (accuracy, format) but 1 reward_weights" in text


def test_registry_names_are_checked_and_list_the_valid_ones():
    with pytest.raises(ConfigError, match="selector: unknown selector 'rel'; valid: .*relative"):
        TrainConfig(selector="rel")
    with pytest.raises(ConfigError, match="preset: unknown preset 'nope'"):
        TrainConfig(preset="nope")
    assert TrainConfig(cpl_divergence="full").cpl_divergence == "full"


def _yaml(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return str(path)


def test_yaml_sets_defaults_and_flags_override_it(tmp_path):
    path = _yaml(tmp_path, "group_size: 4\nprompts-per-step: 2\nlr: 1e-6\nalgo: grpo\ntensorboard: false\n")
    cfg = parse_args(["--config", path])
    assert (cfg.group_size, cfg.prompts_per_step, cfg.algo, cfg.tensorboard) == (4, 2, "grpo", False)
    assert cfg.lr == 1e-6 and isinstance(cfg.lr, float)  # YAML 1.1 reads "1e-6" as a string
    cfg = parse_args(["--config", path, "--group-size", "8", "--algo", "cppo", "--tensorboard"])
    assert (cfg.group_size, cfg.prompts_per_step, cfg.algo, cfg.tensorboard) == (8, 2, "cppo", True)


def test_yaml_unknown_key_names_the_closest_valid_one(tmp_path):
    with pytest.raises(
        ConfigError, match=r"run\.yaml:1: unknown config key 'grop_size'; did you mean 'group_size'"
    ):
        parse_args(["--config", _yaml(tmp_path, "grop_size: 4\n")])
    with pytest.raises(ConfigError, match="unknown config key 'zzz'; run cppo-train --help"):
        parse_args(["--config", _yaml(tmp_path, "zzz: 1\n")])


def test_yaml_and_flag_type_errors(tmp_path):
    with pytest.raises(ConfigError, match="run.yaml:1: group_size expects int, got 2.5"):
        parse_args(["--config", _yaml(tmp_path, "group_size: 2.5\n")])
    with pytest.raises(ConfigError, match="flags: lr expects float, got 'fast'"):
        parse_args(["--lr", "fast"])
    with pytest.raises(ConfigError, match="expected a mapping"):
        parse_args(["--config", _yaml(tmp_path, "- a\n- b\n")])
    with pytest.raises(ConfigError, match="does not exist"):
        parse_args(["--config", str(tmp_path / "missing.yaml")])
    with pytest.raises(ConfigError, match="betas expects 2 values"):
        parse_args(["--config", _yaml(tmp_path, "betas: [0.9]\n")])


def test_flags_for_bools_lists_tuples_and_none():
    cfg = parse_args(
        [
            "--no-adv-std-scale",
            "--gradient-checkpointing",
            "--rewards",
            "accuracy",
            "format",
            "my.py:f",
            "--reward-weights",
            "0.8",
            "0.1",
            "0.1",
            "--betas",
            "0.9",
            "0.95",
            "--dual-clip",
            "none",
            "--model",
            "some/dir",
            "--max-steps",
            "3",
            "--output-dir",
            "out",
            "--resume",
            "auto",
            "--seed",
            "7",
        ]
    )
    assert cfg.adv_std_scale is False and cfg.gradient_checkpointing is True
    assert cfg.rewards == ["accuracy", "format", "my.py:f"] and cfg.reward_weights == [0.8, 0.1, 0.1]
    assert cfg.betas == (0.9, 0.95) and cfg.dual_clip is None
    assert (cfg.model, cfg.max_steps, cfg.output_dir, cfg.resume, cfg.seed) == (
        "some/dir",
        3,
        "out",
        "auto",
        7,
    )


def test_help_documents_every_field(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    for f in dataclasses.fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in text
        assert " ".join(f.metadata["help"].split())[:40] in text, f.name


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = parse_args(["--group-size", "4", "--betas", "0.8", "0.9", "--lora-r", "8"])
    save_config(cfg, tmp_path / "config.yaml")
    assert config_from_yaml(tmp_path / "config.yaml") == cfg


def test_cli_main_exit_codes(capsys):
    assert main(["--rollouts-per-step", "12", "--group-size", "5"]) == 2
    assert (
        "cppo-train: error: batch of 12 rollouts is not divisible by group size 5" in capsys.readouterr().err
    )
    assert main(["--print-config", "--algo", "grpo"]) == 0
    out = capsys.readouterr().out
    assert "algo: grpo\n" in out and "group_size: 8\n" in out


def test_unknown_flag_names_the_closest_one_and_exits_2(capsys):
    with pytest.raises(ConfigError, match="flags: unknown flag '--grop-size'; did you mean --group-size"):
        parse_args(["--grop-size", "4"])
    assert main(["--max-stesp", "3"]) == 2
    assert "did you mean --max-steps?" in capsys.readouterr().err


def test_every_boolean_has_a_no_form_and_underscore_flags_are_accepted():
    cfg = parse_args(["--seed-per-prompt", "--no-tensorboard", "--keep_best", "false", "--group_size", "4"])
    assert (cfg.seed_per_prompt, cfg.tensorboard, cfg.keep_best, cfg.group_size) == (True, False, False, 4)
    for f in dataclasses.fields(TrainConfig):
        if isinstance(f.default, bool):
            assert getattr(parse_args(["--no-" + f.name.replace("_", "-")]), f.name) is False


def test_validate_changes_nothing():
    cfg = TrainConfig()
    cfg.rollouts_per_step = 12
    before = cfg.to_dict()
    with pytest.raises(ConfigError, match="batch of 12 rollouts is not divisible by group size 8"):
        cfg.validate()
    assert cfg.to_dict() == before


def test_reward_names_are_checked():
    valid = "valid: accuracy, accuracy_mathruler, format"
    with pytest.raises(ConfigError, match=f"rewards: unknown reward 'acuracy'; {valid}"):
        TrainConfig(rewards=["acuracy", "format"])
    with pytest.raises(ConfigError, match=r"reward names must be distinct, got \['accuracy', 'accuracy'\]"):
        TrainConfig(rewards=["accuracy", "mod.py:accuracy"])


def test_check_launch_lists_what_the_loop_cannot_run():
    check_launch(TrainConfig(), world=2)
    with pytest.raises(ConfigError, match="16 prompts per step cannot be shared by 3 processes"):
        check_launch(TrainConfig(), world=3)
    with pytest.raises(ConfigError, match="LoRA is not supported with FSDP"):
        check_launch(TrainConfig(lora_r=8), sharded=True)
    with pytest.raises(ConfigError) as e:
        check_launch(TrainConfig(cpl_divergence="full", selector="kl_shift"))
    assert "set --cpl-divergence k3" in str(e.value) and "set --selector relative" in str(e.value)


def test_gradient_checkpointing_is_auto_by_default_on_with_cuda_and_keeps_its_switches(tmp_path):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    cfg = parse_args([])
    assert cfg.gradient_checkpointing == "auto"
    assert use_gradient_checkpointing(cfg, cuda) and not use_gradient_checkpointing(cfg, cpu)
    for flags, want in [
        (["--gradient-checkpointing"], True),
        (["--no-gradient-checkpointing"], False),
        (["--gradient-checkpointing", "false"], False),
        (["--gradient_checkpointing", "auto"], "auto"),
    ]:
        assert parse_args(flags).gradient_checkpointing == want, flags
    for text, want in [("true", True), ("false", False), ("auto", "auto")]:
        cfg = parse_args(["--config", _yaml(tmp_path, f"gradient_checkpointing: {text}\n")])
        assert cfg.gradient_checkpointing == want, text
        assert config_from_yaml(_yaml(tmp_path, to_yaml(cfg))).gradient_checkpointing == want
    assert use_gradient_checkpointing(parse_args(["--gradient-checkpointing"]), cpu)
    assert not use_gradient_checkpointing(parse_args(["--no-gradient-checkpointing"]), cuda)
    with pytest.raises(ConfigError, match="gradient_checkpointing expects bool, got 'sometimes'"):
        parse_args(["--config", _yaml(tmp_path, "gradient_checkpointing: sometimes\n")])


def test_trl_names_for_the_learning_rate_set_lr(tmp_path):
    assert parse_args(["--learning-rate", "1e-4"]).lr == 1e-4
    assert parse_args(["--learning_rate", "2e-4"]).lr == 2e-4
    assert parse_args(["--config", _yaml(tmp_path, "learning_rate: 3e-4\n")]).lr == 3e-4
    assert parse_args(["--config", _yaml(tmp_path, "learning-rate: 3e-4\n"), "--lr", "1e-3"]).lr == 1e-3


def test_a_yaml_number_is_text_where_a_field_is_text_but_never_a_name_in_a_list(tmp_path):
    assert parse_args(["--config", _yaml(tmp_path, "output_dir: 2024\n")]).output_dir == "2024"
    with pytest.raises(ConfigError, match=r"run\.yaml:2: lora_targets expects a list of str, got 7"):
        parse_args(["--config", _yaml(tmp_path, "seed: 1\nlora_targets: [q_proj, 7]\n")])


def test_config_module_imports_no_torch():
    """config.py is fields and their checks; what needs torch (check_launch) is in cppo.rl.launch. Only
    the file itself is checked: importing it still loads torch through cppo.rl and cppo.loss."""
    tree = ast.parse(Path(config.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not {name for name in imported if name.split(".")[0] == "torch"}


def test_every_field_is_listed_once_and_its_metadata_is_known():
    names = field_names()
    assert sorted(names) == sorted(f.name for f in dataclasses.fields(TrainConfig))
    assert names.index("generation_batch_size") < names.index("cpl_lambda") < names.index("preset")
    for f in dataclasses.fields(TrainConfig):
        assert set(f.metadata) <= {"help", "aliases", "check", "resume_safe"}, f.name


def test_bounds_name_the_field_the_range_and_the_value():
    assert at_least(1).problem("x", 0) == "x must be >= 1, got 0"
    assert at_least(1).problem("x", None) is None and at_least(1).problem("x", 1) is None
    assert Bound(0, 1, low_open=True).problem("p", 1.5) == "p must be in (0, 1], got 1.5"
    assert (
        above(0, "note", noun="a number").problem("t", float("nan"))
        == "t must be a number > 0 (note), got nan"
    )
