import tomllib

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import TraceMeanField_ELBO
from torch.distributions import kl_divergence

from pyromtl import priors
from pyromtl.distributions import TaskMixture
from pyromtl.models.vmtl import expected_weights
from pyromtl.priors import PriorContext, PriorSite, PriorSpec, available, build, describe, parse_spec, register
from pyromtl.schedules import TrainState

T, B, K, D = 4, 5, 3, 2


@pytest.fixture(autouse=True)
def _validation():
    pyro.enable_validation(True)
    pyro.set_rng_seed(0)
    yield


@pytest.fixture
def scratch_kinds():
    """Kinds registered by a test are removed afterwards."""
    before = set(priors.registry._REGISTRY)
    yield
    for kind in set(priors.registry._REGISTRY) - before:
        del priors.registry._REGISTRY[kind]


def w_components(requires_grad=False):
    """Task posteriors of w, [T, 1, K, D] as a model holds them, as components [T, K, D]
    (broadcast to [T, 1, T, K, D])."""
    loc = torch.randn(T, 1, K, D, requires_grad=requires_grad)
    scale = (torch.rand(T, 1, K, D) + 0.2).requires_grad_(requires_grad)
    return loc, scale


def build_w(site: PriorSite, components, step=0):
    loc, scale = components
    return site.build(
        batch_shape=(T, 1),
        event_shape=(K, D),
        num_tasks=T,
        state=TrainState(step=step),
        components=(loc.detach().squeeze(1), scale.detach().squeeze(1)),
        task_axis=-2,
    )


def traced_weights(site: PriorSite, components, step=0):
    tr = poutine.trace(lambda: build_w(site, components, step)).get_trace()
    return tr.nodes["w_weights"]["value"], tr


# ---------------------------------------------------------------------------------- specs


def test_spec_forms_parse_equal():
    table = tomllib.loads(
        """
        [priors.w]
        kind = "task_mixture"
        weights = "gumbel_softmax"
        temperature = { start = 5.0, end = 0.5, rate = 1e-3 }
        """
    )["priors"]["w"]
    as_dict = {"kind": "task_mixture", "temperature": {"start": 5, "end": 0.5, "rate": 0.001}}
    as_spec = PriorSpec("task_mixture", {"temperature": {"start": 5.0, "end": 0.5, "rate": 1e-3}, "kl": "upper_bound"})
    parsed = [parse_spec(x) for x in (table, as_dict, as_spec)]
    assert parsed[0] == parsed[1] == parsed[2]
    assert parsed[0].params == {
        "weights": "gumbel_softmax",
        "temperature": {"start": 5.0, "end": 0.5, "rate": 1e-3},
        "kl": "upper_bound",
    }
    assert parse_spec(parsed[0].to_dict()) == parsed[0]
    assert (
        parse_spec("normal")
        == parse_spec({"kind": "normal", "loc": 0, "scale": 1})
        == PriorSpec("normal", {"loc": 0.0, "scale": 1.0})
    )


def test_registry_lists_and_describes_builtins():
    assert {"normal", "learned_normal", "task_mixture", "deterministic"} <= set(available())
    assert describe("task_mixture") == {"weights": "gumbel_softmax", "temperature": 1.0, "kl": "upper_bound"}
    assert describe("learned_normal")["learn_loc"] is True


