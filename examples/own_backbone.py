"""Your own network as the backbone of any method: a torchvision ResNet-18 under VMTL, BayesAgg-MTL,
HIB and L-SMTL, from Python and from the command line.

The embedded digits are 8x8 grey images, stored flat (64 numbers); ``MultiTaskData.with_input_shape``
gives them back their shape. ResNet-18 is made to fit small one-channel images: a 3x3 stem of
stride 1 (a pretrained stem's filters summed over the colour channels), no max-pool, and its
classifier dropped, so it maps ``[B, 1, 8, 8]`` to 512 features. Each method puts its own parts
after it: VMTL's Gaussian z encoder, BayesAgg's Bayesian last layer, HIB's noise channels, and
L-SMTL's gates and decoders (L-SMTL also trains one private copy of the ResNet per task).

With ``--weights FILE`` (a ResNet-18 ``state_dict`` saved with ``torch.save``; nothing is
downloaded) the backbone is pretrained and frozen: its parameters stay bitwise as loaded, and its
BatchNorm statistics keep learning the digits. Without it, the ResNet starts at random weights and
trains with the rest.

    pip install -e ".[vision]"
    python examples/own_backbone.py                      # four methods, 300 steps each (minutes each on 2 cores)
    python examples/own_backbone.py --weights resnet18.pt --methods vmtl,lsmtl
    python examples/own_backbone.py --steps 2 --quick    # a smoke test (the test suite runs this)

From the command line the same network is a name, registered when this file is imported::

    pyromtl fit vmtl --data digits-domains --import examples/own_backbone.py --set backbone=resnet18 \\
        --set steps=300 --out runs/vmtl-resnet18

(the registered factory reshapes the flat digits to 1x8x8 itself). A run directory stores the name
``resnet18``, never code: evaluating or reopening it needs the same ``--import``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from torch import nn

import pyromtl
from pyromtl import datasets, networks

#: Which embedded data each method trains on here: VMTL is MIMO (digits-domains), the others SIMO.
DATA = {"vmtl": "digits-domains", "bayesagg": "digits-mixed", "hib": "digits-mixed", "lsmtl": "digits-mixed"}


def resnet18(in_channels: int = 1, weights: str | Path | None = None) -> nn.Module:
    """ResNet-18 features ``[B, C, H, W] -> [B, 512]`` for small images, optionally from a local ``state_dict``."""
    from torchvision.models import resnet18 as torchvision_resnet18

    net = torchvision_resnet18(weights=None)
    if weights is not None:
        net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    stem = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
    with torch.no_grad():  # a pretrained stem's filters, summed over colours and cut to 3x3
        stem.weight.copy_(net.conv1.weight[:, :, 2:5, 2:5].sum(1, keepdim=True).expand_as(stem.weight) / in_channels)
    net.conv1, net.maxpool, net.fc = stem, nn.Identity(), nn.Identity()
    return net


def frozen(net: nn.Module) -> nn.Module:
    """``net`` with every parameter frozen (its BatchNorm buffers still track the data)."""
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def resnet18_backbone(input_shape: tuple[int, ...]) -> nn.Module:
    """The factory registered as ``resnet18``: flat square inputs are reshaped to one-channel images."""
    if len(input_shape) == 1:
        side = math.isqrt(input_shape[0])
        if side * side != input_shape[0]:
            raise ValueError(f"resnet18: flat inputs must be square images, got {input_shape[0]} numbers")
        return nn.Sequential(nn.Unflatten(1, (1, side, side)), resnet18())
    return resnet18(input_shape[0])


networks.register("resnet18", resnet18_backbone, replace=True)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", help="a ResNet-18 state_dict file: pretrained and frozen backbone")
    parser.add_argument("--methods", default=",".join(DATA), help="comma-separated, of " + ", ".join(DATA))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--fraction", type=float, default=0.2)
    parser.add_argument("--quick", action="store_true", help="small batches and few draws (a smoke test)")
    parser.add_argument("--out", help="write one run directory per method under this folder")
    args = parser.parse_args(argv)
    backbone = resnet18(weights=args.weights)
    if args.weights:
        backbone = frozen(backbone)
    options = {"steps": args.steps, "fraction": args.fraction, "device": "auto", "hidden": [], "latent_dim": 32}
    if args.quick:
        options.update(batch_size=8, eval_samples=2, eval_every=args.steps, quiet=True)
    scores = {}
    for method in args.methods.split(","):
        data = datasets.load(DATA[method]).with_input_shape((1, 8, 8))
        out = Path(args.out) / method if args.out else None
        # the module is a template: every network built from it starts as a copy, and it is never trained
        fit = pyromtl.fit(method, data, backbone=backbone, out=out, **options)
        scores[method] = fit.evaluate()["average"]
        shown = ", ".join(f"{k} {v:.3f}" for k, v in scores[method].items() if k in ("accuracy", "nmse"))
        print(f"{method:9s} on {data.name}: {shown}")
    return scores


if __name__ == "__main__":
    main()
