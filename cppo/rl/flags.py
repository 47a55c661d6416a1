"""cppo-train's command line and config files: flags and YAML files into a validated `TrainConfig`.

Precedence, lowest first: the dataclass defaults, ``--config FILE.yaml``, then flags. transformers'
``HfArgumentParser`` makes a flag of every field (``group_size`` -> ``--group-size 8`` or
``--group_size 8``; booleans as ``--x``, ``--x false`` or ``--no-x``; lists take several values;
``none`` sets an optional field to None). As in TRL's ``TrlParser``, a file's values become the
parser's defaults (``set_defaults``), so flags override them. Each field's flag and its YAML values
go through one converter (`_converter`), so both are checked alike: ``1e-6`` is a float, a float
is never an int, a list of names is never a number.

    cfg = parse_args(argv)                  # the config (tests, workers, bench scripts)
    cfg, options = parse_command(argv)      # and the launcher's own options (cppo-train)
    cfg = config_from_yaml(path)            # a saved config.yaml
    text = to_yaml(cfg)                     # what config.yaml and --print-config hold
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
import types
import typing
from argparse import ArgumentError, ArgumentTypeError
from contextlib import suppress
from pathlib import Path

import yaml
from transformers.hf_argparser import HfArgumentParser, string_to_bool

from cppo.rl.config import ConfigError, TrainConfig

FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
HINTS = typing.get_type_hints(TrainConfig)
ALIASES = {"learning_rate": "lr"}  # config keys TRL / transformers users write -> ours
_OPTIONAL = {name for name, hint in HINTS.items() if type(None) in typing.get_args(hint)}


def field_names() -> list[str]:
    """The fields in the order of their docs, for --help and config.yaml: TrainConfig's own as
    written, the inherited CPL settings (first in dataclasses.fields) at the head of the CPPO group."""
    own = [name for name in TrainConfig.__annotations__ if name in FIELDS]
    inherited = [name for name in FIELDS if name not in own]
    at = own.index("preset")
    return own[:at] + inherited + own[at:]


def _flag_fields() -> type:
    """TrainConfig's fields as the parser is given them: in `field_names` order, with the metadata
    HfArgumentParser takes (help, and aliases, which it consumes). The rest of a field's metadata
    (check, resume_safe) is the config's own, and argparse would refuse it."""
    spec = []
    for name in field_names():
        f = FIELDS[name]
        default = {"default": f.default} if f.default is not dataclasses.MISSING else {}
        if f.default_factory is not dataclasses.MISSING:
            default = {"default_factory": f.default_factory}
        meta = {k: f.metadata[k] for k in ("help", "aliases") if k in f.metadata}
        spec.append((name, HINTS[name], dataclasses.field(metadata=meta, **default)))
    return dataclasses.make_dataclass("TrainFlags", spec)


