"""Fit L-SMTL, export the pruned network (only the chosen encoders and decoders) and check it.

    python examples/smtl_prune.py --steps 300

prints each task's gate, the parameter counts of the gated and the pruned network, and the
largest difference between their test outputs (the pruned one runs the hard gates' choice).
"""

from __future__ import annotations

import argparse

import torch

import pyromtl
from pyromtl.params import local_params
from pyromtl.predict import draw


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="lsmtl", choices=("lsmtl", "lsmtl-c"))
    p.add_argument("--data", default="digits-conflict")
    p.add_argument("--steps", type=int, default=300)
    args = p.parse_args()
    fit = pyromtl.fit(args.method, args.data, steps=args.steps, device="cpu", quiet=True)
    pruned = fit.export_pruned()
    alpha = fit.relatedness()["gates"].diagonal()
    for name, a in zip(fit.data.task_names, alpha):
        print(f"{name:12s} α = {a:.3f} -> {'public' if a > 0.5 else 'private'} encoder")
    count = lambda m: sum(q.numel() for q in m.parameters())  # noqa: E731
    print(f"parameters: gated {count(fit.model):,}, pruned {count(pruned):,}")
    batch = next(fit.data.eval_batches("test", "cpu"))
    with torch.no_grad():
        gated = local_params(draw)(fit.model, fit.guide, batch, 1, 2).outputs[0]
        print(f"largest |pruned − gated| on the test split: {(pruned(batch.x) - gated).abs().max():.2e}")
    print(f"test accuracy: {fit.evaluate()['average']['accuracy']:.4f}")


if __name__ == "__main__":
    main()
