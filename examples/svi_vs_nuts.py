"""pyromtl's mean-field SVI next to NumPyro NUTS, in ArviZ, on a small multi-task regression.

    python examples/svi_vs_nuts.py                       # writes runs/svi_vs_nuts/
    python examples/svi_vs_nuts.py --out /tmp/cmp --steps 3000 --draws 4000

The problem (the one ``tests/test_nuts_reference.py`` checks): T = 3 tasks, each with its own
N = 8 samples of D = 2 fixed features (orthogonal columns), ``y_t ~ N(X_t w_t, σ² I)`` with
σ = 1 known, and two priors for ``w_t`` taken from pyromtl's prior registry:

* ``normal``: ``N(0, I)``. The posterior is Gaussian and independent across dims, so mean-field
  SVI can be exact, and SVI, NUTS and the closed form agree;
* ``task_mixture`` with ``weights = "uniform"`` and fixed Gaussian components
  ``N(m_i, s_i²)``: task t's prior is ``Σ_{i≠t} N(m_i, s_i²) / (T-1)``. SVI with the default
  ``kl = "upper_bound"`` (VMTL eq. 11) fits the posterior under the Gaussian ``∝ Π_c p_c^{α_c}``
  instead (the bound equals the KL to it up to a constant), which is pulled towards the
  weighted centre of all the other components; ``kl = "monte_carlo"`` estimates the exact KL
  and lands on NUTS.

pyromtl's side uses its own parts: ``PriorSite`` (the registry), ``MultiTaskOutput`` (the
likelihood), ``TaskMixture`` with its registered KL, and ``TraceMeanField_ELBO``. NumPyro's side
is the same model with ``MixtureSameFamily``. Outputs in ``--out``:

* ``summary.txt``: ``az.summary`` of every posterior, the closed forms, and PSIS-LOO of each;
* ``comparison.png``: per coefficient, the NUTS histogram, the SVI densities and the exact mean;
* ``nuts.nc``, ``svi.nc``, ``svi_monte_carlo.nc``: the ArviZ DataTrees (posterior,
  log_likelihood, observed_data).

About 30 s of CPU time (under a minute on 2 busy cores).
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np

T, N, D, SIGMA = 3, 8, 2, 1.0
M = np.array([[1.0, -1.0], [2.0, 0.0], [-1.0, 1.0]])  # component means (one per task)
S = np.array([[0.5, 0.5], [0.5, 0.5], [0.7, 0.7]])  # component sds
OTHERS = np.array([[i for i in range(T) if i != t] for t in range(T)])
TASKS = [f"task{t}" for t in range(T)]
COORDS = {"task": TASKS, "coef": [f"x{d}" for d in range(D)], "obs": list(range(N))}
DIMS = {
    "w_normal": ["task", "coef"],
    "w_mixture": ["task", "coef"],
    "y_normal": ["task", "obs"],
    "y_mixture": ["task", "obs"],
}


def make_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``x [T, N, D]`` with ``x_tᵀ x_t = N I`` and ``y [T, N]``."""
    rng = np.random.default_rng(seed)
    x = np.stack([np.linalg.qr(rng.normal(size=(N, D)))[0] * np.sqrt(N) for _ in range(T)])
    w_true = np.array([[1.5, -1.0], [1.2, -0.5], [-1.0, 1.0]])
    return x, np.einsum("tnd,td->tn", x, w_true) + SIGMA * rng.normal(size=(T, N))


