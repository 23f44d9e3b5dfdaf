"""Write the local intersphinx inventories in this folder; run it as
``.venv/bin/python docs/_intersphinx/build.py``.

CI builds the docs without network, so intersphinx cannot fetch each project's
``objects.inv``. These files list only the outside objects our docstrings, type hints and pages
refer to, each with its address on the project's real site (the base URL is in
``docs/conf.py``'s ``intersphinx_mapping``). Where our type hints carry an object's defining
module (``torch.nn.modules.module.Module``), that name is listed too, as an alias of the
public one. Add an entry here when the docs build reports an outside reference it cannot find.
"""

from __future__ import annotations

import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent

# project -> [(name, domain:role, page#anchor or page ("$": the name), aliases)]
Entry = tuple[str, str, str, tuple[str, ...]]

_PY = "library/"
PYTHON: list[Entry] = [
    *[
        (f"collections.abc.{n}", "py:class", f"{_PY}collections.abc.html#$", ())
        for n in ("Callable", "Mapping", "MutableMapping", "Sequence", "Iterable", "Iterator", "Hashable")
    ],
    ("pathlib.Path", "py:class", f"{_PY}pathlib.html#$", ()),
    ("argparse.ArgumentParser", "py:class", f"{_PY}argparse.html#$", ()),
    ("argparse.Namespace", "py:class", f"{_PY}argparse.html#$", ()),
    ("typing.Any", "py:data", f"{_PY}typing.html#$", ()),
    ("typing.Protocol", "py:class", f"{_PY}typing.html#$", ()),
    ("dataclasses.dataclass", "py:function", f"{_PY}dataclasses.html#$", ()),
    ("concurrent.futures.ProcessPoolExecutor", "py:class", f"{_PY}concurrent.futures.html#$", ()),
    ("os.PathLike", "py:class", f"{_PY}os.html#$", ()),
    ("tomllib", "py:module", f"{_PY}tomllib.html#module-tomllib", ()),
    ("functools.partial", "py:function", f"{_PY}functools.html#$", ()),
    ("None", "py:data", f"{_PY}constants.html#$", ()),
    *[
        (n, "py:class", f"{_PY}functions.html#{n}", ())
        for n in ("int", "float", "str", "bool", "bytes", "dict", "list", "tuple", "set", "frozenset", "object", "type")
    ],
    *[
        (n, "py:exception", f"{_PY}exceptions.html#$", ())
        for n in (
            "ValueError",
            "TypeError",
            "RuntimeError",
            "KeyError",
            "FileNotFoundError",
            "FileExistsError",
            "OSError",
            "KeyboardInterrupt",
            "NotImplementedError",
        )
    ],
    ("UserWarning", "py:exception", f"{_PY}exceptions.html#$", ()),
]

NUMPY: list[Entry] = [
    ("numpy.ndarray", "py:class", "reference/generated/numpy.ndarray.html#$", ()),
    ("numpy.typing.ArrayLike", "py:class", "reference/typing.html#$", ("numpy._typing._array_like.ArrayLike",)),
    ("numpy.random.Generator", "py:class", "reference/random/generator.html#$", ()),
    ("numpy.float64", "py:class", "reference/arrays.scalars.html#$", ()),
]

