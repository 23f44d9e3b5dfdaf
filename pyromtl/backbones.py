"""The user's own network as every method's backbone: from Python, or by a registered name.

``pyromtl.fit(method, data, backbone=...)`` takes

* an ``nn.Module``, used as a template: every network a method builds from it (one shared, or
  one per task for ``stl``, ``vstl``, SMTL's private encoders and cross-stitch) starts as a
  copy of it, so pretrained weights reach every copy and the module passed is never trained;
* a callable ``factory(input_shape) -> nn.Module``, called once per network (independent
  initialisations);
* a name: ``"mlp"``, ``"cnn"``, or a network that the user's module registered with
  ``pyromtl.networks.register("NAME", factory)`` (the ``factory(input_shape)`` above), which is
  how the command line and TOML name one (``--set backbone=NAME --import MODULE``).

The network maps one input batch ``[B, *input_shape]`` to features ``[B, F]``; F is found by one
dry run on two zero inputs in eval mode. Each method puts its own parts after it (its ``hidden``
layers, then VMTL's Gaussian z encoder, BayesAgg's last layer, HIB's channels, SMTL's gates and
decoders). Parameters with ``requires_grad=False`` stay frozen, and buffers (BatchNorm) are
trained and checkpointed with the rest.

A config stores a name, never code: an object given from Python is recorded as
``"python:<class or function name>"``, and a run that names one must be given the object again
(``pyromtl.load(RUN, backbone=...)``); the command line refuses it with one line.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from pyromtl import networks
from pyromtl.nn import BACKBONES, DEFAULT_CONV_CHANNELS, PYTHON_PREFIX, Backbone

#: What ``backbone=`` takes from Python besides a name.
BackboneObject = nn.Module | Callable[[tuple[int, ...]], nn.Module]


def label(obj: BackboneObject) -> str:
    """The config's name for a backbone given from Python: ``"python:"`` and its class or function name."""
    name = type(obj).__name__ if isinstance(obj, nn.Module) else getattr(obj, "__qualname__", type(obj).__name__)
    return PYTHON_PREFIX + name


def resolve(config: Mapping[str, Any], input_shape: tuple[int, ...], obj: BackboneObject | None = None) -> Backbone:
    """The backbone of a resolved ``config`` for inputs of ``input_shape``, with ``obj`` when it was
    given from Python; ``ValueError`` naming the problem before anything is trained."""
    name = config.get("backbone")
    if name is None:
        if obj is not None:
            raise ValueError(f"method {config.get('method')!r} takes no backbone")
        return Backbone()
    channels = tuple(config.get("conv_channels", DEFAULT_CONV_CHANNELS))
    if obj is not None:
        if isinstance(obj, str) or not (isinstance(obj, nn.Module) or callable(obj)):
            raise ValueError(f"backbone must be an nn.Module or a callable returning one, got {type(obj).__name__}")
        if name != label(obj):
            raise ValueError(f"the config names backbone {name!r}, but an object labelled {label(obj)!r} was given")
        factory = _template(obj) if isinstance(obj, nn.Module) else obj
    elif name.startswith(PYTHON_PREFIX):
        raise ValueError(
            f"this run's backbone {name!r} was given from Python as an object, and a config stores no code: "
            "pass it again (pyromtl.fit(..., backbone=obj), pyromtl.load(RUN, backbone=obj)), or register "
            "a factory with pyromtl.networks.register and name it"
        )
    elif name in BACKBONES:
        return Backbone(name, channels)
    else:
        factory = networks.get(name)

    def make() -> nn.Module:
        module = factory(input_shape)
        if not isinstance(module, nn.Module):
            raise ValueError(f"backbone {name!r}: the factory must return an nn.Module, got {type(module).__name__}")
        return module

    return Backbone(name, channels, make, feature_size(make(), input_shape, name))


def _template(module: nn.Module) -> Callable[[tuple[int, ...]], nn.Module]:
    """A factory of copies of ``module`` (snapshotted now: later changes to it reach no run)."""
    frozen = copy.deepcopy(module)
    return lambda input_shape: copy.deepcopy(frozen)


def feature_size(module: nn.Module, input_shape: tuple[int, ...], name: str = "backbone") -> int:
    """F of a network that maps ``[B, *input_shape]`` to ``[B, F]``, from one dry run in eval mode
    (no BatchNorm statistic moves); ``ValueError`` if it fails or returns another shape."""
    first = next(itertools.chain(module.parameters(), module.buffers()), None)
    device = first.device if first is not None else torch.device("cpu")
    training = module.training
    module.eval()
    try:
        with torch.no_grad():
            out = module(torch.zeros(2, *input_shape, device=device))
    except Exception as err:  # the user's network: say which input it could not take
        raise ValueError(
            f"backbone {name!r} failed on inputs shaped [2, {', '.join(map(str, input_shape))}]: {err}"
        ) from err
    finally:
        module.train(training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 2:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"backbone {name!r} must map inputs [B, {', '.join(map(str, input_shape))}] to features [B, F]; "
            f"on B = 2 it returned {got}"
        )
    return int(out.shape[1])
