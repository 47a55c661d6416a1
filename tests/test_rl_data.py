import io
import json

import pytest
from PIL import Image

from cppo.rl.checks import open_image
from cppo.rl.data import open_dataset, shapes_data
from cppo.rl.sources import DataError, find_split


def _png(path, size=(32, 24), color=(200, 10, 10), mode="RGB"):
    Image.new(mode, size, color).save(path)
    return path.name


def _write(tmp_path, rows, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "images").mkdir()
    for i in range(3):
        _png(tmp_path / "images" / f"{i}.png", color=(i * 80, 0, 0))
    return tmp_path


def test_jsonl_relative_paths_text_only_and_multi_image_are_kept(folder):
    _write(
        folder,
        [
            {"image": "images/0.png", "question": "What colour?", "answer": "red", "question_type": "colour"},
            {"images": ["images/1.png", "images/2.png"], "question": "Same colour?", "answer": "no"},
            {"question": "What is 1/2 + 1/2?", "answer": "\\boxed{1}"},  # text-only; boxed truth unwrapped
            {"images": [], "problem": "<image> Count the sides.", "answer": 4},  # problem key, <image> tag
        ],
    )
    ds = open_dataset(folder)  # a folder is read as its data.jsonl
    assert len(ds) == 4 and ds.text_only == 2 and ds.multi_image == 1
    s0, s1, s2, s3 = (ds[i] for i in range(4))
    assert [im.size for im in s0.images] == [(32, 24)] and s0.images[0].mode == "RGB"
    assert s0.question_type == "colour" and s0.source.endswith("data.jsonl:1")
    assert len(s1.images) == 2 and s1.images[1].getpixel((0, 0)) == (160, 0, 0)
    assert s2.images == [] and s2.answer == "1"
    assert s3.question == "Count the sides." and s3.answer == "4"
    assert ds.question_types == ["colour"]
    assert "4 samples (2 text-only, 1 multi-image)" in ds.summary()


def test_split_layout_of_the_shapes_export(folder):
    (folder / "val").mkdir()
    _write(folder / "val", [{"image": "../images/0.png", "question": "q", "answer": "a"}])
    assert len(open_dataset(folder, split="val")) == 1


def test_image_paths_stay_in_the_data_folder_of_each_layout(folder):
    """The folder is the file's, or the one above a split folder (the shapes export's ../images/);
    a symlink placed inside it is followed (the user put it there); other paths are counted skips."""
    (folder / "val").mkdir()
    (folder / "linked").symlink_to(folder / "images")
    rows = [
        {"image": "../images/0.png", "question": "q", "answer": "a"},
        {"image": "../linked/1.png", "question": "q", "answer": "a"},
        {"image": "../../images/0.png", "question": "q", "answer": "a"},  # above the dataset folder
        {"image": str(folder / "images" / "2.png"), "question": "q", "answer": "a"},  # absolute, inside
    ]
    _write(folder / "val", rows)
    ds = open_dataset(folder, split="val")
    assert [r.source[-1] for r in ds.records] == ["1", "2", "4"]
    assert ds.skipped == {"image outside the data folder": 1} and "data.jsonl:3" in ds.summary()
    with pytest.raises(
        DataError, match=r"data\.jsonl:3: image outside the data folder: '\.\./\.\./images/0\.png'"
    ):
        open_dataset(folder, split="val", strict=True)


def test_broken_json_line_is_an_error_naming_the_line(folder):
    path = _write(
        folder, [{"image": "images/0.png", "question": "q", "answer": "a"}, "", '{"question": "q",']
    )
    with pytest.raises(DataError, match=r"data\.jsonl:3: not valid JSON"):
        open_dataset(path)


def test_non_object_line_is_an_error(folder):
    path = _write(folder, ['["a list"]'])
    with pytest.raises(DataError, match=r"data\.jsonl:1: expected a JSON object, got list"):
        open_dataset(path)


