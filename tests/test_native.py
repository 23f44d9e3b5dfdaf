"""The compiled regression kernel (``pyromtl.infer.native``) against the torch path it replaces,
and how BayesAgg-MTL's ``kernel`` option chooses between them."""

from __future__ import annotations

import warnings

import numpy as np
import pyro
import pytest
import torch

from pyromtl import config, methods
from pyromtl.base import TrainState
from pyromtl.data.core import MultiTaskData
from pyromtl.infer import native
from pyromtl.infer import bayesagg
from pyromtl.infer.bayesagg import (
    add_bias,
    aggregate,
    regression_moments,
    regression_posterior_from_stats,
    sufficient_stats,
)
from tests.conftest import TINY, mixed_simo

needs_kernel = pytest.mark.skipif(native.unavailable() is not None,
                                  reason=f"no compiled kernel: {native.unavailable()}")


def _problem(batch: int, dim: int, heads: int, seed: int, cov_scale: float = 1.0):
    """Features with a bias column, head means, one SPD covariance and labels given as a transposed view."""
    g = torch.Generator().manual_seed(seed)
    features = add_bias(torch.randn(batch, dim, generator=g))
    a = torch.randn(3 * dim + 5, dim + 1, generator=g)
    cov = torch.linalg.inv(a.T @ a + torch.eye(dim + 1)) * cov_scale
    cov = (cov + cov.T) / 2
    mean = torch.randn(heads, dim + 1, generator=g)
    y = torch.randn(heads, batch, generator=g).T  # strides (1, B), as HeadGroup.labels gives
    return features, mean, cov, y


def _torch_path(features, mean, cov, y, s, coords):
    heads = mean.shape[0]
    mu, var = regression_moments(features, mean, cov.expand(heads, *cov.shape), y, coords=coords)
    return aggregate(mu, var, s, return_weights=True)


@needs_kernel
@pytest.mark.parametrize("batch, dim, heads", [(1, 1, 1), (7, 9, 3), (120, 64, 11), (33, 17, 2)])
@pytest.mark.parametrize("s", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("skip_bias", [True, False])
def test_kernel_equals_regression_moments_then_aggregate(batch, dim, heads, s, skip_bias) -> None:
    features, mean, cov, y = _problem(batch, dim, heads, seed=batch + dim + heads)
    coords = dim if skip_bias else dim + 1
    want, weights = _torch_path(features, mean, cov, y, s, coords)
    got, sums = native.regression_aggregate(features, features @ cov, mean, y, cov.diagonal(), s, coords)
    assert got.shape == (batch, coords)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5 * want.abs().max().item())
    torch.testing.assert_close(sums / (batch * coords), weights.mean((0, 2)), rtol=1e-5, atol=1e-6)


@needs_kernel
def test_kernel_floors_vanishing_variances_as_aggregate_does() -> None:
    # a covariance of 1e-40 leaves variances of 4 r² + ... far below float32's smallest normal number
    features, mean, cov, y = _problem(16, 5, 4, seed=3, cov_scale=1e-40)
    want, _ = _torch_path(features, mean, cov, y, 0.9, 5)
    got, sums = native.regression_aggregate(features, features @ cov, mean, y, cov.diagonal(), 0.9, 5)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(sums.sum(), torch.tensor(16.0 * 5))  # the weights still sum to 1


@needs_kernel
def test_loading_the_kernel_leaves_subnormal_numbers_alone() -> None:
    """A library linked with -ffast-math would set flush-to-zero for the whole process."""
    native.unavailable()
    tiny = torch.tensor([1e-40], dtype=torch.float32)
    assert (tiny * 1.0).item() > 0
    assert np.float32(1e-40) * np.float32(1.0) > 0


@needs_kernel
def test_spd_inverse_names_bad_input() -> None:
    with pytest.raises(ValueError, match=r"expected \[P, P\] and \[K, P\], got \[2, 3\]"):
        native.spd_inverse(torch.zeros(2, 3), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="matrix: expected a float32"):
        native.spd_inverse(torch.eye(3, dtype=torch.float64), torch.zeros(1, 3))


@needs_kernel
@pytest.mark.parametrize("bad, match", [
    (dict(features=torch.zeros(4, 3, dtype=torch.float64)), "features: expected a float32"),
    (dict(mean=torch.zeros(2, 4)), r"mean: expected .* shape \[2, 3\]"),
    (dict(y=torch.zeros(4, 3)), r"y: expected .* shape \[4, 2\]"),
    (dict(coords=4), "coords is 4"),
])
def test_kernel_names_bad_input(bad, match) -> None:
    args = dict(features=torch.zeros(4, 3), r=torch.zeros(4, 3), mean=torch.zeros(2, 3), y=torch.zeros(4, 2),
                diag=torch.ones(3), s=0.9, coords=2)
    with pytest.raises(ValueError, match=match):
        native.regression_aggregate(**{**args, **bad})


@needs_kernel
@pytest.mark.parametrize("size, heads", [(1, 1), (2, 3), (7, 1), (65, 11), (130, 4)])
def test_spd_inverse_is_the_inverse_and_its_products(size: int, heads: int) -> None:
    g = torch.Generator().manual_seed(size)
    x = torch.randn(2 * size + 3, size, generator=g)
    matrix = x.T @ x + 0.5 * torch.eye(size)
    rhs = torch.randn(heads, size, generator=g)
    inverse, product = native.spd_inverse(matrix, rhs)
    exact = torch.linalg.inv(matrix.double())
    scale = exact.abs().max().item()
    torch.testing.assert_close(inverse.double(), exact, rtol=0, atol=2e-5 * scale)
    bound = 2e-5 * scale * rhs.abs().sum(1).max().item()
    torch.testing.assert_close(product.double(), rhs.double() @ exact, rtol=0, atol=bound)
    assert torch.equal(inverse, inverse.T)  # both triangles written, and symmetric


