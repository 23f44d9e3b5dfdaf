"""Every registered method trains on CUDA as it does on the CPU, and a CUDA run's checkpoint loads on the CPU.

Marked ``cuda`` and skipped without a CUDA device. ``PYROMTL_TEST_ACCEL=cpu`` runs the same tests
with the CPU standing in for the accelerator, so their logic can be checked anywhere::

    python -m pytest -m cuda tests/test_cuda.py                          # on a GPU machine
    PYROMTL_TEST_ACCEL=cpu python -m pytest -m cuda tests/test_cuda.py   # anywhere

Each case (:data:`CASES`: every registered method at its defaults on a tiny dataset it accepts,
plus variants whose code paths the defaults miss) is run from the same seed on the CPU and on the
accelerator, and compared:

* the parameters as built, the first loss and the gradients of the first step (one
  ``Objective.backward`` on the same batch, as ``pyromtl.train`` takes it);
* the training loss of each of :data:`STEPS` steps of ``pyromtl.fit``, the step it keeps, and
  the test split's predictive probabilities and log-likelihoods of the trained fit;
* a checkpoint written by ``pyromtl.fit(..., device=accel, out=...)``, read back with
  ``pyromtl.load(..., device="cpu")``: the same state, bit for bit, and the same predictions.

**Random numbers.** CUDA and the CPU have different generators, so the same seed gives different
draws (and different initial weights). Comparing only deterministic quantities would leave out
most methods (VMTL, the variational baselines, HIB, the lite SMTL gates, RLW draw every step);
replaying a CPU guide trace on CUDA would fix the ``pyro.sample`` values but turn them into
constants, which cuts the reparameterised gradients this test should compare, and would miss
draws made outside sample sites (initial weights, VMTL's component subsets, RLW's weights). So
the accelerator's run takes *every* random number from the CPU generator instead:
:class:`HostRNG`, a ``TorchDispatchMode``, runs each random ATen op (those tagged
``nondeterministic_seeded``, and ``random_``, ``binomial`` and ``_sample_dirichlet``) that would
produce an accelerator tensor on CPU copies of its inputs and copies the result over. Both runs
then consume one CPU stream in the same order and get the same draws, bit for bit
(:func:`test_host_rng_gives_the_cpu_draws_on_the_accelerator`), and autograd still sees the
original ops, so gradients flow through the draws as usual. On CUDA the mode also checks that
the CUDA generator was never drawn from, and an op given a CUDA generator of its own (none on
these paths; the data's batches use a CPU one) fails the test rather than drawing elsewhere.

**Tolerances** (CUDA against the CPU; with the CPU standing in, everything must agree bit for
bit: the same ops on the same machine):

* parameters as built: ``rtol = 1e-5, atol = 1e-6``, a few float32 ulps. The draws are the
  same; transforms of them (``log(expm1(.))``, scaling) go through another maths library;
* first loss: ``rtol = 1e-4``. float32 sums over a batch differ in the order of their terms
  (~1e-6 relative expected);
* first gradients, per parameter tensor: ``|cuda - cpu| <= 1e-4 |cpu| + 1e-4 max|cpu|``. The
  absolute part scales with the tensor's largest entry because an entry that is a sum of
  cancelling terms carries rounding of the size of those terms, not of itself;
* the losses of the later steps and the trained fit's predictions: ``rtol = 1e-3`` (losses) and
  ``rtol = 1e-3, atol = 1e-5`` (probabilities, log-likelihoods). Adam divides by the
  gradient's magnitude, so an entry whose gradient is rounding noise can move by ``lr`` in
  either direction; such entries barely touch the loss (their gradient is ~0), which is why
  the parameters after training are not compared entry by entry but through what they compute;
* a loaded checkpoint: its state is compared exactly (a checkpoint is a copy); its predictions,
  from the same parameters and draws on another device, at ``rtol = 1e-4, atol = 1e-6``.

The margin was gauged on the CPU: multiplying every parameter as built by ``1 + 1e-6 N(0, 1)``
(far more than the rounding of one op, ~6e-8) moved each comparison, in every case, by at most a
tenth of its tolerance (the first gradients of ``cross-stitch`` most: 0.1); at ``1e-5`` those
reached their tolerance.

TF32 is off for these runs (matmul precision ``highest``, cuDNN ``allow_tf32 = False``, cuDNN
deterministic): TF32 rounds inputs to 10 mantissa bits, ~1e-3 relative, which no float32
tolerance above would survive.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyro
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

import pyromtl
from pyromtl import config, methods
from pyromtl.data import MultiTaskData
from pyromtl.runspec import RunSpec
from pyromtl.train import build_training
from tests.conftest import TINY, blobs_mimo, mixed_simo

#: ``cpu`` runs these tests with the CPU standing in for the accelerator; ``cuda`` insists on CUDA.
ACCEL_ENV = "PYROMTL_TEST_ACCEL"


def _accelerator() -> torch.device | None:
    forced = os.environ.get(ACCEL_ENV, "").strip()
    if forced:
        if forced not in ("cpu", "cuda"):
            raise ValueError(f"{ACCEL_ENV} must be cpu or cuda, got {forced!r}")
        return torch.device(forced)
    return torch.device("cuda") if torch.cuda.is_available() else None


ACCEL = _accelerator()

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        ACCEL is None, reason=f"no CUDA device (set {ACCEL_ENV}=cpu to run these tests with the CPU standing in)"
    ),
]

SEED = 0
#: Optimiser steps of the compared runs.
STEPS = 4
#: Model passes of the compared predictions.
PASSES = 4


# ------------------------------------------------------------------------------------ random numbers
#: Random ATen ops that lack the ``nondeterministic_seeded`` tag (as of torch 2.14; the check on
#: leaving :class:`HostRNG` catches any other op that draws from CUDA's generator).
UNTAGGED_RANDOM = frozenset({"random_", "random", "binomial", "_sample_dirichlet"})


def is_random(func: torch._ops.OpOverload) -> bool:
    return torch.Tag.nondeterministic_seeded in func.tags or func.overloadpacket.__name__ in UNTAGGED_RANDOM


class HostRNG(TorchDispatchMode):
    """Draw the random numbers of tensors on ``device`` from the CPU generator, as a CPU run would.

    A random op whose inputs or output live on ``device`` runs on CPU copies of its tensor
    inputs (and ``device=cpu``); its output is copied to ``device``, and inputs it writes to
    (``normal_``, ``uniform_``, ``out=``) get the CPU result copied back. Every other op runs
    as it is. With ``device`` the CPU the copies are CPU-to-CPU, so the mode changes nothing
    but still runs every branch of its code.

    An op given an explicit generator draws from it and is left alone; ``unrouted`` names those
    given an accelerator's generator (a CPU run cannot have drawn the same). ``routed`` counts
    the routed ops.
    On CUDA, leaving the mode checks that the CUDA generator was not drawn from: enter it
    right after seeding, since a reseed also moves that state.
    """

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = torch.device(device)
        self.routed = 0
        self.unrouted: list[str] = []
        self._cuda_state: torch.Tensor | None = None

    def _here(self, x: Any) -> bool:
        return isinstance(x, torch.Tensor) and x.device.type == self.device.type

    def __enter__(self):
        if self.device.type == "cuda":
            self._cuda_state = torch.cuda.get_rng_state(self.device)
        return super().__enter__()

    def __exit__(self, *exc):
        out = super().__exit__(*exc)
        if self._cuda_state is not None and exc[0] is None:
            after = torch.cuda.get_rng_state(self.device)
            assert torch.equal(after, self._cuda_state), (
                "a random op drew from the CUDA generator under HostRNG: it is neither tagged "
                "nondeterministic_seeded nor in UNTAGGED_RANDOM; add its name there"
            )
        return out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not is_random(func):
            return func(*args, **kwargs)
        device = kwargs.get("device")
        target = next((x.device for x in tree_leaves((args, kwargs)) if self._here(x)), None)
        if target is None and device is not None and torch.device(device).type == self.device.type:
            target = torch.device(device)
        if target is None:
            return func(*args, **kwargs)
        generator = kwargs.get("generator")
        if generator is not None:  # draws from its own generator, not the default one
            if generator.device.type != "cpu":  # an accelerator's: a CPU run cannot have had the same draws
                self.unrouted.append(str(func))
            return func(*args, **kwargs)
        self.routed += 1
        originals: dict[int, torch.Tensor] = {}  # id of a CPU copy -> the tensor it copies

        def to_host(x: Any) -> Any:
            if not self._here(x):
                return x
            copy = x.to("cpu", copy=True)
            originals[id(copy)] = x
            return copy

        host_args = tree_map(to_host, args)
        host_kwargs = tree_map(to_host, kwargs)
        if device is not None:
            host_kwargs["device"] = torch.device("cpu")
        out = func(*host_args, **host_kwargs)
        # in-place and out= variants: what the op wrote goes back into the caller's tensor
        for i, arg in enumerate(func._schema.arguments):
            if arg.alias_info is not None and arg.alias_info.is_write:
                written = host_args[i] if i < len(host_args) else host_kwargs.get(arg.name)
                if isinstance(written, torch.Tensor) and id(written) in originals:
                    originals[id(written)].copy_(written)

        def back(x: Any) -> Any:  # a written input is the caller's own tensor again; a new one goes over
            if not isinstance(x, torch.Tensor):
                return x
            return originals[id(x)] if id(x) in originals else x.to(target)

        return tree_map(back, out)


@contextlib.contextmanager
def draws_from_the_cpu(device: torch.device) -> Iterator[HostRNG]:
    """Seed every generator with :data:`SEED` and route ``device``'s random ops to the CPU's."""
    torch.manual_seed(SEED)  # also the CUDA generators: the seeds the runs set then leave it as it is
    with HostRNG(device) as mode:
        yield mode
    assert not mode.unrouted, f"random ops with their own generator ran on {device}: {mode.unrouted}"


# ------------------------------------------------------------------------------------ cases
def image_mimo(num_tasks: int = 2, n: int = 40, seed: int = 0) -> MultiTaskData:
    """MIMO classification of 1x8x8 images, for the ``cnn`` backbone (cuDNN on CUDA)."""
    rng = np.random.default_rng(seed)
    xs = [rng.normal(size=(n, 1, 8, 8)) + 0.3 * t for t in range(num_tasks)]
    ys = [np.arange(n) % 3 for _ in range(num_tasks)]
    return MultiTaskData.from_arrays(xs, ys, "classification", name="images")


@dataclass(frozen=True)
class Case:
    method: str
    data: Callable[[], MultiTaskData]
    options: Mapping[str, Any] = field(default_factory=dict)


def _default_case(name: str) -> Case:
    m = methods.get(name)
    return Case(name, blobs_mimo if "mimo" in m.settings else mixed_simo)


#: Case id -> what runs: every registered method at its defaults (MIMO blobs where the method
#: takes MIMO data, else the mixed SIMO tasks), then variants reaching code the defaults do not.
CASES: dict[str, Case] = {
    **{name: _default_case(name) for name in methods.available()},
    # the precomputed attention left in host memory (pinned on CUDA), each batch's rows copied over
    "vmtl-host-attention": Case("vmtl", blobs_mimo, {"attention_max_mb": 0.0}),
    # the z prior's components: a random subset of the other tasks per sample (torch.rand + topk)
    "vmtl-sampled-components": Case("vmtl", blobs_mimo, {"z_components": 1}),
    # vectorised particles
    "vbmtl-particles": Case("vbmtl", blobs_mimo, {"num_particles": 3}),
    # BayesAgg's aggregated gradient after one pre-training step (the full-data prior: float64 sums)
    "bayesagg-aggregate": Case("bayesagg", mixed_simo, {"pretrain_steps": 1}),
    # SMTL's bi-level gates: their own optimiser on a part of val
    "lsmtl-bilevel": Case("lsmtl", mixed_simo, {"gates": "bilevel"}),
    # convolutions (cuDNN on CUDA)
    "bmtl-cnn": Case("bmtl", image_mimo, {"backbone": "cnn", "conv_channels": [4], "hidden": []}),
}

# Collection fails, naming them, if a registered method has no case or a case's data does not suit its method.
assert {c.method for c in CASES.values()} == set(methods.available()), "every registered method needs a case"
for _id, _case in CASES.items():
    methods.get(_case.method).check_data(_case.data())

#: Methods whose CUDA checkpoint is loaded back on the CPU: one per model module, those with
#: extra state in their objective (BayesAgg's prior, SMTL's gate optimiser, Nash-MTL's weights)
#: and the variational ones.
CHECKPOINT_CASES = ["bmtl", "vmtl", "vbmtl", "bayesagg-aggregate", "hib", "lsmtl-bilevel", "cross-stitch", "nash-mtl"]
assert set(CHECKPOINT_CASES) <= set(CASES)


def options(case: Case, device: torch.device) -> dict[str, Any]:
    return {**TINY, **case.options, "seed": SEED, "device": device.type, "steps": STEPS}


# ------------------------------------------------------------------------------------ comparisons
@pytest.fixture
def accel() -> Iterator[torch.device]:
    """The accelerator, with TF32 off (see the module's docstring)."""
    assert ACCEL is not None
    if ACCEL.type != "cuda":
        yield ACCEL
        return
    precision = torch.get_float32_matmul_precision()  # "highest" unless someone changed it
    if precision != "highest":
        torch.set_float32_matmul_precision("highest")
    try:
        with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True, allow_tf32=False):
            yield ACCEL
    finally:
        if precision != "highest":
            torch.set_float32_matmul_precision(precision)