class ConfigParser(HfArgumentParser):
    """HfArgumentParser over TrainConfig's fields, plus the launcher's options (--config,
    --print-config, --dry-run, --dry-run-gpus). Each field's flag takes its value through
    `_converter` (``none`` for optional fields, ``auto`` for gradient_checkpointing); every boolean
    has ``--no-x``; a bad flag is a ConfigError, not an exit."""

    def __init__(self, prog: str = "cppo-train"):
        super().__init__(
            _flag_fields(),
            prog=prog,
            allow_abbrev=False,  # "--lr" must never be read as a prefix of another flag
            exit_on_error=False,
            description="RL finetuning of a vision-language model with GRPO, CPPO (Contrastive Perception "
            "Policy Optimization, arXiv 2601.00501) or PAPO. Precedence: defaults < --config < flags. A "
            "run directory that holds an earlier run needs --resume auto (continue it) or --overwrite "
            "(delete it first; see --overwrite).",
            epilog="CPU threads (runs on the CPU): chosen again before every step, as many as the cores that "
            "other processes leave free (all on an idle machine, fewer while other work keeps cores busy, so "
            "a shared machine slows a run by about 1.5x rather than 3x; cppo/rl/threads.py). "
            "OMP_NUM_THREADS=N fixes the count: for bit-identical reruns, or to leave cores to other work.",
        )
        self.converters: dict[str, tuple] = {}  # field -> (its value check, its nargs)
        for action in list(self._actions):
            if action.dest in FIELDS:
                self._take_values(action)
        self.add_argument("--config", metavar="FILE.yaml", help="YAML file of config keys, flat as the flags")
        self.add_argument(
            "--print-config",
            action="store_true",
            help="validate, print the resolved config as YAML and exit without training",
        )
        self.add_argument(
            "--dry-run",
            action="store_true",
            help="validate, print the resolved config, the data's steps per epoch, the updates per step "
            "and the memory estimate per GPU (cppo.rl.plan), and exit without loading a model",
        )
        self.add_argument(
            "--dry-run-gpus",
            type=int,
            metavar="N",
            default=None,
            help="processes (GPUs) for --dry-run's estimate; default: the launch's (WORLD_SIZE), else 1",
        )

    def _take_values(self, action: argparse.Action) -> None:
        """Give a field's action (made by HfArgumentParser) the converter its YAML values use too, a
        metavar saying what it takes, and the --no-x that HfArgumentParser adds only to booleans that
        default to True."""
        name = action.dest
        dashed = name.replace("_", "-")
        if isinstance(action, argparse._StoreFalseAction):  # HfArgumentParser's --no-x
            action.help, action.default = f"the opposite of --{dashed}", argparse.SUPPRESS
            return
        scalar, nargs, choices = _kind(name)
        listed = nargs not in (None, "?")
        action.type, action.nargs, action.choices = _converter(name, scalar, listed), nargs, None
        optional = "|none" if name in _OPTIONAL else "|auto" if _auto_switch(name) else ""
        action.metavar = ("|".join(choices) if choices else scalar.__name__.upper()) + optional
        self.converters[name] = (action.type, nargs)
        if scalar is bool and FIELDS[name].default is not True:  # False, or auto
            self.add_argument(
                f"--no_{name}",
                f"--no-{dashed}",
                action="store_false",
                dest=name,
                default=argparse.SUPPRESS,
                help=f"the opposite of --{dashed}",
            )

    def error(self, message: str):
        raise ConfigError(f"flags: {message}")

    def read_flags(self, argv: list[str]) -> argparse.Namespace:
        """The flags alone; ConfigError for a bad value or an unknown flag (with the closest known one)."""
        try:
            namespace, rest = self.parse_known_args(argv)
        except ArgumentError as e:
            name = (e.argument_name or "").split("/")[0].lstrip("-")
            raise ConfigError(" ".join(filter(None, ("flags:", name, e.message)))) from None
        if rest:
            flags = [
                s.replace("_", "-") for a in self._actions for s in a.option_strings if s.startswith("--")
            ]
            raise _unknown_flag(rest, flags)
        return namespace

    def file_values(self, values: dict, source: str) -> dict:
        """A YAML file's (or a mapping's) values, checked as the flags are, ready for set_defaults;
        ConfigError naming `source` (with the key's line when `values` is load_yaml's) and the key."""
        out = {}
        for key, value in values.items():
            where = f"{source}:{values.lines[key]}" if key in getattr(values, "lines", {}) else source
            key = ALIASES.get(key, key)
            if key not in self.converters:
                raise _unknown_key(key, where)
            convert, nargs = self.converters[key]
            try:
                if nargs in (None, "?"):
                    out[key] = convert(value)
                    continue
                items = list(value) if isinstance(value, (list, tuple)) else [value]
                if isinstance(nargs, int) and len(items) != nargs:
                    raise ArgumentTypeError(f"expects {nargs} values, got {value!r}")
                out[key] = [convert(v) for v in items]
            except ArgumentTypeError as e:
                raise ConfigError(f"{where}: {key} {e}") from None
        return out

    def to_config(self, argv: list[str]) -> tuple[TrainConfig, argparse.Namespace]:
        """The flags (on top of set_defaults' values) -> a validated TrainConfig, and the launcher's
        options."""
        flags, options = self.parse_args_into_dataclasses(argv, look_for_args_file=False)
        return TrainConfig(**{name: getattr(flags, name) for name in FIELDS}), options


