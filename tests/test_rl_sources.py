"""Data sources as published (ViRL39K with image paths, Geometry3K with image bytes), read through
datasets.load_dataset as a hub id is, and the paper's preprocessing (cppo.rl.sources, cppo.rl.data)."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

datasets = pytest.importorskip("datasets")

from cppo.models import demo_model_path, encode_prompts, load_processor  # noqa: E402
from cppo.models.prompt_tokens import pixel_bounds, prompt_lengths, set_pixel_bounds  # noqa: E402
from cppo.prompt import INSTRUCTION  # noqa: E402
from cppo.rl.checks import Preprocessing  # noqa: E402
from cppo.rl.config import ConfigError, TrainConfig  # noqa: E402
from cppo.rl.data import open_dataset  # noqa: E402
from cppo.rl.launch import resolve_max_steps  # noqa: E402
from cppo.rl.prompt_count import data_processor  # noqa: E402
from cppo.rl.resume import data_fingerprint  # noqa: E402
from cppo.rl.sources import (  # noqa: E402
    DataError,  # noqa: E402
    is_hub_id,
    parquet_files,
    parse_columns,
    split_spec,
)
from tests.published_data import (  # noqa: E402
    GEO_ROWS,
    VIRL_ROWS,
    cache_as_hub_dataset,
    write_geometry3k,
    write_virl39k,
)

PAPER = Preprocessing()  # boxed answer, multi-image dropped, sides < 28 px upscaled, prompts <= 512 tokens


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """ViRL39K- and Geometry3K-shaped files, both also in a datasets cache as hub ids (offline)."""
    root = tmp_path_factory.mktemp("published")
    virl, geo, cache = write_virl39k(root / "ViRL39K"), write_geometry3k(root / "geometry3k"), root / "cache"
    cache_as_hub_dataset("TIGER-Lab/ViRL39K", {"train": [virl / "39Krelease.parquet"]}, cache)
    splits = {s: [geo / "data" / f"{s}-00000-of-00001.parquet"] for s in GEO_ROWS}
    cache_as_hub_dataset("hiyouga/geometry3k", splits, cache)
    return {"virl": virl, "geo": geo, "cache": cache}


@pytest.fixture(autouse=True)
def offline_cache(published, monkeypatch):
    """datasets reads and writes its cache under tmp, offline (tests/conftest.py sets HF_HUB_OFFLINE)."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(published["cache"]))
    assert datasets.config.HF_HUB_OFFLINE
    return published["cache"]


@pytest.fixture(scope="module")
def processor():
    return load_processor(demo_model_path())


def _rows(ds):
    return [(r.question, r.answer, r.question_type, len(r.images)) for r in ds.records]


@pytest.mark.parametrize("bounds", [(None, None), (3136, 40000), (784, 784)])
def test_prompt_lengths_equal_the_processors_input_ids(bounds):
    processor = load_processor(demo_model_path())  # a copy of its own: the bounds change it
    set_pixel_bounds(processor, *bounds)
    questions = ["Find x.", "A longer question " * 30, "Text only.", "Two images."]
    images = [
        [Image.new("RGB", (300, 200))],
        [Image.new("RGB", (28, 28))],
        [],
        [Image.new("RGB", (1000, 60)), Image.new("RGB", (47, 28))],
    ]
    enc = encode_prompts(processor, questions, images)
    counted = prompt_lengths(processor, questions, [[im.size for im in row] for row in images])
    assert counted == enc["attention_mask"].sum(1).tolist()


def test_pixel_bounds_are_saved_with_the_processor(tmp_path):
    processor = load_processor(demo_model_path())
    set_pixel_bounds(processor, 1568, 6272)
    processor.save_pretrained(tmp_path)  # as a checkpoint saves it, beside the model's config.json
    shutil.copy(demo_model_path() / "config.json", tmp_path)
    assert pixel_bounds(load_processor(tmp_path)) == (1568, 6272)
    with pytest.raises(ValueError, match="cannot hold an image"):
        set_pixel_bounds(processor, max_pixels=700)  # under one 28 x 28 patch group
    cfg = TrainConfig(min_pixels=3136, max_pixels=12544)
    assert pixel_bounds(data_processor(cfg)) == (3136, 12544)