@pytest.mark.parametrize(
    "obj, fragments",
    [
        ("laplace", ["'laplace'", "task_mixture"]),
        ({"weights": "uniform"}, ["no 'kind'"]),
        ({"kind": "normal", "sigma": 1.0}, ["'sigma'", "'loc'", "'scale'"]),
        ({"kind": "normal", "scale": -1.0}, ["'scale'", "positive"]),
        ({"kind": "normal", "loc": "zero"}, ["'loc'", "number"]),
        ({"kind": "learned_normal", "learn_loc": "yes"}, ["'learn_loc'", "true or false"]),
        ({"kind": "task_mixture", "weights": "mean"}, ["'weights'", "gumbel_softmax", "uniform", "learned"]),
        ({"kind": "task_mixture", "temperature": {"start": 1.0, "stop": 0.1}}, ["'temperature'", "'stop'"]),
        ({"kind": "task_mixture", "temperature": {"start": 1.0, "end": 0.0, "rate": 1.0}}, ["'temperature'", "> 0"]),
        ({"kind": "task_mixture", "kl": "exact"}, ["'kl'", "monte_carlo"]),
        (3.0, ["kind name"]),
    ],
)
def test_bad_specs_name_the_problem(obj, fragments):
    with pytest.raises(ValueError) as err:
        parse_spec(obj)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_register_a_new_kind(scratch_kinds):
    @register("test_laplace", defaults={"scale": 1.0})
    def laplace(spec, ctx):
        base = dist.Laplace(ctx.full((), 0.0), ctx.full((), spec.params["scale"]))
        return base.expand(ctx.batch_shape + ctx.event_shape).to_event(len(ctx.event_shape))

    assert "test_laplace" in available()
    ctx = PriorContext("z", (T, B), (D,), T)
    prior = build({"kind": "test_laplace", "scale": 2}, ctx)
    assert isinstance(prior.base_dist, dist.Laplace) and bool((prior.base_dist.scale == 2.0).all())
    assert prior.batch_shape == (T, B) and prior.event_shape == (D,)
    site = PriorSite("z", "test_laplace")
    assert site.build(batch_shape=(T, B), event_shape=(D,), num_tasks=T).batch_shape == (T, B)

    with pytest.raises(ValueError, match="already registered"):
        register("test_laplace")(laplace)
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['loc'\].*\['scale'\]"):
        parse_spec({"kind": "test_laplace", "loc": 0.0})
    register("test_laplace", defaults={"scale": 1.0, "loc": 0.0}, replace=True)(laplace)
    assert parse_spec({"kind": "test_laplace", "loc": 1}).params == {"scale": 1.0, "loc": 1.0}


def test_build_checks_shapes(scratch_kinds):
    @register("test_wrong_shape")
    def wrong(spec, ctx):
        return dist.Normal(ctx.full(ctx.event_shape, 0.0), 1.0).to_event(len(ctx.event_shape))

    with pytest.raises(ValueError, match=r"built batch_shape \(\).*needs \(4, 5\)"):
        build("test_wrong_shape", PriorContext("z", (T, B), (D,), T))


def test_normal_and_deterministic_priors():
    ctx = PriorContext("z", (T, B), (D,), T)
    value = torch.randn(T, B, D)
    torch.testing.assert_close(build("normal", ctx).log_prob(value), dist.Normal(0.0, 1.0).log_prob(value).sum(-1))
    flat = build("deterministic", ctx)
    assert flat.batch_shape == (T, B) and flat.event_shape == (D,)
    assert torch.equal(flat.log_prob(value), torch.zeros(T, B))


# ------------------------------------------------------------------------ learned normal


def test_learned_normal_parameters_are_owned_and_persist():
    site = PriorSite("w", {"kind": "learned_normal", "loc": 0.5, "scale": 2.0})
    assert list(site.parameters()) == []  # lazy
    prior = site.build(batch_shape=(T, 1), event_shape=(K, D), num_tasks=T)
    assert prior.batch_shape == (T, 1) and prior.event_shape == (K, D)
    names = dict(site.named_parameters())
    assert set(names) == {"params.loc", "params.scale"} and names["params.loc"].shape == (K, D)
    torch.testing.assert_close(prior.stddev, torch.full((T, 1, K, D), 2.0))
    torch.testing.assert_close(prior.mean, torch.full((T, 1, K, D), 0.5))
    prior.log_prob(torch.randn(T, 1, K, D)).sum().backward()
    assert names["params.loc"].grad is not None and names["params.scale"].grad is not None

    with torch.no_grad():
        site.params["loc"].add_(1.0)
    fresh = PriorSite("w", {"kind": "learned_normal", "loc": 0.5, "scale": 2.0})
    fresh.load_state_dict(site.state_dict())  # strict, before any build
    again = fresh.build(batch_shape=(T, 1), event_shape=(K, D), num_tasks=T)
    torch.testing.assert_close(again.mean, torch.full((T, 1, K, D), 1.5))


