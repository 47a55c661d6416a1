"""Which tests the floor run (scripts/test_floor.sh) repeats: those that can reach transformers or
huggingface_hub, the packages whose versions the floor changes. Worked out from the source on every
run, never from a list: a test that starts to reach transformers is on the floor the run after.

A test reaches them when its module, or a fixture it uses from a conftest.py, can import them by any
path through this repository's files (cppo, cli, tests, bench, examples, scripts), counting:

- every import statement of a file, the ones inside functions included (cppo imports transformers
  lazily), and the packages above an imported module (``import cppo.rl.loop`` runs cppo/__init__.py);
- a string that names a repository module (``"-m", "cli.perturb"``, ``"cppo.rl.rewards:accuracy"``),
  a repository file (``"chaos_reward.py"``, ``"tests/workers/fsdp_load.py"``) or holds code with
  imports (``python -c "import cppo.grading"``): what a subprocess or an importlib call runs;
- an installed package that requires transformers or huggingface-hub, directly or through other
  packages (peft, trl, accelerate, datasets, tokenizers, ...), by its installed metadata; a package
  that is neither installed nor in the standard library counts as reaching them.

The analysis errs on the side of keeping a test: what it leaves out cannot import transformers
without one of the above naming it. pytest runs only those under CPPO_FLOOR_SCOPE=1 (tests/conftest.py).

What it does not count: the imports a package's __init__.py makes when one of its modules is
imported (see _expand): they run, but a test can call only what it and the modules it imports name.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata as metadata
import inspect
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("cppo", "cli", "tests", "bench", "examples", "scripts")
FLOOR_DISTRIBUTIONS = frozenset({"transformers", "huggingface-hub"})
FLOOR_PACKAGES = frozenset({"transformers", "huggingface_hub"})
_DOTTED = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+")


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@functools.cache
def repo_modules() -> dict[str, Path]:
    """Module name -> file, for every .py file under SOURCES."""
    modules = {}
    for top in SOURCES:
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def _module_of(path: Path) -> str | None:
    """The repository module of a file, None for a file elsewhere (pytest's own fixtures)."""
    path = path.resolve()
    return next((m for m, p in repo_modules().items() if p == path), None)


@functools.cache
def _requires_floor(distribution: str) -> bool:
    return _distribution_closure(_normalise(distribution)) & FLOOR_DISTRIBUTIONS != set()


def _distribution_closure(distribution: str, seen: frozenset = frozenset()) -> set[str]:
    from packaging.requirements import Requirement

    out = {distribution}
    try:
        requires = metadata.requires(distribution) or []
    except metadata.PackageNotFoundError:
        return out
    for line in requires:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # an optional extra: not installed with it
        name = _normalise(req.name)
        if name not in seen and name != distribution:
            out |= _distribution_closure(name, seen | {distribution})
    return out


@functools.cache
def external_reaches_floor(top: str) -> bool:
    """Whether importing the installed top-level package ``top`` can import the floor's packages."""
    if top in FLOOR_PACKAGES:
        return True
    if top in sys.stdlib_module_names or top == "__future__":
        return False
    distributions = metadata.packages_distributions().get(top)
    if not distributions:
        return True  # unknown: keep the test
    return any(_requires_floor(d) for d in distributions)


@functools.cache
def _by_stem() -> dict[str, list[str]]:
    """A file's name without .py -> its modules: how a script imports a sibling that a sys.path entry
    makes importable (bench/*.py, tests/workers/*.py). Package names of the repository aside."""
    out: dict[str, list[str]] = {}
    for module in repo_modules():
        if module not in SOURCES and "." in module:
            out.setdefault(module.rsplit(".", 1)[1], []).append(module)
    return out


def _is_external(name: str) -> bool:
    """A top-level name that is not one of this repository's folders or modules."""
    return "." not in name and name not in SOURCES and name not in repo_modules() and name not in _by_stem()


def _docstrings(tree: ast.AST) -> set[int]:
    """The ids of the docstring nodes in ``tree``: prose, not something a program runs."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def _imports_in(tree: ast.AST, module: str | None, is_package: bool) -> set[str]:
    """Module names imported anywhere in ``tree`` or named by its strings (docstrings aside); for code
    in a string (``module`` None) relative imports are left out: they name nothing outside it."""
    names: set[str] = set()
    docstrings = _docstrings(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level and module is None:
                continue
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names.add(target)
            names |= {f"{target}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            names |= _named_by_string(node.value)
    return names


def _named_by_string(text: str) -> set[str]:
    names = set()
    modules = repo_modules()
    for token in _DOTTED.findall(text):
        if token in modules or token.split(".")[0] in FLOOR_PACKAGES:
            names.add(token)
    stripped = text.strip()
    if stripped in FLOOR_PACKAGES or stripped in modules:
        names.add(stripped)
    if stripped.endswith(".py"):
        tail = stripped.replace("\\", "/").split("/")
        names |= {m for m, p in modules.items() if p.parts[-len(tail) :] == tuple(tail)}
    if "import " in text:
        try:
            code = ast.parse(text)
        except SyntaxError:
            pass
        else:
            names |= _imports_in(code, None, False)
    return names


def _expand(names: set[str]) -> set[str]:
    """The names, and the top-level package of each (``a.b.c`` -> ``a``, ``a.b.c``). The packages in
    between are left out: ``from cppo.rl.rewards import f`` runs cppo/rl/__init__.py, whose imports
    (transformers' HfArgumentParser among them) then happen, but f can only call into what
    rewards.py imports; an import of the package itself (``from cppo.rl import f``) is followed."""
    return names | {name.split(".")[0] for name in names if name}


@functools.cache
def _file_imports(module: str) -> frozenset[str]:
    path = repo_modules()[module]
    tree = ast.parse(path.read_text(), filename=str(path))
    return frozenset(_expand(_imports_in(tree, module, path.name == "__init__.py")))


@functools.cache
def reaching_path(module: str) -> tuple[str, ...] | None:
    """A chain of imports from repository module ``module`` to a package that reaches the floor's
    packages (the last element), or None when there is none."""
    modules = repo_modules()
    parents: dict[str, str | None] = {module: None}
    queue = [module]
    while queue:
        current = queue.pop(0)
        for name in sorted(_file_imports(current)):
            if name in parents:
                continue
            parents[name] = current
            if name in modules or name in _by_stem():
                queue.extend(_by_stem().get(name, [name]))
            elif _is_external(name) and external_reaches_floor(name):
                chain = [name]
                while parents[chain[-1]] is not None:
                    chain.append(parents[chain[-1]])
                return tuple(reversed(chain))
    return None


def function_reaching_path(func) -> tuple[str, ...] | None:
    """The same for one function of a repository file (a conftest.py fixture): its own imports and
    strings, and its file's top-level imports."""
    code = getattr(inspect.unwrap(func), "__code__", None)
    if code is None:
        return None  # a builtin
    path = Path(code.co_filename)
    module = _module_of(path)
    if module is None:
        return None  # not ours (pytest's tmp_path, ...)
    tree = ast.parse(path.read_text(), filename=str(path))
    defs = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
    imports = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    top = ast.Module(body=imports, type_ignores=[])
    names = _imports_in(top, module, False)
    for node in defs:
        if node.name == func.__name__:  # every function of that name: no need to tell them apart
            names |= _imports_in(node, module, False)
    names = _expand(names)
    for name in sorted(names):
        if name in repo_modules():
            chain = reaching_path(name)
            if chain:
                return (f"{module}.{func.__name__}", *chain)
        elif _is_external(name) and external_reaches_floor(name):
            return (f"{module}.{func.__name__}", name)
    return None


def item_reaching_path(item) -> tuple[str, ...] | None:
    """Why a collected pytest item is on the floor (a chain of imports), or None if it is not."""
    module = _module_of(Path(item.path))
    chain = reaching_path(module) if module else ("<outside the repository>",)
    if chain:
        return chain
    for definitions in item._fixtureinfo.name2fixturedefs.values():
        for definition in definitions:
            chain = function_reaching_path(definition.func)
            if chain:
                return chain
    return None
