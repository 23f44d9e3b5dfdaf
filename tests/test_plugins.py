"""Methods as plug-ins: declarations, the trainer's objective hook and module-local parameters."""

from __future__ import annotations

import dataclasses
import importlib
import os
import pkgutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pyro
import pytest
import torch
from pyro import poutine

import pyromtl
import pyromtl.models
from pyromtl import config, methods
from pyromtl.cli import main
from pyromtl.objective import Objective, TrainContext
from pyromtl.rundir import RunDir
from pyromtl.runspec import RunSpec
from pyromtl.train import train
from tests.conftest import TINY, blobs_mimo, built, interrupted_then_resumed, mixed_simo, scaled

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- declarations
def test_builtin_methods_are_declared_beside_their_code() -> None:
    """Every built-in method is in the METHODS of exactly one module of pyromtl.models, and the
    registry's table lists each such module."""
    declared: dict[str, str] = {}
    for info in pkgutil.iter_modules(pyromtl.models.__path__):
        module = importlib.import_module(f"pyromtl.models.{info.name}")
        for m in module.METHODS:
            assert m.name not in declared, (m.name, declared.get(m.name), info.name)
            declared[m.name] = info.name
    assert declared.keys() == methods.builtin().keys()
    for m in methods.builtin().values():
        assert set(m.overrides) <= set(m.options.defaults()) | set(config.TRAIN_DEFAULTS), m.name


def test_core_names_no_method_site() -> None:
    """The core reads sites, titles and plates from declarations, never by name."""
    core = [p for p in (ROOT / "pyromtl").rglob("*.py") if "infer" not in p.parts]
    for word in ("w_weights", "z_weights", "mc_z", "mc_w", "kl_weight_", "expected_weights"):
        hits = [p.name for p in core if word in p.read_text()]
        assert not hits, (word, hits)


def test_kl_weights_are_a_mapping_over_latent_sites() -> None:
    vbmtl = methods.get("vbmtl")
    cfg = config.resolve(vbmtl, {"kl_weights": {"z": 0.5}})
    assert cfg["kl_weights"] == {"z": 0.5, "w": 1e-7}  # a partial table tunes the defaults
    with pytest.raises(ValueError, match=r"'kl_weights' names unknown site\(s\) \['q'\]"):
        config.resolve(vbmtl, {"kl_weights": {"q": 1.0}})
    with pytest.raises(ValueError, match=r"'kl_weights.z' must be >= 0"):
        config.resolve(vbmtl, {"kl_weights": {"z": -1.0}})
    with pytest.raises(ValueError, match="unknown config key 'kl_weight_z'"):
        config.resolve(vbmtl, {"kl_weight_z": 0.1})
    text = config.to_toml(cfg)
    assert "kl_weights = { z = 0.5, w = 1e-07 }" in text


def test_monte_carlo_plates_are_vmtls_choice() -> None:
    assert "mc_z" not in methods.get("bmtl").defaults and methods.get("bmtl").max_plate_nesting == 2
    assert methods.get("vmtl").defaults["mc_z"] == 10 and methods.get("vmtl").max_plate_nesting == 4
    fit = pyromtl.fit("bmtl", blobs_mimo(), steps=1, **TINY)
    tr = _trace(fit, fit.data.train_batch(4, None, "cpu"))
    assert {n for n, s in tr.nodes.items() if s["type"] == "sample"} >= {"w", "z", "y"}
    assert tr.nodes["y"]["fn"].batch_shape == (3, 4)  # [T, B]: no Monte-Carlo dims


def _trace(fit, batch):
    """The model's trace, replayed against the guide's (point-estimate priors cannot be sampled)."""
    guide_tr = poutine.trace(fit.guide).get_trace(batch)
    return poutine.trace(poutine.replay(fit.model, trace=guide_tr)).get_trace(batch)


# ----------------------------------------------------------------------------- objective hook
class FrozenEncoder(Objective):
    """Replaces the backward pass: the encoder gets no gradient, and the hooks are counted."""

    def __init__(self, loss):
        super().__init__(loss)
        self.calls: list[tuple[str, int, int]] = []

    def backward(self, batch):
        loss = super().backward(batch)
        for p in self.model.encoder.parameters():
            p.grad = None
        return loss

    def after_step(self, ctx: TrainContext) -> None:
        self.calls.append(("step", ctx.step, ctx.epoch))

    def end_epoch(self, ctx: TrainContext) -> None:
        self.calls.append(("epoch", ctx.step, ctx.epoch))


