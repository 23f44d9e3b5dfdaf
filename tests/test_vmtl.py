"""VMTL and VMTL-AC on real models and guides: the KL bound of eq. 11, detached components,
mixing weights, the class attention of eq. 10, relatedness recovery and the amortised classifier.

``test_distributions.py`` and ``test_priors.py`` check ``TaskMixture`` and the ``task_mixture``
prior in isolation; here they run inside the model and guide that ``methods.get("vmtl")`` builds.
"""

from __future__ import annotations

import math

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import ELBO, TraceMeanField_ELBO
from torch.distributions import Normal, kl_divergence

import pyromtl
from pyromtl import config, datasets, methods
from pyromtl.data import MultiTaskData
from pyromtl.evaluation import predict_split
from pyromtl.method import MethodContext
from pyromtl.models.vmtl import ClassAttention
from pyromtl.predict import draw
from pyromtl.runspec import RunSpec
from pyromtl.schedules import TrainState
from pyromtl.train import train
from tests.conftest import TINY, blobs_mimo, built, regression_mimo

#: VMTL's L x M Monte-Carlo draws cut to 2 x 2, and the KL at full weight from step 0 (the
#: default anneals it from 0, which would mask every KL term at the start).
SMALL = {**TINY, "mc_z": 2, "mc_w": 2, "kl_weight": 1.0}
MIXTURE_WEIGHTS = ["gumbel_softmax", "learned", "uniform"]


@pytest.fixture(autouse=True)
def _local_params_one_thread():
    """Models own their parameters (no global param store), as in training."""
    pyro.set_rng_seed(0)
    with pyro.settings.context(module_local_params=True):
        yield


def build(method: str = "vmtl", data: MultiTaskData | None = None, priors: dict | None = None, **options):
    """``(model, guide, cfg)`` of ``method`` on ``data`` (default: 3 blob tasks), built as the trainer does."""
    data = data if data is not None else blobs_mimo()
    m = methods.get(method)
    cfg = config.resolve(m, {**SMALL, **options}, priors, data=data)
    torch.manual_seed(0)  # the same initial parameters on every build
    model, guide = built(m, cfg, data, TrainState(total_steps=100))
    return model, guide, cfg


def train_batch(data: MultiTaskData, size: int = 8):
    return data.train_batch(size, torch.Generator().manual_seed(0), "cpu")


def without_y(model):
    """The model minus its likelihood: its mean-field ELBO loss is the sum of the KL terms."""
    return poutine.block(model, hide=["y"])


def traces(model, guide, batch):
    guide_tr = poutine.trace(guide).get_trace(batch)
    model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(batch)
    return guide_tr, model_tr


#: Pyro's own mean-field ELBO, and the loss the method trains with (which may specialise it).
ELBOS = ["pyro", "method"]


def elbo(which: str, cfg: dict) -> ELBO:
    if which == "pyro":
        return TraceMeanField_ELBO(max_plate_nesting=4)
    m = methods.get(cfg["method"])
    return m.elbo(MethodContext(m, cfg))


def diag_kl(q_loc, q_scale, p_loc, p_scale, event_dims: int) -> torch.Tensor:
    """KL between diagonal Gaussians, summed over the last ``event_dims`` dims (torch's own Normal KL)."""
    kl = kl_divergence(Normal(q_loc, q_scale), Normal(p_loc, p_scale))
    return kl.sum(tuple(range(-event_dims, 0)))


def mixture_log_prob(x, weights, loc, scale, event_dims: int) -> torch.Tensor:
    """``log Σ_i weights_i N(x | loc_i, scale_i)``; x ``[S, *event]``, components ``[C, *event]``."""
    per_comp = Normal(loc, scale).log_prob(x.unsqueeze(1)).sum(tuple(range(-event_dims, 0)))  # [S, C]
    keep = weights > 0  # log 0 = -inf drops a component; log of the kept ones only (no NaN)
    return torch.logsumexp(per_comp[:, keep] + weights[keep].log(), dim=-1)