def test_virl39k_as_folder_parquet_file_and_hub_id_with_the_papers_preprocessing(published, processor):
    virl = published["virl"]
    folder = open_dataset(virl, prep=PAPER, processor=processor)  # the downloaded repository
    file = open_dataset(virl / "39Krelease.parquet", prep=PAPER, processor=processor)
    hub = open_dataset("TIGER-Lab/ViRL39K", image_root=virl, prep=PAPER, processor=processor)
    assert _rows(folder) == _rows(file) == _rows(hub) and len(hub) == VIRL_ROWS - 2
    assert hub.dropped == {"multi-image": 1, "prompt over 512 tokens": 1} and not hub.skipped
    summary = hub.summary()
    assert "6 samples; dropped by the preprocessing 2: 1 multi-image, 1 prompt over 512 tokens" in summary
    assert "TIGER-Lab/ViRL39K@train row 3:" in summary  # the dropped prompt is named
    raw = datasets.load_dataset("parquet", data_files=str(virl / "39Krelease.parquet"), split="train")
    kept = [i for i in range(VIRL_ROWS) if i not in (1, 3)]
    for sample_index, row_index in enumerate(kept):
        sample, row = hub[sample_index], raw[row_index]
        assert sample.answer == row["answer"][len("\\boxed{") : -1]  # the ground truth from \boxed{}
        assert sample.question_type == row["category"] and sample.extra["qid"] == row["qid"]
        assert "<image>" not in sample.question and INSTRUCTION not in sample.question
        assert sample.extra["PassRate_32BTrained"] == 0.5 and len(sample.images) == 1
    assert hub[1].images[0].size == (47, 28)  # row 2's 20 x 12 image: shorter side upscaled to 28
    assert hub[2].question == raw[4]["question"][len("<image>") : -len(INSTRUCTION)].strip()


def test_a_long_prompt_is_an_error_under_strict_naming_the_row(published, processor):
    with pytest.raises(
        DataError, match=r"39Krelease\.parquet row 3: prompt of \d+ tokens .* over max_prompt_length 512"
    ):
        open_dataset(published["virl"] / "39Krelease.parquet", strict=True, prep=PAPER, processor=processor)
    roomy = Preprocessing(max_prompt_length=4096)
    assert len(open_dataset(published["virl"], strict=True, prep=roomy, processor=processor)) == VIRL_ROWS - 1


def test_without_the_preprocessing_every_row_is_kept_as_it_is(published):
    ds = open_dataset(published["virl"], prep=Preprocessing.none())
    assert len(ds) == VIRL_ROWS and ds.multi_image == 1 and not ds.dropped
    assert ds[2].images[0].size == (20, 12)
    with pytest.raises(ValueError, match="needs the model's processor"):
        open_dataset(published["virl"], prep=PAPER)


def test_geometry3k_bytes_by_split_from_the_folder_and_the_hub_id(published, processor):
    geo = published["geo"]
    for split, n in GEO_ROWS.items():
        hub = open_dataset(f"hiyouga/geometry3k@{split}", prep=PAPER, processor=processor)
        local = open_dataset(f"{geo}@{split}", prep=PAPER, processor=processor)
        assert len(hub) == len(local) == n and _rows(hub) == _rows(local)
        assert hub[0].images[0].size == (112, 112) and hub.source == f"hiyouga/geometry3k@{split}"
    assert len(open_dataset(geo, split="test", prep=PAPER, processor=processor)) == GEO_ROWS["test"]
    assert [p.name for p in parquet_files(geo, "validation")] == ["validation-00000-of-00001.parquet"]
    with pytest.raises(DataError, match=r"Unknown split \"val\".*hiyouga/geometry3k@SPLIT"):
        open_dataset("hiyouga/geometry3k@val", prep=PAPER, processor=processor)
    with pytest.raises(DataError, match="no data.jsonl, save_to_disk dataset or val parquet file"):
        open_dataset(f"{geo}@val")