def assert_close(got, want, *, rtol: float, atol: float, exact: bool, msg: str = "") -> None:
    """``torch.testing.assert_close`` on the CPU, or bit for bit where ``exact``."""
    got, want = torch.as_tensor(got).detach().cpu(), torch.as_tensor(want).detach().cpu()
    if exact:
        rtol = atol = 0.0
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, equal_nan=False, msg=lambda m: f"{msg}: {m}")


@dataclass
class FirstStep:
    initial: dict[str, torch.Tensor]
    loss: float
    grads: dict[str, torch.Tensor]


def first_step(case: Case, device: torch.device) -> FirstStep:
    """The parameters as built, and the loss and gradients of one trainer step on the first batch."""
    m, data = methods.get(case.method), case.data()
    cfg = config.resolve(m, options(case, device), data=data)
    with pyro.settings.context(module_local_params=True):
        pyro.set_rng_seed(SEED)
        spec = RunSpec.build(m, cfg, data)
        objective, optim = build_training(spec)
        initial = {k: v.detach().cpu().clone() for k, v in objective.state_dict().items() if torch.is_tensor(v)}
        batch = data.train_batch(cfg["batch_size"], torch.Generator().manual_seed(SEED), spec.device)
        optim.zero_grad(set_to_none=True)
        with pyro.validation_enabled(False):  # as in the trainer
            loss = float(objective.backward(batch))
        grads = {name: p.grad.detach().cpu().clone() for name, p in objective.named_parameters() if p.grad is not None}
    assert all(p.device.type == device.type for p in objective.parameters())
    return FirstStep(initial, loss, grads)


