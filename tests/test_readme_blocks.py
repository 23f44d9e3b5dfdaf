"""The README's shell and Python code blocks, run top to bottom in one fresh directory, work.

A new user copies the README's commands in order into one directory, where a command that
reuses a run directory an earlier one wrote with another config, or with more steps than it
asks for, is refused. This test does what that user does:

* **What runs.** Every ```bash and ```python block of README.md, in order. A bash block is cut
  into its command lines (``\\`` continuations joined), and a line that chains commands with
  ``&&`` into those commands. What is not meant to be run here is skipped by a rule of
  :data:`SKIPS`, each with its reason: shell commands one at a time (the set-up blocks' install
  steps, GPU-only and real-data commands), Python blocks whole (illustrative fragments). Every
  skipped piece matches exactly one rule and every rule matches something, so the list cannot
  silently grow or go stale.
* **Where.** A fresh temporary directory ``work/``: shell lines through ``bash -e`` with this
  venv's ``bin`` first on ``PATH`` (``pyromtl`` is its CLI, ``python`` its interpreter), a copy
  of ``examples/`` where the README's relative paths look for it, and ``.venv`` linked to this
  venv (what the set-up block creates, so the rest of that block, ``.venv/bin/pyromtl fit
  vmtl ...``, runs too and leaves its run directory for later commands to collide with). The
  Python blocks run in one interpreter and one namespace, as pasted into one session; that
  interpreter (a subprocess, :func:`_drive`) runs the shell lines too, so everything keeps
  the README's order.
* **Shorter training, same meaning.** A step count that a command states is kept: ``--steps``,
  ``--epochs``, ``--set steps=``, a ``--config`` file that sets one, ``steps=`` in Python, a
  script's ``--steps``. A ``pyromtl fit`` command that states none gets ``--set steps=N``
  appended, and a ``pyromtl.fit(...)`` call in a Python block gets ``steps=N``. N comes from
  the run's default length D, which the library itself resolves on a dry run (the CLI's or
  ``pyromtl.fit``'s own resolution, stopped before training), through :func:`shortened`: the
  counts stated by what writes run directories (``pyromtl fit``, ``pyromtl.fit(...)``, a script
  given ``--out``) are fixed points, and D becomes at most :data:`SHORT` steps past the largest
  stated count below it (today every default is 100 steps, the stated counts 200 and 500, so
  N = 5). The shortening keeps the order:
  a default-length command that reuses the directory of one that stated its count asks for
  fewer, as many or more steps exactly as it does at full length, so a refusal like "holds 200
  steps, more than the 100 asked" still happens here. Two different default lengths that
  would shorten to the same N fail the test instead of hiding the difference.

The library has no knob for any of this: the commands run as written, plus the appended
``--set steps=N``, with one intra-op thread per process (``OMP_NUM_THREADS=1``, as the other
tests run). On a quiet 2-core machine the test takes about two minutes (the README unshortened
about three and a half), most of it in the runs whose length the README states
(``--set steps=500`` of the Table 2 ablation, the custom-method script's 200 steps).
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import scaled

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
#: This venv (not resolved: its ``bin/python`` is a link that must keep its path to find the venv).
VENV = Path(sys.executable).parent.parent
#: Steps that a default-length run may train past the largest stated count below its length.
SHORT = 5
#: Whole-run and per-command time limits on an idle 2-core machine, in seconds.
TOTAL_SECONDS, COMMAND_SECONDS = 900, 300


@dataclass(frozen=True)
class Skip:
    """A piece of the README that is not run here: ``what`` is ``"command"`` (one shell command)
    or ``"block"`` (a whole Python block); ``pattern`` a regular expression it matches."""

    what: str
    pattern: str
    reason: str


SKIPS = (
    Skip("command", r"^python3\.12 -m venv\b", "creates the virtual environment, which this test runs in"),
    Skip("command", r"\bpip install\b", "installs packages"),
    Skip("command", r"\bpython -m pytest\b", "runs the whole test suite, this test included"),
    Skip("command", r"--device cuda\b", "needs a CUDA GPU"),
    Skip("command", r"--root /data/", "reads a benchmark's files, which are not embedded"),
    Skip("block", r"\bx_task0\b", "illustrative: the reader's own arrays (x_task0, y_age, ...) are placeholders"),
    Skip("block", r"\bmy_resnet\b", "illustrative: the reader's own networks (my_resnet, MyNet) are placeholders"),
    Skip("block", r"(?m)^\s*\.\.\.\s*$", "abridged source of models/vmtl.py (`...` elides code), not a script"),
)


@dataclass
class Unit:
    """One thing to run: a shell command line (its ``&&`` parts) or a Python block."""

    kind: str
    line: int
    parts: list[str] = field(default_factory=list)
    code: str = ""

    @property
    def text(self) -> str:
        return " && ".join(self.parts) if self.kind == "bash" else self.code


def readme_blocks(text: str) -> list[tuple[str, int, str]]:
    """``(language, line, body)`` of every fenced block, indented ones (in list items) dedented."""
    fence = re.compile(r"^(?P<indent>[ ]*)```(?P<lang>[\w-]*)[ \t]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)
    blocks = []
    for m in fence.finditer(text):
        indent = len(m["indent"])
        body = "".join(line[indent:] if line[:indent].isspace() else line for line in m["body"].splitlines(True))
        blocks.append((m["lang"], text.count("\n", 0, m.start()) + 1, body))
    return blocks


def _rules(what: str, piece: str) -> list[Skip]:
    return [rule for rule in SKIPS if rule.what == what and re.search(rule.pattern, piece)]


def plan(text: str) -> tuple[list[Unit], list[tuple[int, str, Skip]]]:
    """The units to run, in order, and every skipped piece as ``(line, piece, rule)``."""
    units: list[Unit] = []
    skipped: list[tuple[int, str, Skip]] = []
    for lang, line, body in readme_blocks(text):
        if lang == "python":
            rules = _rules("block", body)
            if rules:
                skipped += [(line, body, rule) for rule in rules]
            else:
                units.append(Unit("python", line, code=body))
        elif lang == "bash":
            for command in re.sub(r"\\\n[ \t]*", " ", body).splitlines():
                parts = []
                for part in re.split(r"\s+&&\s+", command.strip()):
                    rules = _rules("command", part)
                    if rules:
                        skipped += [(line, part, rule) for rule in rules]
                    elif part and not part.startswith("#"):
                        parts.append(part)
                if parts:
                    units.append(Unit("bash", line, parts=parts))
    return units, skipped


def fit_argv(part: str) -> list[str] | None:
    """The CLI arguments of a ``pyromtl fit`` command (``fit`` first), else None."""
    argv = shlex.split(part, comments=True)
    if len(argv) >= 2 and Path(argv[0]).name == "pyromtl" and argv[1] == "fit":
        return argv[1:]
    return None


def shortened(total: int, stated: list[int], short: int) -> int:
    """The length a default-length run of ``total`` steps trains for here: ``total`` itself if a
    command states that count, else at most ``short`` steps past the largest stated count below
    it. No length moves across a stated count, so every comparison a later command makes
    between its length and a checkpoint's comes out as it does at full length."""
    if total in stated:
        return total
    return min(total, max([s for s in stated if s < total], default=0) + short)


