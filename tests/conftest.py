import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if os.environ.get("CPPO_FLOOR_SCOPE") == "1":  # scripts/test_floor.sh: only what can call transformers
        from tests.floor_scope import item_reaching_path

        kept = [item for item in items if item_reaching_path(item) is not None]
        left = [item for item in items if item_reaching_path(item) is None]
        modules = sorted({item.path.name for item in left})
        print(f"\n[floor] {len(left)} tests that cannot call transformers left out ({', '.join(modules)})")
        config.hook.pytest_deselected(items=left)
        items[:] = kept
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A saved random tiny Qwen2.5-VL (model + processor), loadable by path like a real checkpoint."""
    from tests.helpers import tiny_model_and_processor

    model, processor = tiny_model_and_processor(seed=3)
    d = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(d)
    processor.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The train split (data.jsonl) of a small exported shapes dataset."""
    from tests.helpers import shapes_dataset

    return shapes_dataset(tmp_path_factory.mktemp("data"), n=8)["train"]
