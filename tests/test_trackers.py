"""--report-to (cppo.rl.trackers, issue 30): one tiny two-step run reports to W&B (offline), trackio
(its local store), MLflow (a file store) and TensorBoard at once, and what each holds is read back
and compared with the run's config.yaml and metrics.jsonl; a resume continues the same tracker
runs; a tracker that is not installed is one line naming its extra, before any model loads. The
end of a run: summary.json and the printed summary (cppo.rl.summary)."""

import json
import struct
from pathlib import Path

import pytest
import yaml

from cli.train import main as train_main
from cppo.rl.flags import parse_args
from cppo.rl.summary import summarize, summary_text
from cppo.rl.trackers import TRACKERS_FILE, resolve

TRACKED = ("tensorboard", "wandb", "trackio", "mlflow")


def _flags(tiny_dir, data, out, *extra):
    tiny = "--prompts-per-step 2 --group-size 2 --micro-batch-size 2 --max-new-tokens 4 --seed 0"
    return [
        *("--model", str(tiny_dir), "--data", str(data), "--output-dir", str(out), *tiny.split()),
        *("--eval-every", "1", "--eval-at-start", "--eval-data", str(data), "--rollout-table-every", "1"),
        *("--project", "cppo-tests", "--run-name", "tiny", *extra),
    ]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    env = {
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(root / "wandb"),
        "WANDB_SILENT": "true",
        "TRACKIO_DIR": str(root / "trackio"),
        "MLFLOW_TRACKING_URI": f"file:{root / 'mlruns'}",
        "MLFLOW_ALLOW_FILE_STORE": "true",  # mlflow 3 keeps the file store behind this switch
    }
    (root / "wandb").mkdir()
    with pytest.MonkeyPatch.context() as m:
        for k, v in env.items():
            m.setenv(k, v)
        yield root


@pytest.fixture(scope="module")
def tracked_run(tiny_dir, data, stores, tmp_path_factory):
    """Two steps reporting to the four trackers, then a resume to step 3 of the same run."""
    pytest.importorskip("wandb"), pytest.importorskip("trackio"), pytest.importorskip("mlflow")
    out = tmp_path_factory.mktemp("tracked") / "run"
    assert train_main(_flags(tiny_dir, data, out, "--max-steps", "2", "--report-to", *TRACKED)) == 0
    first = json.loads((out / TRACKERS_FILE).read_text())
    after_2 = _metrics(out)
    resumed = ["--max-steps", "3", "--resume", "auto", "--report-to", *TRACKED]
    assert train_main(_flags(tiny_dir, data, out, *resumed)) == 0
    return out, first, after_2


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _numbers(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}


def _config(run: Path) -> dict:
    return yaml.safe_load((run / "config.yaml").read_text())


