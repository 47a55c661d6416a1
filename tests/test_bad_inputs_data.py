"""Hostile model folders and data files given to cppo-train, cppo-eval and cppo-detect: one stderr line
naming the file (its line, its field), exit 2, no traceback, nothing written, and the refusal comes
before any model loads (the loaders are replaced by pytest.fail). Issue 18, points 5, 8, 9 and 10;
tests/test_bad_inputs.py holds the numbers, devices, presets, images and outputs.

Every bad file is written here: copies of the bundled demo model broken one way each, and small
JSONL / parquet files with one bad line after a good one.
"""

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from PIL import Image

from cli.detect import main as detect_main
from cli.eval import main as eval_main
from cli.train import main as train_main
from cppo.models import demo_model_path, load_processor
from cppo.rl.checks import Preprocessing
from cppo.rl.data import open_dataset

GOOD = {"question": "What colour is the square?", "answer": "red"}


def _break_models(root: Path) -> None:
    """One copy of the demo model per fault, named after it."""

    def copy(name: str) -> Path:
        return Path(shutil.copytree(demo_model_path(), root / name))

    def edit_config(folder: Path, **changes) -> None:
        config = json.loads((folder / "config.json").read_text())
        config.update(changes)
        (folder / "config.json").write_text(json.dumps(config))

    weights = copy("truncated") / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    weights = copy("bad-header") / "model.safetensors"
    weights.write_bytes(b"\xff" * 8 + weights.read_bytes()[8:])  # same size, header length garbage
    qwen2 = copy("qwen2")  # a text-only Qwen2 config: what a wrong download looks like
    text = json.loads((qwen2 / "config.json").read_text())["text_config"]
    (qwen2 / "config.json").write_text(json.dumps({**text, "model_type": "qwen2"}))
    no_tokenizer = copy("no-tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (no_tokenizer / name).unlink()
    (copy("not-json") / "config.json").write_text('{"model_type": "qwen2_5_vl",\n  oops}\n')
    (copy("no-config") / "config.json").unlink()
    (copy("no-weights") / "model.safetensors").unlink()
    sharded = copy("missing-shard")
    (sharded / "model.safetensors").rename(sharded / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    edit_config(copy("image-token"), image_token_id=5)  # the tokenizer's <|image_pad|> is another id
    (copy("no-chat-template") / "chat_template.jinja").unlink()
    adapter = root / "lora-adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    layers = copy("extra-layer")  # the config asks for a layer the weights do not hold
    text = json.loads((layers / "config.json").read_text())
    extra = text["text_config"]["num_hidden_layers"] + 1
    text["text_config"].update(num_hidden_layers=extra, layer_types=["full_attention"] * extra)
    (layers / "config.json").write_text(json.dumps(text))


def _lines(path: Path, *lines: str) -> str:
    path.write_text("".join(line + "\n" for line in lines))
    return path.name


def _write_data(data: Path) -> None:
    """Good line 1, the fault on line 2 (the image a real one, so only the fault is wrong)."""
    data.mkdir()
    Image.new("RGB", (56, 56), (200, 10, 10)).save(data / "red.png")
    Image.new("RGB", (56, 56), (10, 200, 10)).save(data.parent / "outside.png")
    good = json.dumps({**GOOD, "image": "red.png"})
    _lines(data / "good.jsonl", good, good)
    _lines(data / "deep.jsonl", good, '{"question": "q", "answer": ' + "[" * 200_000 + "]" * 200_000 + "}")
    (data / "latin1.jsonl").write_bytes(good.encode() + b'\n{"question": "caf\xe9?", "answer": "a"}\n')
    (data / "corrupt.parquet").write_bytes(b"PAR1" + os.urandom(300) + b"PAR1")
    _lines(data / "array.jsonl", json.dumps([GOOD, GOOD]))
    for name, row in {
        "answer-list": {"question": "Which colours?", "answer": ["red", "blue"]},
        "answer-dict": {"question": "q", "answer": {"value": 3}},
        "answer-bool": {"question": "Is it red?", "answer": True},
        "answer-nan": {"question": "q", "answer": float("nan")},  # json.dumps writes NaN, json reads it
        "question-list": {"question": ["a", "b"], "answer": "a"},
        "type-dict": {**GOOD, "question_type": {"kind": "colour"}},
    }.items():
        _lines(data / f"{name}.jsonl", good, json.dumps({**row, "image": "red.png"}))
    _lines(data / "escape.jsonl", good, json.dumps({**GOOD, "image": "../outside.png"}))
    _lines(data / "absolute.jsonl", good, json.dumps({**GOOD, "image": "/etc/passwd"}))
    long_question = "How many " + "seven " * 3000 + "?"  # ~3000 tokens: over the demo's 2048 positions
    _lines(data / "long.jsonl", good, json.dumps({"question": long_question, "answer": "7"}))


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-data")
    (root / "models").mkdir()
    _break_models(root / "models")
    _write_data(root / "data")
    return root


@pytest.fixture
def no_model_load(monkeypatch):
    """Any model load fails the test: these refusals must come before it."""
    import cppo.models
    import cppo.rl.run

    def fail(*args, **kwargs):
        pytest.fail("the model was loaded before the refusal")

    monkeypatch.setattr(cppo.rl.run, "build_policy", fail)
    monkeypatch.setattr(cppo.models, "load_model_and_processor", fail)


def _run(command: str, argv: list[str], d: Path, tmp_path: Path, capsys, loads: bool = False) -> str:
    """Run a command in-process on argv ({d} is the corpus folder); check the refusal; its one line
    (`loads`: transformers' weight-loading progress bar may come first)."""
    argv = [a.replace("{d}", str(d)) for a in argv]
    data = [] if "--data" in argv or command == "detect" else ["--data", f"{d}/data/good.jsonl"]
    out = tmp_path / "out"
    if command == "train":
        code = train_main([*argv, *data, "--output-dir", str(out), "--max-steps", "1"])
    elif command == "eval":
        code = eval_main([*argv, *data, "--out", str(out / "eval.json")])
    else:
        code = detect_main([*argv, "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2, (argv, code, err)
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if not (loads and line.startswith("Loading weights"))]
    assert len(lines) == 1, lines
    # nothing written: cppo-train makes its run folder (the writable check) before the data, empty
    assert not out.exists() or not any(out.iterdir()), list(out.rglob("*"))
    return lines[0]


# the demo tokenizer's own id of <|image_pad|>, which the broken config contradicts
IMAGE_PAD = next(
    t["id"]
    for t in json.loads((demo_model_path() / "tokenizer.json").read_text())["added_tokens"]
    if t["content"] == "<|image_pad|>"
)
MODELS = [
    ("truncated", "model.safetensors is truncated or corrupt"),
    ("bad-header", "model.safetensors is not a whole safetensors file"),
    ("qwen2", "model_type is 'qwen2' (a text-only model); cppo needs a Qwen2.5-VL checkpoint"),
    ("no-tokenizer", "has no tokenizer_config.json and no tokenizer.json"),
    ("not-json", "config.json:2: the model's config is not valid JSON"),
    ("no-config", "has no config.json"),
    ("no-weights", "has no weights"),
    ("missing-shard", "names shards that are missing: model-00002-of-00002.safetensors"),
    ("image-token", f"tokenizer.json: <|image_pad|> is {IMAGE_PAD}, config.json's image_token_id 5"),
    ("no-chat-template", "has no chat template"),
    ("lora-adapter", "it holds a LoRA adapter"),
]
COMMANDS = ["train", "eval", "detect"]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("model, expected", MODELS, ids=[m for m, _ in MODELS])
def test_a_broken_model_folder_is_one_line_before_it_loads(
    d, tmp_path, capsys, no_model_load, command, model, expected
):
    line = _run(command, ["--model", f"{{d}}/models/{model}"], d, tmp_path, capsys)
    assert expected in line and model in line


@pytest.mark.parametrize("command", COMMANDS)
def test_weights_that_do_not_fit_the_config_are_one_line(d, tmp_path, capsys, command):
    """Found only by loading (transformers would start the missing layer at random); cppo-train finds
    it while building the policy, after the data, and writes nothing into its run folder."""
    line = _run(command, ["--model", "{d}/models/extra-layer"], d, tmp_path, capsys, loads=True)
    assert "weights do not fit its config.json (12 missing" in line


@pytest.mark.parametrize(
    "model, expected",
    [
        ("not-json", "config.json:2: the model's config is not valid JSON"),
        ("qwen2", "model_type is 'qwen2' (a text-only model)"),
    ],
)
def test_a_dry_run_refuses_a_model_config_it_cannot_read_in_one_line(d, tmp_path, capsys, model, expected):
    """cppo-train --dry-run reads the model's config.json for the memory plan: one line and exit 2, the
    run's own refusal, and no half-printed plan on stdout."""
    argv = ["--model", f"{d}/models/{model}", "--output-dir", str(tmp_path / "run"), "--dry-run"]
    assert train_main(argv) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cppo-train: error: ") and expected in lines[0], lines
    assert out == "" and not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", COMMANDS)
def test_a_hub_id_not_in_the_cache_fails_at_once_offline(
    d, tmp_path, capsys, monkeypatch, no_model_load, command
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    line = _run(command, ["--model", "nobody-org/no-such-vl-model"], d, tmp_path, capsys)
    assert "not in the hub cache" in line and time.time() - t0 < 10


@pytest.mark.parametrize(
    "error, expected",
    [
        ("not found", "is not on the Hugging Face hub (a typo?"),
        ("no network", "cannot reach the Hugging Face hub to look up model"),
    ],
)
def test_a_mistyped_hub_id_online_costs_one_request_not_retries(
    d, tmp_path, capsys, monkeypatch, no_model_load, error, expected
):
    """With the hub allowed, an id that is not cached is looked up once: no retried downloads."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    calls = []

    def model_info(self, repo_id, **kwargs):
        calls.append((repo_id, kwargs.get("timeout")))
        if error == "not found":
            e = RepositoryNotFoundError.__new__(RepositoryNotFoundError)
            Exception.__init__(e, "404 Client Error: Repository Not Found")
            raise e
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(HfApi, "model_info", model_info)
    line = _run("eval", ["--model", "Qwen/Qwen2.5-VL-3B-Instructt"], d, tmp_path, capsys)
    assert expected in line and "Qwen/Qwen2.5-VL-3B-Instructt" in line
    assert calls == [("Qwen/Qwen2.5-VL-3B-Instructt", 15)]


STRICT = {"train": "--data-strict", "eval": "--strict", "detect": "--strict"}
WRONG = "answer of the wrong type: answer is a"
TE = ["train", "eval"]
DATA = [
    ("deep.jsonl", "deep.jsonl:2: JSON nested too deeply to read", COMMANDS),
    ("latin1.jsonl", "latin1.jsonl:2: not UTF-8 (byte 0xe9", COMMANDS),
    ("corrupt.parquet", "corrupt.parquet: not a readable parquet file", COMMANDS),
    ("array.jsonl", "array.jsonl:1: expected a JSON object, got list; JSON Lines expected", COMMANDS),
    ("answer-list.jsonl", f"answer-list.jsonl:2: {WRONG} list (['red', 'blue'])", COMMANDS),
    ("answer-dict.jsonl", f"answer-dict.jsonl:2: {WRONG} dict", TE),
    ("answer-bool.jsonl", f"answer-bool.jsonl:2: {WRONG} bool (True)", TE),
    ("answer-nan.jsonl", f"answer-nan.jsonl:2: {WRONG} float (nan)", TE),
    ("question-list.jsonl", "question-list.jsonl:2: question of the wrong type", TE),
    ("type-dict.jsonl", "type-dict.jsonl:2: question_type of the wrong type", TE),
    ("escape.jsonl", "escape.jsonl:2: image outside the data folder: '../outside.png'", COMMANDS),
    ("absolute.jsonl", "absolute.jsonl:2: image outside the data folder: '/etc/passwd'", COMMANDS),
]


@pytest.mark.parametrize(
    "command, name, expected",
    [(c, name, expected) for name, expected, commands in DATA for c in commands],
    ids=[f"{c}-{name}" for name, _, commands in DATA for c in commands],
)
def test_a_bad_data_file_is_one_line_naming_file_and_line(
    d, tmp_path, capsys, no_model_load, command, name, expected
):
    line = _run(command, ["--data", f"{{d}}/data/{name}", STRICT[command]], d, tmp_path, capsys)
    assert expected in line


@pytest.mark.parametrize("command", ["train", "eval"])
def test_a_prompt_over_the_models_positions_never_reaches_it(d, tmp_path, capsys, no_model_load, command):
    """--max-prompt-length none (no drop by the preprocessing): the model's 2048 positions still bound."""
    argv = ["--data", "{d}/data/long.jsonl", STRICT[command], "--max-prompt-length", "none"]
    line = _run(command, argv, d, tmp_path, capsys)
    assert "long.jsonl:2: prompt of" in line
    assert "leaves no room for a response in the model's 2048 positions (max_position_embeddings)" in line


# ------------------------------------------------------------------- without --data-strict: counted


@pytest.fixture(scope="module")
def processor():
    return load_processor(demo_model_path())


def test_values_of_the_wrong_type_are_counted_skips_never_text(d):
    rows = [
        {**GOOD, "answer": 3},  # a number becomes its text
        {**GOOD, "answer": 2.5},
        {"question": "Which colours?", "answer": ["red", "blue"]},
        {"question": "Is it red?", "answer": True},
        {"question": "q", "answer": {"value": 3}},
        {"question": "q", "answer": float("nan")},
        {"question": ["a"], "answer": "a"},
    ]
    path = d / "data" / "mixed.jsonl"
    _lines(path, *map(json.dumps, rows))
    ds = open_dataset(path)
    assert [r.answer for r in ds.records] == ["3", "2.5"]  # never "['red', 'blue']", "True" or "nan"
    assert ds.skipped == {"answer of the wrong type": 4, "question of the wrong type": 1}
    assert "mixed.jsonl:3: answer of the wrong type: answer is a list (['red', 'blue'])" in ds.summary()


def test_a_json_file_holding_one_array_is_read_as_records_named_by_line(d):
    path = d / "data" / "records.json"
    path.write_text(json.dumps([GOOD, {**GOOD, "answer": "blue"}], indent=1))
    ds = open_dataset(path)
    assert [r.answer for r in ds.records] == ["red", "blue"]
    assert [r.source.rsplit(":", 1)[1] for r in ds.records] == ["2", "6"]  # each object's first line
    (d / "data" / "broken.json").write_text('[\n {"question": "q", "answer": "a"},\n {"question": }\n]\n')
    with pytest.raises(ValueError, match=r"broken\.json:3: not valid JSON"):
        open_dataset(d / "data" / "broken.json")


def test_images_outside_the_data_folder_are_skipped_unless_allowed(d):
    skipped = open_dataset(d / "data" / "escape.jsonl")
    assert len(skipped) == 1 and skipped.skipped == {"image outside the data folder": 1}
    allowed = open_dataset(d / "data" / "escape.jsonl", allow_outside_images=True)
    assert len(allowed) == 2 and allowed[1].images[0].getpixel((0, 0)) == (10, 200, 10)
    rooted = d / "data" / "rooted.jsonl"  # with an image root, that is the folder images must lie in
    _lines(
        rooted,
        json.dumps({**GOOD, "image": "outside.png"}),
        json.dumps({**GOOD, "image": "data/../../x.png"}),
    )
    ds = open_dataset(rooted, image_root=d)
    assert len(ds) == 1 and ds.skipped == {"image outside the data folder": 1}
    assert "--data-allow-outside-images" in skipped.summary()


def test_the_allow_flag_reaches_the_data_from_both_commands():
    from cli.eval import build_parser
    from cppo.rl.flags import parse_args

    assert parse_args(["--data-allow-outside-images"]).data_allow_outside_images is True
    assert parse_args([]).data_allow_outside_images is False
    assert build_parser().parse_args(["--data", "x", "--data-allow-outside-images"]).data_allow_outside_images


def test_cppo_detect_data_confines_images_unless_allowed(d, capsys):
    """cppo-detect --data applies the same rule as train and eval, and takes the same flag."""
    from cli.detect import _examples, build_parser

    argv = ["--data", str(d / "data" / "escape.jsonl")]
    confined, _ = _examples(build_parser().parse_args(argv))
    assert "image outside the data folder" in capsys.readouterr().err
    allowed, _ = _examples(build_parser().parse_args([*argv, "--data-allow-outside-images"]))
    assert len(confined) == 1 and len(allowed) == 2
    assert allowed[1].images[0].getpixel((0, 0)) == (10, 200, 10)  # ../outside.png, opened when allowed
    with pytest.raises(ValueError, match=r"escape\.jsonl:2: image outside the data folder"):
        _examples(build_parser().parse_args([*argv, "--strict"]))


def test_a_long_prompt_is_a_counted_skip_with_the_length_limit_off(d, processor):
    ds = open_dataset(
        d / "data" / "long.jsonl", prep=Preprocessing(max_prompt_length=None), processor=processor
    )
    assert len(ds) == 1 and ds.skipped == {"prompt over the model's 2048 positions": 1}
    assert "long.jsonl:2: prompt of" in ds.summary()