def _stated_counts(part_or_code: str) -> list[int]:
    """Step counts that a script command or a Python block states (``--steps N``, ``steps=N``)."""
    if re.search(r"\bepochs\b", part_or_code):
        raise AssertionError(f"teach this test the length of {part_or_code!r}: it states epochs")
    return [int(n) for n in re.findall(r"(?:--steps[ =]|\bsteps\s*=\s*)(\d+)", part_or_code)]


def _resolve_fit_commands(argvs_file: str) -> None:
    """Print (JSON) each ``pyromtl fit`` command's length in steps and whether it states it,
    resolved by the CLI itself on a dry run: run in a subprocess, so that ``--import`` registers
    nothing in the test process."""
    import json
    import sys

    import pyromtl  # noqa: F401  (loads pyromtl.fit)
    from pyromtl import cli
    from pyromtl.runspec import RunSpec

    class Resolved(Exception):
        pass

    def dry(method, cfg, data=None, out=None, backbone=None):
        raise Resolved(RunSpec.build(method, cfg, data, None, backbone).total_steps)

    sys.modules["pyromtl.fit"].fit_resolved = dry
    results = []
    with open(argvs_file) as f:
        argvs = json.load(f)
    for argv in argvs:
        explicit = bool({"steps", "epochs"} & set(cli.fit_options(cli.build_parser().parse_args(argv))))
        try:
            code = cli.main(argv)
        except Resolved as done:
            results.append({"explicit": explicit, "steps": done.args[0]})
        else:
            raise SystemExit(f"pyromtl {' '.join(argv)} exited {code} on a dry run")
    print(json.dumps(results))


