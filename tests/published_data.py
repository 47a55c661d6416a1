"""Small files shaped like the datasets the paper uses, with real images (cppo.toy's shapes scenes).

    root = write_virl39k(tmp_path / "ViRL39K")      # 39Krelease.parquet + images/ (paths)
    root = write_geometry3k(tmp_path / "geometry3k")  # data/{train,validation,test}-*.parquet (bytes)
    cache_as_hub_dataset("TIGER-Lab/ViRL39K", [root / "39Krelease.parquet"], cache_dir)

- ViRL39K (TIGER-Lab/ViRL39K): ``39Krelease.parquet`` with ``question`` (``<image>`` tag first),
  ``answer`` (``\\boxed{...}``), ``image`` (a list of paths ``images/Processed-*.jpg`` into the
  folder ``images.zip`` unpacks to), ``category``, ``source``, ``qid``, ``PassRate_32BTrained``,
  ``PassRate_7BBase``. Rows chosen for the paper's preprocessing: one with two images, one with a
  20 x 12 px image, one with a question of over 512 tokens, one whose question already ends with the
  instruction.
- Geometry3K (hiyouga/geometry3k): ``data/<split>-00000-of-00001.parquet`` with ``images`` (a list of
  images stored as bytes, datasets' Image feature), ``problem`` (``<image>`` tag first) and ``answer``.

``cache_as_hub_dataset`` puts a parquet file into ``datasets``' cache the way ``load_dataset(repo_id)``
leaves a hub dataset after downloading it (``<cache>/<owner>___<name>/default/0.0.0/<commit>``), so
``load_dataset(repo_id)`` with ``HF_HUB_OFFLINE=1`` reads it: the hub-id code path, offline.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from cppo.prompt import INSTRUCTION
from cppo.toy import make_item

VIRL_ROWS = 8  # of which 1 two-image (dropped), 1 long prompt (dropped): 6 usable
GEO_ROWS = {"train": 4, "validation": 2, "test": 3}


def _items(n: int, seed: int):
    rng = np.random.default_rng(seed)
    return [make_item(rng) for _ in range(n)]


def write_virl39k(root: Path, seed: int = 0) -> Path:
    """A ViRL39K-shaped folder (module docstring): ``root/39Krelease.parquet`` and ``root/images/``."""
    import datasets

    (root / "images").mkdir(parents=True, exist_ok=True)
    items = _items(VIRL_ROWS + 1, seed)
    rows = {k: [] for k in ("question", "answer", "image", "category", "source", "qid")}
    rows.update(PassRate_32BTrained=[], PassRate_7BBase=[])
    for i, item in enumerate(items[:VIRL_ROWS]):
        name = f"images/Processed-{i:05d}-0.jpg"
        image = item.image.resize((20, 12)) if i == 2 else item.image  # 2: a side under 28 px
        image.save(root / name, quality=95)
        paths = [name]
        question = f"<image>{item.question}"
        if i == 1:  # two images: the paper drops it
            items[VIRL_ROWS].image.save(root / "images/Processed-00001-1.jpg", quality=95)
            paths.append("images/Processed-00001-1.jpg")
        if i == 3:  # over the 512-token prompt limit
            question += " Think about every shape." * 40
        if i == 4:  # as the official preprocessing writes it: the instruction already there
            question += " " + INSTRUCTION
        rows["question"].append(question)
        rows["answer"].append(f"\\boxed{{{item.answer}}}")
        rows["image"].append(paths)
        rows["category"].append(item.question_type)
        rows["source"].append("shapes")
        rows["qid"].append(f"shapes-{i}")
        rows["PassRate_32BTrained"].append(0.5)
        rows["PassRate_7BBase"].append(0.25)
    datasets.Dataset.from_dict(rows).to_parquet(str(root / "39Krelease.parquet"))
    return root


def write_geometry3k(root: Path, seed: int = 1) -> Path:
    """A Geometry3K-shaped hub repository (module docstring) with images embedded as bytes."""
    import datasets

    features = datasets.Features(
        {
            "images": datasets.Sequence(datasets.Image()),
            "problem": datasets.Value("string"),
            "answer": datasets.Value("string"),
        }
    )
    (root / "data").mkdir(parents=True, exist_ok=True)
    for k, (split, n) in enumerate(GEO_ROWS.items()):
        items = _items(n, seed + k)
        ds = datasets.Dataset.from_dict(
            {
                "images": [[{"bytes": _png(it.image), "path": None}] for it in items],
                "problem": [f"<image>{it.question}" for it in items],
                "answer": [it.answer for it in items],
            },
            features=features,
        )
        ds.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def cache_as_hub_dataset(repo_id: str, files: dict[str, list[Path]], cache_dir: Path) -> Path:
    """Prepare ``files`` ({split: parquet files}) in ``cache_dir`` as ``load_dataset(repo_id)`` caches a
    downloaded hub dataset; returns the prepared folder."""
    from datasets.naming import camelcase_to_snakecase
    from datasets.packaged_modules.parquet.parquet import Parquet

    owner, name = repo_id.split("/")
    stage = cache_dir / ".stage"
    builder = Parquet(
        cache_dir=str(stage),
        dataset_name=name,
        config_name="default",
        hash="0" * 40,  # the commit a download would name
        data_files={split: [str(f) for f in fs] for split, fs in files.items()},
    )
    builder.download_and_prepare()
    prepared = Path(builder.cache_dir)
    target = cache_dir / f"{owner}___{camelcase_to_snakecase(name)}" / "default" / "0.0.0" / prepared.name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(prepared, target)
    shutil.rmtree(stage)
    return target
