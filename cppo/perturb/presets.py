"""Presets: named lists of preserving and removing perturbations, one of each drawn per sample.

    preset = get_preset("paper")
    pos, neg, record = preset.draw(image, seed=3)    # record: JSON-serialisable
    pos2, neg2 = preset.replay(image, record)        # identical images
    neg, rec = preset.draw_view(image, seed=3)       # one removing view alone (the detector's probe)

Presets come from Python (`Preset(...)`, `register_preset`) or YAML (`load_preset`):

    name: gentle
    preserving:
      - color_jitter
      - {entry: rotate, name: rotate5, max_degrees: 5}   # a registered entry with options changed
    removing: [occlusion_mean, grey_fill]
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cppo.perturb.base import (
    Perturbation,
    UnknownNameError,
    as_rng,
    get_perturbation,
    list_perturbations,
)
from cppo.perturb.image import image_size
from cppo.registry import Registry


def _entry(spec) -> Perturbation:
    """A Perturbation, a registered name, or {entry: name, [name: new_name,] **options}."""
    if isinstance(spec, Perturbation):
        return spec
    if isinstance(spec, str):
        return get_perturbation(spec)
    if isinstance(spec, Mapping) and "entry" in spec:
        options = {k: v for k, v in spec.items() if k != "entry"}
        base = get_perturbation(spec["entry"])
        fields = set(base.options()) | {"name", "kind"}
        if unknown := sorted(set(options) - fields):
            raise ValueError(f"{spec['entry']}: unknown options {unknown}; valid: {sorted(fields)}")
        # YAML gives lists where the dataclasses hold tuples (ranges)
        options = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
        if options and "name" not in options:
            options["name"] = spec["entry"] + "[" + ",".join(f"{k}={v}" for k, v in options.items()) + "]"
        return base.with_options(**options)
    raise TypeError(f"a preset entry is a name, a Perturbation or a mapping with 'entry', got {spec!r}")


@dataclass(frozen=True)
class Preset:
    """One preserving and one removing view per sample, each entry chosen uniformly."""

    name: str
    preserving: tuple[Perturbation, ...]
    removing: tuple[Perturbation, ...]
    description: str = ""
    _by_name: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "preserving", tuple(_entry(e) for e in self.preserving))
        object.__setattr__(self, "removing", tuple(_entry(e) for e in self.removing))
        for label, entries in (("preserving", self.preserving), ("removing", self.removing)):
            if not entries:
                raise ValueError(f"preset {self.name!r} needs at least one {label} entry")
            if wrong := [e.name for e in entries if e.kind != label]:
                raise ValueError(f"preset {self.name!r}: {wrong} listed as {label} but are not")
        names = [e.name for e in self.entries]
        if len(set(names)) != len(names):
            raise ValueError(f"preset {self.name!r}: entry names must be unique, got {names}")
        object.__setattr__(self, "_by_name", {e.name: e for e in self.entries})

    @property
    def entries(self) -> tuple[Perturbation, ...]:
        return self.preserving + self.removing

    def entry(self, name: str) -> Perturbation:
        try:
            return self._by_name[name]
        except KeyError:
            raise UnknownNameError(f"entry of preset {self.name!r}", name, self._by_name) from None

    def _choose(self, kind: str, rng) -> Perturbation:
        """One entry of `kind`, chosen uniformly with `rng`."""
        if kind not in ("preserving", "removing"):
            raise ValueError(f"kind must be 'preserving' or 'removing', got {kind!r}")
        entries = self.preserving if kind == "preserving" else self.removing
        return entries[int(rng.integers(len(entries)))]

    def sample(self, seed, width: int, height: int) -> dict:
        """The record of one draw: {"preset", "seed", "positive": {name, params}, "negative": ...}."""
        rng = as_rng(seed)
        pos = self._choose("preserving", rng)
        neg = self._choose("removing", rng)
        return {
            "preset": self.name,
            "seed": seed if isinstance(seed, int) else None,
            "positive": {"name": pos.name, "params": pos.sample(rng, width, height)},
            "negative": {"name": neg.name, "params": neg.sample(rng, width, height)},
        }

    def draw(self, image, seed):
        """(I+, I-, record). A (B, C, H, W) tensor gets one draw for the whole batch: call per
        image (or slice) when every element needs its own views."""
        width, height = image_size(image)
        record = self.sample(seed, width, height)
        return (*self.replay(image, record), record)

    def sample_view(self, kind: str, seed, width: int, height: int) -> dict:
        """The record {"name", "params"} of ONE view of one kind: an entry of `kind` chosen uniformly,
        then its parameters, from the same generator. For a probe that needs only I- (the detector):
        it draws nothing for the other kind, so its views are not those of `sample` for the same seed."""
        rng = as_rng(seed)
        entry = self._choose(kind, rng)
        return {"name": entry.name, "params": entry.sample(rng, width, height)}

    def draw_view(self, image, seed, kind: str = "removing"):
        """(view, record) of one view of one kind (`sample_view`); `replay_view` gives it back."""
        width, height = image_size(image)
        record = self.sample_view(kind, seed, width, height)
        return self.replay_view(image, record), record

    def replay_view(self, image, record: Mapping):
        """The view of a record made by `draw_view` or `sample_view`."""
        return self.entry(record["name"]).apply(image, record["params"])

    def replay(self, image, record: Mapping):
        """(I+, I-) from a record made by `draw` or `sample` (also after a JSON round trip)."""
        pos, neg = record["positive"], record["negative"]
        return (
            self.entry(pos["name"]).apply(image, pos["params"]),
            self.entry(neg["name"]).apply(image, neg["params"]),
        )

    def to_dict(self) -> dict:
        """A YAML/JSON-ready description; `preset_from_dict` turns it back into an equal preset."""
        return {
            "name": self.name,
            "description": self.description,
            "preserving": [_spec(e) for e in self.preserving],
            "removing": [_spec(e) for e in self.removing],
        }


def _spec(e: Perturbation):
    """A registered entry by name; a variant as {entry: registered base, name, changed options}."""
    if e.name in list_perturbations() and get_perturbation(e.name) == e:
        return e.name
    base = next(n for n in list_perturbations() if type(get_perturbation(n)) is type(e))
    ref = get_perturbation(base)
    changed = {
        k: list(v) if isinstance(v, tuple) else v for k, (v, _) in e.options().items() if getattr(ref, k) != v
    }
    return {"entry": base, "name": e.name, "kind": e.kind, **changed}


def preset_from_dict(d: Mapping) -> Preset:
    unknown = sorted(set(d) - {"name", "description", "preserving", "removing"})
    if unknown:
        raise ValueError(f"unknown preset keys {unknown}; expected name, description, preserving, removing")
    for key in ("name", "preserving", "removing"):
        if key not in d:
            raise ValueError(f"a preset needs {key!r}")
    if isinstance(d["preserving"], str | Mapping) or isinstance(d["removing"], str | Mapping):
        raise ValueError("'preserving' and 'removing' must be lists")
    return Preset(
        name=str(d["name"]),
        preserving=tuple(d["preserving"]),
        removing=tuple(d["removing"]),
        description=str(d.get("description", "")),
    )


def load_preset(path: str | Path, register: bool = False) -> Preset:
    """A preset from a YAML file (format in the module docstring); `register` adds it by name."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            d = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ValueError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read the preset ({e})") from None
    if not isinstance(d, Mapping):
        raise ValueError(f"{path}: expected a YAML mapping with name, preserving, removing")
    try:
        preset = preset_from_dict(d)
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a preset ({type(e).__name__}: {e})") from None
    if register:
        register_preset(preset, overwrite=True)
    return preset


