"""The import graph of cppo/ and cli/ between packages, its layering rule, and its figure.

    python scripts/import_graph.py            # print the edges and any violation, write the figure
    python scripts/import_graph.py --check    # exit 1 naming every import that breaks the layering

Standard library only (``ast``): the source is parsed, never imported. A unit is a subpackage or a
top-level module of ``cppo`` (``cppo.loss``, ``cppo.response_stats``), the root package ``cppo`` itself,
or ``cli``. Every ``import`` / ``from ... import`` is counted, including those inside functions
(drawn dashed in the figure: a lazy import is still a dependency).

The rule (docs/architecture.md explains it): units sit in the layers of ``LAYERS``, and a unit may
import only units of LOWER layers, never one of its own layer or above. ``ONLY`` narrows that for
some units: ``cppo.loss`` is pure tensor maths and may import ``cppo.registry`` and nothing else
from cppo. A unit that is in no layer is a violation too, so a new package has to be placed here
(and in docs/architecture.md) before the check passes.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
FIGURE = Path("docs/img/architecture.svg")

# Top layer first. A unit may import units of the layers BELOW its own, and nothing else.
LAYERS: list[tuple[str, list[str]]] = [
    ("entry points", ["cli"]),
    ("trainers", ["cppo.rl", "cppo.integrations"]),
    ("detector, benchmarks", ["cppo.detect", "cppo.benchmarks"]),
    ("models and response stats", ["cppo.models", "cppo.response_stats"]),
    ("maths, views, task", ["cppo.toy", "cppo.loss", "cppo.perturb"]),
    ("base", ["cppo.batching", "cppo.grading", "cppo.prompt", "cppo.registry", "cppo.precision", "cppo"]),
]
# Narrower than the layers allow: the only cppo units these may import.
ONLY: dict[str, frozenset[str]] = {
    "cppo.loss": frozenset({"cppo.registry"}),
}


class Import(NamedTuple):
    file: str  # relative to the scanned root
    line: int
    target: str  # the dotted name as written (resolved if relative)
    lazy: bool  # inside a function


def layer_of() -> dict[str, int]:
    """unit -> layer index, 0 = the top layer."""
    return {unit: i for i, (_, units) in enumerate(LAYERS) for unit in units}


def _module_name(path: Path, root: Path) -> tuple[str, list[str]]:
    """(dotted module name, package parts) of a source file."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
        return ".".join(parts), parts
    return ".".join(parts), parts[:-1]


def unit_of(dotted: str, root: Path) -> str | None:
    """The unit a dotted name belongs to, or None outside cppo/ and cli/."""
    parts = dotted.split(".")
    if parts[0] == "cli":
        return "cli"
    if parts[0] != "cppo":
        return None
    if len(parts) > 1:
        sub = root / "cppo" / parts[1]
        if sub.with_suffix(".py").is_file() or sub.is_dir():
            return f"cppo.{parts[1]}"
    return "cppo"  # the root package, or a name defined in cppo/__init__.py