def _drive(plan_file: str) -> None:
    """Run the plan's units in order, in this one process (the reader's session): shell lines
    through bash, Python blocks in one namespace with ``pyromtl.fit`` shortened. Writes a
    report after each unit and stops at the first failure."""
    import contextlib
    import io
    import json
    import subprocess
    import sys
    import time
    import traceback

    import pyromtl
    from pyromtl.runspec import RunSpec

    with open(plan_file) as f:
        spec = json.load(f)
    lengths = {int(n): d for n, d in spec["lengths"].items()}  # shortened -> full length, so far
    fit_module = sys.modules["pyromtl.fit"]
    real_fit, real_resolved = pyromtl.fit, fit_module.fit_resolved

    class Resolved(Exception):
        pass

    def dry(method, cfg, data=None, out=None, backbone=None):
        raise Resolved(RunSpec.build(method, cfg, data, None, backbone).total_steps)

    def fit(method, data=None, **options):
        if "steps" in options or "epochs" in options:
            return real_fit(method, data, **options)
        fit_module.fit_resolved = dry
        try:
            real_fit(method, data, **options)
            raise AssertionError("the dry run trained")
        except Resolved as done:
            total = done.args[0]
        finally:
            fit_module.fit_resolved = real_resolved
        steps = shortened(total, spec["stated"], spec["short"])
        if lengths.setdefault(steps, total) != total:
            raise AssertionError(f"lengths {total} and {lengths[steps]} would both train {steps} steps here")
        log.append(f"pyromtl.fit({method!r}, ...): {total} steps by default, {steps} here")
        return real_fit(method, data, steps=steps, **options)

    pyromtl.fit = fit
    namespace = {"__name__": "__main__"}
    report = []
    for unit in spec["units"]:
        log: list[str] = []
        t0 = time.perf_counter()
        if unit["kind"] == "bash":
            try:
                done = subprocess.run(
                    ["bash", "-e", "-o", "pipefail", "-c", unit["text"]],
                    capture_output=True,
                    text=True,
                    timeout=spec["timeout"],
                )
                ok, output = done.returncode == 0, done.stdout + done.stderr + f"\n(exit code {done.returncode})"
            except subprocess.TimeoutExpired as err:
                ok, output = False, f"{err.stdout or ''}{err.stderr or ''}\n(timed out after {spec['timeout']:.0f} s)"
        else:
            buffer = io.StringIO()
            with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
                try:
                    exec(compile(unit["text"], f"README.md, block at line {unit['line']}", "exec"), namespace)
                    ok = True
                except Exception:
                    ok = False
                    traceback.print_exc()
            output = buffer.getvalue()
        report.append({**unit, "ok": ok, "seconds": round(time.perf_counter() - t0, 1), "log": log, "output": output})
        with open(spec["report"], "w") as f:
            json.dump(report, f)
        if not ok:
            sys.exit(1)


def _script(*functions, call: str) -> str:
    """A script of these module-level functions, which then runs ``call`` (``sys.argv`` at hand)."""
    return "import sys\n\n\n" + "\n\n".join(inspect.getsource(f) for f in functions) + f"\n\n{call}\n"


def test_every_block_is_run_or_skipped_for_one_stated_reason() -> None:
    units, skipped = plan(README.read_text(encoding="utf-8"))
    pieces = [(line, piece) for line, piece, _ in skipped]
    ambiguous = sorted({p for p in pieces if pieces.count(p) > 1})
    assert not ambiguous, f"skipped for more than one reason, make the rules exclusive: {ambiguous}"
    unused = [rule.reason for rule in SKIPS if not any(rule is r for _, _, r in skipped)]
    assert not unused, f"skip rules that match nothing in README.md any more: {unused}"
    kinds = [u.kind for u in units]
    assert kinds.count("bash") >= 10 and kinds.count("python") >= 3, kinds
    assert any(fit_argv(p) for u in units for p in u.parts), "no `pyromtl fit` command left to run"


def test_shortening_never_moves_a_length_across_a_stated_count() -> None:
    stated = [200, 500]
    assert [shortened(n, stated, SHORT) for n in (3, 100, 200, 300, 500, 1700)] == [3, 5, 200, 205, 500, 505]
    for total in range(1, 800):
        n = shortened(total, stated, SHORT)
        assert 1 <= n <= total
        for s in stated:
            assert (n < s, n == s) == (total < s, total == s), (total, n, s)