def assert_weights_matrix(a: np.ndarray | torch.Tensor, T: int) -> None:
    """A [T, T] mixing matrix: no weight on the task itself, rows on the simplex."""
    a = torch.as_tensor(np.asarray(a, dtype=np.float64))
    assert a.shape == (T, T)
    assert torch.equal(a.diagonal(), torch.zeros(T, dtype=a.dtype))
    assert (a >= 0).all()
    torch.testing.assert_close(a.sum(-1), torch.ones(T, dtype=a.dtype), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- eq. 11: KL bound
@pytest.mark.parametrize("which", ELBOS)
def test_elbo_kl_terms_are_the_weighted_pairwise_normal_kls_and_bound_the_mixture_kl(which):
    data = blobs_mimo()
    T = data.num_tasks
    model, guide, cfg = build(data=data)
    batch = train_batch(data)

    # The Gumbel-Softmax weights are drawn inside the model: the same seed gives the ELBO call and
    # the traces below the same guide draws and the same α, β.
    pyro.set_rng_seed(1)
    loss = elbo(which, cfg).loss(without_y(model), guide, batch)
    pyro.set_rng_seed(1)
    _, model_tr = traces(without_y(model), guide, batch)
    alpha, beta = model_tr.nodes["w_weights"]["value"], model_tr.nodes["z_weights"]["value"]
    assert not torch.allclose(alpha, (1 - torch.eye(T)) / (T - 1))  # a real, non-uniform draw

    with torch.no_grad():
        # w: KL(q(w_t) ‖ Σ_i α_ti q(w_i)) ≤ Σ_i α_ti KL(q(w_t) ‖ q(w_i)), per task (eq. 6, 11)
        loc, scale = (v.squeeze(1) for v in guide.w_post())  # [T, K, d]
        pair_w = diag_kl(loc[:, None], scale[:, None], loc[None], scale[None], 2)  # [t, i]
        bound_w = (alpha * pair_w).sum(-1)
        # z: components q_φ(z | f(x_tn, D_i)) from the precomputed attention (eq. 9, 10)
        z_loc, z_scale = guide.encoder(batch.x, False)  # [T, B, d]
        attended = model.attention(batch.index)  # [T, B, T, D]
        c_loc, c_scale = guide.encoder(attended.reshape(T, -1, attended.shape[-1]), False)
        c_loc, c_scale = c_loc.reshape(*attended.shape[:3], -1), c_scale.reshape(*attended.shape[:3], -1)
        c_scale = c_scale.clamp_min(cfg["z_component_min_scale"])  # the floor on the component scales
        pair_z = diag_kl(z_loc.unsqueeze(2), z_scale.unsqueeze(2), c_loc, c_scale, 1)  # [T, B, i]
        bound_z = (beta[:, None, :] * pair_z).sum(-1)  # [T, B]
    # Each site's KL carries its configured weight; z terms also the subsampling scale N_t / B_t
    # and the padding mask. The M and L draws each weigh 1/M and 1/L: one copy of each term.
    expected = (
        cfg["kl_weights"]["w"] * bound_w.sum() + cfg["kl_weights"]["z"] * (bound_z * batch.scale * batch.mask).sum()
    )
    assert loss == pytest.approx(expected.item(), rel=1e-5)

    # the bound is above a Monte-Carlo estimate of the exact KL to the mixture
    S = 4000
    for t in range(T):
        x = Normal(loc[t], scale[t]).sample((S,))
        diff = Normal(loc[t], scale[t]).log_prob(x).sum((-1, -2)) - mixture_log_prob(x, alpha[t], loc, scale, 2)
        assert bound_w[t] >= diff.mean() - 5 * diff.std() / math.sqrt(S)
    for t, b in [(0, 0), (1, 3), (2, 7)]:
        x = Normal(z_loc[t, b], z_scale[t, b]).sample((S,))
        diff = Normal(z_loc[t, b], z_scale[t, b]).log_prob(x).sum(-1) - mixture_log_prob(
            x, beta[t], c_loc[t, b], c_scale[t, b], 1
        )
        assert bound_z[t, b] >= diff.mean() - 5 * diff.std() / math.sqrt(S)


def _kl_loss(loss_fn: ELBO, model, guide, guide_tr, batch) -> float:
    """The KL terms' loss with the guide's draws fixed to ``guide_tr`` and the Gumbel noise to one seed."""
    pyro.set_rng_seed(7)
    return loss_fn.loss(without_y(model), poutine.replay(guide, trace=guide_tr), batch)


@pytest.mark.parametrize("which", ELBOS)
def test_mean_field_elbo_uses_the_analytic_bound_unless_kl_is_monte_carlo(which):
    data = blobs_mimo()
    batch = train_batch(data)
    losses = {}
    for kl in ("upper_bound", "monte_carlo"):
        model, guide, cfg = build(data=data, priors={"z": {"kl": kl}, "w": {"kl": kl}})  # same init per mode
        draws = [poutine.trace(guide).get_trace(batch) for _ in range(2)]
        losses[kl] = [_kl_loss(elbo(which, cfg), model, guide, tr, batch) for tr in (draws[0], draws[0], draws[1])]
    bound, mc = losses["upper_bound"], losses["monte_carlo"]
    # analytic: the value does not depend on where the guide's draws landed
    assert bound[0] == pytest.approx(bound[1], rel=1e-6) and bound[0] == pytest.approx(bound[2], rel=1e-6)
    # sampled: fixed by the draws (same draws, same value), and it moves with them
    assert mc[0] == pytest.approx(mc[1], rel=1e-6)
    assert mc[0] != pytest.approx(mc[2], rel=1e-3)
    assert mc[0] != pytest.approx(bound[0], rel=1e-3)


def test_monte_carlo_kl_trains():
    data = blobs_mimo()
    m = methods.get("vmtl")
    cfg = config.resolve(
        m,
        {**SMALL, "steps": 40, "lr": 0.01, "batch_size": 8, "eval_every": 1000, "device": "cpu"},
        {"z": {"kl": "monte_carlo"}, "w": {"kl": "monte_carlo"}},
        data=data,
    )
    losses: list[float] = []
    train(RunSpec.build(m, cfg, data), callback=lambda step, loss: losses.append(loss))
    assert len(losses) == 40 and np.isfinite(losses).all()
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])


