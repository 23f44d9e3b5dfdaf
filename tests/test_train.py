"""The SVI loop: seeds, resume, NaN stop, particles, progress bar, atomic outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import pyromtl
from pyromtl import io as pio
from pyromtl.method import MethodContext
from pyromtl.runspec import RunSpec, resolve_device, total_steps
from pyromtl.train import TrainingError
from tests.conftest import TINY, blobs_mimo, built


def _params(fit) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in fit.objective.state_dict().items()}


def test_same_seed_same_numbers_and_other_seed_differs(blobs):
    a = pyromtl.fit("vbmtl", blobs, steps=20, seed=3, **TINY)
    b = pyromtl.fit("vbmtl", blobs, steps=20, seed=3, **TINY)
    c = pyromtl.fit("vbmtl", blobs, steps=20, seed=4, **TINY)
    pa, pb, pc = _params(a), _params(b), _params(c)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert a.evaluate() == b.evaluate()
    assert not all(torch.equal(pa[k], pc[k]) for k in pa)


class _Interrupt(Exception):
    pass


def test_resumed_run_ends_where_an_uninterrupted_one_would(blobs, tmp_path):
    opts = dict(steps=60, seed=1, checkpoint_every=20, **TINY)
    full = pyromtl.fit("vbmtl", blobs, **opts)

    from pyromtl import config, methods
    from pyromtl.train import train

    m = methods.get("vbmtl")
    cfg = config.resolve(m, opts, data=blobs)

    def stop_at_45(step: int, loss: float) -> None:
        if step == 45:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        train(RunSpec.build(m, cfg, blobs, tmp_path), callback=stop_at_45)
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert saved["step"] == 40  # the last periodic checkpoint before the interruption
    resumed = train(RunSpec.build(m, cfg, blobs, tmp_path))
    pf = _params(full)
    pr = {k: v.detach() for k, v in resumed.objective.state_dict().items()}
    assert pf.keys() == pr.keys()
    for k in pf:
        torch.testing.assert_close(pr[k], pf[k], rtol=0, atol=0, msg=k)
    assert [h["step"] for h in resumed.history] == [h["step"] for h in full.history]
    assert resumed.best_step == full.train_info["best_step"]


def test_nan_loss_stops_with_a_clear_message(blobs, monkeypatch):
    from pyromtl import likelihoods

    monkeypatch.setattr(
        likelihoods.MultiTaskOutput, "log_prob", lambda self, value: torch.full(self.batch_shape, float("nan"))
    )
    with pytest.raises(TrainingError, match=r"loss is nan before the first step of bmtl"):
        pyromtl.fit("bmtl", blobs, steps=5, **TINY)


def test_vectorized_particles_reduce_the_variance_of_the_loss(blobs):
    from pyromtl import config, methods
    from pyromtl.params import local_params
    from pyromtl.schedules import TrainState

    m = methods.get("vbmtl")

    @local_params
    def losses(n: int) -> np.ndarray:
        cfg = config.resolve(m, dict(num_particles=n, **TINY), data=blobs)
        torch.manual_seed(0)
        model, guide = built(m, cfg, blobs, TrainState(total_steps=100))
        loss_fn = m.elbo(MethodContext(m, cfg))(model, guide)
        batch = blobs.train_batch(16, torch.Generator().manual_seed(0), "cpu")
        with torch.no_grad():
            return np.array([float(loss_fn(batch)) for _ in range(40)])

    one, many = losses(1), losses(16)
    assert np.isfinite(many).all()
    assert many.std() < 0.5 * one.std()
    assert abs(many.mean() - one.mean()) < 4 * one.std() / np.sqrt(40) + 4 * many.std()


def test_progress_bar_shows_and_quiet_silences_it(blobs, capsys):
    pyromtl.fit("bmtl", blobs, steps=5, **{**TINY, "quiet": False})
    assert "step" in capsys.readouterr().err
    pyromtl.fit("bmtl", blobs, steps=5, **TINY)
    assert capsys.readouterr().err == ""


def test_epochs_count_passes_over_the_largest_task(blobs):
    from pyromtl import config, methods

    cfg = config.resolve(methods.get("bmtl"), {"epochs": 3, "batch_size": 10})
    largest = max(blobs.split_sizes("train"))
    assert total_steps(cfg, blobs) == 3 * -(-largest // 10)
    cfg = config.resolve(methods.get("bmtl"), {"epochs": 3, "steps": 7})
    assert total_steps(cfg, blobs) == 7


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match="no CUDA device"):
        resolve_device("cuda")


def test_model_selection_restores_the_best_validation_state(blobs):
    fit = pyromtl.fit("bmtl", blobs, steps=40, **TINY)
    scored = [h for h in fit.history if "val_score" in h]
    scores = [h["val_score"] for h in scored]
    best = int(np.argmax(scores))
    assert fit.train_info["best_step"] == scored[best]["step"]
    from pyromtl.train import validation_score

    again = validation_score(fit.spec, fit.model, fit.guide, fit.config["seed"] + fit.train_info["best_step"])
    assert again == pytest.approx(scores[best])


@pytest.mark.parametrize("select, kept", [("after_warmup", 20), ("all", 10), ("last", 40)])
def test_model_selection_starts_after_the_warmup_by_default(blobs, monkeypatch, select, kept):
    """Validation scores that only fall would keep the first state; by default selection waits
    until the KL warm-up and the temperature decay have ended (half of this run), and records
    the kept step with the schedules' values there."""
    import pyromtl.train as train_mod

    monkeypatch.setattr(train_mod, "validation_score", lambda *args: -float(args[-1]))  # seed + step: falls
    warmup = {"start": 0.0, "end": 1.0, "fraction": 0.5}
    decay = {"start": 5.0, "end": 0.5, "decay_fraction": 0.25}
    fit = pyromtl.fit(
        "vmtl",
        blobs,
        steps=40,
        kl_weight=warmup,
        select=select,
        mc_z=1,
        mc_w=1,
        priors={"w": {"temperature": decay}},
        **TINY,
    )
    selected = fit.train_info["selected"]
    assert fit.train_info["best_step"] == kept == selected["step"]
    assert selected["kl_weight"] == pytest.approx(min(1.0, kept / 20))
    assert selected["priors.w.temperature"] == pytest.approx(max(0.5, 5.0 * 0.1 ** (kept / 10)))
    assert selected["kl_weights"] == {
        site: pytest.approx(w * selected["kl_weight"]) for site, w in fit.config["kl_weights"].items()
    }