def test_a_run_of_an_unregistered_method_says_to_pass_import(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The README's promise for a run of one's own method: refused in one line that says how to
    reopen it (``--import MODULE``), whether the command reads the run or refits its config."""
    from pyromtl.cli import main

    run = tmp_path / "custom"
    run.mkdir()
    (run / "config.toml").write_text('method = "nobody-registered"\ndata = "digits-domains"\n')
    (run / "checkpoint.pt").write_bytes(b"")
    for argv in (
        ["evaluate", str(run)],
        ["fit", "nobody-registered", "--config", str(run / "config.toml"), "--out", str(tmp_path / "again")],
        ["show", "nobody-registered"],
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "unknown method 'nobody-registered'" in err and "--import MODULE" in err, err
    assert not (tmp_path / "again").exists()


@pytest.mark.slow
def test_readme_blocks_run_in_order_in_a_fresh_directory(tmp_path: Path) -> None:
    assert (VENV / "bin" / "pyromtl").exists(), f"no pyromtl CLI in {VENV}"
    units, skipped = plan(README.read_text(encoding="utf-8"))
    work, harness = tmp_path / "work", tmp_path / "harness"
    harness.mkdir()
    shutil.copytree(ROOT / "examples", work / "examples", ignore=shutil.ignore_patterns("__pycache__"))
    (work / ".venv").symlink_to(VENV, target_is_directory=True)
    env = {
        **os.environ,
        "PATH": f"{VENV / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
        "VIRTUAL_ENV": str(VENV),
        "PYTHONDONTWRITEBYTECODE": "1",
        "MPLBACKEND": "Agg",
        # one intra-op thread, as in conftest: the networks are small, and on a busy machine two
        # threads' spinning made a 100-step run five times slower (the results do not depend on it)
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    env.pop("PYTHONPATH", None)

    # every `pyromtl fit` command's length, resolved by the CLI on a dry run
    fits = [(u, i, argv) for u in units for i, p in enumerate(u.parts) if (argv := fit_argv(p)) is not None]
    (harness / "argvs.json").write_text(json.dumps([argv for _, _, argv in fits]))
    resolver = harness / "resolve.py"
    resolver.write_text(_script(_resolve_fit_commands, call="_resolve_fit_commands(sys.argv[1])"))

    def run(script: Path, plan: Path, seconds: float) -> subprocess.CompletedProcess:
        command = [sys.executable, str(script), str(plan)]
        return subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=scaled(seconds))

    done = run(resolver, harness / "argvs.json", 300)
    assert done.returncode == 0, f"resolving the fit commands failed:\n{done.stdout}\n{done.stderr}"
    resolved = json.loads(done.stdout.strip().splitlines()[-1])

    # counts stated by commands that write run directories are kept, and fix the shortening
    stated = {r["steps"] for r in resolved if r["explicit"]}
    for unit in units:
        for part in unit.parts if unit.kind == "bash" else [unit.code]:
            writes_runs = "--out" in part if unit.kind == "bash" else "pyromtl.fit(" in part
            if fit_argv(part) is None and writes_runs:
                stated.update(_stated_counts(part))
    stated_list = sorted(stated)
    lengths: dict[int, int] = {}
    changed = []
    for (unit, i, _), r in zip(fits, resolved):
        if r["explicit"]:
            continue
        steps = shortened(r["steps"], stated_list, SHORT)
        assert lengths.setdefault(steps, r["steps"]) == r["steps"], f"{r['steps']} and {lengths[steps]} steps merge"
        unit.parts[i] = shlex.join([*shlex.split(unit.parts[i], comments=True), "--set", f"steps={steps}"])
        changed.append(f"README.md:{unit.line}: {r['steps']} steps by default, {steps} here: {unit.parts[i]}")

    spec = {
        "units": [{"kind": u.kind, "line": u.line, "text": u.text} for u in units],
        "stated": stated_list,
        "short": SHORT,
        "lengths": lengths,
        "timeout": scaled(COMMAND_SECONDS),
        "report": str(harness / "report.json"),
    }
    (harness / "plan.json").write_text(json.dumps(spec))
    driver = harness / "drive.py"
    driver.write_text(_script(shortened, _drive, call="_drive(sys.argv[1])"))
    t0 = time.perf_counter()
    try:
        done = run(driver, harness / "plan.json", TOTAL_SECONDS)
        failure = "" if done.returncode == 0 else f"the driver exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    except subprocess.TimeoutExpired:
        failure = f"timed out after {scaled(TOTAL_SECONDS):.0f} s"
    wall = time.perf_counter() - t0
    report = json.loads((harness / "report.json").read_text()) if (harness / "report.json").exists() else []

    lines = [f"{r['seconds']:6.1f} s  {'ok ' if r['ok'] else 'FAILED'} README.md:{r['line']}: " for r in report]
    lines = [ln + r["text"].splitlines()[0] + (" ..." if "\n" in r["text"] else "") for ln, r in zip(lines, report)]
    lines += [entry for r in report for entry in r["log"]] + changed
    lines += [f"skipped README.md:{line}: {piece.splitlines()[0]!r}: {rule.reason}" for line, piece, rule in skipped]
    print(f"README blocks: {len(report)} of {len(units)} units run in {wall:.0f} s", *lines, sep="\n")
    bad = next((r for r in report if not r["ok"]), None)
    assert bad is None, f"README.md:{bad['line']} failed:\n{bad['text']}\n{bad['output'][-4000:]}"
    assert not failure, failure
    assert len(report) == len(units)