_G = "generated/"
TORCH: list[Entry] = [
    ("torch.Tensor", "py:class", "tensors.html#$", ()),
    ("torch.Tensor.backward", "py:method", f"{_G}torch.Tensor.backward.html#$", ()),
    ("torch.Size", "py:class", "size.html#$", ()),
    ("torch.device", "py:class", "tensor_attributes.html#$", ()),
    ("torch.dtype", "py:class", "tensor_attributes.html#$", ()),
    ("torch.Generator", "py:class", f"{_G}torch.Generator.html#$", ("torch._C.Generator",)),
    ("torch.nn.Module", "py:class", f"{_G}torch.nn.Module.html#$", ("torch.nn.modules.module.Module",)),
    ("torch.nn.Module.state_dict", "py:method", f"{_G}torch.nn.Module.html#$", ()),
    ("torch.nn.Module.load_state_dict", "py:method", f"{_G}torch.nn.Module.html#$", ()),
    ("torch.nn.Module.forward", "py:method", f"{_G}torch.nn.Module.html#$", ()),
    ("torch.nn.Module.get_extra_state", "py:method", f"{_G}torch.nn.Module.html#$", ()),
    ("torch.nn.Module.set_extra_state", "py:method", f"{_G}torch.nn.Module.html#$", ()),
    (
        "torch.nn.Parameter",
        "py:class",
        f"{_G}torch.nn.parameter.Parameter.html#torch.nn.parameter.Parameter",
        ("torch.nn.parameter.Parameter",),
    ),
    ("torch.nn.Sequential", "py:class", f"{_G}torch.nn.Sequential.html#$", ("torch.nn.modules.container.Sequential",)),
    ("torch.optim.Optimizer", "py:class", "optim.html#torch.optim.Optimizer", ("torch.optim.optimizer.Optimizer",)),
    (
        "torch.distributions.distribution.Distribution",
        "py:class",
        "distributions.html#$",
        ("torch.distributions.Distribution",),
    ),
    (
        "torch.distributions.distribution.Distribution.expand",
        "py:method",
        "distributions.html#$",
        ("torch.distributions.Distribution.expand",),
    ),
    ("torch.distributions.constraints.Constraint", "py:class", "distributions.html#$", ()),
    ("torch.distributions.kl.register_kl", "py:function", "distributions.html#$", ()),
    ("torch.distributions.kl.kl_divergence", "py:function", "distributions.html#$", ()),
    ("torch.compile", "py:function", f"{_G}torch.compile.html#$", ()),
]

PYRO: list[Entry] = [
    ("pyro.infer.elbo.ELBO", "py:class", "inference_algos.html#$", ("pyro.infer.ELBO",)),
    (
        "pyro.infer.trace_mean_field_elbo.TraceMeanField_ELBO",
        "py:class",
        "inference_algos.html#$",
        ("pyro.infer.TraceMeanField_ELBO",),
    ),
    ("pyro.infer.trace_elbo.Trace_ELBO", "py:class", "inference_algos.html#$", ("pyro.infer.Trace_ELBO",)),
    ("pyro.infer.svi.SVI", "py:class", "inference_algos.html#$", ("pyro.infer.SVI",)),
    ("pyro.infer.predictive.Predictive", "py:class", "inference_algos.html#$", ("pyro.infer.Predictive",)),
    ("pyro.distributions.torch_distribution.TorchDistributionMixin", "py:class", "distributions.html#$", ()),
    (
        "pyro.distributions.TorchDistribution",
        "py:class",
        "distributions.html#$",
        ("pyro.distributions.torch_distribution.TorchDistribution",),
    ),
    ("pyro.distributions.RelaxedBernoulliStraightThrough", "py:class", "distributions.html#$", ()),
    ("pyro.nn.module.PyroModule", "py:class", "nn.html#$", ("pyro.nn.PyroModule",)),
    ("pyro.nn.module.PyroParam", "py:class", "nn.html#$", ("pyro.nn.PyroParam",)),
    ("pyro.primitives.deterministic", "py:function", "primitives.html#$", ("pyro.deterministic",)),
    ("pyro.primitives.sample", "py:function", "primitives.html#$", ("pyro.sample",)),
    ("pyro.primitives.plate", "py:class", "primitives.html#$", ("pyro.plate",)),
    ("pyro.optim.clipped_adam.ClippedAdam", "py:class", "optimization.html#$", ()),
]

# ArviZ >= 1.0 documents its parts (arviz-base, arviz-stats, arviz-plots) as sub-projects of
# python.arviz.org; the base URL in conf.py is the site's root.
_PLOTS = "projects/plots/en/latest/api/generated/"
_STATS = "projects/stats/en/latest/api/generated/"
_BASE = "projects/base/en/latest/api/generated/"
ARVIZ: list[Entry] = [
    *[
        (f"arviz.{n}", "py:function", f"{_PLOTS}arviz_plots.{n}.html#arviz_plots.{n}", (f"arviz_plots.{n}",))
        for n in ("plot_forest", "plot_dist", "plot_trace", "plot_pair", "plot_compare", "plot_ppc_dist")
    ],
    *[
        (f"arviz.{n}", "py:function", f"{_STATS}arviz_stats.{n}.html#arviz_stats.{n}", (f"arviz_stats.{n}",))
        for n in ("summary", "loo", "compare")
    ],
    *[
        (f"arviz.{n}", "py:function", f"{_BASE}arviz_base.{n}.html#arviz_base.{n}", (f"arviz_base.{n}",))
        for n in ("from_dict", "from_numpyro")
    ],
]

