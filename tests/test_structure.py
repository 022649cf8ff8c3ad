"""The package's shape, checked: no import cycle, no module importing another's private names, the
Lightning adapter on the engine's public surface only, and modules of a readable size."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "gradwatch"
MODULES = sorted(PACKAGE.rglob("*.py"))
MAX_LINES = 520


def _name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of each import of a gradwatch module made at import time (not under
    ``if TYPE_CHECKING:``), resolved to absolute names."""
    tree = ast.parse(path.read_text())
    package = _name(path) if path.name == "__init__.py" else _name(path).rsplit(".", 1)[0]
    out = []
    for node in tree.body:  # top level only: imports inside functions run later, on demand
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")
            base = base[: len(base) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            names = [a.name for a in node.names]
            if node.module is None:  # from . import stats: each name is a module
                out += [(f"{target}.{n}", []) for n in names]
            else:
                out.append((target, names))
    return out


def test_no_import_cycle():
    graph = {_name(p): {t for t, _ in _imports(p)} for p in MODULES}
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in graph.get(node, ()):
            nxt = nxt if nxt in graph else nxt.rsplit(".", 1)[0]
            assert state.get(nxt) != 1, " -> ".join([*path, nxt])
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])


def test_no_module_imports_another_modules_private_names():
    for path in MODULES:
        for target, names in _imports(path):
            private = [n for n in names if n.startswith("_")]
            assert not private, (path.name, target, private)


def test_the_lightning_adapter_uses_only_the_engines_public_surface():
    tree = ast.parse((PACKAGE / "lightning.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr[:1] == "_" and node.attr[:2] != "__":
            owner = node.value
            assert isinstance(owner, ast.Name) and owner.id == "self", ast.unparse(node)


def test_modules_stay_a_readable_size():
    long = {p.name for p in MODULES if len(p.read_text().splitlines()) > MAX_LINES}
    assert not long, long


def test_one_exceptions_module_and_a_typed_package():
    import gradwatch
    from gradwatch import exceptions, report, sinks

    assert gradwatch.GradWatchWarning is exceptions.GradWatchWarning is sinks.GradWatchWarning
    assert gradwatch.NonFiniteError is exceptions.NonFiniteError is report.NonFiniteError
    assert (Path(gradwatch.__file__).parent / "py.typed").is_file()