def test_bad_samples_are_skipped_with_counts_and_lines(folder):
    (folder / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    _png(folder / "images" / "thin.png", size=(402, 2))  # aspect ratio 201 > 200
    path = _write(
        folder,
        [
            {"image": "images/0.png", "question": "q", "answer": "a"},
            {"image": "images/0.png", "question": "q"},  # 2: missing answer
            {"image": "images/0.png", "question": "q", "answer": "  "},  # 3: empty answer
            {"image": "images/gone.png", "question": "q", "answer": "a"},  # 4: missing image
            {"image": "images/corrupt.png", "question": "q", "answer": "a"},  # 5: corrupt image
            {"image": "images/0.png", "answer": "a"},  # 6: missing question
            {"image": "images/thin.png", "question": "q", "answer": "a"},  # 7: aspect ratio
        ],
    )
    ds = open_dataset(path)
    assert len(ds) == 1
    assert ds.skipped == {
        "missing answer": 2,
        "missing image file": 1,
        "unreadable image": 1,
        "missing question": 1,
        "aspect ratio over 200": 1,
    }
    summary = ds.summary()
    assert "skipped 6" in summary and "data.jsonl:2: missing answer" in summary
    assert "data.jsonl:4: missing image file" in summary and "gone.png" in summary


@pytest.mark.parametrize(
    "line, row, message",
    [
        (2, {"image": "images/0.png", "question": "q"}, "missing answer"),
        (2, {"image": "images/gone.png", "question": "q", "answer": "a"}, "missing image file"),
    ],
)
def test_strict_turns_skips_into_errors_naming_the_line(folder, line, row, message):
    path = _write(folder, [{"image": "images/0.png", "question": "q", "answer": "a"}, row])
    with pytest.raises(DataError, match=rf"data\.jsonl:{line}: {message}"):
        open_dataset(path, strict=True)


def test_no_usable_sample_is_an_error_with_the_reason(folder):
    path = _write(folder, [{"image": "images/0.png", "question": "q", "solutionz": "a"}])
    with pytest.raises(DataError, match=r"no usable sample.*1 missing answer"):
        open_dataset(path)


def test_missing_path_and_unknown_format(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        open_dataset(tmp_path / "nope.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="not a .jsonl or .parquet"):
        open_dataset(tmp_path / "x.csv")


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    _png(tmp_path / "big.png", size=(64, 64))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 px > 1000: Pillow warns, we refuse
    path = _write(
        tmp_path, [{"image": "big.png", "question": "q", "answer": "a"}, {"question": "text", "answer": "a"}]
    )
    assert open_dataset(path).skipped == {"image too large": 1}


def test_transparent_image_is_composited_on_white(tmp_path):
    buf = io.BytesIO()
    Image.new("RGBA", (4, 4), (255, 0, 0, 0)).save(buf, format="PNG")
    assert open_image(buf.getvalue()).getpixel((0, 0)) == (255, 255, 255)
    with pytest.raises(DataError, match="missing image file"):
        open_image({"bytes": None, "path": str(tmp_path / "no.png")})


def _hf_dataset(folder):
    datasets = pytest.importorskip("datasets")
    red = Image.new("RGB", (30, 20), (255, 0, 0))
    return datasets.Dataset.from_dict(
        {
            "images": [[red], [], [red, red]],
            "problem": ["<image>What colour?", "2+2?", "Same?"],
            "answer": ["red", "4", ""],  # the third has no answer: skipped
        },
        features=datasets.Features(
            {
                "images": datasets.List(datasets.Image()),
                "problem": datasets.Value("string"),
                "answer": datasets.Value("string"),
            }
        ),
    )


def test_hf_save_to_disk_folder_and_dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = _hf_dataset(tmp_path)
    ds.save_to_disk(str(tmp_path / "plain"))
    loaded = open_dataset(tmp_path / "plain")
    assert len(loaded) == 2 and loaded.skipped == {"missing answer": 1}
    assert loaded[0].question == "What colour?" and loaded[0].images[0].getpixel((0, 0)) == (255, 0, 0)
    assert loaded[1].images == []
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dict"))
    assert len(open_dataset(tmp_path / "dict", split="test")) == 2
    with pytest.raises(DataError, match="no split 'val'; it has train, test"):
        open_dataset(tmp_path / "dict", split="val")


def test_hf_parquet_file_with_image_paths(folder):
    pytest.importorskip("datasets")
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "image": ["images/0.png", "images/gone.png"],
            "question": ["q1", "q2"],
            "answer": ["a", "b"],
            "question_type": ["t", "t"],
        }
    )
    pq.write_table(table, folder / "train.parquet")
    ds = open_dataset(folder / "train.parquet")
    assert len(ds) == 1 and ds.skipped == {"missing image file": 1} and "row 1" in ds.summary()
    assert ds[0].images[0].size == (32, 24) and ds[0].question_type == "t"
    assert len(open_dataset(folder)) == 1  # a folder of train*.parquet


def test_hf_without_the_needed_columns_names_them(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["x"]}).to_parquet(str(tmp_path / "train.parquet"))
    with pytest.raises(DataError, match="needs a question/problem column.*it has text"):
        open_dataset(tmp_path / "train.parquet")


def test_find_split_beside_the_training_data(tmp_path):
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
        _write(tmp_path / split, [{"question": "q", "answer": "a"}])
    assert find_split(tmp_path, "val") == tmp_path / "val" / "data.jsonl"
    assert find_split(tmp_path / "train" / "data.jsonl", "val") == tmp_path / "val" / "data.jsonl"
    assert find_split(tmp_path, "test") is None
    assert find_split(tmp_path / "train" / "data.jsonl", "train") is None  # no separate split
    datasets = pytest.importorskip("datasets")
    d = datasets.Dataset.from_dict({"question": ["q"], "answer": ["a"]})
    datasets.DatasetDict({"train": d, "validation": d}).save_to_disk(str(tmp_path / "hf"))
    assert find_split(tmp_path / "hf", "validation") == tmp_path / "hf"
    assert find_split(tmp_path / "hf", "val") is None


def test_shapes_data_is_exported_once_and_reused(tmp_path):
    root = shapes_data(tmp_path / "shapes", seed=0, n_train=6, n_val=2, n_test=3)
    train = open_dataset(root)
    assert len(train) == 6 and len(open_dataset(root, split="test")) == 3
    assert train.question_types and all(len(train[i].images) == 1 for i in range(6))
    stamp = (root / "train" / "data.jsonl").stat().st_mtime_ns
    shapes_data(tmp_path / "shapes", seed=0, n_train=6, n_val=2, n_test=3)
    assert (root / "train" / "data.jsonl").stat().st_mtime_ns == stamp  # reused, not rewritten
    shapes_data(tmp_path / "shapes", seed=1, n_train=6, n_val=2, n_test=3)
    assert (root / "train" / "data.jsonl").stat().st_mtime_ns != stamp  # other arguments: re-exported