@needs_kernel
@pytest.mark.parametrize("matrix", [
    -torch.eye(3), torch.zeros(3, 3), torch.diag(torch.tensor([1.0, float("nan"), 1.0])),
    torch.tensor([[1.0, 2.0], [2.0, 1.0]]),  # eigenvalues 3 and -1
])
def test_spd_inverse_reports_a_matrix_it_cannot_factorise(matrix: torch.Tensor) -> None:
    assert native.spd_inverse(matrix, torch.ones(2, matrix.shape[0])) is None


@needs_kernel
def test_posterior_with_the_kernel_matches_torch_and_falls_back_on_failure(monkeypatch) -> None:
    features, mean, cov, y = _problem(40, 6, 3, seed=5)
    stats = sufficient_stats(features, y)
    prior = (torch.randn(3, 7), 2.0 * torch.eye(7))
    want = regression_posterior_from_stats(*stats, *prior, with_precision=True)
    got = regression_posterior_from_stats(*stats, *prior, with_precision=True, native=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert got[1].stride(0) == 0  # one covariance, broadcast to every head
    monkeypatch.setattr(bayesagg.native_kernels, "spd_inverse", lambda matrix, rhs: None)  # as for an indefinite one
    for a, b in zip(regression_posterior_from_stats(*stats, *prior, with_precision=True, native=True), want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.fixture
def no_compiler(monkeypatch, tmp_path):
    """A machine whose C compiler is missing: the kernel is rebuilt (in an empty cache) and fails."""
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("PYROMTL_CACHE", str(tmp_path / "cache"))
    native._library.cache_clear()
    yield
    native._library.cache_clear()  # the next caller loads the real kernel again


def test_a_missing_compiler_is_a_reason_not_an_error(no_compiler) -> None:
    reason = native.unavailable()
    assert reason is not None and "could not be built" in reason and "no-such-cc" in reason
    with pytest.raises(RuntimeError, match="compiled kernel is unavailable"):
        native.regression_aggregate(torch.zeros(4, 3), torch.zeros(4, 3), torch.zeros(2, 3), torch.zeros(4, 2),
                                    torch.ones(3), 0.9, 2)


# ----------------------------------------------------------------------------- the objective's choice
def _regression_data(tasks: int = 4, n: int = 80, dim: int = 6, seed: int = 0) -> MultiTaskData:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim))
    y = {f"t{t}": x @ rng.normal(size=dim) + 0.1 * rng.normal(size=n) for t in range(tasks)}
    return MultiTaskData.from_arrays(x, y, ["regression"] * tasks, name="regression")


def _objective(data: MultiTaskData, kernel: str, kind: str = "isotropic"):
    method = methods.get("bayesagg")
    cfg = config.resolve(method, {**TINY, "device": "cpu", "pretrain_steps": 0, "kernel": kernel},
                         priors={"w": {"kind": kind}})
    torch.manual_seed(0)
    with pyro.settings.context(module_local_params=True):
        model, guide = method.build(data, cfg, TrainState(total_steps=100), torch.device("cpu"))
        return method.objective(method, cfg, model, guide)


@needs_kernel
@pytest.mark.parametrize("kind", ["isotropic", "full_data", "previous_batch"])
def test_objective_step_is_the_same_with_either_kernel(kind: str) -> None:
    data = _regression_data()
    compiled, eager = _objective(data, "auto", kind), _objective(data, "torch", kind)
    assert compiled.use_native and not eager.use_native
    eager.load_state_dict(compiled.state_dict())
    for step in range(3):  # the full-data prior's statistics come from the compiled steps too
        batch = data.train_batch(32, torch.Generator().manual_seed(step), "cpu")
        for objective in (compiled, eager):
            objective.zero_grad(set_to_none=True)
            objective.backward(batch)
        for (name, a), b in zip(compiled.named_parameters(), eager.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)
        weights = compiled.diagnostics()
        assert weights.keys() == eager.diagnostics().keys() and len(weights) == 4
        for key, value in eager.diagnostics().items():
            assert weights[key] == pytest.approx(value, rel=1e-4)
    torch.testing.assert_close(compiled.stats.gram, eager.stats.gram, rtol=1e-5, atol=1e-5)


def test_objective_refuses_a_native_kernel_it_cannot_use() -> None:
    with pytest.raises(ValueError, match="config key 'kernel' is 'native'.*not regressions"):
        _objective(mixed_simo(), "native")
    with pytest.raises(ValueError, match="config key 'kernel' must be one of"):
        _objective(_regression_data(), "fast")
    assert not _objective(mixed_simo(), "auto").use_native  # no warning either: it does not apply


def test_objective_without_a_compiler_warns_and_uses_torch(no_compiler) -> None:
    data = _regression_data()
    with pytest.warns(UserWarning, match="compiled regression kernel is off"):
        objective = _objective(data, "auto")
    assert not objective.use_native
    objective.backward(data.train_batch(32, torch.Generator().manual_seed(0), "cpu"))
    assert len(objective.diagnostics()) == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not _objective(data, "torch").use_native
    with pytest.raises(ValueError, match="kernel' is 'native' but the compiled kernel cannot run"):
        _objective(data, "native")
