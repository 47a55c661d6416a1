"""Where samples come from: a data source (``--data``, ``--eval-data``, ``cppo-eval --data``) -> ``Source``.

A source is one of:

- a **hub id**, ``owner/name`` (``hiyouga/geometry3k``), read by ``datasets.load_dataset(id,
  split=...)``: downloaded and cached by ``datasets``, or taken from its cache when offline
  (``HF_HUB_OFFLINE=1``) once it has been downloaded;
- a **JSONL** file, or a folder with ``data.jsonl`` or ``<split>/data.jsonl`` (the layout of
  ``cppo.toy.export_shapes_dataset``); relative image paths resolve against the file's folder;
- a **save_to_disk** folder (``datasets.load_from_disk``, a Dataset or a DatasetDict);
- a **.parquet** file, or a **dataset folder** of parquet files (a hub repository downloaded with
  ``hf download ID --repo-type dataset --local-dir DIR``): the files named after the split
  (``train*.parquet``, ``data/train-*.parquet``, ``train/*.parquet``), or, for the train split of a
  folder whose files name no split (ViRL39K's ``39Krelease.parquet``), all of them. Parquet is read by
  ``datasets.load_dataset("parquet", data_files=...)``, the call ``load_dataset`` makes for a hub
  repository of parquet files. Relative image paths resolve against the folder given (ViRL39K's
  ``images/...`` against the folder where ``images.zip`` was unpacked) or the file's folder.

Any source may end in ``@split`` (``hiyouga/geometry3k@test``) to name its split. ``image_root``
replaces the folder that relative image paths resolve against (a hub id has none).

Image paths are confined to the data's folder (cppo.rl.data refuses the others unless allowed,
``--data-allow-outside-images``): ``image_root`` when given, else the folder given as the source, the
parquet or JSONL file's folder, or, for a JSONL file in a split folder (``<dir>/train/data.jsonl``,
whose images are ``../images/...``), the folder above it.

Columns: a sample needs a question and an answer column and may have an image column and a
question type; ``KEYS`` lists the names tried for each, and a mapping (``--data-columns
image=picture,question=prompt``) names the column for one of them instead. ``read_source`` gives a
``Source``: the ``datasets.Dataset`` (hub id, parquet, save_to_disk), or a JSONL file's lines read
lazily, images undecoded (paths, bytes or ``{"bytes", "path"}``), for ``cppo.rl.checks`` to check.

The parquet files of a dataset folder are chosen here rather than by ``load_dataset(folder)``, whose
split discovery differs from the one above: it reads every file of a folder with no split names
(ViRL39K's ``images/*.jpg`` beside its parquet file), calls ``val.parquet`` the ``validation``
split, and ignores ``test/`` once ``data/train-*`` files are there.

``datasets`` is the ``data`` extra; a source that needs it says so when it is missing.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cppo.rl.jsonl import JsonRowsError, json_rows

# canonical name -> the columns tried, in order
KEYS: dict[str, tuple[str, ...]] = {
    "question": ("question", "problem"),
    "answer": ("answer", "ground_truth", "solution"),
    "image": ("images", "image"),
    "question_type": ("question_type", "category"),  # ViRL39K's category is its question type
}
SPLIT_NAMES = ("train", "validation", "val", "test", "dev")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


class DataError(ValueError):
    """Data the trainer cannot use; the message names the file and line or row."""


@dataclass
class Source:
    """A source read: its rows (a datasets.Dataset, or a JSONL file's lines) and how to read them."""

    label: str  # the source as the logs name it
    base: Path | None  # relative image paths resolve against it; None: they cannot be resolved
    keys: dict[str, tuple[str, ...]]  # canonical name -> the columns tried
    hub: bool = False  # from a hub id: a relative image path has no folder to resolve against
    folder: Path | None = None  # image paths must lie in it (None: base); module docstring
    dataset: Any = None  # a datasets.Dataset (hub id, parquet, save_to_disk); its rows are "LABEL row i"
    lines: Iterator[tuple[str, dict]] | None = None  # a JSONL file's ("file:line", row) pairs, lazily

    def __post_init__(self):
        self.folder = self.folder or self.base


def parse_columns(text: str | None) -> dict[str, str]:
    """``"image=images,question=problem"`` -> {"image": "images", "question": "problem"} (ValueError
    naming what is wrong)."""
    mapping: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        name, sep, column = (s.strip() for s in part.partition("="))
        if not sep or not name or not column:
            raise ValueError(
                f"data columns: {part!r} is not NAME=COLUMN (e.g. image=images,question=problem)"
            )
        if name not in KEYS:
            raise ValueError(f"data columns: unknown name {name!r}; the names are {', '.join(KEYS)}")
        mapping[name] = column
    return mapping


def split_spec(spec: str | Path) -> tuple[str, str | None]:
    """``"hiyouga/geometry3k@test"`` -> ("hiyouga/geometry3k", "test"); a path that exists as written
    is never split."""
    text = str(spec)
    if Path(text).expanduser().exists() or "@" not in text:
        return text, None
    location, split = text.rsplit("@", 1)
    if not split or "/" in split:
        raise DataError(f"{text}: after '@' comes a split name (e.g. {location}@test)")
    return location, split


def is_hub_id(location: str) -> bool:
    """owner/name that is not a local path: no such path, no data-file suffix, not under an existing
    local folder ("data/typo.jsonl" is a missing file, not a hub id)."""
    path = Path(location).expanduser()
    return (
        not path.exists()
        and bool(_HUB_ID.match(location))
        and not location.endswith(_LOCAL_SUFFIXES)
        and not path.parent.exists()
    )


def read_source(
    spec: str | Path, split: str = "train", columns: dict[str, str] | None = None, image_root=None
) -> Source:
    """The rows of a source (module docstring), its label and the folder its image paths resolve against."""
    location, at_split = split_spec(spec)
    split = at_split or split
    keys = {**KEYS, **{name: (column,) for name, column in (columns or {}).items()}}
    root = None if image_root is None else Path(image_root).expanduser()
    if root is not None and not root.is_dir():
        raise DataError(f"data image root {root} is not a folder")
    path = Path(location).expanduser()
    if not path.exists():
        if not is_hub_id(location):
            raise DataError(
                f"data path {location} does not exist (and is not a hub id like TIGER-Lab/ViRL39K)"
            )
        ds = _load_hub(location, split)
        label = f"{location}@{split}"
        return Source(label, root, keys, hub=True, dataset=_with_columns(ds, label, keys, columns))
    jsonl = path if path.is_file() and path.suffix in (".jsonl", ".json") else None
    if path.is_dir():
        jsonl = next((p for p in (path / "data.jsonl", path / split / "data.jsonl") if p.is_file()), None)
    if jsonl is not None:
        # <dir>/<split>/data.jsonl (cppo.toy's export) names its images ../images/...: <dir> is the folder
        folder = jsonl.parent.parent if jsonl.parent.name in SPLIT_NAMES else jsonl.parent
        return Source(
            str(jsonl), root or jsonl.parent, keys, folder=root or folder, lines=_jsonl_lines(jsonl)
        )
    if path.is_dir() and _is_saved_dataset(path):
        ds, label = _load_saved(path, split)
        return Source(label, root or path, keys, dataset=_with_columns(ds, label, keys, columns))
    if path.suffix == ".parquet" or path.is_dir():
        files = [path] if path.is_file() else parquet_files(path, split)
        if not files:
            raise DataError(
                f"{path}: no data.jsonl, save_to_disk dataset or {split} parquet file in this folder"
            )
        label = f"{path}@{split}" if path.is_dir() else str(path)
        ds = _load_parquet(files, split, label)
        base = root or (path if path.is_dir() else path.parent)
        return Source(label, base, keys, dataset=_with_columns(ds, label, keys, columns))
    raise DataError(f"{path}: not a .jsonl or .parquet file, a dataset folder or a save_to_disk folder")


def parquet_files(folder: Path, split: str) -> list[Path]:
    """The parquet files of `split` in a dataset folder (module docstring); hidden folders (the
    ``.cache`` of ``hf download``) are left out."""
    files = sorted(p for p in folder.rglob("*.parquet") if not _hidden(p.relative_to(folder)))
    chosen = [p for p in files if _names_split(p, folder, split)]
    named = any(_names_split(p, folder, s) for p in files for s in SPLIT_NAMES)
    return files if split == "train" and not named else chosen  # no split named: all are training data


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _names_split(file: Path, folder: Path, split: str) -> bool:
    """train.parquet, train-00000-of-00001.parquet, train/x.parquet; not training.parquet ("val" is
    not "validation")."""
    return (
        bool(re.match(rf"{re.escape(split)}(?![A-Za-z])", file.name))
        or split in file.relative_to(folder).parent.parts
    )


def find_split(path: str | Path, split: str) -> Path | None:
    """Where ``read_source(..., split=split)`` finds ``split`` beside training data at ``path``, or None.

    Covers the folder layouts: ``<dir>/<split>/data.jsonl`` (also when ``path`` is
    ``<dir>/train/data.jsonl``), a DatasetDict folder with that split, a folder of parquet files that
    name it.
    """
    path = Path(path)
    root = path.parent.parent if path.name == "data.jsonl" and path.parent.name != split else path
    if (root / split / "data.jsonl").is_file():
        return root / split / "data.jsonl"
    if path.is_dir() and (path / "dataset_dict.json").is_file():
        return path if split in _load_saved_splits(path) else None
    if path.is_dir() and any(_names_split(p, path, split) for p in parquet_files(path, split)):
        return path
    return None


def _import_datasets(what):
    try:
        import datasets
    except ImportError:
        raise DataError(f"{what} needs the datasets package: pip install 'cppo[data]'") from None
    return datasets


def _load_hub(name: str, split: str):
    """``datasets.load_dataset(name, split=split)``: from the hub, or from datasets' cache offline."""
    datasets = _import_datasets(f"the hub dataset {name}")
    try:
        return datasets.load_dataset(name, split=split)
    except ValueError as e:
        if "split" in str(e).lower():  # 'Unknown split "val". Should be one of [...]'
            raise DataError(f"{name}: {_first_line(e)} (pick one with {name}@SPLIT)") from None
        raise DataError(f"{name}: loading it from the hub failed ({_first_line(e)})") from None
    except OSError as e:  # ConnectionError, DatasetNotFoundError (a FileNotFoundError), ...
        raise DataError(
            f"{name}: not a local path, and loading it from the Hugging Face hub failed ({_first_line(e)}); "
            f"offline, download it where there is a network (hf download {name} --repo-type dataset "
            "--local-dir DIR) and pass --data DIR"
        ) from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def _load_parquet(files: list[Path], split: str, label: str):
    """The parquet files as one datasets.Dataset; a file that is not parquet (cut short, another
    format) is named from its footer before datasets reads anything."""
    datasets = _import_datasets(label)
    import pyarrow.parquet as pq

    for f in files:
        try:
            pq.read_metadata(f)
        except Exception as e:  # ArrowInvalid (a ValueError), OSError: the footer is unreadable
            raise DataError(
                f"{f}: not a readable parquet file ({_first_line(e)}): download or write it again"
            ) from None
    try:
        return datasets.load_dataset("parquet", data_files={split: [str(f) for f in files]}, split=split)
    except Exception as e:  # a damaged page behind a good footer, or a column schema datasets refuses
        raise DataError(
            f"{label}: cannot read the parquet data ({_first_line(e)}): download or write it again"
        ) from None


def _load_saved_splits(path: Path):
    """``datasets.load_from_disk``: a Dataset, or a DatasetDict of its splits."""
    datasets = _import_datasets(path)
    try:
        return datasets.load_from_disk(str(path))
    except Exception as e:  # a missing or damaged arrow file, state.json that is not JSON
        raise DataError(f"{path}: cannot read the save_to_disk dataset ({_first_line(e)})") from None


def _load_saved(path: Path, split: str):
    ds = _load_saved_splits(path)
    if isinstance(ds, dict):  # a DatasetDict
        if split not in ds:
            raise DataError(f"{path}: no split {split!r}; it has {', '.join(ds)} (pick one with split=...)")
        return ds[split], f"{path}@{split}"
    return ds, str(path)


def _is_saved_dataset(path: Path) -> bool:
    return any((path / name).is_file() for name in ("dataset_info.json", "dataset_dict.json", "state.json"))


def _jsonl_lines(path: Path):
    try:
        yield from json_rows(path)
    except JsonRowsError as e:
        raise DataError(str(e)) from None


def _with_columns(ds, label: str, keys: dict[str, tuple[str, ...]], columns: dict[str, str] | None):
    """``ds`` once it has the columns a sample needs (DataError naming those it has otherwise)."""
    for name, column in (columns or {}).items():
        if column not in ds.column_names:
            raise DataError(
                f"{label}: --data-columns maps {name} to {column!r}, which it does not have; "
                f"it has {', '.join(ds.column_names)}"
            )
    for name in ("question", "answer"):
        if not any(k in ds.column_names for k in keys[name]):
            raise DataError(
                f"{label}: needs a {'/'.join(keys[name])} column (the {name}; --data-columns "
                f"{name}=COLUMN names another); it has {', '.join(ds.column_names)}"
            )
    return ds