class _Collector(ast.NodeVisitor):
    def __init__(self, package: list[str]):
        self.package = package
        self.depth = 0  # function nesting
        self.found: list[tuple[int, str, bool]] = []

    def _function(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_Import(self, node: ast.Import):
        for alias in node.names:
            self.found.append((node.lineno, alias.name, self.depth > 0))

    def visit_ImportFrom(self, node: ast.ImportFrom):
        if node.level:  # relative: from .x import y, from .. import z
            base = self.package[: len(self.package) - (node.level - 1)]
            module = ".".join(base + ([node.module] if node.module else []))
        else:
            module = node.module or ""
        # `from cppo import loss` names a unit through the imported name, not the module
        names = [f"{module}.{a.name}" for a in node.names] if module.count(".") == 0 else [module]
        for name in names:
            self.found.append((node.lineno, name, self.depth > 0))


def scan(root: Path = ROOT) -> dict[tuple[str, str], list[Import]]:
    """(importing unit, imported unit) -> the imports that make that edge; self-edges left out."""
    root = Path(root)
    edges: dict[tuple[str, str], list[Import]] = defaultdict(list)
    files = sorted(list((root / "cppo").rglob("*.py")) + list((root / "cli").rglob("*.py")))
    for path in files:
        module, package = _module_name(path, root)
        src = unit_of(module, root)
        collector = _Collector(package)
        collector.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        for line, target, lazy in collector.found:
            dst = unit_of(target, root)
            if dst is None or dst == src:
                continue
            edges[(src, dst)].append(Import(path.relative_to(root).as_posix(), line, target, lazy))
    return dict(edges)


def why_not(src: str, dst: str) -> str | None:
    """Why `src` may not import `dst` (None when it may); both must be in a layer."""
    layers = layer_of()
    if src in ONLY:
        if dst in ONLY[src]:
            return None
        return f"{src} may import only {', '.join(sorted(ONLY[src])) or 'nothing'} from cppo"
    if layers[dst] > layers[src]:
        return None
    if layers[dst] == layers[src]:
        return f"{src} and {dst} are in the same layer ({LAYERS[layers[src]][0]})"
    return f"{dst} ({LAYERS[layers[dst]][0]}) is above {src} ({LAYERS[layers[src]][0]})"


def violations(edges: dict[tuple[str, str], list[Import]]) -> list[str]:
    """One line per import that breaks the rule, naming file, line, edge and the rule it breaks."""
    layers = layer_of()
    out = []
    for unit in sorted({u for edge in edges for u in edge} - set(layers)):
        out.append(f"{unit} is in no layer: add it to LAYERS here and to the table of docs/architecture.md")
    for (src, dst), imports in sorted(edges.items()):
        if src not in layers or dst not in layers:
            continue
        why = why_not(src, dst)
        if why is None:
            continue
        for imp in imports:
            where = " inside a function" if imp.lazy else ""
            out.append(f"{imp.file}:{imp.line}: {src} -> {dst} (import of {imp.target}{where}): {why}")
    return out


# ---------------------------------------------------------------- figure


def render_svg(edges: dict[tuple[str, str], list[Import]]) -> str:
    """A layered drawing: one row per layer, top layer first; an arrow per edge, from the importing
    unit to the imported one. Dashed: every import of that edge is inside a function. Red: the edge
    breaks the rule."""
    box_w, box_h, gap_x, row_h, left, top = 150, 36, 40, 110, 170, 60
    rows = [list(units) for _, units in LAYERS]
    placed = set(layer_of())
    stray = sorted({u for e in edges for u in e} - placed)
    names = [name for name, _ in LAYERS]
    if stray:
        rows.append(stray)
        names.append("not in a layer")
    widest = max(len(r) for r in rows)
    width = left + widest * (box_w + gap_x) + 20
    height = top + len(rows) * row_h
    pos: dict[str, tuple[float, float]] = {}  # unit -> (centre x, top y)
    for i, units in enumerate(rows):
        span = len(units) * box_w + (len(units) - 1) * gap_x
        x0 = left + (widest * (box_w + gap_x) - gap_x - span) / 2
        for j, unit in enumerate(units):
            pos[unit] = (x0 + j * (box_w + gap_x) + box_w / 2, top + i * row_h)
    bad_edges = {e for e in edges if e[0] in placed and e[1] in placed and why_not(*e) is not None}

    # spread the arrow ends along each box's edge, ordered by the other end's x
    outs: dict[str, list[tuple[str, str]]] = defaultdict(list)
    ins: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for edge in edges:
        outs[edge[0]].append(edge)
        ins[edge[1]].append(edge)

    def anchor(unit, edge, along):
        group = sorted(along[unit], key=lambda e: pos[e[1] if along is outs else e[0]][0])
        k, n = group.index(edge), len(group)
        return pos[unit][0] - box_w / 2 + box_w * (k + 1) / (n + 1)

    palette = ["#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#17becf", "#7f7f7f", "#bcbd22"]
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="Helvetica, Arial, sans-serif">',
        '<rect width="100%" height="100%" fill="white"/>',
        "<defs>",
    ]
    for i, colour in enumerate([*palette, "#d62728"]):
        parts.append(
            f'<marker id="a{i}" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
            f'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="{colour}"/></marker>'
        )
    parts.append("</defs>")
    parts.append(
        '<text x="10" y="24" font-size="15" font-weight="bold">Imports between the packages of cppo '
        "(scripts/import_graph.py)</text>"
    )
    parts.append(
        '<text x="10" y="44" font-size="11" fill="#444">an arrow from A to B: A imports B; '
        "dashed: only inside functions; red: breaks the layering rule</text>"
    )
    for i, name in enumerate(names):
        y = top + i * row_h
        parts.append(f'<line x1="8" y1="{y - 12}" x2="{width - 8}" y2="{y - 12}" stroke="#eee"/>')
        parts.append(f'<text x="10" y="{y + box_h / 2 + 4}" font-size="12" fill="#555">{name}</text>')
    rank = {u: i for i, units in enumerate(rows) for u in units}
    passing: dict[tuple[int, int, int], int] = defaultdict(int)  # (row, gap, side) -> edges routed there

    def through(row: int, x: float) -> float:
        """x of an edge crossing `row` that would pass at `x`: moved into the nearest gap between
        boxes, each further edge at the same gap side a few pixels further out."""
        lefts = sorted(pos[u][0] - box_w / 2 for u in rows[row])
        gaps = [(-1e9, lefts[0] - 8)]
        gaps += [(a + box_w + 8, b - 8) for a, b in zip(lefts, lefts[1:])]
        gaps.append((lefts[-1] + box_w + 8, 1e9))
        for lo, hi in gaps:
            if lo <= x <= hi:
                return x
        g, (lo, hi) = min(enumerate(gaps), key=lambda ig: min(abs(x - ig[1][0]), abs(x - ig[1][1])))
        side = 0 if abs(x - lo) < abs(x - hi) else 1
        k = passing[(row, g, side)]
        passing[(row, g, side)] += 1
        return lo + 7 * k if side == 0 else hi - 7 * k

    for edge in sorted(edges, key=lambda e: (rank[e[0]], pos[e[0]][0], pos[e[1]][0])):
        src, dst = edge
        broken = edge in bad_edges
        colour_i = len(palette) if broken else rank[src] % len(palette)
        colour = "#d62728" if broken else palette[colour_i]
        x1, x2 = anchor(src, edge, outs), anchor(dst, edge, ins)
        r1, r2 = rank[src], rank[dst]
        if r1 == r2:  # same row: an arc above the boxes
            y = pos[src][1]
            d = f"M{x1:.1f},{y} C{x1:.1f},{y - 40} {x2:.1f},{y - 40} {x2:.1f},{y}"
        else:  # down (or, breaking the rule, up) through the gaps of the rows in between
            step = 1 if r2 > r1 else -1
            y1 = pos[src][1] + (box_h if step == 1 else 0)
            y2 = pos[dst][1] + (0 if step == 1 else box_h)
            points = [(x1, y1)]
            for r in range(r1 + step, r2, step):
                x = x1 + (x2 - x1) * (r - r1) / (r2 - r1)
                points.append((through(r, x), top + r * row_h + box_h / 2))
            points.append((x2, y2))
            d = f"M{x1:.1f},{y1:.1f}"
            for (xa, ya), (xb, yb) in zip(points, points[1:]):
                c = (yb - ya) / 2  # vertical tangents at every point: a smooth S between rows
                d += f" C{xa:.1f},{ya + c:.1f} {xb:.1f},{yb - c:.1f} {xb:.1f},{yb:.1f}"
        dash = ' stroke-dasharray="5,4"' if all(i.lazy for i in edges[edge]) else ""
        width_px = 2.2 if broken else 1.3
        n = len(edges[edge])
        parts.append(
            f'<path d="{d}" fill="none" stroke="{colour}" stroke-width="{width_px}" stroke-opacity="0.85"'
            f'{dash} marker-end="url(#a{colour_i})"><title>{src} -&gt; {dst}: {n} import(s)</title></path>'
        )
    for unit, (cx, y) in pos.items():
        fill = "#fde2e1" if unit in stray else "#f3f6fb"
        parts.append(
            f'<rect x="{cx - box_w / 2}" y="{y}" width="{box_w}" height="{box_h}" rx="6" '
            f'fill="{fill}" stroke="#345"/>'
        )
        parts.append(
            f'<text x="{cx}" y="{y + box_h / 2 + 5}" font-size="13" text-anchor="middle">{unit}</text>'
        )
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if an import breaks the layering")
    parser.add_argument("--root", type=Path, default=ROOT, help="repository root (default: this one)")
    parser.add_argument("--svg", type=Path, default=None, help=f"figure path (default: ROOT/{FIGURE})")
    args = parser.parse_args(argv)
    edges = scan(args.root)
    bad = violations(edges)
    if args.check:
        for line in bad:
            print(line)
        if bad:
            print(f"{len(bad)} import(s) break the layering (scripts/import_graph.py, docs/architecture.md)")
            return 1
        print(f"layering holds: {len(edges)} edges between {len({u for e in edges for u in e})} units")
        return 0
    for (src, dst), imports in sorted(edges.items()):
        lazy = sum(i.lazy for i in imports)
        print(f"{src} -> {dst}: {len(imports)} import(s)" + (f", {lazy} inside functions" if lazy else ""))
    if bad:
        print(f"\n{len(bad)} violation(s) of the layering (not an error without --check):")
        for line in bad:
            print(f"  {line}")
    out = args.svg or args.root / FIGURE
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_svg(edges), encoding="utf-8")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
