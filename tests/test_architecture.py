"""The layering of docs/architecture.md holds for the code's own imports (scripts/import_graph.py)."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _load():
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "scripts" / "import_graph.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


graph = _load()


def test_layering_holds():
    edges = graph.scan(ROOT)
    assert ("cppo.rl", "cppo.loss") in edges  # the scan sees the code: the check is not vacuous
    bad = graph.violations(edges)
    assert not bad, "\n".join(bad)


def test_every_unit_has_a_layer():
    units = {p.name for p in (ROOT / "cppo").iterdir() if (p / "__init__.py").is_file()}
    units |= {p.stem for p in (ROOT / "cppo").glob("*.py") if p.stem != "__init__"}
    placed = set(graph.layer_of())
    assert {f"cppo.{u}" for u in units} <= placed, sorted({f"cppo.{u}" for u in units} - placed)


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_check_names_upward_lazy_and_unplaced_imports(tmp_path):
    _write(tmp_path, "cppo/__init__.py", "")
    _write(tmp_path, "cppo/registry.py", "")
    _write(tmp_path, "cppo/loss/__init__.py", "from cppo.registry import Registry\n")
    _write(tmp_path, "cppo/loss/mask.py", "def f():\n    from cppo.detect import select\n")
    _write(tmp_path, "cppo/detect/__init__.py", "from ..rl import loop\nfrom cppo import loss\n")
    _write(tmp_path, "cppo/rl/__init__.py", "import cppo.detect\nimport cppo.newpkg.x\n")
    _write(tmp_path, "cppo/newpkg/__init__.py", "")
    _write(tmp_path, "cli/run.py", "from cppo.rl import loop\nfrom cppo import __version__\n")
    edges = graph.scan(tmp_path)
    assert set(edges) == {
        ("cppo.loss", "cppo.registry"),
        ("cppo.loss", "cppo.detect"),
        ("cppo.detect", "cppo.rl"),
        ("cppo.detect", "cppo.loss"),
        ("cppo.rl", "cppo.detect"),
        ("cppo.rl", "cppo.newpkg"),
        ("cli", "cppo.rl"),
        ("cli", "cppo"),
    }
    assert edges[("cppo.loss", "cppo.detect")][0].lazy
    bad = graph.violations(edges)
    assert len(bad) == 3, bad
    assert bad[0].startswith("cppo.newpkg is in no layer")
    assert any(
        line.startswith("cppo/loss/mask.py:2: cppo.loss -> cppo.detect") and "inside a function" in line
        for line in bad
    ), bad
    assert any(line.startswith("cppo/detect/__init__.py:1: cppo.detect -> cppo.rl") for line in bad), bad
    assert graph.main(["--check", "--root", str(tmp_path)]) == 1
    out = tmp_path / "graph.svg"
    assert graph.main(["--root", str(tmp_path), "--svg", str(out)]) == 0  # reports, does not fail
    assert out.read_text().startswith("<svg")


def test_the_committed_figure_is_a_fresh_drawing_of_the_code():
    """docs/img/architecture.svg shows today's edges: regenerate it with `python scripts/import_graph.py`."""
    fresh = graph.render_svg(graph.scan(ROOT))
    committed = (ROOT / graph.FIGURE).read_text(encoding="utf-8")
    assert committed == fresh, "docs/img/architecture.svg is stale: run python scripts/import_graph.py"


def test_the_trainer_package_lists_each_of_its_files_once():
    """cppo/rl/__init__.py's file list names every module of cppo/rl and no other."""
    import ast
    import re

    init = ROOT / "cppo" / "rl" / "__init__.py"
    listed = re.findall(r"\b(\w+)\.py\b", ast.get_docstring(ast.parse(init.read_text())))
    files = {p.stem for p in init.parent.glob("*.py") if p.stem != "__init__"}
    assert sorted(set(listed)) == sorted(files)
    assert len(listed) == len(set(listed)), "a file is listed twice"