# ------------------------------------------------------------------------------ closed forms
def exact_posteriors(x: np.ndarray, y: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Posterior mean and sd ``[T, D]`` under each prior, and what the upper bound fits."""
    w_ls = np.einsum("tnd,tn->td", x, y) / N

    def gaussian(m0, s0):
        precision = 1 / s0**2 + N / SIGMA**2
        mean = (m0 / s0**2 + N * w_ls / SIGMA**2) / precision
        return mean, np.broadcast_to(precision**-0.5, mean.shape)

    m, s = M[OTHERS], S[OTHERS]  # [T, T-1, D]
    precision = 1 / s**2 + N / SIGMA**2
    means = (m / s**2 + N * w_ls[:, None] / SIGMA**2) / precision
    var = s**2 + SIGMA**2 / N
    log_ev = (-0.5 * (w_ls[:, None] - m) ** 2 / var - 0.5 * np.log(2 * np.pi * var)).sum(-1)
    resp = np.exp(log_ev - log_ev.max(-1, keepdims=True))
    resp /= resp.sum(-1, keepdims=True)
    mix_mean = np.einsum("tc,tcd->td", resp, means)
    mix_sd = np.sqrt(np.einsum("tc,tcd->td", resp, 1 / precision + means**2) - mix_mean**2)
    g_precision = (1 / (T - 1) / s**2).sum(1)
    g_mean = (m / (T - 1) / s**2).sum(1) / g_precision
    return {
        "normal": gaussian(0.0, 1.0),
        "mixture": (mix_mean, mix_sd),
        "mixture, upper-bound target": gaussian(g_mean, g_precision**-0.5),
    }


# ------------------------------------------------------------------------------ pyromtl SVI
def fit_svi(x: np.ndarray, y: np.ndarray, spec: dict, steps: int, seed: int):
    """Mean-field SVI with pyromtl's prior, likelihood and ``TraceMeanField_ELBO``.

    Returns ``(loc, scale)`` of ``q(w) [T, D]`` and a function giving the per-observation
    log-likelihood ``[S, T, N]`` of draws ``w [S, T, D]``.
    """
    import pyro
    import pyro.distributions as dist
    import torch
    from pyro.infer import SVI, TraceMeanField_ELBO

    from pyromtl.data import MultiTaskData
    from pyromtl.likelihoods import MultiTaskOutput
    from pyromtl.priors import PriorSite

    info = MultiTaskData.from_arrays(list(x), list(y), "regression", TASKS, standardize=False).info
    xt, yt = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32)
    noise = torch.full((T,), SIGMA)
    # components shaped batch (T, 1) + (T components,) + event (1, D)
    components = (torch.as_tensor(M, dtype=torch.float32)[:, None], torch.as_tensor(S, dtype=torch.float32)[:, None])
    site = PriorSite("w", spec)

    def model():
        prior = site.build(batch_shape=(T, 1), event_shape=(1, D), num_tasks=T, components=components)
        with pyro.plate("tasks", T, dim=-2):
            w = pyro.sample("w", prior)  # [..., T, 1, 1, D], the layout of pyromtl's models
            outputs = torch.einsum("tnd,...tkd->...tnk", xt, w.squeeze(-3))
            with pyro.plate("data", N, dim=-1):
                pyro.sample("y", MultiTaskOutput(outputs, info, noise), obs=yt)

    def guide():
        loc = pyro.param("loc", torch.zeros(T, 1, 1, D))
        scale = pyro.param("scale", torch.full((T, 1, 1, D), 0.3), constraint=dist.constraints.positive)
        with pyro.plate("tasks", T, dim=-2):
            pyro.sample("w", dist.Normal(loc, scale).to_event(2))

    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    elbo = TraceMeanField_ELBO(num_particles=8, vectorize_particles=True, max_plate_nesting=2)
    svi = SVI(model, guide, pyro.optim.ClippedAdam({"lr": 0.05, "lrd": 0.02 ** (1 / steps)}), elbo)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is fastest
    try:
        for _ in range(steps):
            svi.step()
    finally:
        torch.set_num_threads(threads)
    loc = pyro.param("loc").detach().numpy().reshape(T, D)
    scale = pyro.param("scale").detach().numpy().reshape(T, D)

    def log_likelihood(w: np.ndarray) -> np.ndarray:
        outputs = torch.einsum("tnd,std->stn", xt, torch.as_tensor(w, dtype=torch.float32))[..., None]
        return MultiTaskOutput(outputs, info, noise).log_prob(yt).numpy()

    return loc, scale, log_likelihood


def svi_tree(fits: dict[str, tuple], x: np.ndarray, y: np.ndarray, draws: int, seed: int):
    """A DataTree of guide draws ``(chain=1, draw)`` with log_likelihood and observed_data."""
    import arviz as az

    rng = np.random.default_rng(seed)
    posterior, log_lik, observed = {}, {}, {}
    for name, (loc, scale, loglik_fn) in fits.items():
        w = loc + scale * rng.standard_normal((draws, T, D))
        posterior[f"w_{name}"] = w[None]
        log_lik[f"y_{name}"] = loglik_fn(w)[None]
        observed[f"y_{name}"] = y
    return az.from_dict(
        {"posterior": posterior, "log_likelihood": log_lik, "observed_data": observed}, dims=DIMS, coords=COORDS
    )


# ------------------------------------------------------------------------------ NumPyro NUTS
def run_nuts(x: np.ndarray, y: np.ndarray, draws: int, seed: int):
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as nd
    from numpyro.infer import MCMC, NUTS

    numpyro.set_platform("cpu")

    def model(x, y):
        components = nd.Normal(jnp.asarray(M[OTHERS]), jnp.asarray(S[OTHERS])).to_event(1)  # batch [T, T-1]
        mixture = nd.MixtureSameFamily(nd.Categorical(probs=jnp.full((T, T - 1), 1 / (T - 1))), components)
        with numpyro.plate("tasks", T, dim=-1):
            w_normal = numpyro.sample("w_normal", nd.Normal(0.0, 1.0).expand([D]).to_event(1))
            w_mixture = numpyro.sample("w_mixture", mixture)
        with numpyro.plate("tasks_", T, dim=-2), numpyro.plate("obs", N, dim=-1):
            numpyro.sample("y_normal", nd.Normal(jnp.einsum("tnd,td->tn", x, w_normal), SIGMA), obs=y)
            numpyro.sample("y_mixture", nd.Normal(jnp.einsum("tnd,td->tn", x, w_mixture), SIGMA), obs=y)

    mcmc = MCMC(
        NUTS(model),
        num_warmup=1000,
        num_samples=draws // 2,
        num_chains=2,
        chain_method="vectorized",
        progress_bar=False,
    )
    mcmc.run(jax.random.PRNGKey(seed), jnp.asarray(x), jnp.asarray(y))
    return mcmc


# ------------------------------------------------------------------------------ output
def plot(trees: dict, exact: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("w_normal", "normal"), ("w_mixture", "mixture")]
    fig, axes = plt.subplots(len(rows), T * D, figsize=(3 * T * D, 3.2 * len(rows)), squeeze=False)
    styles = {"SVI": ("tab:orange", "-"), "SVI (kl=monte_carlo)": ("tab:green", "--")}
    for r, (var, key) in enumerate(rows):
        for t in range(T):
            for d in range(D):
                ax = axes[r, t * D + d]
                nuts = trees["NUTS"].posterior[var].values[..., t, d].ravel()
                ax.hist(nuts, bins=60, density=True, color="tab:blue", alpha=0.35, label="NUTS (NumPyro)")
                grid = np.linspace(nuts.min() - 0.5, nuts.max() + 0.5, 300)
                for name, (color, ls) in styles.items():
                    if var not in trees[name].posterior:
                        continue
                    w = trees[name].posterior[var].values[..., t, d].ravel()
                    mu, sd = w.mean(), w.std()
                    ax.plot(
                        grid,
                        np.exp(-0.5 * ((grid - mu) / sd) ** 2) / (sd * np.sqrt(2 * np.pi)),
                        color=color,
                        ls=ls,
                        label=name,
                    )
                ax.axvline(exact[key][0][t, d], color="k", lw=1, label="exact posterior mean")
                ax.set_title(f"{var}[{TASKS[t]}, x{d}]", fontsize=9)
                ax.set_yticks([])
    axes[0, 0].set_ylabel("prior: normal")
    axes[1, 0].set_ylabel("prior: task_mixture")
    handles, labels = axes[1, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/svi_vs_nuts"), help="output folder")
    parser.add_argument("--steps", type=int, default=1500, help="SVI steps")
    parser.add_argument("--draws", type=int, default=4000, help="posterior draws of each method")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import arviz as az

    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    x, y = make_data()
    exact = exact_posteriors(x, y)

    normal = fit_svi(x, y, {"kind": "normal", "loc": 0.0, "scale": 1.0}, args.steps, args.seed)
    bound = fit_svi(x, y, {"kind": "task_mixture", "weights": "uniform", "kl": "upper_bound"}, args.steps, args.seed)
    mc = fit_svi(x, y, {"kind": "task_mixture", "weights": "uniform", "kl": "monte_carlo"}, args.steps, args.seed)
    svi_seconds = time.perf_counter() - start

    mcmc = run_nuts(x, y, args.draws, args.seed)
    trees = {
        "NUTS": az.from_numpyro(mcmc, log_likelihood=True, dims=DIMS, coords=COORDS),
        "SVI": svi_tree({"normal": normal, "mixture": bound}, x, y, args.draws, args.seed),
        "SVI (kl=monte_carlo)": svi_tree({"mixture": mc}, x, y, args.draws, args.seed + 1),
    }

    lines = [f"SVI: 3 fits x {args.steps} steps in {svi_seconds:.1f} s; NUTS: 2 chains x {args.draws // 2} draws", ""]
    headings = {
        "NUTS": "NUTS (NumPyro)",
        "SVI": "SVI (normal prior; task_mixture with the default kl=upper_bound)",
        "SVI (kl=monte_carlo)": "SVI (task_mixture with kl=monte_carlo)",
    }
    for name, tree in trees.items():
        # ESS and R-hat mean something for the Markov chains only; SVI draws are independent.
        summary = az.summary(tree, kind="all" if name == "NUTS" else "stats", round_to=3)
        lines += [f"== {headings[name]}", summary.to_string(), ""]
    lines.append("== exact posteriors (mean / sd)")
    lines.append(f"{'':14}" + "".join(f"{name:>30}" for name in exact))
    for t in range(T):
        for d in range(D):
            cells = "".join(f"{f'{mean[t, d]:.3f} / {sd[t, d]:.3f}':>30}" for mean, sd in exact.values())
            lines.append(f"w[{TASKS[t]}, x{d}]".ljust(14) + cells)
    lines += [
        "",
        "== PSIS-LOO of y_mixture (SVI draws give an approximate LOO; 8 points per task, so some"
        " observations are influential: k-hat > 0.7 means that point's estimate is unreliable)",
    ]
    for name, tree in trees.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the k-hat warning; reported below instead
            loo = az.loo(tree, var_name="y_mixture", pointwise=True)
        k = np.asarray(loo.pareto_k)
        lines.append(
            f"{name:>22}: elpd_loo = {loo.elpd:.2f} ± {loo.se:.2f}, max k-hat {k.max():.2f}, "
            f"{int((k > 0.7).sum())} of {k.size} above 0.7"
        )
    report = "\n".join(lines)
    print(report)
    (args.out / "summary.txt").write_text(report + "\n")

    for name, file in (("NUTS", "nuts.nc"), ("SVI", "svi.nc"), ("SVI (kl=monte_carlo)", "svi_monte_carlo.nc")):
        trees[name].to_netcdf(args.out / file, engine="h5netcdf")
    plot(trees, exact, args.out / "comparison.png")
    print(f"\nwrote {args.out}/summary.txt, comparison.png and the DataTrees in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
