"""tests/floor_scope.py: which tests the floor run repeats (those that can call transformers)."""

from tests import conftest, floor_scope, test_loss_grpo
from tests.floor_scope import external_reaches_floor, function_reaching_path, reaching_path


def test_model_tests_are_on_the_floor_and_pure_maths_is_not():
    assert reaching_path("tests.test_models")[-1] == "transformers"
    assert reaching_path("tests.test_rl_config")[-2:] == ("cppo.rl.flags", "transformers")  # HfArgumentParser
    assert reaching_path("tests.test_loss_grpo") is None
    assert reaching_path("tests.test_perturb_registry") is None


def test_imports_inside_functions_are_followed():
    """cppo.models.build imports transformers at the top; the trl integration only inside functions."""
    chain = reaching_path("cppo.integrations.trl")
    assert chain is not None and chain[-1] in {"transformers", "trl"}
    assert "transformers" in floor_scope._file_imports("cppo.rl.flags")


def test_what_a_subprocess_runs_is_followed():
    named = floor_scope._named_by_string
    assert "cli.train" in named("cli.train")  # python -m cli.train
    assert "tests.workers.chaos_reward" in named("chaos_reward.py")  # REPO / "tests" / "workers" / ...
    assert "tests.workers.fsdp_load" in named("tests/workers/fsdp_load.py")
    assert "cppo.grading" in named("import cppo.grading, sys\nprint(sys.modules)")  # python -c
    assert "transformers.hf_argparser" in named("transformers.hf_argparser")  # importlib.import_module
    assert reaching_path("tests.test_reward_hang") is not None  # only subprocesses of cli.train
    assert reaching_path("tests.test_examples") is not None  # runs examples/cpl_plain_pytorch.py


def test_a_conftest_fixture_that_builds_the_model_puts_its_tests_on_the_floor():
    assert function_reaching_path(conftest.tiny_dir) is not None
    assert function_reaching_path(test_loss_grpo.test_advantage_errors) is None
    assert function_reaching_path(len) is None  # not a function of this repository


def test_packages_that_require_transformers_or_the_hub_count_and_unknown_ones_too():
    assert external_reaches_floor("transformers") and external_reaches_floor("huggingface_hub")
    assert external_reaches_floor("peft") and external_reaches_floor("datasets")  # by their metadata
    assert not external_reaches_floor("numpy") and not external_reaches_floor("json")
    assert external_reaches_floor("a_package_that_is_not_installed")


def test_every_test_module_is_classified():
    """Each module resolves to a chain or None without error; a module left out is in the list the
    floor run prints, and the floor still runs most of the suite's modules."""
    tests = [m for m in floor_scope.repo_modules() if m.startswith("tests.test_")]
    assert len(tests) > 50 and "tests.test_floor_scope" in tests
    on_floor = [m for m in tests if reaching_path(m) is not None]
    assert len(on_floor) > len(tests) / 2, sorted(set(tests) - set(on_floor))
    assert "tests.test_rl_loop" in on_floor and "tests.test_fsdp_load" in on_floor
