"""The experiment trackers a run reports to (--report-to), through accelerate's tracker classes.

    trackers = Trackers(run_dir, cfg, rank, resumed=start > 0)   # starts them; a no-op off rank 0
    trackers.config(cfg.to_dict())                               # the resolved config, as config.yaml
    trackers.log(step, row)                                      # a metrics.jsonl row
    trackers.table(step, rows)                                   # rollouts, where a tracker has tables
    trackers.image(run_dir / "curves.png")                       # at the end, where it takes images
    trackers.finish()

`--report-to` is TRL's `report_to`: `none` (the default), `all` (every tracker accelerate finds
installed) or names: tensorboard, wandb, trackio, mlflow, and accelerate's other trackers (comet_ml,
aim, clearml, dvclive, swanlab). TensorBoard's scalars are the run directory's own tb/ (written by
cppo.rl.logfiles, which purges the steps after a resumed checkpoint and reports a full disk in one
line); accelerate's TensorBoardTracker adds the config (as text) and the curves image there. Every
other tracker is accelerate's class, started on the main process only, with `--project` and
`--run-name`; each keeps where it logs in its own settings (WANDB_MODE, WANDB_DIR, TRACKIO_DIR,
MLFLOW_TRACKING_URI).

The id of each tracker's run goes to trackers.json in the run directory, so that `--resume`
continues the same W&B, trackio or MLflow run rather than starting another.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from cppo.rl.atomic import atomic_write

TRACKERS_FILE = "trackers.json"
# name -> (the module that must import, the pip install that brings it)
TRACKERS = {
    "tensorboard": ("tensorboard", "cppo[logging]"),
    "wandb": ("wandb", "cppo[wandb]"),
    "trackio": ("trackio", "cppo[trackio]"),
    "mlflow": ("mlflow", "cppo[mlflow]"),
    "comet_ml": ("comet_ml", "comet_ml"),
    "aim": ("aim", "aim"),
    "clearml": ("clearml", "clearml"),
    "dvclive": ("dvclive", "dvclive"),
    "swanlab": ("swanlab", "swanlab"),
}


def tracker_name(name: str) -> str:
    """`name` if it is a value of --report-to (config.py's check); ValueError listing them else."""
    if name in ("none", "all") or name in TRACKERS:
        return name
    raise ValueError(f"unknown tracker {name!r}; valid: none|all|{'|'.join(TRACKERS)}")


def _installed(name: str) -> bool:
    return importlib.util.find_spec(TRACKERS[name][0]) is not None


def resolve(report_to: list[str]) -> list[str]:
    """The trackers a run starts: [] for none, every installed one for all (as TRL), else the names
    (commas split: `wandb,mlflow` as TRL's string form)."""
    names = [n.strip() for item in report_to for n in str(item).split(",") if n.strip()]
    if "all" in names:
        return [n for n in TRACKERS if _installed(n)]
    return list(dict.fromkeys(n for n in names if n != "none"))


def check_installed(cfg) -> None:
    """ConfigError (one line, cppo-train's exit 2, before any model loads) naming the extra to install
    for each tracker of --report-to whose package does not import."""
    from cppo.rl.config import ConfigError  # config.py imports tracker_name from here

    missing = [n for n in resolve(cfg.report_to) if n in TRACKERS and not _installed(n)]
    if missing:
        installs = " ".join(f"'{TRACKERS[n][1]}'" for n in missing)
        raise ConfigError(
            f"report_to {', '.join(missing)}: not installed; pip install {installs} "
            "(or drop it from --report-to)"
        )


def run_name(cfg) -> str:
    """--run-name, else the run directory's name (TRL's run_name defaults to its output_dir)."""
    return cfg.run_name or Path(cfg.output_dir).resolve().name


class Trackers:
    """accelerate's trackers of --report-to on the main process; every method a no-op elsewhere or
    when there are none, so the loop never branches on them."""

    def __init__(self, run_dir: Path, cfg=None, rank: int = 0, resumed: bool = False):
        """Start the trackers of `cfg.report_to` on rank 0 (none without a cfg); ConfigError, one
        line, when one cannot start."""
        self.run_dir = Path(run_dir)
        self.names = resolve(cfg.report_to) if cfg is not None and rank == 0 else []
        self.trackers: dict = {}
        if not self.names:
            return
        from cppo.rl.config import ConfigError

        ids = self._saved_ids() if resumed else {}
        for name in self.names:
            try:
                self.trackers[name] = _start(name, cfg, self.run_dir, ids.get(name, {}))
            except Exception as e:  # a login, a server, a store: one line, before any step trains
                detail = f"{type(e).__name__}: {e}".strip().splitlines()[0]
                raise ConfigError(
                    f"report_to {name}: could not start its run ({detail}); fix its settings or drop it "
                    "from --report-to"
                ) from None
        atomic_write(self.run_dir / TRACKERS_FILE, json.dumps(self._ids(), indent=1) + "\n")

    def _saved_ids(self) -> dict:
        try:
            return json.loads((self.run_dir / TRACKERS_FILE).read_text())
        except (OSError, ValueError):
            return {}  # no file (an older run): the trackers start new runs

    def _ids(self) -> dict:
        ids = {}
        for name, t in self.trackers.items():
            if name == "wandb":
                ids[name] = {"id": t.run.id}
            elif name == "mlflow":
                ids[name] = {"run_id": t.active_run.info.run_id}
            elif name == "trackio":
                ids[name] = {"name": t.run.name}
        return ids

    def config(self, values: dict) -> None:
        """The resolved config, each field as config.yaml holds it. MLflow's params cannot change: a
        resumed run's changed fields (max_steps, resume, ...) go to tags `resumed/<field>`."""
        for name, t in self.trackers.items():
            if name == "mlflow":
                import mlflow

                logged = mlflow.get_run(t.active_run.info.run_id).data.params
                changed = {k: v for k, v in values.items() if k in logged and logged[k] != str(v)}
                mlflow.set_tags({f"resumed/{k}": str(v) for k, v in changed.items()})
                values = {k: v for k, v in values.items() if k not in logged}
            t.store_init_configuration(values)

    def log(self, step: int, row: dict) -> None:
        """A metrics.jsonl row (its numbers) at `step`."""
        values = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        self._each(lambda name, t: t.log(values, step=int(step)))

    def table(self, step: int, rows: list[dict]) -> None:
        """Rollouts as a table `rollouts` (wandb, clearml: the trackers accelerate gives log_table)."""
        if not rows:
            return
        columns = list(rows[0])
        data = [[_cell(r[c]) for c in columns] for r in rows]
        self._each(
            lambda name, t: hasattr(t, "log_table") and t.log_table("rollouts", columns, data, step=step)
        )

    def image(self, path: Path | None, step: int) -> None:
        """The curves figure: an image where the tracker takes images, MLflow's artifact."""
        if path is None or not self.trackers:
            return
        import numpy as np
        from PIL import Image

        pixels = np.asarray(Image.open(path).convert("RGB"))  # (H, W, 3)

        def send(name, t):
            if name == "mlflow":
                t.log_artifact(str(path))
            elif hasattr(t, "log_images"):
                t.log_images({"curves": [pixels]}, step=step)

        self._each(send)

    def _each(self, call) -> None:
        """call(name, tracker) for each tracker; one that raises (a lost connection, a full disk) is
        said in one stderr line and dropped: the run and its own logs go on without it."""
        for name, t in list(self.trackers.items()):
            try:
                call(name, t)
            except Exception as e:
                detail = f"{type(e).__name__}: {e}".strip().splitlines()[0]
                print(
                    f"[cppo] report_to {name} failed ({detail}); the run goes on without it", file=sys.stderr
                )
                self.trackers.pop(name)

    def finish(self) -> None:
        for name, t in self.trackers.items():
            try:
                t.finish()
            except Exception as e:  # the run is complete: a tracker that fails to close is a warning
                print(f"[cppo] could not close the {name} run ({type(e).__name__}: {e})", file=sys.stderr)
        self.trackers = {}


def _cell(value):
    return value if isinstance(value, (int, float, str)) or value is None else json.dumps(value)


def _start(name: str, cfg, run_dir: Path, saved: dict):
    """accelerate's tracker `name`, started; `saved` holds the id of the run to continue (trackers.json)."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    cls, project, run = LOGGER_TYPE_TO_CLASS[name], cfg.project, run_name(cfg)
    if name == "wandb":
        kwargs = {"name": run, **({"id": saved["id"], "resume": "allow"} if "id" in saved else {})}
        tracker = cls(project, **kwargs)
    elif name == "trackio":
        tracker = cls(project, name=saved.get("name", run), resume="allow" if saved else "never")
    elif name == "mlflow":
        tracker = cls(project, run_id=saved.get("run_id"), run_name=run)
    elif name == "tensorboard":  # the scalars are cppo.rl.logfiles' tb/
        return _TensorBoard(run_dir / "tb")
    elif getattr(cls, "requires_logging_directory", False):
        tracker = cls(project, str(run_dir / name))
    else:
        tracker = cls(project)
    tracker.start()
    return tracker


class _TensorBoard:
    """tensorboard in --report-to: its scalars are the run directory's tb/ (cppo.rl.logfiles); this adds
    the config (as text, at step 0) and the curves image there, each through accelerate's tracker."""

    def __init__(self, tb_dir: Path):
        self.tb_dir = tb_dir

    def _write(self, write) -> None:
        from accelerate.tracking import TensorBoardTracker

        tracker = TensorBoardTracker("", str(self.tb_dir))  # tb/ itself, beside the scalars' events
        tracker.start()
        write(tracker)
        tracker.finish()

    def store_init_configuration(self, values: dict) -> None:
        import yaml

        self._write(lambda t: t.log({"config": yaml.safe_dump(values, sort_keys=False)}, step=0))

    def log(self, values: dict, step: int) -> None:
        pass  # cppo.rl.logfiles wrote them

    def log_images(self, values: dict, step: int) -> None:
        images = {k: vs[0][None] for k, vs in values.items()}  # (1, H, W, 3): the first image
        self._write(lambda t: t.log_images(images, step=step, dataformats="NHWC"))

    def finish(self) -> None:
        pass