@pytest.mark.parametrize("case_id", sorted(CASES))
def test_first_step_loss_and_gradients_agree(case_id: str, accel: torch.device) -> None:
    case = CASES[case_id]
    exact = accel.type == "cpu"
    want = first_step(case, torch.device("cpu"))
    with draws_from_the_cpu(accel):
        got = first_step(case, accel)
    assert got.initial.keys() == want.initial.keys()
    for name, value in want.initial.items():
        assert_close(got.initial[name], value, rtol=1e-5, atol=1e-6, exact=exact, msg=f"{case_id}: initial {name}")
    assert np.isfinite(want.loss)
    assert_close(got.loss, want.loss, rtol=1e-4, atol=0.0, exact=exact, msg=f"{case_id}: first loss")
    assert want.grads, f"{case_id}: the first step set no gradient"
    assert got.grads.keys() == want.grads.keys()
    for name, g in want.grads.items():
        scale = float(g.abs().max())
        assert_close(got.grads[name], g, rtol=1e-4, atol=1e-4 * scale, exact=exact, msg=f"{case_id}: grad of {name}")


def short_fit(case: Case, device: torch.device, **extra: Any) -> tuple[pyromtl.Fit, Any]:
    """``pyromtl.fit`` of :data:`STEPS` steps and its test predictions from :data:`PASSES` model passes."""
    fit = pyromtl.fit(case.method, case.data(), **options(case, device), **extra)
    return fit, fit.predict("test", num_samples=PASSES)