def test_save_to_disk_dataset_dict(published, processor, tmp_path):
    geo = published["geo"]
    files = {s: str(geo / "data" / f"{s}-00000-of-00001.parquet") for s in GEO_ROWS}
    datasets.load_dataset("parquet", data_files=files).save_to_disk(str(tmp_path / "saved"))
    ds = open_dataset(f"{tmp_path / 'saved'}@test", prep=PAPER, processor=processor)
    assert len(ds) == GEO_ROWS["test"] and ds.source.endswith("saved@test")
    assert _rows(ds) == _rows(open_dataset("hiyouga/geometry3k@test", prep=PAPER, processor=processor))


def _counting_checks(monkeypatch):
    """The rows cppo.rl.checks.check_row is called on (in this process: num_proc 1)."""
    import cppo.rl.checks as checks

    calls, check = [], checks.check_row
    monkeypatch.setattr(checks, "check_row", lambda row, *a, **k: calls.append(row) or check(row, *a, **k))
    return calls


def _outcome(ds):
    return _rows(ds), ds.summary(), ds.skipped, ds.dropped, ds.fingerprint


def test_the_check_is_cached_by_the_datasets_fingerprint_and_a_second_launch_reads_it(
    published, processor, monkeypatch, tmp_path
):
    cache = tmp_path / "cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    calls = _counting_checks(monkeypatch)
    data = tmp_path / "virl"
    shutil.copytree(published["virl"], data)
    first = open_dataset(data, prep=PAPER, processor=processor)
    assert len(calls) == VIRL_ROWS and len(list((cache / "cppo_checks").glob("check-*.arrow"))) == 1
    again = open_dataset(data, prep=PAPER, processor=processor, num_proc=1)  # a second launch
    assert len(calls) == VIRL_ROWS and _outcome(again) == _outcome(first)  # read back, not checked
    assert again[1].images[0].size == (47, 28)
    strict = Preprocessing(max_prompt_length=4096)  # strictness and the length limit reuse the check
    assert len(open_dataset(data, strict=True, prep=strict, processor=processor)) == VIRL_ROWS - 1
    assert len(calls) == VIRL_ROWS
    none = open_dataset(data, prep=Preprocessing.none())  # other options: checked again
    assert len(calls) == 2 * VIRL_ROWS and len(none) == VIRL_ROWS
    import cppo.rl.checks as checks

    monkeypatch.setattr(checks, "_CODE", ["another version of the check"])  # checked again, but the
    assert _outcome(open_dataset(data, prep=PAPER, processor=processor)) == _outcome(first)  # same data
    assert len(calls) == 3 * VIRL_ROWS
    # two processes give the outcome one gives (another cache: the check itself runs again)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache2"))
    assert _outcome(open_dataset(data, prep=PAPER, processor=processor, num_proc=2)) == _outcome(first)
    # changed data at the same path: checked again, and another fingerprint (a resume refuses it)
    raw = datasets.load_dataset("parquet", data_files=str(data / "39Krelease.parquet"), split="train")
    answers = ["\\boxed{9}"] + raw["answer"][1:]
    raw.remove_columns("answer").add_column("answer", answers).to_parquet(str(tmp_path / "x.parquet"))
    shutil.move(tmp_path / "x.parquet", data / "39Krelease.parquet")
    changed = open_dataset(data, prep=PAPER, processor=processor)
    assert changed[0].answer == "9" and changed.fingerprint != first.fingerprint
    assert (
        data_fingerprint(again) == data_fingerprint(first) == first.fingerprint != data_fingerprint(changed)
    )