XARRAY: list[Entry] = [
    ("xarray.DataTree", "py:class", "generated/xarray.DataTree.html#$", ("xarray.core.datatree.DataTree",)),
    ("xarray.Dataset", "py:class", "generated/xarray.Dataset.html#$", ("xarray.core.dataset.Dataset",)),
    ("xarray.DataArray", "py:class", "generated/xarray.DataArray.html#$", ("xarray.core.dataarray.DataArray",)),
]

MATPLOTLIB: list[Entry] = [
    ("matplotlib.figure.Figure", "py:class", "api/_as_gen/matplotlib.figure.Figure.html#$", ()),
    ("matplotlib.axes.Axes", "py:class", "api/_as_gen/matplotlib.axes.Axes.html#$", ()),
]

_AGG = "docs/aggregation/"
TORCHJD: list[Entry] = [
    ("torchjd.aggregation.Aggregator", "py:class", f"{_AGG}#$", ("torchjd.aggregation._aggregator_bases.Aggregator",)),
    ("torchjd.aggregation.Weighting", "py:class", f"{_AGG}#$", ()),
    ("torchjd.aggregation.PCGrad", "py:class", f"{_AGG}pcgrad/#$", ("torchjd.aggregation._pcgrad.PCGrad",)),
    ("torchjd.aggregation.NashMTL", "py:class", f"{_AGG}nash_mtl/#$", ("torchjd.aggregation._nash_mtl.NashMTL",)),
    ("torchjd.aggregation.UPGrad", "py:class", f"{_AGG}upgrad/#$", ()),
    ("torchjd.aggregation.MGDA", "py:class", f"{_AGG}mgda/#$", ()),
    ("torchjd.aggregation.CAGrad", "py:class", f"{_AGG}cagrad/#$", ()),
    ("torchjd.aggregation.IMTLG", "py:class", f"{_AGG}imtl_g/#$", ()),
    ("torchjd.aggregation.AlignedMTL", "py:class", f"{_AGG}aligned_mtl/#$", ()),
    (
        "torchjd.scalarization.Scalarizer",
        "py:class",
        "docs/scalarization/#$",
        ("torchjd.scalarization._scalarizer_base.Scalarizer",),
    ),
    ("torchjd.scalarization.DWA", "py:class", "docs/scalarization/dwa/#$", ("torchjd.scalarization._dwa.DWA",)),
    ("torchjd.scalarization.UW", "py:class", "docs/scalarization/uw/#$", ()),
    ("torchjd.autojac.mtl_backward", "py:function", "docs/autojac/mtl_backward/#$", ("torchjd.mtl_backward",)),
]

PROJECTS: dict[str, tuple[str, list[Entry]]] = {
    "python": ("Python", PYTHON),
    "numpy": ("NumPy", NUMPY),
    "torch": ("PyTorch", TORCH),
    "pyro": ("Pyro", PYRO),
    "arviz": ("ArviZ", ARVIZ),
    "xarray": ("xarray", XARRAY),
    "matplotlib": ("Matplotlib", MATPLOTLIB),
    "torchjd": ("TorchJD", TORCHJD),
}


def inventory(project: str, entries: list[Entry]) -> bytes:
    """A Sphinx inventory, version 2: a plain header, then zlib-compressed ``name domain:role
    priority uri dispname`` lines. An alias points at its public name's address."""
    lines = []
    for name, role, uri, aliases in entries:
        uri = uri.replace("#$", f"#{name}")
        lines += [f"{n} {role} 1 {uri} {name if n != name else '-'}" for n in (name, *aliases)]
    header = f"# Sphinx inventory version 2\n# Project: {project}\n# Version: \n"
    header += "# The remainder of this file is compressed using zlib.\n"
    return header.encode() + zlib.compress(("\n".join(sorted(lines)) + "\n").encode())


def main() -> None:
    for key, (project, entries) in PROJECTS.items():
        (HERE / f"{key}.inv").write_bytes(inventory(project, entries))


if __name__ == "__main__":
    main()
