"""The shell and Python code blocks of the README and the docs pages, run top to bottom in one
fresh directory, work.

A new user copies the README's commands in order into one directory, then those of the docs
pages, where a command that reuses a run directory an earlier one wrote with another config, or
with more steps than it asks for, is refused. This test does what that user does:

* **What runs.** Every ```bash and ```python block of README.md, then of each docs page in the
  order of :data:`PAGES`, in one directory, so a page can use the runs an earlier page made (the
  ArviZ guide reopens the quick start's ``runs/vmtl``). Every Markdown page under ``docs/``
  outside ``docs/api/`` with such a block must be listed there. A bash block is cut
  into its command lines (``\\`` continuations joined), and a line that chains commands with
  ``&&`` into those commands. What is not meant to be run here is skipped by a rule of
  :data:`SKIPS`, each with its reason: shell commands one at a time (the set-up blocks' install
  steps, GPU-only and real-data commands), Python blocks whole (illustrative fragments). Every
  skipped piece matches exactly one rule and every rule matches something, so the list cannot
  silently grow or go stale. A block that repeats an earlier block verbatim (the docs' Getting
  started repeats the README's quick start) is skipped whole by :data:`REPEAT` and runs once.
  A block that is not meant to run at all (illustrative output, a SLURM script) is fenced with
  another language, e.g. ```text, and is never read.
* **Where.** A fresh temporary directory ``work/``, with a copy of ``examples/`` where the
  pages' relative paths look for it, and ``.venv`` linked to this venv (what the set-up block
  creates, so the rest of that block, ``.venv/bin/pyromtl fit vmtl ...``, runs too and leaves
  its run directory for later commands to collide with). The Python blocks run in one
  interpreter and one namespace, as pasted into one session; that interpreter (a subprocess,
  :func:`_drive`) runs the shell lines too, so everything keeps the pages' order.
* **How a shell line runs.** Every command is a process of its own, started from nothing that an
  earlier command or Python block left behind. A line of plain words and quotes (no expansion,
  redirection, pipe, glob or other shell syntax, :data:`SHELL_SYNTAX`) whose commands run this
  venv's ``pyromtl`` CLI, or a script with its ``python``, runs each command in a process forked
  from a server process (:func:`_fork_server`) that has imported ``pyromtl.cli``, the state the
  ``pyromtl`` console script has when it calls ``main``, and third-party libraries that fit
  commands import anyway (:data:`PRELOAD`), so no command pays the seconds of importing torch
  and Pyro afresh. Its arguments are the line split as bash splits it (:func:`shlex.split`), its
  exit code is ``sys.exit(main(argv))``'s, or the script's (run as ``__main__`` by :mod:`runpy`,
  its folder first on ``sys.path``), and an exception ends it with a traceback and exit code 1,
  as in a fresh interpreter; it ends as an interpreter does, less the teardown of every module
  (:func:`_job_process`). Every other line runs through ``bash -e -o pipefail`` with this venv's
  ``bin`` first on ``PATH`` (``pyromtl`` is its CLI, ``python`` its interpreter), and so does
  the README's first ``pyromtl`` command (the set-up block's), so the console script itself
  starts a new interpreter at least once here (the custom-method script also starts its own
  ``python -m pyromtl.cli`` commands).
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
tests run). On a quiet 2-core machine the test takes about one minute (the pages unshortened,
every command in a new interpreter, about three and a half), most of it in the runs whose
length the pages state (``--set steps=500`` of the Table 2 ablation, the custom-method
script's 200 steps).
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import scaled

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
#: The pages whose blocks run, in this order, in one directory: the README, then the docs pages
#: in the order a reader meets them (the site's front page, then Getting started; the ArviZ guide
#: reopens a quick-start run).
PAGES = (
    "README.md",
    "docs/index.md",
    "docs/guide/getting-started.md",
    "docs/guide/own-data.md",
    "docs/guide/run-directories.md",
    "docs/guide/priors.md",
    "docs/guide/own-method.md",
    "docs/guide/own-network.md",
    "docs/guide/arviz.md",
    "docs/guide/cuda.md",
    "docs/guide/many-devices.md",
    "docs/guide/leaderboard.md",
    "docs/datasets.md",
    "docs/methods/index.md",
    "docs/methods/vmtl.md",
    "docs/methods/bayesagg.md",
    "docs/methods/hib.md",
    "docs/methods/smtl.md",
    "docs/methods/weighting.md",
    "docs/methods/leaderboard.md",
    "docs/benchmarks.md",
    "docs/changelog.md",
)
#: This venv (not resolved: its ``bin/python`` is a link that must keep its path to find the venv).
VENV = Path(sys.executable).parent.parent
#: Steps that a default-length run may train past the largest stated count below its length.
SHORT = 5
#: Whole-run and per-command time limits on an idle 2-core machine, in seconds.
TOTAL_SECONDS, COMMAND_SECONDS = 900, 300
#: Shell syntax beyond plain words and quotes (expansions, redirections, pipes, lists, globs,
#: subshells, escapes): a command line holding any of it runs through bash.
SHELL_SYNTAX = re.compile(r"[$`|;&<>*?\[\]{}()~!\\]")
#: What the server process imports before it forks the commands' processes: what the ``pyromtl``
#: console script imports before it calls ``main``, then third-party libraries that a ``pyromtl
#: fit`` process imports anyway (optimiser, metrics, posterior.nc, plots), never a pyromtl module.
#: Not ArviZ: a fit plots before it imports ArviZ, whose lazy ``jax`` module matplotlib would
#: otherwise probe and import.
PRELOAD = ["pyromtl.cli", "torch._dynamo", "sklearn.metrics", "h5netcdf", "matplotlib.pyplot"]


@dataclass(frozen=True)
class Skip:
    """A piece of a page that is not run here: ``what`` is ``"command"`` (one shell command)
    or ``"block"`` (a whole Python block); ``pattern`` a regular expression it matches."""

    what: str
    pattern: str
    reason: str


SKIPS = (
    Skip("command", r"^python3\.12 -m venv\b", "creates the virtual environment, which this test runs in"),
    Skip("command", r"\bpip install\b", "installs packages"),
    Skip("command", r"\bpython -m pytest\b", "runs the whole test suite, this test included"),
    Skip("command", r"^bash \.ci/docs\b", "builds the docs, which CI does in a step of its own"),
    Skip("command", r"--device cuda\b", "needs a CUDA GPU"),
    Skip("command", r"--root /data/", "reads a benchmark's files, which are not embedded"),
    Skip("command", r"^pyromtl bench --jobs 2 --out bench$", "the default grid: 612 runs, 26 minutes on 2 cores"),
    Skip(
        "command",
        r"^pyromtl bench .*--seeds 5 .*--out bench/(vmtl|smtl|hib)$",
        "a method page's results: 5 seeds at full length, 5 to 17 minutes on 2 cores (test_bench.py runs the CLI)",
    ),
    Skip("block", r"\bx_task0\b", "illustrative: the reader's own arrays (x_task0, y_age, ...) are placeholders"),
    Skip("block", r"\bmy_resnet\b", "illustrative: the reader's own networks (my_resnet, MyNet) are placeholders"),
    Skip("block", r"(?m)^\s*\.\.\.\s*$", "abridged source of models/vmtl.py (`...` elides code), not a script"),
)
#: The rule for a block whose language and text repeat an earlier block's exactly: it ran (or was
#: skipped) once already. Checked before :data:`SKIPS`, so a repeat is skipped for this reason only.
REPEAT = Skip("block", "", "repeats, verbatim, a block of an earlier page or of this one")


@dataclass
class Unit:
    """One thing to run: a shell command line (its ``&&`` parts) or a Python block, and where it
    is (``page``, a path from the repository root, and ``line``)."""

    kind: str
    page: str
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


def read_pages() -> list[tuple[str, str]]:
    """``(page, text)`` of every page of :data:`PAGES`, in order."""
    return [(page, (ROOT / page).read_text(encoding="utf-8")) for page in PAGES]


def plan(pages: list[tuple[str, str]]) -> tuple[list[Unit], list[tuple[str, int, str, Skip]]]:
    """The units to run, in order, and every skipped piece as ``(page, line, piece, rule)``."""
    units: list[Unit] = []
    skipped: list[tuple[str, int, str, Skip]] = []
    seen: set[tuple[str, str]] = set()
    for page, text in pages:
        for lang, line, body in readme_blocks(text):
            if lang not in ("python", "bash"):
                continue
            if (lang, body) in seen:
                skipped.append((page, line, body, REPEAT))
                continue
            seen.add((lang, body))
            if lang == "python":
                rules = _rules("block", body)
                if rules:
                    skipped += [(page, line, body, rule) for rule in rules]
                else:
                    units.append(Unit("python", page, line, code=body))
                continue
            for command in re.sub(r"\\\n[ \t]*", " ", body).splitlines():
                parts = []
                for part in re.split(r"\s+&&\s+", command.strip()):
                    rules = _rules("command", part)
                    if rules:
                        skipped += [(page, line, part, rule) for rule in rules]
                    elif part and not part.startswith("#"):
                        parts.append(part)
                if parts:
                    units.append(Unit("bash", page, line, parts=parts))
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


def _shorten(units: list[dict], resolved: list[dict], short: int) -> tuple[list[int], dict[int, int], list[str]]:
    """Append ``--set steps=N`` to every ``pyromtl fit`` part of ``units`` that states no length
    (``resolved``: each fit part's ``{"explicit", "steps"}``, in order); return the stated counts,
    ``{N: default length}`` and a line per changed command."""
    # counts stated by commands that write run directories are kept, and fix the shortening
    stated = {r["steps"] for r in resolved if r["explicit"]}
    for unit in units:
        for part in [p["text"] for p in unit["parts"]] if unit["kind"] == "bash" else [unit["text"]]:
            writes_runs = "--out" in part if unit["kind"] == "bash" else "pyromtl.fit(" in part
            if fit_argv(part) is None and writes_runs:
                stated.update(_stated_counts(part))
    stated_list = sorted(stated)
    fits = [(u, p) for u in units if u["kind"] == "bash" for p in u["parts"] if fit_argv(p["text"]) is not None]
    assert len(fits) == len(resolved), (len(fits), len(resolved))
    lengths: dict[int, int] = {}
    changed = []
    for (unit, part), r in zip(fits, resolved):
        if r["explicit"]:
            continue
        steps = shortened(r["steps"], stated_list, short)
        assert lengths.setdefault(steps, r["steps"]) == r["steps"], f"{r['steps']} and {lengths[steps]} steps merge"
        part["text"] = shlex.join([*shlex.split(part["text"], comments=True), "--set", f"steps={steps}"])
        changed.append(f"{unit['page']}:{unit['line']}: {r['steps']} steps by default, {steps} here: {part['text']}")
    return stated_list, lengths, changed


def _resolve_fit_commands(argvs_file: str, results_file: str) -> int:
    """Write (JSON) each ``pyromtl fit`` command's length in steps and whether it states it,
    resolved by the CLI itself on a dry run: run in a process of its own, so that ``--import``
    registers nothing in the driver."""
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
    with open(results_file, "w") as f:
        json.dump(results, f)
    return 0


def _fork_server(preload: list[str]):
    """Import ``preload``, then fork a server process that forks a process for each job it is
    sent (one JSON line) and answers (one JSON line) with the job's exit code, or null when the
    job ran past its ``timeout`` and was killed. Returns ``(server pid, requests, replies)`` in
    the calling process and the job (a dict) in a job's process, which is to run it
    (:func:`_run_job`) and exit. The server runs nothing itself, so every job starts from the
    state just after these imports."""
    import importlib
    import json
    import os
    import signal
    import sys
    import time

    for name in preload:
        importlib.import_module(name)
    if os.path.isdir("/proc/self/task"):  # a fork copies only the calling thread
        assert os.listdir("/proc/self/task") == [str(os.getpid())], "forking a process that runs threads"
    sys.stdout.flush()
    sys.stderr.flush()
    requests_r, requests_w = os.pipe()
    replies_r, replies_w = os.pipe()
    driver = os.getpid()
    server = os.fork()
    if server:
        os.close(requests_r)
        os.close(replies_w)
        return server, os.fdopen(requests_w, "w"), os.fdopen(replies_r)
    os.close(requests_w)
    os.close(replies_r)
    with os.fdopen(requests_r) as requests, os.fdopen(replies_w, "w") as replies:
        for line in requests:
            job = json.loads(line)
            pid = os.fork()
            if pid == 0:
                os.setpgid(0, 0)  # its own process group, so a timeout also ends what it started
                return job
            try:
                os.setpgid(pid, pid)
            except OSError:  # the job set it first, or has already exited
                pass
            deadline = time.monotonic() + job["timeout"]
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    code = os.waitstatus_to_exitcode(status)
                    break
                if time.monotonic() > deadline or os.getppid() != driver:
                    try:
                        os.killpg(pid, signal.SIGKILL)
                    except OSError:
                        pass
                    os.waitpid(pid, 0)
                    code = None
                    break
                time.sleep(0.02)
            replies.write(json.dumps(code) + "\n")
            replies.flush()
    os._exit(0)


def _run_job(job: dict) -> int:
    """Run a job of :func:`_fork_server` in its process, stdout and stderr into ``job["output"]``:
    a ``pyromtl`` command line, a ``python`` script's, or the dry run of the fit commands."""
    import os
    import runpy
    import sys

    fd = os.open(job["output"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    argv = job["argv"]
    if job["kind"] == "resolve":
        return _resolve_fit_commands(*argv)
    if job["kind"] == "pyromtl":  # what the console script does: sys.exit(main())
        from pyromtl.cli import main

        sys.argv = [job["program"], *argv[1:]]
        return main(argv[1:])
    assert job["kind"] == "python", job
    sys.argv = argv[1:]
    script = os.path.abspath(argv[1])
    sys.path[0] = os.path.dirname(script)
    runpy.run_path(script, run_name="__main__")
    return 0


def _job_process(job: dict) -> None:
    """Run ``job`` (:func:`_run_job`) and end this process as the interpreter ends one, less the
    seconds of tearing down every module: an uncaught exception's traceback and exit code 1, a
    ``SystemExit``'s code, then the ``atexit`` functions, a garbage collection (finalizers of
    what is unreachable), flushed output."""
    import atexit
    import gc
    import os
    import sys
    import traceback

    try:
        code = _run_job(job)
    except SystemExit as exit_:
        code = exit_.code
    except BaseException:
        traceback.print_exc()
        code = 1
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()
    gc.collect()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


def _launch(server, job: dict) -> int | None:
    """Run ``job`` in a process of the fork server's: its exit code, None if it timed out."""
    import json

    _, requests, replies = server
    requests.write(json.dumps(job) + "\n")
    requests.flush()
    return json.loads(replies.readline())


def _drive(plan_file: str, server) -> None:
    """Run the plan's units in order, in this one process (the reader's session): shell lines
    through the fork server or bash, Python blocks in one namespace with ``pyromtl.fit``
    shortened. Writes a report after each unit and stops at the first failure."""
    import contextlib
    import io
    import json
    import os
    import shlex
    import subprocess
    import sys
    import time
    import traceback

    import pyromtl
    from pyromtl.runspec import RunSpec

    with open(plan_file) as f:
        spec = json.load(f)
    harness, timeout = os.path.dirname(plan_file), spec["timeout"]

    def output_of(path: str, code: int | None) -> str:
        with open(path) as f:
            text = f.read()
        return text + (f"\n(exit code {code})" if code is not None else f"\n(timed out after {timeout:.0f} s)")

    # every `pyromtl fit` command's length, resolved by the CLI on a dry run
    argvs = [fit_argv(p["text"]) for u in spec["units"] if u["kind"] == "bash" for p in u["parts"]]
    argvs_file, results_file = os.path.join(harness, "argvs.json"), os.path.join(harness, "resolved.json")
    with open(argvs_file, "w") as f:
        json.dump([argv for argv in argvs if argv is not None], f)
    out = os.path.join(harness, "resolve.txt")
    code = _launch(server, {"kind": "resolve", "argv": [argvs_file, results_file], "output": out, "timeout": timeout})
    if code != 0:
        sys.exit(f"resolving the fit commands failed:\n{output_of(out, code)}")
    with open(results_file) as f:
        resolved = json.load(f)
    stated, lengths, changed = _shorten(spec["units"], resolved, spec["short"])
    for unit in spec["units"]:
        if unit["kind"] == "bash":
            unit["text"] = " && ".join(p["text"] for p in unit["parts"])

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
        steps = shortened(total, stated, spec["short"])
        if lengths.setdefault(steps, total) != total:
            raise AssertionError(f"lengths {total} and {lengths[steps]} would both train {steps} steps here")
        log.append(f"pyromtl.fit({method!r}, ...): {total} steps by default, {steps} here")
        return real_fit(method, data, steps=steps, **options)

    pyromtl.fit = fit
    namespace = {"__name__": "__main__"}
    report: dict = {"changed": changed, "units": []}
    for n, unit in enumerate(spec["units"]):
        log: list[str] = []
        t0 = time.perf_counter()
        if unit["kind"] == "bash" and unit["via"] == "bash":
            try:
                done = subprocess.run(
                    ["bash", "-e", "-o", "pipefail", "-c", unit["text"]],
                    capture_output=True,
                    text=True,
                    timeout=timeout,
                )
                ok, output = done.returncode == 0, done.stdout + done.stderr + f"\n(exit code {done.returncode})"
            except subprocess.TimeoutExpired as err:
                ok, output = False, f"{err.stdout or ''}{err.stderr or ''}\n(timed out after {timeout:.0f} s)"
        elif unit["kind"] == "bash":  # one forked process per command, as bash -e runs `a && b`
            ok, output = True, ""
            for k, part in enumerate(unit["parts"]):
                out = os.path.join(harness, f"unit{n}-{k}.txt")
                argv = shlex.split(part["text"], comments=True)
                job = {"kind": part["run"], "argv": argv, "program": part["program"], "output": out, "timeout": timeout}
                code = _launch(server, job)
                output += output_of(out, code)
                if code != 0:
                    ok = False
                    break
        else:
            buffer = io.StringIO()
            with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
                try:
                    exec(compile(unit["text"], f"{unit['page']}, block at line {unit['line']}", "exec"), namespace)
                    ok = True
                except Exception:
                    ok = False
                    traceback.print_exc()
            output = buffer.getvalue()
        report["units"].append(
            {**unit, "ok": ok, "seconds": round(time.perf_counter() - t0, 1), "log": log, "output": output}
        )
        with open(spec["report"], "w") as f:
            json.dump(report, f)
        if not ok:
            sys.exit(1)


def _script(*functions, call: str) -> str:
    """A script of these module-level functions, which then runs ``call``: in the driver, with the
    fork server (``server``) started first; in a job's process, the job instead."""
    header = "import re\nimport shlex\nimport sys\nfrom pathlib import Path\n\n\n"
    main = (
        'if __name__ == "__main__":\n'
        f"    server = _fork_server({PRELOAD!r})\n"
        "    if isinstance(server, dict):  # a job's process\n"
        "        _job_process(server)\n"
        f"    {call}\n"
    )
    return header + "\n\n".join(inspect.getsource(f) for f in functions) + "\n\n" + main


def _kill_session(sid: int) -> None:
    """SIGKILL every process of session ``sid``: the driver, its fork server and bash, and the
    commands' processes (each in a process group of its own)."""
    os.killpg(sid, signal.SIGKILL)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            session = int(stat.read_text().rsplit(")", 1)[1].split()[3])  # after the name: state ppid pgrp session
            if session == sid:
                os.kill(int(stat.parent.name), signal.SIGKILL)
        except (OSError, ValueError, IndexError):  # gone meanwhile
            pass


def launcher(part: str, work: Path, path: str) -> tuple[str, str]:
    """How the shell command ``part`` runs in ``work`` with ``PATH`` ``path``, and the program it
    names: ``"pyromtl"`` (this venv's CLI) or ``"python"`` (a script of this venv's interpreter)
    in a process of the fork server, or ``"bash"`` for anything else."""
    argv = shlex.split(part, comments=True)
    if SHELL_SYNTAX.search(re.split(r"(?:^|\s)#", part, maxsplit=1)[0]) or not argv:
        return "bash", ""
    program = str(work / argv[0]) if "/" in argv[0] else shutil.which(argv[0], path=path)
    if program is None or not os.access(program, os.X_OK):
        return "bash", ""
    in_venv = os.path.realpath(Path(program).parent) == os.path.realpath(VENV / "bin")
    if in_venv and Path(program).name == "pyromtl":
        return "pyromtl", program
    if in_venv and Path(program).name == "python" and len(argv) >= 2 and argv[1].endswith(".py"):
        return "python", program
    return "bash", ""


def test_every_block_is_run_or_skipped_for_one_stated_reason() -> None:
    units, skipped = plan(read_pages())
    pieces = [(page, line, piece) for page, line, piece, _ in skipped]
    ambiguous = sorted({p for p in pieces if pieces.count(p) > 1})
    assert not ambiguous, f"skipped for more than one reason, make the rules exclusive: {ambiguous}"
    unused = [rule.reason for rule in SKIPS if not any(rule is r for *_, r in skipped)]
    assert not unused, f"skip rules that match nothing in the pages any more: {unused}"
    kinds = [u.kind for u in units]
    assert kinds.count("bash") >= 10 and kinds.count("python") >= 3, kinds
    assert any(fit_argv(p) for u in units for p in u.parts), "no `pyromtl fit` command left to run"


def test_every_docs_page_with_code_blocks_is_run() -> None:
    """A bash or Python block on a docs page outside :data:`PAGES` would never run: list it."""
    assert all((ROOT / page).is_file() for page in PAGES), [p for p in PAGES if not (ROOT / p).is_file()]
    for path in sorted((ROOT / "docs").rglob("*.md")):
        page = path.relative_to(ROOT).as_posix()
        if page in PAGES or page.startswith("docs/api/"):
            continue
        langs = {lang for lang, _, _ in readme_blocks(path.read_text(encoding="utf-8"))}
        assert not langs & {"bash", "python"}, f"{page} has bash or python blocks: add it to PAGES"


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
    units, skipped = plan(read_pages())
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

    # each shell line through bash or the fork server; the first `pyromtl` command through bash
    spec_units, through_bash = [], False
    for u in units:
        if u.kind == "python":
            spec_units.append({"kind": "python", "page": u.page, "line": u.line, "text": u.code})
            continue
        runs = [launcher(part, work, env["PATH"]) for part in u.parts]
        via = "bash" if any(run == "bash" for run, _ in runs) else "fork"
        if via == "fork" and not through_bash and any(run == "pyromtl" for run, _ in runs):
            via, through_bash = "bash", True
        parts = [{"text": part, "run": run, "program": program} for part, (run, program) in zip(u.parts, runs)]
        spec_units.append({"kind": "bash", "page": u.page, "line": u.line, "text": u.text, "via": via, "parts": parts})
    assert through_bash, "no `pyromtl` command of this venv's CLI runs through bash"

    spec = {
        "units": spec_units,
        "short": SHORT,
        "timeout": scaled(COMMAND_SECONDS),
        "report": str(harness / "report.json"),
    }
    (harness / "plan.json").write_text(json.dumps(spec))
    driver = harness / "drive.py"
    functions = (fit_argv, shortened, _stated_counts, _shorten, _resolve_fit_commands, _fork_server, _run_job)
    driver.write_text(_script(*functions, _job_process, _launch, _drive, call="_drive(sys.argv[1], server)"))
    t0 = time.perf_counter()
    # a session of its own, so that a timeout ends the driver and every process it started
    command = [sys.executable, str(driver), str(harness / "plan.json")]
    with subprocess.Popen(
        command, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    ) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=scaled(TOTAL_SECONDS))
            failure = "" if proc.returncode == 0 else f"the driver exited {proc.returncode}:\n{stdout}\n{stderr}"
        except subprocess.TimeoutExpired:
            _kill_session(proc.pid)
            proc.communicate()
            failure = f"timed out after {scaled(TOTAL_SECONDS):.0f} s"
    wall = time.perf_counter() - t0
    found = json.loads((harness / "report.json").read_text()) if (harness / "report.json").exists() else {}
    report, changed = found.get("units", []), found.get("changed", [])

    how = {"bash": "bash", "fork": "fork", None: "py  "}
    lines = [
        f"{r['seconds']:6.1f} s  {'ok ' if r['ok'] else 'FAILED'} {how[r.get('via')]} {r['page']}:{r['line']}: "
        for r in report
    ]
    lines = [ln + r["text"].splitlines()[0] + (" ..." if "\n" in r["text"] else "") for ln, r in zip(lines, report)]
    lines += [entry for r in report for entry in r["log"]] + changed
    lines += [f"skipped {page}:{line}: {piece.splitlines()[0]!r}: {rule.reason}" for page, line, piece, rule in skipped]
    print(f"README and docs blocks: {len(report)} of {len(units)} units run in {wall:.0f} s", *lines, sep="\n")
    bad = next((r for r in report if not r["ok"]), None)
    assert bad is None, f"{bad['page']}:{bad['line']} failed:\n{bad['text']}\n{bad['output'][-4000:]}"
    assert not failure, failure
    assert len(report) == len(units)