def _kind(name: str) -> tuple[type, int | str | None, tuple]:
    """A field's scalar type, how many values its flag takes (None: one, "?": a bool's optional
    one, "+": a list, n: a tuple of n), and its Literal's choices."""
    hint = HINTS[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = bool if bool in args else args[0]  # bool | str is an auto switch
    origin = typing.get_origin(hint)
    if hint is bool:
        return bool, "?", ()
    if origin is list:
        return typing.get_args(hint)[0], "+", ()
    if origin is tuple:
        return typing.get_args(hint)[0], len(typing.get_args(hint)), ()
    if origin is typing.Literal:
        return str, None, typing.get_args(hint)
    return hint, None, ()


def _auto_switch(name: str) -> bool:
    """A boolean field whose default is "auto" (decided by the run, e.g. gradient_checkpointing):
    it takes true / false / auto, and has --x and --no-x like any boolean."""
    return FIELDS[name].default == "auto" and bool in typing.get_args(HINTS[name])


def _converter(name: str, scalar: type, listed: bool = False):
    """The argparse type of a field, applied to YAML values too: ints are floats, '1e-6' strings are
    numbers (YAML 1.1 reads 1e-6 without a dot as a string), none/null is None where the field allows
    it, auto where the field is an auto switch. A text field takes a YAML number too (``output_dir:
    2024``), but never a boolean, and a list of names (``listed``: rewards, lora_targets) only text
    (``rewards: 5`` is a mistake, not the reward "5")."""

    def convert(value):
        if _auto_switch(name) and str(value).lower() == "auto":
            return "auto"
        if name in _OPTIONAL and (value is None or str(value).lower() in ("none", "null")):
            return None
        if value is None:
            raise ArgumentTypeError("cannot be none")
        with suppress(TypeError, ValueError, ArgumentTypeError):
            if scalar is bool and isinstance(value, (bool, str)):
                return string_to_bool(value)
            if scalar is int and not isinstance(value, (bool, float)):
                return int(value)
            if scalar is int and isinstance(value, float) and value.is_integer():
                return int(value)
            if scalar is float and not isinstance(value, bool):
                return float(value)
            if scalar is str and (isinstance(value, str) or _number(value) and not listed):
                return str(value)
        kind = f"a list of {scalar.__name__}" if listed else scalar.__name__
        raise ArgumentTypeError(f"expects {kind}, got {value!r}")

    return convert


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _unknown_key(key: str, source: str) -> ConfigError:
    close = difflib.get_close_matches(key.replace("-", "_"), FIELDS, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else "; run cppo-train --help for the list"
    return ConfigError(f"{source}: unknown config key {key!r}{hint}")


def _unknown_flag(rest: list[str], flags: list[str]) -> ConfigError:
    arg = next((a for a in rest if a.startswith("-")), rest[0])
    if not arg.startswith("-"):
        return ConfigError(f"flags: unexpected value {arg!r} (a flag takes the form --name VALUE)")
    close = difflib.get_close_matches(arg.split("=")[0].replace("_", "-"), flags, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]}?" if close else "; run cppo-train --help for the list"
    return ConfigError(f"flags: unknown flag {arg!r}{hint}")


class ConfigValues(dict):
    """A config file's field -> value, with ``lines``: field -> the line it is set on (for messages)."""

    lines: dict[str, int]


class _DuplicateKey(Exception):
    def __init__(self, key: str, line: int, first: int):
        super().__init__(key)
        self.key, self.line, self.first = key, line, first


def _key(key) -> str:
    """A config key as the fields name it: ``-`` read as ``_``, TRL's names as ours (ALIASES)."""
    key = str(key).replace("-", "_")
    return ALIASES.get(key, key)


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False):
    """SafeLoader's mapping, refusing a key given twice (PyYAML silently keeps the last; YAML 1.2 says
    keys are unique). Keys are compared as config keys, so ``group-size`` repeats ``group_size``."""
    first: dict[str, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key, line = _key(loader.construct_object(key_node, deep=True)), key_node.start_mark.line + 1
        if key in first:
            raise _DuplicateKey(key, line, first[key])
        first[key] = line
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


class _UniqueKeyLoader(yaml.SafeLoader):
    pass


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def load_yaml(path: str | Path) -> ConfigValues:
    """A flat mapping of field -> value (``-`` in keys read as ``_``), or ConfigError naming
    ``file:line``: a syntax error, a key given twice (refused: which one was meant is a guess, and
    PyYAML would keep the last without a word), a file that is not a mapping or not UTF-8 text."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    if not path.is_file():
        raise ConfigError(f"config file {path} is not a regular file: give a YAML file to --config")
    try:
        loader = _UniqueKeyLoader(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the config file ({e}); it must be UTF-8 text") from None
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    except _DuplicateKey as e:
        raise ConfigError(
            f"{path}:{e.line}: duplicate key {e.key!r} (also on line {e.first}): keep one of them"
        ) from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    values = ConfigValues((_key(k), v) for k, v in data.items())
    values.lines = {_key(k.value): k.start_mark.line + 1 for k, _ in node.value} if node is not None else {}
    return values


def build_parser(prog: str = "cppo-train") -> ConfigParser:
    """One flag per field (``--help`` lists them with their help and default), plus --config,
    --print-config, --dry-run and --dry-run-gpus."""
    return ConfigParser(prog)


def parse_command(argv: list[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    """Defaults, then ``--config FILE.yaml``, then flags -> a validated TrainConfig (ConfigError if
    not), and the launcher's options: ``config``, ``print_config``, ``dry_run``, ``dry_run_gpus``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    path = parser.read_flags(argv).config  # a bad or unknown flag is reported before the file is read
    if path:
        parser.set_defaults(**parser.file_values(load_yaml(path), str(path)))
    return parser.to_config(argv)


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """`parse_command`'s config alone."""
    return parse_command(argv)[0]


def config_from_dict(values: dict, source: str = "config") -> TrainConfig:
    """A config from a mapping of field -> value, checked as flags are (ConfigError names `source`)."""
    parser = build_parser()
    parser.set_defaults(**parser.file_values(values, source))
    return parser.to_config([])[0]


def config_from_yaml(path: str | Path) -> TrainConfig:
    """A config from a YAML file such as a run's config.yaml, checked as --config's is."""
    return config_from_dict(load_yaml(path), source=str(path))


def to_yaml(cfg: TrainConfig) -> str:
    """The config as YAML, its fields in the order of their docs: a run's config.yaml, --print-config."""
    values = cfg.to_dict()
    return yaml.safe_dump({name: values[name] for name in field_names()}, sort_keys=False)


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(to_yaml(cfg))
