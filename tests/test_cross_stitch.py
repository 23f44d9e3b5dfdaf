"""``cross-stitch``: identity units are STL, one-row units are hard sharing, the units learn, and
the method runs through the same API as every other."""

from __future__ import annotations

import pytest
import torch

import pyromtl
from pyromtl import config, methods
from pyromtl.models.cross_stitch import SELF_WEIGHT, stitch_init
from pyromtl.params import local_params
from pyromtl.schedules import TrainState
from tests.conftest import TINY, blobs_mimo, built, mixed_simo


@local_params
def _model(data, **options):
    m = methods.get("cross-stitch")
    cfg = config.resolve(m, {**TINY, "device": "cpu", **options}, data=data)
    torch.manual_seed(0)
    model, _ = built(m, cfg, data, TrainState(total_steps=100))
    return model


def test_initial_units_mostly_keep_each_task() -> None:
    a = stitch_init(4)
    torch.testing.assert_close(a.diagonal(), torch.full((4,), SELF_WEIGHT))
    torch.testing.assert_close(a.sum(1), torch.ones(4))
    assert torch.equal(stitch_init(1), torch.ones(1, 1))


def test_identity_units_make_the_tasks_independent() -> None:
    """With A = I no task's output depends on another task's network (STL)."""
    model = _model(mixed_simo(), hidden=[16, 16])
    with torch.no_grad():
        for stitch in model.stitches:
            stitch.copy_(torch.eye(3))
    x = mixed_simo().x[:10]
    out = model.outputs(x)
    grads = torch.autograd.grad(out[0].sum(), [layer.weight for layer in model.layers])
    for grad in grads:
        assert grad[0].abs().sum() > 0  # task 0's own layers
        assert grad[1:].abs().sum() == 0  # nobody else's


def test_units_that_copy_one_task_share_its_representation() -> None:
    """Rows that all read task 0 give every task task 0's representation (hard sharing)."""
    model = _model(mixed_simo())
    with torch.no_grad():
        for stitch in model.stitches:
            stitch.zero_()[:, 0] = 1.0
        model.head.weight.copy_(model.head.weight[:1].expand_as(model.head.weight))
        model.head.bias.copy_(model.head.bias[:1].expand_as(model.head.bias))
    out = model.outputs(mixed_simo().x[:10])
    torch.testing.assert_close(out[1], out[0])
    torch.testing.assert_close(out[2], out[0])


def test_default_units_mix_the_tasks() -> None:
    """At the initial units, task 1's loss reaches task 0's first layer (what STL never does)."""
    model = _model(mixed_simo())
    out = model.outputs(mixed_simo().x[:10])
    grad = torch.autograd.grad(out[1].sum(), model.layers[0].weight)[0]
    assert grad[0].abs().sum() > 0


@pytest.mark.slow
def test_cross_stitch_learns_and_its_units_move() -> None:
    fit = pyromtl.fit("cross-stitch", mixed_simo(n=150), seed=0, device="cpu", steps=150, **TINY)
    assert fit.metrics()["tasks"]["bin"]["accuracy"] > 0.8
    stitch = fit.relatedness()["stitch"]
    assert stitch.shape == (3, 3)
    assert abs(stitch - stitch_init(3).numpy()).max() > 1e-3


def test_cross_stitch_refuses_mimo_data() -> None:
    with pytest.raises(ValueError, match="needs SIMO"):
        pyromtl.fit("cross-stitch", blobs_mimo(), steps=2, device="cpu", **TINY)