def assert_same_prediction(got, want, *, rtol: float, atol: float, exact: bool, msg: str) -> None:
    assert len(got.pred) == len(want.pred)
    for t, (a, b) in enumerate(zip(got.pred, want.pred)):
        assert_close(a, b, rtol=rtol, atol=atol, exact=exact, msg=f"{msg}: predictions of task {t}")
    assert_close(got.loglik, want.loglik, rtol=rtol, atol=atol, exact=exact, msg=f"{msg}: log-likelihoods")
    np.testing.assert_array_equal(got.mask, want.mask)


@pytest.mark.parametrize("case_id", sorted(CASES))
def test_short_run_and_its_predictions_agree(case_id: str, accel: torch.device) -> None:
    case = CASES[case_id]
    exact = accel.type == "cpu"
    want, want_pred = short_fit(case, torch.device("cpu"))
    with draws_from_the_cpu(accel):
        got, got_pred = short_fit(case, accel)
    assert got.device.type == accel.type
    losses = [h["loss"] for h in got.history]
    assert len(losses) == STEPS and [h["step"] for h in got.history] == list(range(1, STEPS + 1))
    assert_close(losses, [h["loss"] for h in want.history], rtol=1e-3, atol=0.0, exact=exact, msg=f"{case_id}: losses")
    assert got.train_info["best_step"] == want.train_info["best_step"]
    assert_same_prediction(got_pred, want_pred, rtol=1e-3, atol=1e-5, exact=exact, msg=case_id)