def test_the_check_of_a_save_to_disk_folder_never_writes_into_it(published, tmp_path, monkeypatch, capsys):
    saved = tmp_path / "saved"
    raw = datasets.load_dataset("parquet", data_files=str(published["virl"] / "39Krelease.parquet"))
    raw.save_to_disk(str(saved))
    before = sorted(p.relative_to(saved) for p in saved.rglob("*"))
    calls = _counting_checks(monkeypatch)
    prep = Preprocessing.none()
    first = open_dataset(saved, image_root=published["virl"], prep=prep)
    again = open_dataset(saved, image_root=published["virl"], prep=prep)
    assert len(calls) == VIRL_ROWS and _outcome(again) == _outcome(first)  # cached under HF_DATASETS_CACHE
    assert sorted(p.relative_to(saved) for p in saved.rglob("*")) == before  # nothing beside the data
    (tmp_path / "file").write_text("")  # a datasets cache that cannot be written: no cache, same outcome
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "file" / "cache"))
    assert _outcome(open_dataset(saved, image_root=published["virl"], prep=prep)) == _outcome(first)
    assert len(calls) == 2 * VIRL_ROWS and "the data check is not cached" in capsys.readouterr().err
    assert sorted(p.relative_to(saved) for p in saved.rglob("*")) == before


def test_the_resume_fingerprint_of_parquet_follows_its_files_and_of_save_to_disk_its_contents(
    published, tmp_path
):
    """datasets' own _fingerprint: a parquet file's follows its path and modification time, so a copy
    elsewhere (or the same bytes written again) counts as changed data for a resume (docs/training.md,
    "Data"); a save_to_disk folder keeps its fingerprint in a copy."""
    prep = Preprocessing.none()
    first, copy = tmp_path / "a", tmp_path / "b"
    shutil.copytree(published["virl"], first)
    shutil.copytree(published["virl"], copy)
    same = open_dataset(first, prep=prep).fingerprint
    assert open_dataset(first, prep=prep).fingerprint == same  # the same files: the same fingerprint
    assert open_dataset(copy, prep=prep).fingerprint != same
    raw = datasets.load_dataset("parquet", data_files=str(first / "39Krelease.parquet"), split="train")
    raw.save_to_disk(str(tmp_path / "saved"))
    shutil.copytree(tmp_path / "saved", tmp_path / "saved2")
    saved = [open_dataset(tmp_path / name, image_root=first, prep=prep) for name in ("saved", "saved2")]
    assert saved[0].fingerprint == saved[1].fingerprint


def test_columns_can_be_mapped(published, tmp_path):
    raw = datasets.load_dataset("parquet", data_files=str(published["virl"] / "39Krelease.parquet"))["train"]
    renamed = raw.rename_columns({"question": "prompt", "answer": "truth", "image": "pictures"})
    renamed.to_parquet(str(tmp_path / "train.parquet"))
    with pytest.raises(DataError, match="needs a question/problem column .* --data-columns question=COLUMN"):
        open_dataset(tmp_path / "train.parquet")
    ds = open_dataset(
        tmp_path / "train.parquet",
        columns="question=prompt,answer=truth,image=pictures",
        image_root=published["virl"],
        prep=Preprocessing.none(),
    )
    assert _rows(ds) == _rows(open_dataset(published["virl"], prep=Preprocessing.none()))
    with pytest.raises(DataError, match="maps image to 'pics', which it does not have; it has prompt"):
        open_dataset(tmp_path / "train.parquet", columns="question=prompt,answer=truth,image=pics")
    assert parse_columns(" image = images , question=problem ") == {"image": "images", "question": "problem"}
    for bad, message in (("image", "is not NAME=COLUMN"), ("picture=x", "unknown name 'picture'")):
        with pytest.raises(ValueError, match=message):
            parse_columns(bad)
        with pytest.raises(ConfigError, match=f"data_columns: data columns: .*{message}"):
            TrainConfig(data_columns=bad)