# ----------------------------------------------------------------------- eq. 6: detached q(w_i)
@pytest.mark.parametrize("which", ELBOS)
@pytest.mark.parametrize("t", [0, 2])
def test_task_kl_sends_no_gradient_to_other_tasks_posteriors(t, which):
    """Back-propagating task t's prior terms alone moves q(w_t) and π_t, never q(w_i), i ≠ t.

    The w components are the other tasks' posteriors with gradients stopped (eq. 6: "from the
    previous iteration"). The z components q_φ(z | f(x_tn, D_i)) run the shared inference
    network φ without a graph (eq. 9, the previous φ); their input f(x_tn, D_i) is attention
    over task i's *data*, precomputed in input space.
    """
    data = blobs_mimo()
    T = data.num_tasks
    model, guide, cfg = build(data=data)
    with torch.no_grad():  # at init every σ is equal, which makes ∂KL/∂σ_t exactly 0
        guide.w_post.raw_scale.add_(0.3 * torch.randn_like(guide.w_post.raw_scale))
    batch = train_batch(data)
    only_t = torch.nn.functional.one_hot(torch.tensor(t), T).bool()[:, None]  # [T, 1] over the task plate
    # TraceMeanField_ELBO takes an analytic KL's mask from the guide site
    loss = elbo(which, cfg).differentiable_loss(without_y(model), poutine.mask(guide, mask=only_t), batch)
    loss.backward()

    others = torch.arange(T) != t
    for p in (guide.w_post.loc, guide.w_post.raw_scale):
        assert torch.equal(p.grad[others], torch.zeros_like(p.grad[others]))
        assert p.grad[t].abs().sum() > 0
    for site in (model.w_prior, model.z_prior):
        pi = site.params["logits"]  # row t holds π_t, which only task t's weights use
        assert torch.equal(pi.grad[others], torch.zeros_like(pi.grad[others]))
        assert pi.grad[t].abs().sum() > 0
    # the z prior's inputs are data: a constant table, not a function of parameters
    assert not model.attention.attended.requires_grad
    assert all(p.grad is not None for p in guide.encoder.parameters())  # through the guide's q(z|x)


