"""The package's shape, checked: stages that import only downwards, no import cycle (counting
imports inside functions and under ``TYPE_CHECKING``: they run, or are read, all the same), no
module importing another's private names, the adapters on the engine's public surface only, and
modules of a readable size."""

import ast
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "gradwatch"
MODULES = sorted(PACKAGE.rglob("*.py"))
MAX_LINES = 520

# The pipeline, bottom up: a module may import its own stage and the ones below, never above.
STAGES = [
    ("gradwatch.exceptions", "gradwatch.report"),  # the shared words
    ("gradwatch.measure",),  # pure tensor maths and the declared statistics
    ("gradwatch.probes",),  # hooks on the model
    ("gradwatch.step",),  # the optimizer boundary: gather, combine, message, readout
    ("gradwatch.diagnosis",),  # rules, thresholds, findings
    ("gradwatch.output",),  # sinks: TensorBoard, warnings, loggers, images
    (
        "gradwatch.watch",
        "gradwatch.closing",
        "gradwatch.options",
        "gradwatch.arguments",
        "gradwatch.optimizer_mode",
    ),
    ("gradwatch.integrations", "gradwatch.cli"),  # programs and adapters over the engine
    ("gradwatch", "gradwatch.moved"),  # the public surface
]


def _name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


NAMES = {_name(p) for p in MODULES}


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module, names, line) of every import of a gradwatch module anywhere in the file: at the
    top, inside functions, under ``if TYPE_CHECKING:``; resolved to absolute names."""
    tree = ast.parse(path.read_text())
    package = _name(path) if path.name == "__init__.py" else _name(path).rsplit(".", 1)[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("gradwatch")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == "gradwatch":
                target = node.module
            else:
                continue
            names = [a.name for a in node.names]
            modules = [n for n in names if f"{target}.{n}" in NAMES]  # from . import stats
            out += [(f"{target}.{n}", [], node.lineno) for n in modules]
            if len(modules) < len(names):
                out.append((target, [n for n in names if n not in modules], node.lineno))
    return out


def _stage(module: str) -> int:
    best, rank = -1, None
    for i, prefixes in enumerate(STAGES):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), i
    assert rank is not None, f"{module} belongs to no stage: add it to STAGES"
    return rank


def _graph() -> dict[str, set[str]]:
    return {_name(p): {t for t, _, _ in _imports(p) if t != _name(p)} for p in MODULES}


def test_every_module_belongs_to_a_stage():
    for name in NAMES:
        _stage(name)


def test_no_stage_imports_a_higher_one():
    upward = []
    for path in MODULES:
        here = _stage(_name(path))
        for target, _, line in _imports(path):
            if _stage(target) > here:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}")
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            assert state.get(nxt) != 1, " -> ".join([*path, nxt])
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_the_checks_see_imports_inside_functions_and_type_checking(tmp_path):
    source = tmp_path / "gradwatch" / "measure" / "probe.py"
    source.parent.mkdir(parents=True)
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from ..watch import GradWatch\n"
        "def f():\n    from ..output import sinks\n"
    )
    global PACKAGE, NAMES
    saved = PACKAGE, NAMES
    PACKAGE = tmp_path / "gradwatch"
    NAMES = {"gradwatch.output.sinks", "gradwatch.watch"}
    try:
        found = {t for t, _, _ in _imports(source)}
    finally:
        PACKAGE, NAMES = saved
    assert found == {"gradwatch.watch", "gradwatch.output.sinks"}
    assert _stage("gradwatch.watch") > _stage("gradwatch.measure.probe")


def test_no_module_imports_another_modules_private_names():
    for path in MODULES:
        for target, names, _ in _imports(path):
            private = [n for n in names if n.startswith("_")]
            assert not private, (path.name, target, private)


@pytest.mark.parametrize("adapter", ["lightning.py", "hf.py"])
def test_the_framework_adapters_use_only_the_engines_public_surface(adapter):
    tree = ast.parse((PACKAGE / "integrations" / adapter).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr[:1] == "_" and node.attr[:2] != "__":
            owner = node.value
            assert isinstance(owner, ast.Name) and owner.id == "self", ast.unparse(node)


def test_modules_stay_a_readable_size():
    long = {p.name for p in MODULES if len(p.read_text().splitlines()) > MAX_LINES}
    assert not long, long


def test_one_exceptions_module_and_a_typed_package():
    import gradwatch
    from gradwatch import exceptions
    from gradwatch.output import sinks

    assert gradwatch.GradWatchWarning is exceptions.GradWatchWarning is sinks.GradWatchWarning
    assert gradwatch.NonFiniteError is exceptions.NonFiniteError
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from gradwatch.report import NonFiniteError

    assert NonFiniteError is exceptions.NonFiniteError
    assert (Path(gradwatch.__file__).parent / "py.typed").is_file()


@pytest.mark.parametrize("old", ["gradwatch.sinks", "gradwatch.stats", "gradwatch.lightning"])
def test_a_moved_module_still_imports_under_its_old_name_with_a_warning(old):
    import importlib
    import sys

    from gradwatch.moved import MOVED

    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=MOVED[old].replace(".", r"\.")):
        module = importlib.import_module(old)
    assert module is importlib.import_module(MOVED[old])
    assert module.__spec__.name == MOVED[old]  # its own spec: reload works on it


def test_a_moved_module_reached_as_an_attribute_warns_at_the_callers_line(monkeypatch):
    import gradwatch

    # importing gradwatch.sinks (another test did) sets the attribute on the package
    monkeypatch.delattr(gradwatch, "sinks", raising=False)
    with pytest.warns(DeprecationWarning, match="gradwatch.sinks moved") as caught:
        sinks = gradwatch.sinks
    assert sinks.Sink is gradwatch.Sink
    assert caught[0].filename == __file__


# Called from outside the package's own code: Lightning's hooks, Python's protocols, arguments a
# caller's signature fixes.
CALLED_FROM_OUTSIDE = [
    "on_*",
    "teardown",
    "__getattr__",
    "create_module",
    "exec_module",
    "__signature__",
    "_repr_html_",
    "memo",
    "exception",
    "batch_idx",
    "control",  # the Hugging Face Trainer passes it to every callback event
]


def test_no_dead_code():
    vulture = pytest.importorskip("vulture")  # a dev extra: CI has it
    root = PACKAGE.parent
    finder = vulture.Vulture(verbose=False, ignore_names=CALLED_FROM_OUTSIDE)
    # what the tests, benchmarks, examples and docs use counts as used
    finder.scavenge(
        [str(root / d) for d in ("gradwatch", "tests", "benchmarks", "examples", "docs")]
    )
    dead = [
        f"{item.filename}:{item.first_lineno}: {item.message}"
        for item in finder.get_unused_code(min_confidence=60)
        if Path(item.filename).resolve().is_relative_to(PACKAGE)
    ]
    assert not dead, "\n".join(dead)


def test_the_internals_page_names_every_stage_and_module():
    page = (PACKAGE.parent / "docs" / "internals.md").read_text()
    for path in MODULES:
        if path.name not in ("__init__.py", "__main__.py"):
            stem = path.stem
            assert f"`{stem}`" in page or f"`{stem}.py`" in page, path
    for prefixes in STAGES[:-1]:
        for prefix in prefixes:
            short = prefix.split(".", 1)[1]
            assert f"`{short}/`" in page or f"`{short}.py`" in page, prefix


def test_the_conductor_calls_the_probes_and_never_writes_their_fields():
    tree = ast.parse((PACKAGE / "watch.py").read_text())
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else []
        if isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        for target in targets:
            for t in ast.walk(target):
                if isinstance(t, ast.Attribute) and "probes" in ast.unparse(t.value):
                    raise AssertionError(f"watch.py:{node.lineno} writes {ast.unparse(t)}")


def test_a_pickle_made_under_the_old_module_names_still_loads():
    import pickle
    import sys

    import gradwatch

    old = pickle.dumps(gradwatch.Thresholds(dead_units=0.7), protocol=0).replace(
        b"gradwatch.diagnosis.thresholds", b"gradwatch.thresholds"
    )
    assert b"gradwatch.thresholds\n" in old
    sys.modules.pop("gradwatch.thresholds", None)
    with pytest.warns(DeprecationWarning, match="gradwatch.thresholds moved"):
        assert pickle.loads(old) == gradwatch.Thresholds(dead_units=0.7)


def test_importing_gradwatch_leaves_dtensor_unimported():
    # torch.distributed.tensor costs 0.6 s to import; gradwatch asks for it only once it exists
    code = (
        "import sys, torch; before = 'torch.distributed.tensor' in sys.modules; import gradwatch; "
        "print(before, 'torch.distributed.tensor' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    before, after = out.stdout.split()
    assert after == before