def test_hub_ids_and_their_errors(published, processor, monkeypatch, tmp_path):
    assert split_spec("hiyouga/geometry3k@test") == ("hiyouga/geometry3k", "test")
    assert split_spec("TIGER-Lab/ViRL39K") == ("TIGER-Lab/ViRL39K", None)
    odd = tmp_path / "a@b"
    odd.mkdir()
    assert split_spec(str(odd)) == (str(odd), None)  # a path that exists is never split
    assert (
        is_hub_id("TIGER-Lab/ViRL39K") and not is_hub_id(str(tmp_path / "x")) and not is_hub_id("a/b.jsonl")
    )
    with pytest.raises(
        DataError, match=r"^nobody/nothing: not a local path, .*OfflineModeIsEnabled.*hf download"
    ):
        open_dataset("nobody/nothing")
    with pytest.raises(DataError, match="does not exist .*not a hub id"):
        open_dataset(tmp_path / "typo.parquet")
    with pytest.raises(DataError, match=r"row 0: image path 'images/.*--data-image-root DIR"):
        open_dataset("TIGER-Lab/ViRL39K", prep=PAPER, processor=processor)  # relative paths, no folder
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if the data extra were not installed
    with pytest.raises(DataError, match=r"needs the datasets package: pip install 'cppo\[data\]'"):
        open_dataset("TIGER-Lab/ViRL39K")
    with pytest.raises(DataError, match=r"needs the datasets package: pip install 'cppo\[data\]'"):
        open_dataset(published["virl"])


def test_epochs_set_max_steps_from_the_data():
    assert TrainConfig().max_steps == 40 and TrainConfig(max_steps=5, epochs=2).max_steps == 5
    cfg = TrainConfig(epochs=2, prompts_per_step=4)
    assert cfg.max_steps is None
    assert resolve_max_steps(cfg, 10) and cfg.max_steps == 5  # 20 prompts, 4 a step
    assert not resolve_max_steps(cfg, 1000) and cfg.max_steps == 5  # set once, never again
    paper = TrainConfig(epochs=2, prompts_per_step=512, group_size=5, mini_batch_size=320, micro_batch_size=8)
    resolve_max_steps(paper, 38870)
    assert paper.max_steps == 152  # one stream: 77,740 prompts / 512 = 151.8, rounded up
    official = TrainConfig(epochs=2, prompts_per_step=512, group_size=5, drop_last=True)
    resolve_max_steps(official, 38870)
    assert official.max_steps == 150  # verl: len(dataloader) = floor(38,870 / 512) = 75 steps, x 2 epochs
    half = TrainConfig(epochs=1.5, prompts_per_step=4, drop_last=True)
    assert resolve_max_steps(half, 10) and half.max_steps == 3  # floor(10 / 4) = 2 a step, x 1.5
    with pytest.raises(
        ConfigError, match=r"drop_last: the 3 training samples make no full step of 4 prompts"
    ):
        resolve_max_steps(TrainConfig(max_steps=9, prompts_per_step=4, drop_last=True), 3)
    for kwargs, message in (
        (dict(epochs=0), "epochs must be > 0"),
        (dict(min_pixels=5000, max_pixels=4000), "min_pixels 5000 is over max_pixels 4000"),
        (dict(max_prompt_length=0), "max_prompt_length must be >= 1"),
        (dict(min_image_side=-1), "min_image_side must be >= 0"),
    ):
        with pytest.raises(ConfigError, match=message):
            TrainConfig(**kwargs)


def test_preprocessing_of_a_config_is_its_fields():
    cfg = TrainConfig(drop_multi_image=False, max_prompt_length=None)
    assert Preprocessing.of(cfg) == Preprocessing(drop_multi_image=False, max_prompt_length=None)
    assert Preprocessing.of(TrainConfig()) == PAPER  # the paper's, by default


