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
from collections.abc import Callable, Iterator
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
    ``pyromtl/methods.py`` names it in code (tests, docs and golden cases aside), in the
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


#: Code that the fresh-process tests below run, each in a new interpreter.
FRESH = {
    "priors": "import json, pyromtl.priors as p; print(json.dumps(p.available()))",
    "parse_spec": "from pyromtl.priors import parse_spec; print(parse_spec({'kind': 'full_data'}).kind)",
    "list priors": "from pyromtl.cli import main; main(['list', 'priors'])",
    "methods": "import json, pyromtl.methods as m; print(json.dumps(m.available()))",
    "list methods": "from pyromtl.cli import main; main(['list', 'methods'])",
    "list datasets": "from pyromtl.cli import main; main(['list', 'datasets'])",
    "list networks": "from pyromtl.cli import main; main(['list', 'networks'])",
}


def _started(command: list[str]) -> subprocess.Popen:
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


def _output(proc: subprocess.Popen, seconds: float) -> tuple[int, str, str]:
    """``(exit code, stdout, stderr)`` of a started process; killed if it runs past ``seconds``."""
    try:
        out, err = proc.communicate(timeout=scaled(seconds))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def fresh() -> Iterator[Callable[[str], str]]:
    """``fresh(name)``: stdout of ``FRESH[name]`` in a new interpreter, which has imported nothing
    of pyromtl before. Every one starts, each in its own process, when the first test asks for
    one, so the interpreters start side by side instead of one after another."""
    procs = {name: _started([sys.executable, "-c", code]) for name, code in FRESH.items()}
    outputs: dict[str, tuple[int, str, str]] = {}

    def stdout(name: str) -> str:
        if name not in outputs:
            outputs[name] = _output(procs.pop(name), 120)
        code, out, err = outputs[name]
        assert code == 0, err
        return out

    yield stdout
    for proc in procs.values():  # the ones no test waited for
        proc.kill()
        proc.communicate()


def test_every_prior_kind_is_listed_in_a_fresh_process(fresh: Callable[[str], str]) -> None:
    every = {kind.name for kind in priors.BUILTIN_KINDS}
    assert {"full_data", "isotropic", "previous_batch", "relaxed_bernoulli", "task_mixture"} <= every
    listed = json.loads(fresh("priors"))
    assert set(listed) == every
    parsed = fresh("parse_spec")
    assert parsed.strip() == "full_data"
    cli = fresh("list priors")
    assert {line.split()[0] for line in cli.splitlines()[1:] if line.strip()} == every


def test_every_method_is_listed_in_a_fresh_process(fresh: Callable[[str], str]) -> None:
    listed = json.loads(fresh("methods"))
    assert listed == methods.available() and len(listed) >= 26
    cli = fresh("list methods")
    assert [line.split()[0] for line in cli.splitlines()[1:] if line.strip()] == listed


@pytest.mark.parametrize("section", ["datasets", "networks"])
def test_other_listings_in_a_fresh_process(section: str, fresh: Callable[[str], str]) -> None:
    cli = fresh(f"list {section}")
    lines = cli.splitlines()
    assert lines[0] == f"{section}:"
    if section == "datasets":
        from pyromtl import datasets

        assert [line.split()[0] for line in lines[1:]] == datasets.available()
    else:
        assert "pyromtl.networks.register" in lines[1]  # none built in: says how to add one


@pytest.mark.slow
def test_pytest_and_python_m_pytest_collect_the_same_tests() -> None:
    """``pythonpath`` in pyproject and one conftest import style: neither entry point misses a file.
    The two collections run side by side."""
    pytest_bin = Path(sys.executable).parent / "pytest"
    options = ["--collect-only", "-q", "-p", "no:randomly", "-p", "no:cacheprovider"]
    procs = [_started([*command, *options]) for command in ([str(pytest_bin)], [sys.executable, "-m", "pytest"])]
    try:
        done = [_output(proc, 300) for proc in procs]
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                proc.communicate()
    for code, out, err in done:
        assert code == 0, out[-2000:] + err[-2000:]
    plain, module = ({line for line in out.splitlines() if "::" in line} for _, out, _ in done)
    assert plain == module and len(plain) > 800