@pytest.mark.parametrize("case_id", CHECKPOINT_CASES)
def test_a_checkpoint_written_on_the_accelerator_loads_on_the_cpu(case_id: str, accel: torch.device, tmp_path) -> None:
    case = CASES[case_id]
    data = case.data()
    with draws_from_the_cpu(accel):
        trained = pyromtl.fit(case.method, data, **options(case, accel), out=tmp_path)
        want = trained.predict("test", num_samples=PASSES)
    loaded = pyromtl.load(tmp_path, data=data, device="cpu")
    assert loaded.device.type == "cpu" and trained.device.type == accel.type
    assert loaded.train_info["steps"] == STEPS  # the saved run, reopened
    assert all(p.device.type == "cpu" for p in loaded.objective.parameters())
    saved, back = trained.objective.state_dict(), loaded.objective.state_dict()
    assert back.keys() == saved.keys()
    for name, value in saved.items():
        if torch.is_tensor(value):
            assert back[name].device.type == "cpu", name
            assert torch.equal(back[name], value.cpu()), f"{case_id}: {name} changed on the way through the checkpoint"
    torch.manual_seed(SEED)
    got = loaded.predict("test", num_samples=PASSES)
    assert_same_prediction(got, want, rtol=1e-4, atol=1e-6, exact=accel.type == "cpu", msg=case_id)