def test_the_dataset_folder_of_parquet_files_takes_the_split_names_as_the_hub_does(tmp_path):
    for name in ("data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet", "test/x.parquet"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "train-old.parquet").write_bytes(b"")
    assert [p.name for p in parquet_files(tmp_path, "train")] == [
        "train-00000-of-00002.parquet",
        "train-00001-of-00002.parquet",
    ]
    assert parquet_files(tmp_path, "test") == [tmp_path / "test" / "x.parquet"]
    single = tmp_path / "single"
    single.mkdir()
    (single / "39Krelease.parquet").write_bytes(b"")
    assert parquet_files(single, "train") == [single / "39Krelease.parquet"] and not parquet_files(
        single, "val"
    )


def test_data_path_resolution_keeps_jsonl_relative_paths(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (30, 30)).save(tmp_path / "images" / "a.png")
    (tmp_path / "data.jsonl").write_text(
        '{"image": "images/a.png", "question": "q", "answer": "\\\\boxed{2}"}\n'
    )
    ds = open_dataset(tmp_path, prep=Preprocessing(boxed_answer=False, max_prompt_length=None))
    assert ds[0].answer == "\\boxed{2}" and ds[0].images[0].size == (30, 30)
    assert Path(ds.base) == tmp_path


def test_a_damaged_parquet_file_in_a_folder_is_named_before_datasets_reads_any(published, tmp_path):
    folder = tmp_path / "parquet"
    shutil.copytree(published["virl"], folder)
    good = folder / "39Krelease.parquet"
    bad = folder / "39Kextra.parquet"  # no split in the names: both are the training data
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # cut: its footer is gone
    with pytest.raises(DataError, match=r"39Kextra\.parquet: not a readable parquet file .*write it again"):
        open_dataset(folder)


# --- each source end to end: cppo-train --max-steps 2 on the demo model, the paper's preprocessing
def _train(out, *flags):
    from cli.train import main

    tiny = "--max-steps 2 --prompts-per-step 2 --group-size 2 --micro-batch-size 2 --max-new-tokens 16"
    return main([*map(str, flags), "--output-dir", str(out), *tiny.split(), "--no-tensorboard"])


def _sources(published, tmp_path) -> dict[str, tuple[str, Path | None]]:
    """{name: (--data, --data-image-root)} of the four kinds of source, ViRL39K- or Geometry3K-shaped."""
    geo = published["geo"]
    files = {s: str(geo / "data" / f"{s}-00000-of-00001.parquet") for s in GEO_ROWS}
    datasets.load_dataset("parquet", data_files=files).save_to_disk(str(tmp_path / "saved"))
    return {
        "hub id": ("TIGER-Lab/ViRL39K", published["virl"]),  # its image paths need the unpacked folder
        "parquet with paths": (str(published["virl"] / "39Krelease.parquet"), None),
        "parquet with bytes": (f"{geo}@train", None),
        "save_to_disk": (f"{tmp_path / 'saved'}@train", None),
    }


@pytest.mark.slow
@pytest.mark.parametrize("source", ["hub id", "parquet with paths", "parquet with bytes", "save_to_disk"])
def test_each_source_trains_two_steps_with_the_papers_preprocessing(published, tmp_path, capsys, source):
    data, image_root = _sources(published, tmp_path)[source]
    flags = ["--data", data] + (["--data-image-root", image_root] if image_root else [])
    if source == "hub id":  # and the validation set as the paper's: Geometry3K's test split, by hub id
        flags += ["--eval-data", "hiyouga/geometry3k@test", "--eval-every", "2"]
    assert _train(tmp_path / "run", *flags) == 0
    out = capsys.readouterr().out
    run = tmp_path / "run"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    config = yaml.safe_load((run / "config.yaml").read_text())
    paper = {"max_prompt_length": 512, "drop_multi_image": True, "min_image_side": 28, "boxed_answer": True}
    assert {k: config[k] for k in paper} == paper  # the defaults are the paper's preprocessing
    questions = {r.question for r in open_dataset(data, image_root=image_root).records}
    rollouts = [json.loads(line) for line in (run / "rollouts.jsonl").read_text().splitlines()]
    assert rollouts and {r["question"] for r in rollouts} <= questions
    if "ViRL39K" in data:
        assert "6 samples; dropped by the preprocessing 2: 1 multi-image, 1 prompt over 512 tokens" in out
    if source == "hub id":
        assert "[cppo] eval data hiyouga/geometry3k@test: 3 samples" in out and "eval/accuracy" in metrics[-1]
        last = metrics[-1]  # the run's reward on the same greedy answers, as verl validates
        assert last["eval/reward/accuracy"] == last["eval/accuracy"]  # the same grader here, K = 1
        assert last["eval/reward/total"] == pytest.approx(
            0.9 * last["eval/accuracy"] + 0.1 * last["eval/format"]
        )