def test_learned_normal_frozen_mean_and_per_task():
    site = PriorSite("z", {"kind": "learned_normal", "learn_loc": False, "per_task": True})
    prior = site.build(batch_shape=(T, B), event_shape=(D,), num_tasks=T, task_axis=0)
    assert set(dict(site.named_parameters())) == {"params.scale"}
    assert site.params["scale"].shape == (T, 1, D)
    assert torch.equal(prior.mean, torch.zeros(T, B, D))


# -------------------------------------------------------------------------- task mixture


@pytest.mark.parametrize("weights", ["gumbel_softmax", "learned", "uniform"])
def test_mixture_weights_exclude_self_and_sum_to_one(weights):
    site = PriorSite("w", {"kind": "task_mixture", "weights": weights})
    alpha, tr = traced_weights(site, w_components())
    assert alpha.shape == (T, T)
    assert torch.equal(alpha.diagonal(), torch.zeros(T))
    torch.testing.assert_close(alpha.sum(-1), torch.ones(T))
    assert (alpha >= 0).all()
    if weights == "uniform":
        assert torch.equal(alpha, (1 - torch.eye(T)) / (T - 1))
        assert list(site.parameters()) == []
    else:
        assert dict(site.named_parameters())["params.logits"].shape == (T, T - 1)
    # each task row of the prior mixes with its own row of alpha
    prior = tr.nodes["_RETURN"]["value"]
    assert type(prior) is TaskMixture and prior.batch_shape == (T, 1) and prior.event_shape == (K, D)
    torch.testing.assert_close(prior.weights[:, 0], alpha)
    torch.testing.assert_close(expected_weights(site).diagonal(), torch.zeros(T))


def test_gumbel_weights_are_random_learned_are_not():
    comps = w_components()
    gumbel = PriorSite("w", {"kind": "task_mixture", "weights": "gumbel_softmax"})
    learned = PriorSite("w", {"kind": "task_mixture", "weights": "learned"})
    assert not torch.equal(traced_weights(gumbel, comps)[0], traced_weights(gumbel, comps)[0])
    assert torch.equal(traced_weights(learned, comps)[0], traced_weights(learned, comps)[0])
    with torch.no_grad():
        learned.params["logits"].copy_(torch.randn(T, T - 1))
    alpha = traced_weights(learned, comps)[0]
    torch.testing.assert_close(alpha, expected_weights(learned))
    others = ~torch.eye(T, dtype=torch.bool)
    torch.testing.assert_close(alpha[others].reshape(T, T - 1), torch.softmax(learned.params["logits"], -1))


def test_temperature_schedule_is_applied():
    # hot at step 0 (τ = 100: near uniform), cold late (τ floor 0.02: near one-hot)
    site = PriorSite("w", {"kind": "task_mixture", "temperature": {"start": 100.0, "end": 0.02, "rate": 1.0}})
    comps = w_components()
    hot = torch.stack([traced_weights(site, comps, step=0)[0].max(-1).values for _ in range(20)])
    cold = torch.stack([traced_weights(site, comps, step=100)[0].max(-1).values for _ in range(20)])
    assert hot.mean() < 0.5 < 0.9 < cold.mean()


