"""The house's shape: imports form no circle, plug-ins stand alone, registries are complete in a
fresh process, and a new method touches few files.

The import graph is read from the sources (every ``import`` statement, in functions and under
``TYPE_CHECKING`` too), with ``models/`` and ``guides/`` as the ``pyromtl.models`` and
``pyromtl.guides`` they are shipped as.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pyromtl import methods, priors
from tests.conftest import scaled

ROOT = Path(__file__).resolve().parents[1]
#: Source folder -> the package it is shipped as.
PACKAGES = {"pyromtl": "pyromtl", "models": "pyromtl.models", "guides": "pyromtl.guides"}
#: What a plug-in may not import: the application on top of the methods.
APPLICATION = {"pyromtl", "pyromtl.fit", "pyromtl.cli", "pyromtl.report", "pyromtl.methods"}


def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


MODULES = _modules()


def _owner(name: str) -> str | None:
    """The module of ours that ``name`` (a module, or a name inside one) belongs to."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> set[str]:
    """The modules of ours that ``module`` imports, anywhere in its source."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            found |= {_owner(a.name) for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from pyromtl import config` imports the module pyromtl.config
            found |= {_owner(f"{node.module}.{a.name}") for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            raise AssertionError(f"{module}: relative import (pyromtl uses absolute imports)")
    return {m for m in found if m is not None and m != module}


GRAPH = {module: _imports(module) for module in MODULES}


def _plugin(module: str) -> str | None:
    """The plug-in a module belongs to: ``vmtl`` for ``pyromtl.models.vmtl`` and ``pyromtl.guides.vmtl``."""
    for package in ("pyromtl.models.", "pyromtl.guides."):
        if module.startswith(package):
            return module[len(package) :]
    return None


def _cycle() -> list[str] | None:
    """One import circle of GRAPH, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(GRAPH):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_graph_reads_every_module_and_the_imports_that_matter() -> None:
    assert {"pyromtl.fit", "pyromtl.models.vmtl", "pyromtl.guides.vmtl", "pyromtl.priors.registry"} <= set(GRAPH)
    assert "pyromtl.guides.vmtl" in GRAPH["pyromtl.models.vmtl"]  # the same plug-in's guide
    assert {"pyromtl.runspec", "pyromtl.train"} <= GRAPH["pyromtl.fit"]


def test_no_import_circle() -> None:
    assert _cycle() is None, " -> ".join(_cycle() or [])


def test_no_plug_in_imports_another_plug_in_or_the_application() -> None:
    bad = [
        (module, imported)
        for module, imports in GRAPH.items()
        if _plugin(module)
        for imported in imports
        if (_plugin(imported) not in (None, _plugin(module))) or imported in APPLICATION
    ]
    assert not bad, bad


def test_the_core_imports_plug_ins_only_in_the_registry_table() -> None:
    bad = [
        (module, imported)
        for module, imports in GRAPH.items()
        if not _plugin(module) and module != "pyromtl.methods"
        for imported in imports
        if _plugin(imported)
    ]
    assert not bad, bad


def test_a_new_method_touches_its_two_files_and_the_registry_table() -> None:
    """Outside a plug-in's own ``models/<name>.py`` and ``guides/<name>.py``, only
    ``pyromtl/methods.py`` names it in code (tests, README and golden cases aside), in the
    import and the tuple of its table."""
    table = (ROOT / "pyromtl" / "methods.py").read_text()
    plugins = sorted({p for m in MODULES if (p := _plugin(m))})
    assert {"baselines", "bayesagg", "cross_stitch", "hib", "smtl", "vmtl", "weighting"} <= set(plugins)
    for plugin in plugins:
        importers = {
            MODULES[module].relative_to(ROOT).as_posix()
            for module, imports in GRAPH.items()
            if _plugin(module) != plugin and any(_plugin(i) == plugin for i in imports)
        }
        own = {f"{folder}/{plugin}.py" for folder in ("models", "guides") if (ROOT / folder / f"{plugin}.py").exists()}
        assert importers == {"pyromtl/methods.py"}, (plugin, importers)
        assert len(own | importers) <= 3, (plugin, own | importers)
        assert len(re.findall(rf"\b{plugin}\b", table)) == 2, plugin


def _fresh(code: str) -> str:
    """stdout of ``code`` in a new interpreter, which has imported nothing of pyromtl before."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=scaled(120), cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_every_prior_kind_is_listed_in_a_fresh_process() -> None:
    every = {kind.name for kind in priors.BUILTIN_KINDS}
    assert {"full_data", "isotropic", "previous_batch", "relaxed_bernoulli", "task_mixture"} <= every
    listed = json.loads(_fresh("import json, pyromtl.priors as p; print(json.dumps(p.available()))"))
    assert set(listed) == every
    parsed = _fresh("from pyromtl.priors import parse_spec; print(parse_spec({'kind': 'full_data'}).kind)")
    assert parsed.strip() == "full_data"
    cli = _fresh("from pyromtl.cli import main; main(['list', 'priors'])")
    assert {line.split()[0] for line in cli.splitlines()[1:] if line.strip()} == every


def test_every_method_is_listed_in_a_fresh_process() -> None:
    listed = json.loads(_fresh("import json, pyromtl.methods as m; print(json.dumps(m.available()))"))
    assert listed == methods.available() and len(listed) >= 26
    cli = _fresh("from pyromtl.cli import main; main(['list', 'methods'])")
    assert [line.split()[0] for line in cli.splitlines()[1:] if line.strip()] == listed


@pytest.mark.parametrize("section", ["datasets", "networks"])
def test_other_listings_in_a_fresh_process(section: str) -> None:
    cli = _fresh(f"from pyromtl.cli import main; main(['list', {section!r}])")
    lines = cli.splitlines()
    assert lines[0] == f"{section}:"
    if section == "datasets":
        from pyromtl import datasets

        assert [line.split()[0] for line in lines[1:]] == datasets.available()
    else:
        assert "pyromtl.networks.register" in lines[1]  # none built in: says how to add one


@pytest.mark.slow
def test_pytest_and_python_m_pytest_collect_the_same_tests() -> None:
    """``pythonpath`` in pyproject and one conftest import style: neither entry point misses a file."""
    pytest_bin = Path(sys.executable).parent / "pytest"

    def collected(command: list[str]) -> set[str]:
        done = subprocess.run(
            [*command, "--collect-only", "-q", "-p", "no:randomly", "-p", "no:cacheprovider"],
            capture_output=True,
            text=True,
            timeout=scaled(300),
            cwd=ROOT,
        )
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        return {line for line in done.stdout.splitlines() if "::" in line}

    plain, module = collected([str(pytest_bin)]), collected([sys.executable, "-m", "pytest"])
    assert plain == module and len(plain) > 800