@pytest.mark.slow
def test_epochs_set_the_run_length_from_the_data(published, tmp_path, capsys):
    from cli.train import main

    geo = published["geo"]
    flags = ["--data", f"{geo}@train", "--epochs", "1", "--prompts-per-step", "2", "--group-size", "2"]
    assert (
        main([*flags, "--micro-batch-size", "2", "--max-new-tokens", "8", "--output-dir", str(tmp_path)]) == 0
    )
    assert "[cppo] 1 epochs of 4 samples = 2 steps" in capsys.readouterr().out
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


@pytest.mark.slow
def test_cppo_eval_takes_the_same_sources_and_preprocessing(published, tmp_path, capsys):
    from cli.eval import main

    out = tmp_path / "eval.json"
    flags = ["--samples", "2", "--temperature", "1.0", "--max-new-tokens", "16", "--out", str(out)]
    assert main(["--data", "hiyouga/geometry3k@test", *flags]) == 0
    report = json.loads(out.read_text())
    assert report["data"] == "hiyouga/geometry3k@test" and report["n"] == GEO_ROWS["test"]
    assert main(["--data", str(published["virl"]), "--split", "train", *flags]) == 0
    report = json.loads(out.read_text())
    assert report["dropped"] == {"multi-image": 1, "prompt over 512 tokens": 1} and report["n"] == 6
    capsys.readouterr()
    assert main(["--data", str(published["virl"]), "--split", "train", "--strict", *flags]) == 2
    assert "row 3: prompt of" in capsys.readouterr().err
    args = ["--data", str(published["virl"]), "--split", "train", "--no-drop-multi-image"]
    assert main([*args, "--max-prompt-length", "none", *flags]) == 0
    assert json.loads(out.read_text())["n"] == VIRL_ROWS


@pytest.mark.slow
def test_a_resume_on_a_parquet_source_compares_its_datasets_fingerprint(
    published, tmp_path, capsys, monkeypatch
):
    from cli.train import main

    data = tmp_path / "virl"
    shutil.copytree(published["virl"], data)
    tiny = "--prompts-per-step 2 --group-size 2 --micro-batch-size 2 --max-new-tokens 8 --no-tensorboard"
    args = ["--data", str(data), "--output-dir", str(tmp_path / "run"), *tiny.split()]
    assert main([*args, "--max-steps", "1"]) == 0
    calls = _counting_checks(monkeypatch)
    assert main([*args, "--max-steps", "2", "--resume", "auto"]) == 0  # the same data: resumed
    assert not calls and "resumed from" in capsys.readouterr().out  # its check read back from the cache
    raw = datasets.load_dataset("parquet", data_files=str(data / "39Krelease.parquet"), split="train")
    answers = ["\\boxed{9}"] + raw["answer"][1:]
    raw.remove_columns("answer").add_column("answer", answers).to_parquet(str(tmp_path / "x.parquet"))
    shutil.move(tmp_path / "x.parquet", data / "39Krelease.parquet")
    assert main([*args, "--max-steps", "3", "--resume", "auto"]) == 2
    assert "data contents (the samples differ from the checkpoint's)" in capsys.readouterr().err
