"""The data package's shape: an acyclic import graph, and a short ``repr`` of a dataset."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np

import pyromtl.data
from pyromtl.data import MultiTaskData

DATA_DIR = Path(pyromtl.data.__file__).parent


def _data_imports(path: Path) -> tuple[set[str], list[int]]:
    """Modules of ``pyromtl.data`` that a file imports, and the lines of imports inside functions."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    nested: list[int] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pyromtl.data."):
            names = {node.module}
        elif isinstance(node, ast.Import):
            names = {a.name for a in node.names if a.name.startswith("pyromtl.data.")}
        else:
            continue
        found |= {n.split(".")[2] for n in names}
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            nested += [
                n.lineno
                for n in ast.walk(fn)
                if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("pyromtl.data")
            ]
    return found, nested


def test_data_modules_import_each_other_without_cycles():
    graph, nested = {}, {}
    for path in DATA_DIR.glob("*.py"):
        if path.stem != "__init__":
            graph[path.stem], lines = _data_imports(path)
            if lines:
                nested[path.stem] = lines
    # embedded defers digit_arrays (scikit-learn) to a cache miss; the container and its checks defer nothing
    assert "core" not in nested and "validate" not in nested, f"function-level imports: {nested}"
    assert "core" in graph["embedded"] and "constants" in graph["validate"]
    assert "core" not in graph["validate"]
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, f"import cycle: {' -> '.join(path + (module,))}"
        if module in done:
            return
        for dep in graph.get(module, ()):
            visit(dep, path + (module,))
        done.add(module)

    for module in graph:
        visit(module, ())


def test_repr_is_short_and_names_tasks_types_and_split_sizes():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 50))
    y = {"kind": np.arange(200) % 3, "flag": np.arange(200) % 2, "size": rng.normal(size=200)}
    data = MultiTaskData.from_arrays(x, y, ["classification", "binary", "regression"], name="toy", seed=1)
    text = repr(data)
    assert text.startswith("MultiTaskData('toy', SIMO, input (50,)")
    assert "kind: classification (3 classes)" in text and "flag: binary" in text and "size: regression" in text
    for t in range(3):
        assert "/".join(str(data.split_sizes(s)[t]) for s in ("train", "val", "test")) in text
    assert "tensor" not in text and len(text) < 300 and "\n" not in text
    few = data.with_fraction(0.5)
    assert "fraction=0.5" in repr(few) and f"{few.split_sizes()[0]}/" in repr(few)


def test_repr_of_many_tasks_counts_the_rest():
    x = np.eye(40)
    data = MultiTaskData.from_arrays(
        x, {f"t{k}": np.arange(40) % 2 for k in range(40)}, "binary", splits={"train": np.arange(40)}
    )
    text = repr(data)
    assert "t11: binary" in text and "t12:" not in text and "28 more" in text and len(text) < 400
