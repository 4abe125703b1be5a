"""No import circles in tmcgraph or apg: no module imports (at any level: function bodies and
``if TYPE_CHECKING:`` blocks included) a module that imports it, directly or through others.
"""

import ast
from pathlib import Path
from typing import Dict, List

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]


def _modules(root: Path, packages: List[str]) -> Dict[str, Path]:
    out = {}
    for pkg in packages:
        for path in (root / pkg).rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _targets(module: str, path: Path, node: ast.AST, modules: Dict[str, Path]) -> List[str]:
    """The modules of ``modules`` an import statement loads (``from pkg import mod`` names ``pkg.mod``)."""
    base = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    if isinstance(node, ast.ImportFrom):
        if node.level:
            parts = base.split(".")
            parts = parts[: len(parts) - node.level + 1]
            target = ".".join(parts + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        names = [f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target for a in node.names]
    else:
        names = [a.name for a in node.names]  # type: ignore[attr-defined]
    found = []
    for name in names:
        while name not in modules and "." in name:
            name = name.rsplit(".", 1)[0]
        if name in modules and name != module:
            found.append(name)
    return found


def import_graph(root: Path, packages: List[str]) -> nx.DiGraph:
    """Module -> the modules it imports (every import statement, at any depth)."""
    modules = _modules(root, packages)
    g = nx.DiGraph()
    for module, path in modules.items():
        g.add_node(module)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _targets(module, path, node, modules):
                    g.add_edge(module, target)
    return g


def circles(g: nx.DiGraph) -> List[List[str]]:
    return [sorted(c) for c in nx.strongly_connected_components(g) if len(c) > 1]


def test_no_import_circles():
    assert circles(import_graph(ROOT, ["tmcgraph", "apg"])) == []


def test_the_check_finds_circles_through_function_level_and_type_checking_imports(tmp_path):
    """Power: modules that import each other inside a function, or for types only, are caught."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import f\n")
    (pkg / "b.py").write_text("def f():\n    from . import c\n")
    (pkg / "c.py").write_text("from pkg.a import f\n")
    (pkg / "d.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .e import g\n")
    (pkg / "e.py").write_text("from .d import TYPE_CHECKING\n")
    assert sorted(circles(import_graph(tmp_path, ["pkg"]))) == [["pkg.a", "pkg.b", "pkg.c"], ["pkg.d", "pkg.e"]]