def _with_objective(name: str, factory) -> methods.Method:
    return dataclasses.replace(
        methods.get(name), objective=lambda ctx: factory(ctx.method.elbo(ctx)(ctx.model, ctx.guide))
    )


def test_objective_can_replace_the_backward_pass_and_runs_its_hooks() -> None:
    data = blobs_mimo()
    m = _with_objective("bmtl", FrozenEncoder)
    cfg = config.resolve(m, {**TINY, "steps": 12, "batch_size": 16, "device": "cpu"}, data=data)
    per_epoch = -(-max(data.split_sizes("train")) // 16)
    pyro.set_rng_seed(cfg["seed"])  # the trainer's seed: the same initialisation
    with pyro.settings.context(module_local_params=True):
        before = {
            k: v.clone()
            for k, v in built(m, cfg, data, pyromtl.schedules.TrainState(total_steps=100))[0]
            .encoder.state_dict()
            .items()
        }
    result = train(RunSpec.build(m, cfg, data))
    obj = result.objective
    after = obj.model.encoder.state_dict()
    for k in before:  # no gradient ever reached the encoder
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0)
    assert [c[1] for c in obj.calls if c[0] == "step"] == list(range(1, 13))
    epochs = [c for c in obj.calls if c[0] == "epoch"]
    assert epochs == [("epoch", e * per_epoch, e) for e in range(1, 12 // per_epoch + 1)]


class _Scaled(torch.nn.Module):
    """A loss module: ``scale · Σ w`` of one parameter ``w``."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))

    def forward(self, scale: float) -> torch.Tensor:
        return scale * self.w.sum()


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf")])
def test_default_backward_leaves_a_non_finite_loss_unpropagated(scale: float) -> None:
    objective = Objective(_Scaled())
    loss = objective.backward(scale)
    assert not loss.requires_grad and not torch.isfinite(loss)
    assert objective.loss.w.grad is None  # the trainer stops before its optimiser sees anything
    finite = objective.backward(2.0)
    assert float(finite) == 6.0
    torch.testing.assert_close(objective.loss.w.grad, torch.full((3,), 2.0))


class OwnGate(Objective):
    """Owns a parameter and its optimiser, updated after every step; its state is checkpointed."""

    def __init__(self, loss):
        super().__init__(loss)
        self.gate = torch.nn.Parameter(torch.zeros(3))
        self.gate_optim = torch.optim.Adam([self.gate], lr=0.1)

    def own_parameters(self):
        return [self.gate]

    def after_step(self, ctx: TrainContext) -> None:
        self.gate_optim.zero_grad()
        noise = torch.randn(3)  # the trainer's RNG stream: a resume must restore it
        ((self.gate - noise) ** 2).sum().backward()
        self.gate_optim.step()

    def get_extra_state(self):
        return {"optim": self.gate_optim.state_dict()}

    def set_extra_state(self, state) -> None:
        self.gate_optim.load_state_dict(state["optim"])


def test_objective_state_and_optimiser_resume_exactly(tmp_path: Path) -> None:
    data = mixed_simo()
    m = _with_objective("vbmtl", OwnGate)
    cfg = config.resolve(m, {**TINY, "steps": 30, "checkpoint_every": 10, "device": "cpu"}, data=data)
    full = train(RunSpec.build(m, cfg, data))
    assert id(full.objective.gate) not in {id(p) for p in full.objective.trainable_parameters()}

    resumed = interrupted_then_resumed(m, data, cfg, tmp_path, at=25)
    torch.testing.assert_close(resumed.objective.gate, full.objective.gate, rtol=0, atol=0)
    state_full, state_resumed = full.objective.gate_optim.state_dict(), resumed.objective.gate_optim.state_dict()
    torch.testing.assert_close(state_resumed["state"][0]["exp_avg"], state_full["state"][0]["exp_avg"], rtol=0, atol=0)
    for k, v in full.objective.state_dict().items():
        if torch.is_tensor(v):
            torch.testing.assert_close(resumed.objective.state_dict()[k], v, rtol=0, atol=0, msg=k)


# ----------------------------------------------------------------------------- module-local parameters
def test_two_fits_never_share_a_parameter() -> None:
    data = blobs_mimo()
    a = pyromtl.fit("bmtl", data, steps=5, seed=0, **TINY)
    b = pyromtl.fit("bmtl", data, steps=5, seed=1, **TINY)
    scores = b.evaluate("val")
    # user code traces a's model under Pyro's default global parameter store
    batch = data.train_batch(4, None, "cpu")
    assert not pyro.settings.get("module_local_params")
    tr = _trace(a, batch)
    torch.testing.assert_close(tr.nodes["bias"]["value"], a.model.bias)
    assert "bias" not in pyro.get_param_store()
    b._predictions.clear()
    assert b.evaluate("val") == scores
    assert not torch.equal(a.model.bias, b.model.bias)


def test_a_global_param_store_entry_is_never_read() -> None:
    data = blobs_mimo()
    fit = pyromtl.fit("bmtl", data, steps=5, **TINY)
    pyro.get_param_store()["bias"] = torch.full_like(fit.model.bias, 99.0)
    try:
        batch = data.train_batch(4, None, "cpu")
        tr = _trace(fit, batch)
        assert not (tr.nodes["bias"]["value"] == 99.0).any()
        assert not (fit.model.bias == 99.0).any()
    finally:
        pyro.clear_param_store()


def _param_calls(base: type) -> tuple[dict, dict, list[float]]:
    """A module of class ``base`` (a parent holding a child of the same kind) whose call issues
    ``pyro.param`` statements, called twice under module-local parameters with an entry in the
    global store: what the store holds afterwards, the module's own state, what the calls saw."""

    class Child(base):
        def forward(self) -> torch.Tensor:
            return pyro.param("child", lambda: torch.tensor(2.0))

    class Parent(base):
        def __init__(self) -> None:
            super().__init__()
            self.child = Child()

        def forward(self) -> torch.Tensor:
            seen.append("outer" in pyro.get_param_store())
            value = pyro.param("own", lambda: torch.tensor(1.0)) + self.child()
            with torch.no_grad():
                pyro.param("own").add_(10.0)  # kept in the module's state for the next call
            return value

    seen: list = []
    pyro.clear_param_store()
    try:
        with pyro.settings.context(module_local_params=True), pyro.validation_enabled(False):
            module = Parent()
            pyro.get_param_store()["outer"] = torch.tensor(5.0)
            values = [module().item(), module().item()]
            store = {k: v.item() for k, v in pyro.get_param_store().items()}
            own = {k: v.item() for k, v in module._pyro_context.param_state["params"].items()}
    finally:
        pyro.clear_param_store()
    return store, own, [*seen, *values]


def test_a_pyro_param_inside_a_module_stays_in_the_module_as_under_pyros_own_scope() -> None:
    """LocalParamsModule's call scope swaps the store's dicts instead of Pyro's copy-clear-load:
    a ``pyro.param`` inside still goes to the module's state, persists between calls, never
    sees or changes the global store, the same as a plain PyroModule."""
    from pyro.nn import PyroModule

    from pyromtl.params import LocalParamsModule

    ours, pyros = _param_calls(LocalParamsModule), _param_calls(PyroModule)
    assert ours == pyros
    store, own, seen = ours
    assert store == {"outer": 5.0}
    assert own == {"own": 21.0, "child": 2.0}
    assert seen == [False, False, 3.0, 13.0]


# ----------------------------------------------------------------------------- the package and the CLI
def test_submodules_are_attributes_of_the_package() -> None:
    code = (
        "import pyromtl; d = pyromtl.datasets.load('synthetic-clusters'); "
        "print(d.num_tasks, pyromtl.methods.get('stl').name)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=scaled(120), cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["8", "stl"]


def test_import_option_names_a_missing_module_in_one_line(capsys) -> None:
    assert main(["list", "methods", "--import", "no_such_module_xyz"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pyromtl: error: --import: cannot import 'no_such_module_xyz'") and "\n" not in err
    assert main(["list", "methods", "--import", "nope/missing.py"]) == 2
    assert "no such file nope/missing.py" in capsys.readouterr().err


def _finished(proc: subprocess.Popen, seconds: float) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=scaled(seconds))
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


CUSTOM_METHOD = ROOT / "examples" / "custom_method.py"
#: What a fit saved to disk has imported: run in a new interpreter, writing into ``out``.
NO_JAX = (
    "import sys, pyromtl; pyromtl.fit('vmtl', 'synthetic-clusters', steps=2, quiet=True, device='cpu', "
    "latent_dim=4, hidden=[8], mc_z=1, mc_w=1, out={out!r}); print('jax._src' in sys.modules)"
)
#: The slow subprocess of each of two tests below: test name -> its command, given its folder.
SLOW_PROCESSES: dict[str, Callable[[Path], list[str]]] = {
    "test_custom_method_example_fits_from_python_and_the_cli": (
        lambda out: [sys.executable, str(CUSTOM_METHOD), "--steps", "5", "--out", str(out)]
    ),
    "test_a_fit_saved_to_disk_imports_no_jax": (lambda out: [sys.executable, "-c", NO_JAX.format(out=str(out))]),
}


@pytest.fixture(scope="module")
def started(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, tuple[subprocess.Popen, Path]]]:
    """``{test name: (process, its folder)}``: the slow subprocesses of the selected tests of
    :data:`SLOW_PROCESSES`, all started (one intra-op thread each) when the first of those tests
    runs, so that they run side by side; each test waits for its own."""
    selected = {item.name for item in request.session.items if item.module is request.module}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = {}
    for name, command in SLOW_PROCESSES.items():
        if name in selected:
            out = tmp_path_factory.mktemp("slow")
            pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
            procs[name] = (subprocess.Popen(command(out), cwd=ROOT, env=env, **pipes), out)
    yield procs
    for proc, _ in procs.values():  # one no test waited for, or that timed out
        if proc.returncode is None:
            proc.kill()
            proc.communicate()


def _waited(
    started: dict[str, tuple[subprocess.Popen, Path]], name: str, seconds: float
) -> tuple[subprocess.CompletedProcess, Path]:
    """The finished process of test ``name`` and its folder."""
    proc, out = started[name]
    return _finished(proc, seconds), out


@pytest.mark.slow
def test_custom_method_example_fits_from_python_and_the_cli(started) -> None:
    done, tmp_path = _waited(started, "test_custom_method_example_fits_from_python_and_the_cli", 600)
    assert done.returncode == 0, done.stderr
    assert "from Python: bayes-heads on digits-domains, test accuracy" in done.stdout
    compare = done.stdout[done.stdout.index("$ pyromtl compare") :]
    header = next(line for line in compare.splitlines() if line.startswith("| task"))
    assert [c.strip() for c in header.split("|")[1:-1]] == ["task", "metric", "bayes-heads", "stl"]
    assert "Δm% ↓" in compare and "η̂ ↑" in compare
    assert RunDir(tmp_path / "bayes-heads").read_metrics()["method"] == "bayes-heads"
    # evaluating the custom run needs the module that declares it, given on the command line (two
    # readers of the run, side by side)
    evaluate = [sys.executable, "-m", "pyromtl.cli", "evaluate", str(tmp_path / "bayes-heads")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for command in (evaluate, [*evaluate, "--import", str(CUSTOM_METHOD)])
    ]
    try:
        refused, ok = (_finished(proc, 300) for proc in procs)
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                proc.communicate()
    assert refused.returncode == 2 and "unknown method 'bayes-heads'" in refused.stderr
    assert ok.returncode == 0 and "bayes-heads on digits-domains" in ok.stdout


@pytest.mark.slow
def test_a_fit_saved_to_disk_imports_no_jax(started) -> None:
    """ArviZ leaves a lazy `jax` module that matplotlib would probe and import (about a second)."""
    done, tmp_path = _waited(started, "test_a_fit_saved_to_disk_imports_no_jax", 300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
    assert {p.name for p in (tmp_path / "plots").glob("*.png")} >= {"training.png", "relatedness_alpha.png"}


def test_pyro_warnings_about_a_model_fail_the_tests() -> None:
    """pyproject's filterwarnings turns what Pyro says about a model into an error (no wholesale ignore)."""

    def model() -> None:
        pyro.sample("a", pyro.distributions.Normal(0.0, 1.0))
        pyro.sample("unguided", pyro.distributions.Normal(0.0, 1.0))

    def guide() -> None:
        pyro.sample("a", pyro.distributions.Normal(0.0, 1.0))

    with pytest.raises(UserWarning, match="Found vars in model but not guide"), pyro.validation_enabled(True):
        pyro.infer.Trace_ELBO().loss(model, guide)
