"""``pyromtl.base``: the shared plates and the likelihood site, as every model and guide runs them."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch

from pyromtl import methods
from pyromtl.base import Plates, _Plate
from pyromtl.config import resolve
from pyromtl.predict import evaluating
from tests.conftest import TINY, built, mixed_simo


def _traces(model, guide, batch):
    guide_tr = pyro.poutine.trace(guide).get_trace(batch)
    return pyro.poutine.trace(pyro.poutine.replay(model, trace=guide_tr)).get_trace(batch), guide_tr


def test_outputs_are_recorded_in_eval_mode_only() -> None:
    """Predictions read the ``outputs`` site (eval mode); a training step does not record it."""
    data = mixed_simo()
    method = methods.get("hib")
    cfg = resolve(method, TINY, data=data)
    batch = data.train_batch(8, torch.Generator().manual_seed(0), "cpu")
    with pyro.settings.context(module_local_params=True):
        model, guide = built(method, cfg, data)
        torch.manual_seed(0)
        train_tr, _ = _traces(model, guide, batch)
        torch.manual_seed(0)
        with evaluating(model, guide):
            eval_tr, _ = _traces(model, guide, batch)
    assert "outputs" not in train_tr.nodes
    outputs = eval_tr.nodes["outputs"]["value"]
    assert outputs.shape == (data.num_tasks, batch.size, data.info.out_dim)
    # the same likelihood either way
    torch.testing.assert_close(train_tr.nodes["y"]["fn"].outputs, eval_tr.nodes["y"]["fn"].outputs)


def test_plates_are_shared_and_record_nothing() -> None:
    """Runs reuse one plate per name and size; creating it inside a trace leaves no site there."""
    data = mixed_simo()
    batch = data.train_batch(8, torch.Generator().manual_seed(0), "cpu")

    def model():
        plates = Plates(batch)
        with plates.observations():
            pyro.sample("x", dist.Normal(0.0, 1.0))  # broadcast once, to [T, B]

    tr = pyro.poutine.trace(model).get_trace()
    assert [n for n, site in tr.nodes.items() if site["type"] == "sample"] == ["x"]
    assert tr.nodes["x"]["fn"].batch_shape == (data.num_tasks, batch.size)
    assert [f.name for f in tr.nodes["x"]["cond_indep_stack"]] == ["task", "data"]
    assert Plates(batch).task is Plates(batch).task


def test_task_and_data_plates_broadcast_on_their_own() -> None:
    """``Plates.task`` and ``Plates.data``, for a site of one's own, are ordinary Pyro plates."""
    batch = mixed_simo().train_batch(8, torch.Generator().manual_seed(0), "cpu")
    plates = Plates(batch)
    with plates.task, plates.data:
        value = pyro.sample("x", dist.Normal(0.0, 1.0))
    assert value.shape == (batch.num_tasks, batch.size)


def _broadcast_shapes(handler: type, batch_shape: tuple[int, ...], plates: list[tuple[int, int]]):
    """The batch shape a site's ``Normal`` of ``batch_shape`` gets under ``handler`` with the plates
    ``(size, dim)`` inside it, and whether the site kept its own distribution object; or the
    error's type."""
    d = dist.Normal(torch.zeros(batch_shape), 1.0)
    frames = [_Plate(f"p{i}", size, dim=dim) for i, (size, dim) in enumerate(plates)]
    try:
        with pyro.poutine.trace() as tr, handler():
            for frame in frames:
                frame.__enter__()
            try:
                pyro.sample("x", d)
            finally:
                for frame in reversed(frames):
                    frame.__exit__(None, None, None)
    except ValueError:
        return ValueError
    fn = tr.trace.nodes["x"]["fn"]
    return tuple(fn.batch_shape), fn is d


def test_one_broadcast_expands_as_pyros_and_only_when_the_shape_changes() -> None:
    """``_Broadcast`` gives every site the batch shape Pyro's ``BroadcastMessenger`` gives it (and
    refuses the same mismatches), and keeps a distribution that is already at that shape."""
    from pyro.poutine.broadcast_messenger import BroadcastMessenger

    from pyromtl.base import _Broadcast

    cases = [
        ((), [(3, -1)]),
        ((1,), [(4, -2), (3, -1)]),
        ((3,), [(4, -2)]),
        ((4, 3), [(4, -2), (3, -1)]),
        ((5, 1, 3), [(2, -2)]),
        ((3,), [(2, -1)]),  # a mismatch
        ((2,), [(6, -4)]),
    ]
    for batch_shape, plates in cases:
        ours, pyros = (
            _broadcast_shapes(_Broadcast, batch_shape, plates),
            _broadcast_shapes(BroadcastMessenger, batch_shape, plates),
        )
        if pyros is ValueError:
            assert ours is ValueError, batch_shape
            continue
        assert ours[0] == pyros[0], (batch_shape, plates)
        assert ours[1] == (ours[0] == batch_shape), (batch_shape, plates)  # expanded only when it must be
