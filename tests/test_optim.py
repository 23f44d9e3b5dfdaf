"""pyromtl's ClippedAdam takes Pyro's ClippedAdam's steps bit for bit, with the same state."""

from __future__ import annotations

import pytest
import torch
from pyro.optim.clipped_adam import ClippedAdam as PyroClippedAdam

from pyromtl.optim import ClippedAdam


def _params(seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen).requires_grad_() for shape in [(5, 3), (7,), (2, 2, 2), (1,)]]


def _run(cls, options: dict, steps: int = 40) -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
    params = _params(0)
    optim = cls(params, **options)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        for i, p in enumerate(params):
            grad = 30 * torch.randn(p.shape, generator=gen)  # large enough that clipping bites
            # the second tensor gets no gradient for 5 steps: it then lags the others' step count
            p.grad = None if (i == 1 and step < 5) else grad
        optim.step()
    return params, optim


@pytest.mark.parametrize(
    "options",
    [
        {"lr": 0.01},
        {"lr": 0.05, "lrd": 0.99, "clip_norm": 0.5, "weight_decay": 0.1, "betas": (0.8, 0.9), "eps": 1e-6},
        {"lr": 0.01, "centered_variance": True},  # Pyro's own loop
    ],
)
def test_same_steps_and_state_as_pyro(options: dict) -> None:
    ours, ours_optim = _run(ClippedAdam, options)
    ref, ref_optim = _run(PyroClippedAdam, options)
    for p, q in zip(ours, ref):
        assert torch.equal(p, q)
    ours_state, ref_state = ours_optim.state_dict(), ref_optim.state_dict()
    assert ours_state["param_groups"] == ref_state["param_groups"]  # the decayed lr included
    for key, state in ref_state["state"].items():
        assert ours_state["state"][key]["step"] == state["step"]
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(ours_state["state"][key][name], state[name])


def test_resumes_from_pyros_state() -> None:
    """A checkpoint written with Pyro's optimiser loads into ours and continues identically."""
    _, ref_optim = _run(PyroClippedAdam, {"lr": 0.01}, steps=10)
    params = _params(0)
    ours = ClippedAdam(params, lr=0.01)
    ours.load_state_dict(ref_optim.state_dict())
    assert ours.state[params[0]]["step"] == 10 and ours.state[params[1]]["step"] == 5
    for p in params:
        p.grad = torch.ones_like(p)
    ours.step()
    assert ours.state[params[1]]["step"] == 6


def test_a_closure_computes_its_loss_with_gradients() -> None:
    """``step(closure)`` evaluates the closure with gradients on, as torch's optimisers do."""
    x = torch.tensor([1.0, -2.0], requires_grad=True)
    optim = ClippedAdam([x], lr=0.1)

    def closure() -> torch.Tensor:
        optim.zero_grad()
        loss = (x**2).sum()
        loss.backward()
        return loss

    assert optim.step(closure).item() == 5.0
    assert torch.all(x.abs() < torch.tensor([1.0, 2.0]))


def test_step_hooks_and_the_profiler_still_see_the_lean_step() -> None:
    """The step skips torch's hook and profiler wrapper only when there is nothing for it to do:
    a registered step hook runs, a profiler records the step's range, and the parameters move
    the same either way; ``zero_grad`` drops or zeroes the gradients as torch's does."""
    params, optim = _run(ClippedAdam, {"lr": 0.01}, steps=1)
    calls: list[str] = []
    handles = [
        optim.register_step_pre_hook(lambda *_: calls.append("pre")),
        optim.register_step_post_hook(lambda *_: calls.append("post")),
    ]
    for p in params:
        p.grad = torch.ones_like(p)
    optim.step()
    assert calls == ["pre", "post"]
    for handle in handles:
        handle.remove()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for p in params:
            p.grad = torch.ones_like(p)
        optim.step()
    assert any(e.name == "Optimizer.step#ClippedAdam.step" for e in prof.events())
    plain, plain_optim = _run(ClippedAdam, {"lr": 0.01}, steps=1)
    for _ in range(2):
        for p in plain:
            p.grad = torch.ones_like(p)
        plain_optim.step()
    for a, b in zip(params, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    optim.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in params)
    optim.zero_grad()
    assert all(p.grad is None for p in params)


def test_hooks_run_once_on_pyros_loop() -> None:
    """``centered_variance`` runs Pyro's own step, which torch wraps in its hook wrapper once a
    Pyro ClippedAdam exists: a step hook still runs once per step, not twice."""
    PyroClippedAdam(_params(0), lr=0.01)  # torch wraps Pyro's class's step on the first instance
    params = _params(0)
    optim = ClippedAdam(params, lr=0.01, centered_variance=True)
    calls: list[str] = []
    optim.register_step_pre_hook(lambda *_: calls.append("pre"))
    for p in params:
        p.grad = torch.ones_like(p)
    optim.step()
    assert calls == ["pre"]
