"""A model directory or hub id checked before anything loads: one line naming what is wrong.

    path = check_model_path("runs/x/checkpoints/step-000040")  # ModelError (a ValueError) if unusable
    positions = model_positions(path)                           # max_position_embeddings, or None

`check_model_path` reads only small files and headers, cheapest first, in the order a load needs
them: ``config.json`` (JSON, an object, a Qwen2.5-VL: ``model_type`` ``qwen2_5_vl``), the processor's
files (tokenizer, image processor), then the weights (each safetensors file's header parses and its
size is the size the header describes; every shard a sharded index names is there; a ``.bin`` is a
whole zip). A hub id is looked up in the local cache, and, when not there and the hub may be used,
with ONE request to the hub (no retries): a mistyped id fails in a second, not after minutes of
retried downloads of every file a processor may have. `check_processor` checks a loaded processor
against the config (a chat template; the image token under the config's id), since a folder with
the wrong tokenizer files loads without a word.

What it cannot see: weights changed in place without a size change (safetensors has no checksum;
cppo-train's checkpoints carry a sha256 manifest, checked on resume).
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from pathlib import Path

VL_MODEL_TYPE = "qwen2_5_vl"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header, in bytes
_FIX_WEIGHTS = "copy the file again from where it came from, or use another checkpoint"


class ModelError(ValueError):
    """A model directory or hub id that cannot be used; the message names the file and what to do."""


class ModelNotFoundError(ModelError, FileNotFoundError):
    """No model there: a missing path, a folder without config.json, a hub id not found or not cached."""


def check_model_path(path_or_id: str | os.PathLike, weights_required: bool = True) -> str:
    """The path or hub id, once `check_model_dir` (a folder) or the hub lookup (an id) passed.
    ``weights_required=False`` (the processor alone) still checks the weight files that are there."""
    s = str(path_or_id)
    p = Path(s).expanduser()
    if p.exists():
        check_model_dir(p, weights_required)
        return str(p)
    parent_is_local = p.parent != Path(".") and p.parent.exists()  # "runs/typo": a local path, not a hub id
    if not _HUB_ID.match(s) or s.startswith((".", "/", "~")) or parent_is_local:
        raise ModelNotFoundError(
            f"model path {s!r} does not exist (and is not a hub id like 'Qwen/Qwen2.5-VL-3B-Instruct')"
        )
    _check_hub_id(s, weights_required)
    return s


def check_model_dir(folder: Path, weights_required: bool = True) -> dict:
    """The config of a saved model folder, after checking config, tokenizer files and weight headers."""
    config = read_config(folder)
    has = {p.name for p in folder.iterdir()}
    missing = [] if "tokenizer_config.json" in has else ["tokenizer_config.json"]
    if "tokenizer.json" not in has and not {"vocab.json", "merges.txt"} <= has:
        missing.append("tokenizer.json (or vocab.json and merges.txt)")
    if "preprocessor_config.json" not in has and "image_processor" not in _processor_config(folder):
        missing.append("preprocessor_config.json")
    if missing:
        raise ModelError(
            f"model directory {folder} has no {' and no '.join(missing)}: copy the processor files "
            "(tokenizer, image processor) of the model it was trained from into it"
        )
    _check_tokenizer_files(folder, has, config)
    _check_weights(folder, has, weights_required)
    return config


def _check_tokenizer_files(folder: Path, has: set[str], config: dict) -> None:
    """A chat template is there, and tokenizer.json gives <|image_pad|> the config's image_token_id
    (another model's tokenizer would load without a word)."""
    tokenizer_config = _read_json(folder / "tokenizer_config.json", "the tokenizer's config")
    templates = {"chat_template.jinja", "chat_template.json"} & has
    if (
        not templates
        and "chat_template" not in tokenizer_config
        and "chat_template" not in _processor_config(folder)
    ):
        raise ModelError(
            f"model directory {folder} has no chat template (chat_template.jinja, or chat_template in "
            "tokenizer_config.json): copy it from the model it was trained from"
        )
    if "tokenizer.json" not in has or config.get("image_token_id") is None:
        return
    tokenizer = _read_json(folder / "tokenizer.json", "the tokenizer")
    added = tokenizer.get("added_tokens") if isinstance(tokenizer, dict) else None
    ids = {t.get("content"): t.get("id") for t in added or [] if isinstance(t, dict)}
    if ids.get("<|image_pad|>") != config["image_token_id"]:
        raise ModelError(
            f"{folder / 'tokenizer.json'}: <|image_pad|> is {ids.get('<|image_pad|>')}, config.json's "
            f"image_token_id {config['image_token_id']}: the tokenizer is another model's; copy the "
            "tokenizer files of the model it was trained from into it"
        )


def read_config(folder: Path) -> dict:
    """config.json of a model folder as a dict, refused unless it is a Qwen2.5-VL's."""
    file = folder / "config.json"
    if not file.is_file():
        adapter = " (it holds a LoRA adapter: pass the folder with the merged weights)"
        hint = adapter if (folder / "adapter_config.json").is_file() else " (not a saved checkpoint)"
        raise ModelNotFoundError(f"model directory {str(folder)!r} has no config.json{hint}")
    config = _read_json(file, "the model's config")
    if not isinstance(config, dict):
        raise ModelError(f"{file}: expected a JSON object, got {type(config).__name__}")
    kind = config.get("model_type")
    if kind != VL_MODEL_TYPE:
        text_only = " (a text-only model)" if kind in ("qwen2", "qwen3", "llama", "mistral") else ""
        raise ModelError(
            f"{file}: model_type is {kind!r}{text_only}; cppo needs a Qwen2.5-VL checkpoint "
            f"(model_type {VL_MODEL_TYPE!r}, e.g. Qwen/Qwen2.5-VL-3B-Instruct)"
        )
    return config


def _processor_config(folder: Path) -> dict:
    """processor_config.json (transformers 5 may keep the image processor's settings there), or {}."""
    try:
        data = json.loads((folder / "processor_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def model_positions(path_or_id: str | os.PathLike) -> int | None:
    """The model's ``max_position_embeddings`` (its text decoder's), read from config.json; None when
    the config is not at hand (a hub id not in the cache)."""
    config = config_of(path_or_id) or {}
    value = (config.get("text_config") or {}).get("max_position_embeddings")
    value = value or config.get("max_position_embeddings")
    return int(value) if isinstance(value, (int, float)) and value > 0 else None


def check_processor(processor, config: dict, where: str) -> None:
    """The processor has a chat template; its tokenizer knows the image token under the id the config
    gives it, and fits the embeddings."""
    if getattr(processor, "chat_template", None) is None:
        raise ModelError(
            f"{where}: its processor has no chat template (chat_template.jinja, or chat_template in "
            "tokenizer_config.json): copy it from the model it was trained from"
        )
    tokenizer = processor.tokenizer
    image_id = config.get("image_token_id")
    got = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    vocab = (config.get("text_config") or {}).get("vocab_size") or config.get("vocab_size")
    if (image_id is not None and got != image_id) or (vocab and len(tokenizer) > vocab):
        raise ModelError(
            f"{where}: its tokenizer ({len(tokenizer)} tokens, <|image_pad|> = {got}) does not match "
            f"config.json (image_token_id {image_id}, vocab_size {vocab}): copy the tokenizer files of "
            "the model it was trained from into it"
        )


def config_of(path_or_id: str | os.PathLike) -> dict | None:
    """config.json of a checked folder, or of a hub id in the cache; None when not at hand."""
    folder = Path(str(path_or_id)).expanduser()
    if folder.is_dir():
        return read_config(folder)
    cached = _cached_config(str(path_or_id))
    return None if cached is None else read_config(Path(cached).parent)


# ----------------------------------------------------------------------------------- the weights


def _check_weights(folder: Path, has: set[str], required: bool) -> None:
    if "model.safetensors.index.json" in has:
        for shard in _index_shards(folder / "model.safetensors.index.json"):
            check_safetensors(shard)
    elif "model.safetensors" in has:
        check_safetensors(folder / "model.safetensors")
    elif "pytorch_model.bin.index.json" in has:
        for shard in _index_shards(folder / "pytorch_model.bin.index.json"):
            _check_bin(shard)
    elif "pytorch_model.bin" in has:
        _check_bin(folder / "pytorch_model.bin")
    elif (folder / "shards").is_dir() and required:  # cppo.rl.sharded's layout
        raise ModelError(
            f"model directory {folder} holds an FSDP run's sharded weights (shards/): resume it with "
            "cppo-train --resume, or write a from_pretrained folder with cppo.rl.sharded.export_sharded"
        )
    elif required:
        raise ModelError(
            f"model directory {folder} has no weights (model.safetensors, model.safetensors.index.json "
            "or pytorch_model.bin): the save did not finish, or only the config was copied"
        )


def _index_shards(index: Path) -> list[Path]:
    data = _read_json(index, "the weights' index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelError(f"{index}: no weight_map in it; {_FIX_WEIGHTS}")
    shards = [index.parent / name for name in sorted(set(map(str, weight_map.values())))]
    missing = [s.name for s in shards if not s.is_file()]
    if missing:
        raise ModelError(f"{index} names shards that are missing: {', '.join(missing[:3])}; {_FIX_WEIGHTS}")
    return shards


def check_safetensors(file: Path) -> None:
    """The header parses and describes exactly the file's size (a cut or overwritten file does not)."""
    size = file.stat().st_size
    with file.open("rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= min(size - 8, _MAX_HEADER):
            raise ModelError(f"{file} is not a whole safetensors file (no valid header); {_FIX_WEIGHTS}")
        try:
            header = json.loads(fh.read(n))
            ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError):
            raise ModelError(f"{file}: its safetensors header is corrupt; {_FIX_WEIGHTS}") from None
    expected = 8 + n + max(ends, default=0)
    if expected != size:
        raise ModelError(
            f"{file} is truncated or corrupt: {size} bytes, its header describes {expected}; {_FIX_WEIGHTS}"
        )


def _check_bin(file: Path) -> None:
    if not zipfile.is_zipfile(file):  # torch.save's format: a cut file loses the zip's directory
        raise ModelError(f"{file} is not a whole torch checkpoint (truncated or corrupt); {_FIX_WEIGHTS}")


def _read_json(file: Path, what: str):
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ModelError(f"{file}:{e.lineno}: {what} is not valid JSON ({e.msg}); {_FIX_WEIGHTS}") from None
    except (UnicodeDecodeError, RecursionError) as e:
        raise ModelError(
            f"{file}: {what} is not readable JSON ({type(e).__name__}); {_FIX_WEIGHTS}"
        ) from None


# ----------------------------------------------------------------------------------- hub ids


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def _cached_config(repo_id: str) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json")
    return found if isinstance(found, str) else None


def _check_hub_id(repo_id: str, weights_required: bool) -> None:
    """A cached id is checked in the cache; otherwise offline refuses, online asks the hub once."""
    cached = _cached_config(repo_id)
    if cached is not None:
        if _hub_offline():
            check_model_dir(Path(cached).parent, weights_required)
        else:  # the files not cached yet download with the model
            read_config(Path(cached).parent)
        return
    if _hub_offline():
        raise ModelNotFoundError(
            f"model {repo_id!r} is not a local directory and not in the hub cache (HF_HUB_OFFLINE is set)"
        )
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        info = HfApi().model_info(repo_id, timeout=15)
    except GatedRepoError:
        raise ModelError(
            f"model {repo_id!r} is gated: accept its terms on huggingface.co/{repo_id}, then `hf auth login`"
        ) from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(
            f"model {repo_id!r} is not on the Hugging Face hub (a typo? a private one needs `hf auth login`)"
        ) from None
    except Exception as e:  # connection, DNS, timeout, HTTP 5xx: one try, no retries
        detail = f"{type(e).__name__}: {e}".splitlines()[0]
        raise ModelError(
            f"cannot reach the Hugging Face hub to look up model {repo_id!r} ({detail}): check the "
            "network, or pass a local directory (hf download ID --local-dir DIR), or set HF_HUB_OFFLINE=1 "
            "to use the cache"
        ) from None
    kind = (getattr(info, "config", None) or {}).get("model_type")
    if kind is not None and kind != VL_MODEL_TYPE:
        raise ModelError(
            f"model {repo_id!r} has model_type {kind!r}; cppo needs a Qwen2.5-VL checkpoint "
            f"(model_type {VL_MODEL_TYPE!r}, e.g. Qwen/Qwen2.5-VL-3B-Instruct)"
        )