def test_bad_select_is_a_config_error(blobs):
    with pytest.raises(ValueError, match="'select' must be one of"):
        pyromtl.fit("bmtl", blobs, steps=4, select="best", **TINY)


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    pio.atomic_write_json(target, {"ok": 1})

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(pio.os, "replace", broken_replace)
    with pytest.raises(OSError):
        pio.atomic_write_json(target, {"ok": 2})
    assert json.loads(target.read_text()) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temporary left behind


def test_each_step_runs_the_encoder_once_whatever_the_number_of_tasks():
    """Vectorised over tasks: a step's work is one batched call, not a loop over tasks."""
    from pyromtl import config, methods
    from pyromtl.nn import GaussianEncoder
    from pyromtl.params import local_params
    from pyromtl.schedules import TrainState

    calls = []
    original = GaussianEncoder.forward

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    @local_params
    def count(num_tasks: int, method: str) -> int:
        data = blobs_mimo(num_tasks=num_tasks)
        m = methods.get(method)
        cfg = config.resolve(m, dict(TINY), data=data)
        model, guide = built(m, cfg, data, TrainState(total_steps=100))
        loss_fn = m.elbo(MethodContext(m, cfg))(model, guide)
        batch = data.train_batch(8, None, "cpu")
        calls.clear()
        GaussianEncoder.forward = counting
        try:
            loss_fn(batch)
        finally:
            GaussianEncoder.forward = original
        return len(calls)

    for method in ("stl", "vbmtl", "vmtl"):
        assert count(2, method) == count(6, method), method