# ----------------------------------------------------------------------- eq. 12: prediction
def test_predictive_averages_the_per_draw_probabilities():
    """Eq. 12: p(y | x) = (1 / LM) Σ_{l,m} p(y | z^(l), w^(m)), probabilities averaged, not logits.

    The same seeded draws are scored twice: by the evaluation path and by hand. The softmax of
    the averaged logits is checked to differ, so the test tells the two apart.
    """
    data = blobs_mimo()
    fit = pyromtl.fit("vmtl", data, steps=20, device="cpu", **SMALL)
    batch = next(data.eval_batches("test", "cpu"))
    pyro.set_rng_seed(3)
    outputs = draw(fit.model, fit.guide, batch, 3, fit.method.max_plate_nesting).outputs  # [D, T, B, K]
    assert outputs.shape[0] == 3 * SMALL["mc_z"] * SMALL["mc_w"]  # the inner L x M pairs are draws too
    pyro.set_rng_seed(3)
    got = predict_split(
        fit.model,
        fit.guide,
        data,
        "test",
        num_samples=3,
        max_plate_nesting=fit.method.max_plate_nesting,
        device=torch.device("cpu"),
    )
    by_hand = torch.softmax(outputs, -1).mean(0)
    of_mean_logits = torch.softmax(outputs.mean(0), -1)
    for t in range(data.num_tasks):
        n = batch.mask[t].sum()
        np.testing.assert_allclose(got.pred[t], by_hand[t, :n].numpy(), rtol=1e-5, atol=1e-6)
        assert np.abs(got.pred[t] - of_mean_logits[t, :n].numpy()).max() > 1e-3


# ------------------------------------------------------------------- eq. 9: the previous φ
@pytest.mark.parametrize("z_prior_grad", [False, True])
def test_z_prior_components_carry_gradient_only_when_asked(z_prior_grad):
    """By default the z components q_φ(z | f(x, D_i)) are the previous iteration's φ (eq. 9).

    The KL alone (no likelihood) is back-propagated twice: once through the guide only, once
    through the whole loss. Without ``z_prior_grad`` both give φ the same gradient, so none
    reached φ through the prior; with it they differ.
    """
    data = blobs_mimo()
    model, guide, cfg = build(data=data, z_prior_grad=z_prior_grad)
    batch = train_batch(data)
    (loc, scale), _ = model.z_prior_inputs(batch)
    assert loc.requires_grad == z_prior_grad and scale.requires_grad == z_prior_grad

    def encoder_grad(block_prior: bool) -> torch.Tensor:
        guide.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)
        pyro.set_rng_seed(1)
        run = without_y(model)
        if block_prior:  # the same prior, its components recomputed without a graph
            inputs = model.z_prior_inputs

            def frozen(b):
                with torch.no_grad():
                    return inputs(b)

            model.z_prior_inputs = frozen
        try:
            loss = elbo("method", cfg).differentiable_loss(run, guide, batch)
        finally:
            model.__dict__.pop("z_prior_inputs", None)
        loss.backward()
        return torch.cat([p.grad.flatten() for p in guide.encoder.parameters()])

    through_guide_only, through_both = encoder_grad(True), encoder_grad(False)
    assert torch.allclose(through_guide_only, through_both) != z_prior_grad


