"""The baseline family and the shared likelihood on every setting and task type."""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

import pyromtl
from pyromtl import methods
from pyromtl.likelihoods import MultiTaskOutput
from tests.conftest import TINY, blobs_mimo, built, mixed_simo, regression_mimo


@pytest.mark.parametrize("method", ["stl", "bmtl", "vstl", "vbmtl"])
@pytest.mark.parametrize("make", [blobs_mimo, mixed_simo, regression_mimo], ids=["mimo-cls", "simo-mixed", "mimo-reg"])
def test_baselines_train_on_every_setting_and_task_type(method, make):
    data = make()
    fit = pyromtl.fit(method, data, steps=15, **TINY)
    assert np.isfinite(fit.train_info["final_loss"])
    sp = fit.predict("test")
    for t, kind in enumerate(data.task_types):
        n = data.splits["test"][t].numel()
        if kind == "classification":
            assert sp.pred[t].shape == (n, data.num_classes[t])
            np.testing.assert_allclose(sp.pred[t].sum(1), 1.0, atol=1e-5)
        else:
            assert sp.pred[t].shape == (n,)
    scores = fit.evaluate()
    assert set(scores["tasks"]) == set(data.task_names)


def test_likelihood_matches_torch_distributions_per_task_type():
    data = mixed_simo()
    info = data.info
    T, B, K = info.num_tasks, 7, info.out_dim
    torch.manual_seed(0)
    out = torch.randn(2, T, B, K)
    noise = torch.tensor([1.0, 1.0, 0.7])
    y = torch.stack([torch.randint(0, 3, (B,)).float(), torch.randint(0, 2, (B,)).float(), torch.randn(B)])
    lp = MultiTaskOutput(out, info, noise).log_prob(y)
    assert lp.shape == (2, T, B)
    c = data.num_classes[0]
    torch.testing.assert_close(lp[:, 0], dist.Categorical(logits=out[:, 0, :, :c]).log_prob(y[0]))
    torch.testing.assert_close(lp[:, 1], dist.Bernoulli(logits=out[:, 1, :, 0]).log_prob(y[1]))
    torch.testing.assert_close(lp[:, 2], dist.Normal(out[:, 2, :, 0], 0.7).log_prob(y[2]))
    draws = MultiTaskOutput(out, info, noise).sample((500,))
    assert draws.shape == (500, 2, T, B)
    assert set(draws[:, :, 1].unique().tolist()) <= {0.0, 1.0}
    assert draws[:, :, 0].max() < c  # never a padded class


def test_monte_carlo_plates_average_every_pair_of_draws():
    """L draws of z and M of w give L x M likelihood terms, each weighted 1/(L M) (VMTL eq. 11)."""
    from pyro import poutine

    from pyromtl import config
    from pyromtl.params import local_params
    from pyromtl.schedules import TrainState

    data = blobs_mimo()
    m = methods.get("vmtl")

    @local_params
    def run():
        cfg = config.resolve(m, dict(TINY, mc_z=3, mc_w=5), data=data)
        model, guide = built(m, cfg, data, TrainState(total_steps=100))
        batch = data.train_batch(8, None, "cpu")
        guide_tr = poutine.trace(guide).get_trace(batch)
        model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(batch)
        model_tr.compute_log_prob()
        return model_tr, batch

    tr, batch = run()
    assert tr.nodes["z"]["value"].shape == (3, 1, 3, 8, 8)
    assert tr.nodes["w"]["value"].shape == (5, 3, 1, 3, 8)
    y = tr.nodes["y"]
    assert y["fn"].batch_shape == (3, 5, 3, 8)
    scale = torch.as_tensor(y["scale"])
    torch.testing.assert_close(scale.expand(3, 5, 3, 8)[0, 0], (batch.scale / 15).expand(3, 8))


def test_mean_field_elbo_uses_the_analytic_normal_kl():
    """With z and w from fixed guide draws, two loss evaluations agree only if every KL is analytic."""
    from pyromtl import config
    from pyromtl.params import local_params
    from pyromtl.schedules import TrainState

    data = blobs_mimo()
    m = methods.get("vbmtl")

    @local_params
    def kl_terms():
        cfg = config.resolve(m, {**TINY, "kl_weight": 1.0}, data=data)
        model, guide = built(m, cfg, data, TrainState(total_steps=100))
        batch = data.train_batch(8, None, "cpu")
        elbo = pyro.infer.TraceMeanField_ELBO(max_plate_nesting=4)
        losses = []
        for seed in (0, 1):
            torch.manual_seed(seed)
            # Drop the likelihood: what is left is -(KL terms), which must not depend on the draw.
            losses.append(elbo.loss(poutine_block_y(model), guide, batch))
        return losses

    def poutine_block_y(model):
        from pyro import poutine

        return poutine.block(model, hide=["y"])

    a, b = kl_terms()
    assert a == pytest.approx(b, rel=1e-6)
    assert a > 0


@pytest.mark.parametrize("method, isolated", [("stl", True), ("bmtl", False)])
def test_only_a_shared_encoder_lets_one_tasks_data_change_another_tasks_predictions(method, isolated):
    """STL's tasks learn alone; BMTL's share an encoder: noise in task 1's inputs reaches task 0."""
    clean = blobs_mimo()
    rng = np.random.default_rng(1)
    xs = [clean.x[t].numpy() for t in range(clean.num_tasks)]
    xs[1] = rng.normal(size=xs[1].shape).astype(np.float32) * 5
    noisy = type(clean).from_arrays(
        xs, [clean.y[t].numpy() for t in range(clean.num_tasks)], "classification", splits=clean.splits, name="blobs"
    )
    task0 = [pyromtl.fit(method, d, steps=15, device="cpu", **TINY).predict("test").pred[0] for d in (clean, noisy)]
    assert np.array_equal(task0[0], task0[1]) == isolated


def test_unknown_method_lists_the_available_ones():
    with pytest.raises(ValueError, match=r"unknown method 'nope'; available: .*vbmtl"):
        methods.get("nope")
    assert {"stl", "bmtl", "vstl", "vbmtl", "vmtl", "vmtl-ac"} <= set(methods.available())


def test_vmtl_refuses_simo_data():
    with pytest.raises(ValueError, match="MIMO"):
        pyromtl.fit("vmtl", mixed_simo(), steps=2, **TINY)
