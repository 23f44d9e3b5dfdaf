"""The trainer's optimiser: Pyro's ClippedAdam, updated with ``torch._foreach_*`` kernels.

:class:`pyro.optim.clipped_adam.ClippedAdam` updates its parameters one at a time: about seven
tensor operations per parameter and step, each a Python call and a kernel launch. A method with
tens of parameter tensors (per-task heads, encoders, noise channels) spends more time on that
loop than on the arithmetic. :class:`ClippedAdam` here takes the same steps with one
multi-tensor kernel per operation: the same elementwise arithmetic in the same order, so the
parameters it produces equal Pyro's bit for bit (``tests/test_optim.py``), and its
``state_dict`` is Pyro's (checkpoints load in either).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from pyro.optim.clipped_adam import ClippedAdam as PyroClippedAdam
from torch.optim.optimizer import Optimizer, _global_optimizer_post_hooks, _global_optimizer_pre_hooks

__all__ = ["ClippedAdam"]


class ClippedAdam(PyroClippedAdam):
    """Adam with every gradient element clamped to ``±clip_norm`` and the step size multiplied
    by ``lrd`` at every step (Pyro's :class:`~pyro.optim.clipped_adam.ClippedAdam`, same
    arguments and state), batched over its parameters.

    ``centered_variance = True`` falls back to Pyro's loop.
    """

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimisation step of every parameter that has a gradient.

        Under a profiler, or with optimiser step hooks registered, the step runs inside torch's
        hook and profiler wrapper (a profiler range, the hooks); otherwise it skips that wrapper,
        which costs about as much as the update itself for a small model.

        Args:
            closure: re-evaluates the model and returns the loss (optional).

        Returns:
            The closure's loss, or None.
        """
        if (
            torch.autograd._profiler_enabled()
            or self._optimizer_step_pre_hooks
            or self._optimizer_step_post_hooks
            or _global_optimizer_pre_hooks
            or _global_optimizer_post_hooks
        ):
            return self._hooked_step(closure)
        return self._step(closure)

    # torch wraps an optimiser class's ``step`` in its hook wrapper unless it says it is hooked.
    step.hooked = True  # type: ignore[attr-defined]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop every parameter's gradient (``set_to_none``, the default), or zero it in place.

        Args:
            set_to_none: set ``.grad`` to None rather than to zeros.
        """
        if not set_to_none or torch.autograd._profiler_enabled():
            return super().zero_grad(set_to_none)
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    def _step(self, closure: Callable[[], Any] | None = None) -> Any:
        if any(group["centered_variance"] for group in self.param_groups):
            pyros: Callable[..., Any] = PyroClippedAdam.step
            if getattr(pyros, "hooked", False):  # torch wrapped Pyro's step too; ours ran the hooks
                pyros = pyros.__wrapped__  # type: ignore[attr-defined]
            return pyros(self, closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():  # the step runs without gradients; the closure needs them
                loss = closure()
        with torch.no_grad():
            for group in self.param_groups:
                group["lr"] *= group["lrd"]
                # Parameters advance together, but one added later starts at step 0: group by step
                # count (the bias correction) and by device and dtype (what a foreach kernel takes).
                batches: dict[tuple[int, torch.device, torch.dtype], list[tuple[torch.Tensor, torch.Tensor]]]
                batches = defaultdict(list)
                for p in group["params"]:
                    grad = p.grad
                    if grad is None:
                        continue
                    state = self.state[p]
                    if len(state) == 0:
                        state["step"] = 0
                        state["exp_avg"] = torch.zeros_like(grad)
                        state["exp_avg_sq"] = torch.zeros_like(grad)
                    state["step"] += 1
                    batches[(state["step"], p.device, p.dtype)].append((p, grad))
                for (step, _, _), pairs in batches.items():
                    self._update(group, [p for p, _ in pairs], [g for _, g in pairs], step)
        return loss

    _hooked_step = Optimizer.profile_hook_step(_step)

    def _update(self, group: dict[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor], step: int) -> None:
        """Pyro's update of ``params`` (all at ``step``), one multi-tensor kernel per operation."""
        beta1, beta2 = group["betas"]
        exp_avg = [self.state[p]["exp_avg"] for p in params]
        exp_avg_sq = [self.state[p]["exp_avg_sq"] for p in params]
        torch._foreach_clamp_min_(grads, -group["clip_norm"])
        torch._foreach_clamp_max_(grads, group["clip_norm"])
        if group["weight_decay"] != 0:
            grads = list(torch._foreach_add(grads, params, alpha=group["weight_decay"]))
        torch._foreach_mul_(exp_avg, beta1)
        torch._foreach_add_(exp_avg, grads, alpha=1 - beta1)
        torch._foreach_mul_(exp_avg_sq, beta2)
        torch._foreach_addcmul_(exp_avg_sq, grads, grads, value=1 - beta2)
        denom = torch._foreach_sqrt(exp_avg_sq)
        torch._foreach_add_(denom, group["eps"])
        step_size = group["lr"] * math.sqrt(1 - beta2**step) / (1 - beta1**step)
        torch._foreach_addcdiv_(params, exp_avg, denom, value=-step_size)
