"""The package's shape (cyrushelper/README.md): one module per concept, imports pointing downward,
no test bed in the product, and the module map true to the files."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "cyrushelper"
MODULES = sorted(p for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py"))


def imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module, at module level?) for every import statement of `path`."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    top |= {id(n) for node in tree.body if isinstance(node, ast.Try) for n in node.body}  # optional deps
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [f"{node.module}.{a.name}" for a in node.names]
            found += [(n, id(node) in top) for n in [node.module, *names]]
    return found


def test_no_module_imports_cli_or_the_test_bed():
    for path in MODULES:
        if path.name == "cli.py":
            continue
        for name, _ in imports(path):
            assert name != "cyrushelper.cli" and not name.startswith("cyrushelper.cli."), path.name
            assert not name.startswith("testbed"), path.name


def test_imports_are_at_module_level():
    """No import hidden in a function to step around a cycle (optional dependencies sit in a
    module-level try)."""
    for path in MODULES:
        lazy = [name for name, top in imports(path) if not top]
        assert lazy == [], f"{path.name} imports inside a function: {lazy}"


def test_module_map_lists_every_module():
    text = (PACKAGE / "README.md").read_text()
    listed = set(re.findall(r"^\| `(\w+\.py)` \|", text, re.M))
    assert listed == {p.name for p in MODULES}