def test_z_prior_broadcasts_weights_along_the_task_axis():
    site = PriorSite("z", {"kind": "task_mixture", "weights": "learned"})
    with torch.no_grad():
        site.param("logits", torch.randn(T, T - 1))
    loc, scale = torch.randn(T, B, T, D), torch.rand(T, B, T, D) + 0.1
    prior = site.build(batch_shape=(T, B), event_shape=(D,), num_tasks=T, components=(loc, scale), task_axis=-2)
    assert prior.batch_shape == (T, B) and prior.event_shape == (D,)
    alpha = expected_weights(site)
    for b in range(B):
        torch.testing.assert_close(prior.weights[:, b], alpha)
    # the mixture uses the per-sample components q(z | f(x_tn, D_i))
    assert torch.equal(prior.loc, loc)


def test_z_prior_with_named_components_gathers_their_weights():
    """``component_tasks`` names each component's task: its weight is that column of β, over
    ``component_inclusion`` (Horvitz–Thompson) when the components are a random subset."""
    site = PriorSite("z", {"kind": "task_mixture", "weights": "learned"})
    with torch.no_grad():
        site.param("logits", torch.randn(T, T - 1))
    beta = expected_weights(site, T)
    C = 2
    tasks = torch.stack([torch.randperm(T - 1)[:C] for _ in range(T * B)]).reshape(T, B, C)
    tasks = tasks + (tasks >= torch.arange(T)[:, None, None]).long()  # other tasks only
    loc, scale = torch.randn(T, B, C, D), torch.rand(T, B, C, D) + 0.1
    kwargs = dict(batch_shape=(T, B), event_shape=(D,), num_tasks=T, components=(loc, scale), task_axis=-2)
    inclusion = C / (T - 1)
    prior = site.build(**kwargs, extras={"component_tasks": tasks, "component_inclusion": inclusion})
    assert prior.sampled and prior.batch_shape == (T, B) and prior.num_components == C
    for t, b, c in [(0, 0, 0), (1, 3, 1), (3, 4, 0)]:
        torch.testing.assert_close(prior.weights[t, b, c], beta[t, tasks[t, b, c]] / inclusion)
    # every other task named, in any order, probability 1: the exact mixture, weights on the simplex
    everyone = priors.other_tasks(T).flip(-1)[:, None, :]
    exact = site.build(
        **{**kwargs, "components": (torch.randn(T, B, T - 1, D), torch.ones(T, B, T - 1, D))},
        extras={"component_tasks": everyone},
    )
    assert not exact.sampled
    torch.testing.assert_close(exact.weights.sum(-1), torch.ones(T, B))
    torch.testing.assert_close(exact.weights[:, 0], beta.gather(-1, everyone[:, 0]))
    # errors: a subset for the exact KL, an impossible inclusion, a component count that does not match
    mc = PriorSite("z", {"kind": "task_mixture", "kl": "monte_carlo"})
    with pytest.raises(ValueError, match=r"monte_carlo.*needs every component"):
        mc.build(**kwargs, extras={"component_tasks": tasks, "component_inclusion": inclusion})
    with pytest.raises(ValueError, match=r"component_inclusion must be in \(0, 1\]"):
        site.build(**kwargs, extras={"component_tasks": tasks, "component_inclusion": 0.0})
    with pytest.raises(ValueError, match=r"components must be shaped batch_shape \+ \(3,\)"):
        site.build(**kwargs, extras={"component_tasks": everyone})


def test_task_mixture_errors():
    site = PriorSite("w", "task_mixture")
    with pytest.raises(ValueError, match="at least 2 tasks"):
        site.build(
            batch_shape=(1, 1), event_shape=(K, D), num_tasks=1, components=(torch.zeros(1, K, D), torch.ones(1, K, D))
        )
    with pytest.raises(ValueError, match="needs the other tasks' posteriors"):
        site.build(batch_shape=(T, 1), event_shape=(K, D), num_tasks=T)
    with pytest.raises(ValueError, match=r"components must be shaped"):
        site.build(
            batch_shape=(T, 1),
            event_shape=(K, D),
            num_tasks=T,
            components=(torch.zeros(T - 1, K, D), torch.ones(T - 1, K, D)),
        )
    with pytest.raises(ValueError, match="task_axis"):
        site.build(batch_shape=(1, B), event_shape=(D,), num_tasks=T, components=(torch.zeros(T, D), torch.ones(T, D)))
    with pytest.raises(ValueError, match="build the prior once"):
        expected_weights(PriorSite("w", "task_mixture"), num_tasks=T)
    with pytest.raises(ValueError, match="not 'task_mixture'"):
        expected_weights(PriorSite("w", "normal"))