PRESETS = Registry("preset", error=UnknownNameError)  # name -> Preset


def register_preset(preset: Preset, overwrite: bool = False) -> Preset:
    return PRESETS.register(preset.name, overwrite=overwrite)(preset)


def get_preset(name: str) -> Preset:
    """A registered preset by name, or a preset loaded from a path ending in .yaml / .yml."""
    if name not in PRESETS and str(name).endswith((".yaml", ".yml")) and Path(name).is_file():
        return load_preset(name)
    return PRESETS.get(name)


def list_presets() -> list[str]:
    return PRESETS.names()


register_preset(
    Preset(
        "paper",
        ("color_jitter", "perspective", "rotate"),
        ("occlusion_noise", "zoom_crop"),
        "CPPO's reference views, exactly as docs/method.md §1",
    )
)
register_preset(
    Preset(
        "papo",
        ("identity",),
        ("patch_blackout",),
        "PAPO: the original image against 14-px grid cells blacked out with p = 0.6",
    )
)
register_preset(
    Preset(
        "in_distribution",
        ("gaussian_blur", "jpeg", "translate_scale", "gaussian_noise"),
        ("occlusion_mean", "occlusion_background", "grey_fill"),
        "mild views and occluders that look like the data (docs/perturbations.md): "
        "keeps the entropy-shift probe about lost content, not surprise at noise",
    )
)
