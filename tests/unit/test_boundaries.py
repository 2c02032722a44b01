"""The tree shows the process boundaries: frontend/ and shard/ never import each other."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "floki"


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_frontend_and_shard_never_import_each_other():
    crossings = []
    for side, other in (("frontend", "floki.shard"), ("shard", "floki.frontend")):
        for path in (ROOT / side).rglob("*.py"):
            crossings += [f"{path.name} imports {m}" for m in imported_modules(path)
                          if m == other or m.startswith(other + ".")]
    assert crossings == []


def test_shared_modules_import_neither_side():
    for path in ROOT.glob("*.py"):
        if path.name in ("cli.py", "supervisor.py"):
            continue  # entry points start either side (lazily)
        bad = [m for m in imported_modules(path)
               if m.startswith("floki.shard") or m.startswith("floki.frontend")]
        assert bad == [], path.name