def _wandb_records(path: Path):
    """The records of an offline W&B run file (LevelDB log blocks of 32 KiB, each record's chunks
    behind a 7-byte header: crc, length, type; after a 7-byte file header)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, chunk = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if n == 0 and kind == 0:  # block padding
            pos += left
            continue
        chunk, pos = chunk + data[pos + 7 : pos + 7 + n], pos + 7 + n
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(chunk)
            chunk = b""
            yield record


def _wandb_run(stores: Path, run_id: str):
    """(config, {step: history row}, table steps) of the offline W&B run `run_id`, every file of it."""
    config, history, tables = {}, {}, []
    for path in sorted((stores / "wandb" / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")):
        for r in _wandb_records(path):
            kind = r.WhichOneof("record_type")
            if kind == "config":
                config.update({i.key: json.loads(i.value_json) for i in r.config.update})
            elif kind == "history":
                row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                history.setdefault(row["_step"], {}).update(row)
                if "rollouts/_type" in row:
                    tables.append(row["_step"])
    return config, history, tables


@pytest.mark.slow
def test_wandb_offline_run_holds_the_config_and_every_metrics_line_and_is_resumed(tracked_run, stores):
    out, first, after_2 = tracked_run
    assert json.loads((out / TRACKERS_FILE).read_text())["wandb"] == first["wandb"]  # resumed, not new
    config, history, tables = _wandb_run(stores, first["wandb"]["id"])
    assert {k: config[k] for k in _config(out)} == _config(out)
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2, 3] and rows[
        :3
    ] == after_2  # step 0: the eval before training
    for row in rows:
        logged = history[row["step"]]
        assert {k: logged[k] for k in _numbers(row)} == _numbers(row), row["step"]
    assert tables == [1, 2, 3]  # --rollout-table-every 1
    assert "curves" in {k.split("/")[0] for k in history[3]}  # the figure, at the last step


@pytest.mark.slow
def test_trackio_local_store_holds_the_config_and_the_metrics(tracked_run, stores):
    from trackio.sqlite_storage import SQLiteStorage

    out, first, _ = tracked_run
    assert first["trackio"] == {"name": "tiny"}
    # the resume logged under the same run name (trackio may list a resumed run's records twice:
    # CI saw ["tiny", "tiny"] once, this machine ["tiny"]); no other run was started
    assert set(SQLiteStorage.get_runs("cppo-tests")) == {"tiny"}
    config = SQLiteStorage.get_run_config("cppo-tests", "tiny")
    assert {k: config[k] for k in _config(out)} == _config(out)
    logged = {r["step"]: r for r in SQLiteStorage.get_logs("cppo-tests", "tiny")}
    for row in _metrics(out):
        assert {k: logged[row["step"]][k] for k in _numbers(row)} == _numbers(row)


@pytest.mark.slow
def test_mlflow_file_store_holds_the_config_and_the_metrics(tracked_run, stores):
    from mlflow.tracking import MlflowClient

    out, first, _ = tracked_run
    client = MlflowClient()
    run = client.get_run(first["mlflow"]["run_id"])
    assert run.info.run_name == "tiny"
    assert client.get_experiment(run.info.experiment_id).name == "cppo-tests"
    config = {k: str(v) for k, v in _config(out).items()}  # MLflow keeps strings, and never changes one
    assert run.data.params == {**config, "max_steps": "2", "resume": "None"}  # the first run's
    assert {k: run.data.tags[f"resumed/{k}"] for k in ("max_steps", "resume")} == {
        "max_steps": "3",
        "resume": "auto",
    }
    rows = _metrics(out)
    for key in ("reward/total", "eval/accuracy", "time/step"):
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        assert history == {r["step"]: r[key] for r in rows if key in r}, key
    assert "curves.png" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert len(client.search_runs([run.info.experiment_id])) == 1  # the resume continued it


@pytest.mark.slow
def test_tensorboard_events_hold_the_metrics_config_and_curves(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _, _ = tracked_run
    events = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    rows = _metrics(out)
    for key in ("reward/total", "eval/accuracy", "response/length"):
        logged = {e.step: e.value for e in events.Scalars(key)}
        assert logged == pytest.approx({r["step"]: r[key] for r in rows if key in r}), key
    assert "curves" in events.Tags()["images"]
    latest = max(events.Tensors("config/text_summary"), key=lambda e: e.wall_time)  # the resumed run's
    text = latest.tensor_proto.string_val[0].decode()
    assert yaml.safe_load(text) == _config(out)


@pytest.mark.slow
def test_the_summary_reads_the_run_back(tracked_run):
    out, _, _ = tracked_run
    summary = json.loads((out / "summary.json").read_text())
    rows = _metrics(out)
    train = [r for r in rows if r["step"] >= 1]
    assert summary["steps"] == 3 and summary["max_steps"] == 3
    assert summary["reward"]["start"] == pytest.approx(train[0]["reward/total"])  # 1 step a side of 3
    assert summary["reward"]["end"] == pytest.approx(train[-1]["reward/total"])
    evals = [[r["step"], r["eval/accuracy"]] for r in rows if "eval/accuracy" in r]
    assert summary["eval"]["curve"] == evals and evals[0][0] == 0
    assert summary["checkpoint"].endswith("step-000003")
    assert summary["next"][0].startswith(f"cppo-eval --model {summary['checkpoint']}")


def test_a_tracker_that_is_not_installed_is_one_line_naming_its_extra(
    tiny_dir, data, tmp_path, monkeypatch, capsys
):
    import cppo.rl.run as run_mod
    import cppo.rl.trackers as trackers

    real = trackers.importlib.util.find_spec
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda n: None if n == "wandb" else real(n))
    monkeypatch.setattr(run_mod, "build_policy", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "run"
    assert train_main(_flags(tiny_dir, data, out, "--max-steps", "1", "--report-to", "wandb", "mlflow")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "cppo-train: error: report_to wandb: not installed; pip install 'cppo[wandb]' "
        "(or drop it from --report-to)"
    ]
    assert not (out / "metrics.jsonl").exists()


def test_report_to_values_as_trl_spells_them(monkeypatch):
    assert resolve(["none"]) == [] and resolve(["wandb,mlflow"]) == ["wandb", "mlflow"]
    assert resolve(["wandb", "wandb"]) == ["wandb"]
    assert parse_args([]).report_to == ["none"]
    with pytest.raises(ValueError, match="unknown tracker 'wandbb'; valid: none"):
        parse_args(["--report-to", "wandbb"])
    import cppo.rl.trackers as trackers

    monkeypatch.setattr(trackers, "_installed", lambda n: n in ("tensorboard", "mlflow"))
    assert resolve(["all"]) == ["tensorboard", "mlflow"]  # every installed one, as TRL's "all"


def test_summary_means_the_first_and_last_steps_and_reads_the_evaluation(tmp_path):
    rows = [{"step": 0, "eval/accuracy": 0.5, "eval/format": 1.0}]
    rows += [
        {
            "step": s,
            "reward/total": s / 10,
            "reward/accuracy": s / 20,
            "time/step": 2.0,
            "memory/peak_mb": 100.0 + s,
        }
        for s in range(1, 11)
    ]
    rows[-1]["eval/accuracy"] = 0.75
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = parse_args(["--max-steps", "10", "--output-dir", str(tmp_path)])  # the demo: avg@4
    summary = summarize(tmp_path, cfg)
    assert summary["reward"] == {
        "start": pytest.approx(0.3),
        "end": pytest.approx(0.8),
        "steps": 5,
    }  # 1..5, 6..10
    assert summary["accuracy"]["end"] == pytest.approx(0.4)
    assert summary["eval"]["start"] == {"step": 0, "accuracy": 0.5} and summary["eval"]["metric"] == "avg@4"
    assert summary["eval"]["end"] == {"step": 10, "accuracy": 0.75}
    assert (summary["seconds_per_step"], summary["peak_memory_mb"]) == (2.0, 110.0)
    assert summary["checkpoint"] is None and summary["next"] == []
    text = summary_text(summary)
    assert "held-out avg@4: 50.0% at step 0 -> 75.0% at step 10" in text
    assert "training reward (mean of 5 steps): 0.300 -> 0.800" in text


def test_curves_draw_the_held_out_evaluations_over_the_training_accuracy():
    from cppo.rl.curves import curves_figure

    rows = [{"step": 0, "eval/accuracy": 0.5}] + [{"step": s, "reward/accuracy": 0.6} for s in (1, 2)]
    rows[-1]["eval/accuracy"] = 0.7
    accuracy = curves_figure(rows, "run").axes[1]
    assert accuracy.get_title() == "accuracy"
    held_out = [line for line in accuracy.get_lines() if line.get_label() == "held-out (eval/accuracy)"]
    assert [list(held_out[0].get_xdata()), list(held_out[0].get_ydata())] == [[0, 2], [0.5, 0.7]]


@pytest.mark.slow
def test_the_demo_evaluates_before_and_after_and_says_where_to_look(tiny_dir, tmp_path, capsys):
    """The no-argument run's settings (no --data: the shapes task, avg@4 at steps 0, every 10 and
    the last), on the tiny model for two steps: summary.json and the printed summary hold the
    held-out accuracy at step 0 and at the end, and the last line names curves.png."""
    cfg = parse_args([])
    assert (cfg.eval_every, cfg.eval_samples, cfg.eval_at_start) == (10, 4, "auto")
    tiny = "--prompts-per-step 2 --group-size 2 --micro-batch-size 2 --max-new-tokens 4 --max-steps 2"
    out = tmp_path / "demo"
    assert train_main(["--model", str(tiny_dir), "--output-dir", str(out), *tiny.split()]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    rows = _metrics(out)
    evals = [(r["step"], r["eval/accuracy"]) for r in rows if "eval/accuracy" in r]
    assert [s for s, _ in evals] == [0, 2]  # before training and at the end
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval"]["metric"] == "avg@4" and summary["eval"]["curve"] == [list(e) for e in evals]
    start, end = (f"{100 * a:.1f}%" for _, a in evals)
    assert f"  held-out avg@4: {start} at step 0 -> {end} at step 2" in printed
    assert printed[-1] == f"cppo-train: done; look at {out / 'curves.png'} and {out / 'summary.json'}"


def test_a_tracker_that_fails_mid_run_is_one_line_and_dropped(tmp_path, capsys):
    from cppo.rl.trackers import Trackers

    class Lost:
        calls = 0

        def log(self, values, step):
            Lost.calls += 1
            raise ConnectionError("server went away\ntraceback...")

    class Kept:
        logged = []

        def log(self, values, step):
            Kept.logged.append((step, values))

    trackers = Trackers(tmp_path)
    trackers.trackers = {"wandb": Lost(), "mlflow": Kept()}
    trackers.log(1, {"step": 1, "reward/total": 0.5, "note": "text"})
    trackers.log(2, {"step": 2, "reward/total": 0.7})
    assert capsys.readouterr().err.splitlines() == [
        "[cppo] report_to wandb failed (ConnectionError: server went away); the run goes on without it"
    ]
    assert Lost.calls == 1 and Kept.logged == [(1, {"reward/total": 0.5}), (2, {"reward/total": 0.7})]