@pytest.mark.parametrize("weights", ["gumbel_softmax", "learned"])
def test_gradients_reach_pi_but_not_detached_components(weights):
    """Under TraceMeanField_ELBO the prior's KL trains π, never the other tasks' posteriors."""
    source = w_components(requires_grad=True)  # the tasks' q(w) parameters (shared with the guide in a model)
    guide_loc = torch.randn(T, 1, K, D, requires_grad=True)
    site = PriorSite("w", {"kind": "task_mixture", "weights": weights, "temperature": 0.5})

    def model():
        with pyro.plate("task", T, dim=-2):
            pyro.sample("w", build_w(site, source))

    def guide():
        with pyro.plate("task", T, dim=-2):
            pyro.sample("w", dist.Normal(guide_loc, 0.3).to_event(2))

    with pyro.settings.context(module_local_params=True):
        loss = TraceMeanField_ELBO().differentiable_loss(model, guide)
    loss.backward()
    assert source[0].grad is None and source[1].grad is None
    pi = site.params["logits"]
    assert pi.grad is not None and pi.grad.abs().sum() > 0
    assert guide_loc.grad.abs().sum() > 0


def test_elbo_with_prior_site_uses_the_bound():
    """The loss of a task_mixture prior in a model equals the analytic bound of eq. 11, same every seed."""
    comps = w_components()
    q_loc, q_scale = torch.randn(T, 1, K, D), torch.rand(T, 1, K, D) + 0.2
    site = PriorSite("w", {"kind": "task_mixture", "weights": "learned"})

    def model():
        with pyro.plate("task", T, dim=-2):
            pyro.sample("w", build_w(site, comps))

    def guide():
        with pyro.plate("task", T, dim=-2):
            pyro.sample("w", dist.Normal(q_loc, q_scale).to_event(2))

    losses = []
    for seed in range(3):
        pyro.set_rng_seed(seed)
        losses.append(TraceMeanField_ELBO().differentiable_loss(model, guide))
    q = dist.Normal(q_loc, q_scale).to_event(2)
    alpha = expected_weights(site)
    expected = sum(
        alpha[:, i] * kl_divergence(q, dist.Normal(comps[0][i], comps[1][i]).to_event(2)).squeeze(-1) for i in range(T)
    ).sum()
    for loss in losses:
        torch.testing.assert_close(loss, expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_priors_on_cuda():
    device = torch.device("cuda")
    loc, scale = torch.randn(T, K, D, device=device), torch.rand(T, K, D, device=device) + 0.1
    for spec in ("task_mixture", {"kind": "task_mixture", "weights": "uniform"}):
        prior = PriorSite("w", spec).build(batch_shape=(T, 1), event_shape=(K, D), num_tasks=T, components=(loc, scale))
        assert prior.weights.device.type == "cuda"
        q = dist.Normal(torch.zeros(T, 1, K, D, device=device), 1.0).to_event(2)
        assert kl_divergence(q, prior).device.type == "cuda"
    for spec in ("normal", "learned_normal"):
        site = PriorSite("z", spec, device=device)
        prior = site.build(batch_shape=(T, B), event_shape=(D,), num_tasks=T)
        assert prior.log_prob(torch.zeros(T, B, D, device=device)).device.type == "cuda"
    moved = PriorSite("z", "learned_normal").to(device)
    moved.build(batch_shape=(T, B), event_shape=(D,), num_tasks=T)
    assert all(p.device.type == "cuda" for p in moved.parameters())
