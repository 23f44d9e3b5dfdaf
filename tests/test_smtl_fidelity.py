"""SMTL against the paper's text where a test of behaviour alone would not notice a slip.

* The test-time gate is ``1[α_t > 0.5]`` (Safe MTL §4, the discussion of Table 5: a task uses
  the public component when α_t "is larger than 0.5", otherwise the private one). Gates start
  at exactly 0.5 (``gate_init``), so ``≥`` instead of ``>`` would send every untrained gate public.
* The bi-level gate step (eq. 6) reads the ``gates`` split and nothing else: a step that drew a
  training batch would still move the gates and pass every other test.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from pyromtl import config, methods
from pyromtl.data.core import Batch, MultiTaskData
from pyromtl.method import MethodContext
from pyromtl.models.smtl import GATE_SPLIT, GateObjective, SMTLModel, prune, straight_through_gate
from pyromtl.objective import TrainContext
from pyromtl.params import local_params
from pyromtl.runspec import RunSpec
from pyromtl.schedules import TrainState
from pyromtl.train import train
from tests.conftest import TINY, built, mixed_simo

LITE = ("lsmtl", "lsmtl-c")
#: The smallest float32 α above one half.
JUST_ABOVE = torch.nextafter(torch.tensor(0.5), torch.tensor(1.0))


@local_params
def _lite_model(name: str, data: MultiTaskData) -> SMTLModel:
    m = methods.get(name)
    cfg = config.resolve(m, {**TINY, "device": "cpu", "gate_init": 0.5}, data=data)  # the tie (lite default: 0.25)
    torch.manual_seed(0)
    model, _ = built(m, cfg, data, TrainState(total_steps=100))
    return model


def _set_alpha(model: SMTLModel, alpha: list[float]) -> None:
    with torch.no_grad():
        model.gate_logit.copy_(torch.logit(torch.tensor(alpha, dtype=torch.float64)).float())


# ----------------------------------------------------------------------------- the test-time gate
def test_straight_through_gate_sends_one_half_private_and_just_above_public() -> None:
    logit = torch.logit(torch.tensor([0.5, JUST_ABOVE.item(), 0.25, 0.75], dtype=torch.float64)).float()
    alpha = torch.sigmoid(logit)
    assert alpha[0] == 0.5 and alpha[1] > 0.5  # what the rule sees
    with torch.no_grad():
        assert straight_through_gate(logit, torch.tensor(0.1)).tolist() == [0.0, 1.0, 0.0, 1.0]


def test_a_logit_whose_alpha_rounds_to_one_half_is_private() -> None:
    """The rule reads α_t as reported (float32): a logit of 1e-8 has α_t == 0.5 there."""
    logit = torch.tensor([1e-8])
    assert torch.sigmoid(logit).item() == 0.5
    with torch.no_grad():
        assert straight_through_gate(logit, torch.tensor(0.1)).tolist() == [0.0]


@pytest.mark.parametrize("name", LITE)
def test_untrained_lite_gates_predict_and_prune_private(name: str) -> None:
    """At ``gate_init = 0.5`` every gate is private: in predictions, in ``gate_draws`` (the
    export's draws) and in the pruned network, which keeps no public encoder."""
    model = _lite_model(name, mixed_simo())
    assert torch.equal(model.alpha(), torch.full((3,), 0.5))
    with torch.no_grad():
        assert model.gate().tolist() == [0.0, 0.0, 0.0]
    assert torch.equal(model.gate_draws(4), torch.zeros(4, 3))
    pruned = prune(model)
    assert pruned.public is None and pruned.public_decoder is None
    assert pruned.private is not None and pruned.decoder is not None


@pytest.mark.parametrize("name", LITE)
def test_pruning_splits_tasks_at_one_half_exclusive(name: str) -> None:
    """Task 0 at exactly 0.5 stays private, task 1 just above goes public, task 2 well below is
    private; the pruned network keeps one private encoder pair per private task."""
    data = mixed_simo()
    model = _lite_model(name, data)
    _set_alpha(model, [0.5, JUST_ABOVE.item(), 0.2])
    assert model.alpha()[0] == 0.5 and model.alpha()[1] > 0.5
    with torch.no_grad():
        assert model.gate().tolist() == [0.0, 1.0, 0.0]
    pruned = prune(model)
    assert pruned.public is not None and pruned.private is not None
    assert next(pruned.private.parameters()).shape[0] == 2  # tasks 0 and 2
    assert next(pruned.public_decoder.parameters()).shape[0] == 1  # task 1
    x = next(data.eval_batches("test", "cpu")).x
    with torch.no_grad():  # the pruned network computes the gated model at those hard gates
        torch.testing.assert_close(pruned(x), model.outputs(x, torch.tensor([0.0, 1.0, 0.0])), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- the bi-level gate step
def _bilevel(name: str) -> tuple[GateObjective, MultiTaskData, dict[str, Any]]:
    """A bi-level objective after one training step, and the data with its ``gates`` split."""
    data = mixed_simo()
    m = methods.get(name)
    cfg = config.resolve(m, {**TINY, "steps": 1, "device": "cpu", "gates": "bilevel", "gate_lr": 0.05}, data=data)
    prepared = m.prepare(MethodContext(m, cfg, data=data))
    objective = train(RunSpec.build(m, cfg, prepared)).objective
    assert isinstance(objective, GateObjective) and objective.bilevel
    return objective, prepared, dict(cfg)


@local_params
def _gate_gradient(objective: GateObjective, data: MultiTaskData, split: str, seed: int) -> torch.Tensor:
    """The gates' gradient on the batch of ``split`` that a generator seeded ``seed`` draws first."""
    batch = data.train_batch(objective.gate_batch_size, torch.Generator().manual_seed(seed), "cpu", split=split)
    torch.manual_seed(seed)  # the lite gate's straight-through draw
    (grad,) = torch.autograd.grad(objective.loss(batch), [objective.model.gate_logit])
    return grad


@pytest.mark.parametrize("name", ["smtl", "lsmtl"])
def test_bilevel_gate_step_reads_the_gates_split_only(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``after_step`` draws exactly one batch, from ``gates``; the gradient it leaves on the logits
    is that batch's (a ``train`` batch's differs, so a step on train data fails here); and no
    other parameter moves."""
    objective, data, cfg = _bilevel(name)
    seed = 11
    on_gates = _gate_gradient(objective, data, GATE_SPLIT, seed)
    on_train = _gate_gradient(objective, data, "train", seed)
    on_val = _gate_gradient(objective, data, "val", seed)
    assert not torch.allclose(on_gates, on_train) and not torch.allclose(on_gates, on_val)  # the test can tell

    reads: list[str] = []  # the split of every batch drawn or iterated during the step
    draw, iterate = MultiTaskData.train_batch, MultiTaskData.eval_batches

    def train_batch(
        self: MultiTaskData, batch_size: int, generator: torch.Generator | None, device: Any, split: str = "train"
    ) -> Batch:
        reads.append(split)
        return draw(self, batch_size, generator, device, split=split)

    def eval_batches(self: MultiTaskData, split: str, device: Any, batch_size: int = 4096) -> Iterator[Batch]:
        reads.append(split)
        return iterate(self, split, device, batch_size)

    monkeypatch.setattr(MultiTaskData, "train_batch", train_batch)
    monkeypatch.setattr(MultiTaskData, "eval_batches", eval_batches)
    logit = objective.model.gate_logit
    others = {k: p.detach().clone() for k, p in objective.named_parameters() if p is not logit}
    before = logit.detach().clone()
    torch.manual_seed(seed)
    local_params(objective.after_step)(
        TrainContext(data=data, cfg=cfg, device=torch.device("cpu"), generator=torch.Generator().manual_seed(seed))
    )
    assert reads == [GATE_SPLIT]
    assert logit.grad is not None
    torch.testing.assert_close(logit.grad, on_gates, rtol=1e-6, atol=0)
    assert not torch.equal(logit.detach(), before)  # the gates' own Adam stepped
    for k, p in objective.named_parameters():
        if p is not logit:
            assert torch.equal(p.detach(), others[k]), k