# ------------------------------------------------------------------------- eq. 7: α and β
@pytest.mark.parametrize("weights", MIXTURE_WEIGHTS)
def test_alpha_and_beta_exclude_the_task_and_sum_to_one(weights):
    data = blobs_mimo()
    T = data.num_tasks
    spec = {"weights": weights, "temperature": 0.5}
    fit = pyromtl.fit("vmtl", data, priors={"z": spec, "w": spec}, steps=3, device="cpu", **SMALL)
    rel = fit.relatedness()
    assert set(rel) == {"alpha", "beta"}
    for a in rel.values():
        assert_weights_matrix(a, T)
    if weights == "uniform":
        np.testing.assert_allclose(rel["alpha"], (1 - np.eye(T)) / (T - 1), rtol=1e-6)

    # the weights the model records as deterministic sites, at training and at evaluation
    eval_batch = next(data.eval_batches("test", "cpu"))
    for batch in (train_batch(data), eval_batch):
        _, model_tr = traces(fit.model, fit.guide, batch)
        recorded = {k: model_tr.nodes[f"{k}_weights"]["value"].detach() for k in ("w", "z")}
        for a in recorded.values():
            assert_weights_matrix(a, T)
        if weights != "gumbel_softmax":  # noise-free weights are their expectation
            np.testing.assert_allclose(recorded["w"].numpy(), rel["alpha"], rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(recorded["z"].numpy(), rel["beta"], rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------- eq. 10: class attention
def test_class_attention_matches_a_loop_over_same_class_samples():
    rng = np.random.default_rng(3)
    dim, n = 3, 9
    ys = [np.arange(n) % 3, np.arange(n) % 3, np.arange(n) % 2]  # task 2 has no class 2
    xs = [rng.normal(size=(n, dim)) + t for t in range(3)]
    splits = {"train": [np.arange(6)] * 3, "val": [np.array([6, 7])] * 3, "test": [np.array([8])] * 3}
    data = MultiTaskData.from_arrays(xs, ys, "classification", num_classes=3, splits=splits)
    attention = ClassAttention(data, torch.device("cpu"))

    def f(x: torch.Tensor, i: int, c: int) -> torch.Tensor:
        """softmax(x D_{i,c}ᵀ / √d) D_{i,c}; a task without class c offers all its samples."""
        train_i = data.splits["train"][i]
        keys = data.x[i][train_i]
        same = data.y[i][train_i] == c
        keys = keys[same] if same.any() else keys
        return torch.softmax(keys @ x / math.sqrt(dim), dim=0) @ keys

    fallbacks = 0
    for t in range(3):
        for pos, row in enumerate(data.splits["train"][t].tolist()):
            c = int(data.y[t][row])
            for i in range(3):
                fallbacks += not bool((data.y[i][data.splits["train"][i]] == c).any())
                torch.testing.assert_close(attention.attended[t, pos, i], f(data.x[t][row], i, c))
    assert fallbacks == 4  # the class-2 samples of tasks 0 and 1 against task 2: the fallback ran

    # a batch's rows are looked up by their position in the task's train split
    batch = train_batch(data, size=4)
    got = attention(batch.index)
    assert got.shape == (3, 4, 3, dim)
    for t in range(3):
        for b in range(4):
            torch.testing.assert_close(got[t, b], attention.attended[t, batch.index[t, b]])


def test_class_attention_on_regression_attends_over_every_training_sample():
    """Regression has no classes: each query attends over all of task i's training samples."""
    data = regression_mimo(num_tasks=2, n=20, dim=3)
    attention = ClassAttention(data, torch.device("cpu"))
    for t in range(2):
        for pos, row in enumerate(data.splits["train"][t].tolist()):
            for i in range(2):
                keys = data.x[i][data.splits["train"][i]]
                expected = torch.softmax(keys @ data.x[t][row] / math.sqrt(3), dim=0) @ keys
                torch.testing.assert_close(attention.attended[t, pos, i], expected)


# ----------------------------------------------------------------- relatedness on known clusters
@pytest.mark.parametrize("weights", ["learned", "gumbel_softmax"])
def test_alpha_puts_its_mass_on_tasks_of_the_same_cluster(weights):
    """8 tasks in 2 clusters of 4: a task's 3 same-cluster partners get most of α and of β.

    The default probabilistic z and the method's own KL weights (only the warm-up is off), with
    one optimiser for every parameter as in the paper (``mixture_lr_scale = 1``) at a larger lr;
    ``test_vmtl_relatedness.py`` checks the default's own learning rate for the logits.
    """
    data = datasets.load("synthetic-clusters")
    related = data.relatedness.astype(bool) & ~np.eye(data.num_tasks, dtype=bool)
    fit = pyromtl.fit(
        "vmtl",
        data,
        priors={"w": {"weights": weights}},
        steps=200,
        lr=0.02,
        mixture_lr_scale=1.0,
        device="cpu",
        **{**SMALL, "mc_z": 1, "mc_w": 1, "eval_every": 1000},
    )
    assert fit.config["priors"]["z"]["kind"] == "task_mixture"
    for name, weights_of in fit.relatedness().items():
        same = (weights_of * related).sum(1)
        other = (weights_of * ~related).sum(1)  # the diagonal is 0
        # uniform weights would give 3/7 ≈ 0.43 to the same cluster
        assert same.mean() > 0.8 > 0.2 > other.mean(), name
        assert (same > other).all(), name


# ------------------------------------------------------------------------------------ VMTL-AC
def test_vmtl_ac_classifier_is_one_network_of_the_class_mean_features():
    """q(w_tc) = g(mean of μ_φ(x) over task t's training samples of class c), g shared by all tasks.

    Checked without assuming g's form: task 1's class 0 holds the same two inputs as task 0's,
    each twice and in another order (same mean feature, different count and sum), its class 1
    an input of its own.
    """
    a, b, c, d, e = torch.randn(5, 3).numpy()
    xs = [np.stack([a, b, c, e, e]), np.stack([b, a, d, a, b, e, e])]
    ys = [np.array([0, 0, 1, 0, 1]), np.array([0, 0, 1, 0, 0, 0, 1])]
    splits = {
        "train": [np.arange(3), np.arange(5)],
        "val": [np.array([3]), np.array([5])],
        "test": [np.array([4]), np.array([6])],
    }
    data = MultiTaskData.from_arrays(xs, ys, "classification", splits=splits)
    model, guide, _ = build("vmtl-ac", data=data)
    ac = guide.w_post
    assert ac is model.w_post and ac.encoder is guide.encoder  # the guide's own inference network φ

    loc, scale = ac()
    assert loc.shape == scale.shape == (2, 1, 2, SMALL["latent_dim"])
    torch.testing.assert_close(loc[0, 0, 0], loc[1, 0, 0])  # same class-mean feature, same q
    torch.testing.assert_close(scale[0, 0, 0], scale[1, 0, 0])
    assert not torch.allclose(loc[0, 0, 1], loc[1, 0, 1], atol=1e-4)  # other features, other q
    # q(w) is trained through φ: its parameters get gradient from q(w) ...
    loc.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in guide.encoder.net[0].parameters())
    # ... and another φ gives another q(w)
    with torch.no_grad():
        for p in guide.encoder.parameters():
            p.add_(0.1 * torch.randn_like(p))
        assert not torch.allclose(ac()[0], loc.detach(), atol=1e-3)

    fit = pyromtl.fit("vmtl-ac", blobs_mimo(), steps=5, device="cpu", **SMALL)
    assert np.isfinite(fit.train_info["final_loss"])
    # the scales never fall below their floor: otherwise the mixture KL can explode
    with torch.no_grad():
        raw = fit.guide.w_post.net[-1].bias
        raw[raw.shape[0] // 2 :] = -50.0  # drive the softplus part of every scale to ~0
        assert fit.guide.w_post()[1].min() >= fit.config["ac_min_scale"]
    assert set(fit.relatedness()) == {"alpha", "beta"}


# ------------------------------------------------------------------------------------ regression
def test_vmtl_on_regression_mimo():
    data = regression_mimo(num_tasks=3)
    fit = pyromtl.fit("vmtl", data, steps=10, device="cpu", **SMALL)
    assert np.isfinite(fit.train_info["final_loss"])
    sp = fit.predict("test")
    for t in range(data.num_tasks):
        assert sp.pred[t].shape == (data.splits["test"][t].numel(),) and np.isfinite(sp.pred[t]).all()
    average = fit.evaluate()["average"]
    assert np.isfinite(average["nmse"]) and average["nmse"] > 0


@pytest.mark.parametrize("z_prior", ["deterministic", "normal", "task_mixture"])
def test_z_components_are_encoded_only_for_a_prior_that_reads_them(z_prior):
    """Table 1's deterministic z (and VSTL's N(0, I)) skip the attention and the components' encoder pass."""
    model, guide, _ = build(priors={"z": z_prior})
    calls = []
    attention = model.attention

    def counted(*args, **kwargs):
        calls.append(1)
        return attention(*args, **kwargs)

    model.attention = counted
    batch = train_batch(blobs_mimo())
    guide_tr, model_tr = traces(model, guide, batch)
    assert bool(calls) == (z_prior == "task_mixture")
    assert model_tr.nodes["z"]["fn"].batch_shape == guide_tr.nodes["z"]["fn"].batch_shape