# ------------------------------------------------------------------------------------ the mode itself
#: Random ops as the library and torch.distributions call them: ``draw(device)`` returns tensors.
RANDOM_CALLS: dict[str, Callable[[torch.device], Any]] = {
    "rand": lambda d: torch.rand(3, 4, device=d),
    "randn": lambda d: torch.randn(5, device=d, dtype=torch.float64),
    "randint": lambda d: torch.randint(0, 7, (6,), device=d),
    "randperm": lambda d: torch.randperm(9, device=d),
    "rand_like": lambda d: torch.rand_like(torch.zeros(4, device=d)),
    "randn_like": lambda d: torch.randn_like(torch.zeros(2, 3, device=d)),
    "normal_": lambda d: torch.empty(4, device=d).normal_(1.0, 2.0),
    "uniform_": lambda d: torch.empty(3, device=d).uniform_(-1.0, 1.0),
    "exponential_": lambda d: torch.empty(3, device=d).exponential_(),
    "random_": lambda d: torch.empty(3, device=d).random_(0, 10),
    "bernoulli_": lambda d: torch.empty(6, device=d).bernoulli_(0.3),
    "bernoulli": lambda d: torch.bernoulli(torch.full((6,), 0.4, device=d)),
    "multinomial": lambda d: torch.multinomial(torch.tensor([0.2, 0.5, 0.3], device=d), 5, replacement=True),
    "poisson": lambda d: torch.poisson(torch.full((4,), 3.0, device=d)),
    "normal(tensor)": lambda d: torch.normal(torch.zeros(3, device=d), torch.ones(3, device=d)),
    "Normal.rsample": lambda d: torch.distributions.Normal(torch.zeros(3, device=d), 1.0).rsample((2,)),
    "Gamma.rsample": lambda d: torch.distributions.Gamma(torch.full((3,), 2.0, device=d), 1.0).rsample(),
    "Dirichlet.sample": lambda d: torch.distributions.Dirichlet(torch.ones(3, device=d)).sample(),
    "Binomial.sample": lambda d: torch.distributions.Binomial(5, torch.full((3,), 0.5, device=d)).sample(),
    "pyro Normal": lambda d: pyro.distributions.Normal(torch.zeros(2, device=d), 1.0).sample(),
}
#: Draws transformed on the device (logs, exps): the same draws, a float32 ulp or two apart on CUDA.
TRANSFORMED_CALLS: dict[str, Callable[[torch.device], Any]] = {
    "RelaxedOneHotCategorical": lambda d: torch.distributions.RelaxedOneHotCategorical(
        torch.tensor(0.5, device=d), logits=torch.zeros(4, device=d)
    ).rsample(),
    "Gumbel": lambda d: torch.distributions.Gumbel(torch.zeros(3, device=d), 1.0).rsample(),
}


def test_host_rng_gives_the_cpu_draws_on_the_accelerator(accel: torch.device) -> None:
    calls = {**RANDOM_CALLS, **TRANSFORMED_CALLS}
    torch.manual_seed(SEED)
    want = {name: draw(torch.device("cpu")) for name, draw in calls.items()}
    with draws_from_the_cpu(accel) as mode:
        got = {name: draw(accel) for name, draw in calls.items()}
    assert mode.routed >= len(calls)
    for name, value in want.items():
        assert got[name].device.type == accel.type, name
        if name in RANDOM_CALLS:
            assert torch.equal(got[name].cpu(), value), f"{name}: the accelerator got other draws than the CPU"
        else:
            assert_close(got[name], value, rtol=1e-5, atol=1e-6, exact=accel.type == "cpu", msg=name)
    # the draws stay differentiable: a reparameterised sample's gradient reaches its parameters
    loc = torch.zeros(3, device=accel, requires_grad=True)
    with draws_from_the_cpu(accel):
        torch.distributions.Normal(loc, 1.0).rsample().sum().backward()
    assert loc.grad is not None and torch.equal(loc.grad.cpu(), torch.ones(3))
