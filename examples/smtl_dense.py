"""Safe MTL on dense prediction (NYUv2, CityScapes): gated public and private conv encoders, one head per task.

Every task ``t`` mixes a public conv encoder ``f_S``, shared by all tasks, with its own private
conv encoder ``f_t`` (Safe MTL, eq. 1): ``z_t = α_t f_S(x) + (1 − α_t) f_t(x)`` with
``α_t = sigmoid(logit_t)``, then decodes ``z_t`` with its own head: per-pixel class logits
(segmentation), depth, or unit normals. ``--lite`` draws the gates from
``RelaxedBernoulliStraightThrough`` while training (eq. 3–4, hard in the forward pass) and uses
``1[α_t > 0.5]`` when evaluating. The gate functions and the vmapped stack of private
encoders (``TaskStack``) are those of ``pyromtl.models.smtl``. The losses are summed over tasks
(eq. 2): cross-entropy over labelled pixels, L1 over pixels with a depth reading, and
``1 − cos`` between normals. Everything is small enough for a CPU.

    python examples/smtl_dense.py --make-fixtures nyuv2-fake --data nyuv2 --steps 50
    python examples/smtl_dense.py --root ~/data/nyuv2 --data nyuv2 --tasks segmentation,depth,normal --lite
    python examples/smtl_dense.py --root ~/data/cityscapes --data cityscapes --num-classes 19

prints the training loss, the per-task metrics on val and test (mIoU and pixel accuracy;
depth abs and rel error; mean normal angle in degrees) and the learned ``α_t``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pyromtl import metrics
from pyromtl.data.constants import IGNORE_INDEX
from pyromtl.data.dense import DENSE_DATASETS, TARGET_CHANNELS, DenseTaskData, write_fake
from pyromtl.models.smtl import mix_encoders, straight_through_gate
from pyromtl.nn import TaskStack
from pyromtl.tables import fmt, render


def conv_encoder(width: int) -> nn.Sequential:
    """Two 3×3 convolutions at full resolution, no BatchNorm (as in benchmarks/smtl_dense_parts.py)."""
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ELU(), nn.Conv2d(width, width, 3, padding=1), nn.ELU())


def conv_head(width: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ELU(), nn.Conv2d(width, out_channels, 1))


class DenseSMTL(nn.Module):
    """``out_t(x) = h_t(α_t f_S(x) + (1 − α_t) f_t(x))`` for dense tasks; ``forward(x [B, 3, H, W])``
    gives each task's map: segmentation logits ``[B, K, H, W]``, depth ``[B, 1, H, W]``, unit
    normals ``[B, 3, H, W]``."""

    def __init__(
        self, tasks: Sequence[str], num_classes: int, width: int = 16, lite: bool = False, temperature: float = 0.1
    ):
        super().__init__()
        self.tasks, self.lite = list(tasks), lite
        self.public = conv_encoder(width)
        # the private encoders share an architecture: one vmapped call runs all of them
        self.private = TaskStack([conv_encoder(width) for _ in self.tasks], sample_dims=3)
        self.gate_logit = nn.Parameter(torch.zeros(len(self.tasks)))  # α_t = 0.5 at the start
        self.register_buffer("tau", torch.tensor(temperature))
        self.heads = nn.ModuleDict({t: conv_head(width, TARGET_CHANNELS[t] or num_classes) for t in self.tasks})

    def alpha(self) -> torch.Tensor:
        """``α_t`` ``[T]``: the weight of the public encoder."""
        return torch.sigmoid(self.gate_logit)

    def gate(self) -> torch.Tensor:
        """Soft: ``α_t``; lite: a straight-through draw when training, ``1[α_t > 0.5]`` under no_grad."""
        return straight_through_gate(self.gate_logit, self.tau) if self.lite else self.alpha()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = mix_encoders(self.gate(), self.public(x), self.private(x))  # [T, B, width, H, W]
        # the heads differ per task type (output channels, normalisation), so the 2–3 of them run in turn
        out = {t: head(z[i]) for i, (t, head) in enumerate(self.heads.items())}
        if "normal" in out:
            out["normal"] = F.normalize(out["normal"], dim=1)
        return out


def task_loss(task: str, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """One task's loss, over the pixels that have a target (labelled, with a depth reading or a normal)."""
    if task == "segmentation":
        return F.cross_entropy(pred, target, ignore_index=IGNORE_INDEX)
    valid = (target != 0).any(1, keepdim=True)  # depth 0, or a zero normal: no target at this pixel
    count = valid.sum().clamp(min=1)
    if task == "depth":
        return ((pred - target).abs() * valid).sum() / count
    return ((1 - (pred * target).sum(1, keepdim=True)) * valid).sum() / count  # 1 − cos: both unit length


def train(model: DenseSMTL, data: DenseTaskData, steps: int, batch_size: int, lr: float, seed: int) -> list[float]:
    """``steps`` Adam steps on random train batches; the summed loss of each step (eq. 2)."""
    optim = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for _ in range(steps):
        x, targets = data.batch("train", batch_size, generator)
        out = model(x)
        loss = sum(task_loss(t, out[t], targets[t]) for t in model.tasks)  # one loss per head, as above
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def evaluate(model: DenseSMTL, data: DenseTaskData, split: str, batch_size: int = 16) -> dict[str, dict[str, float]]:
    """Every task's :func:`pyromtl.metrics.dense_task_metrics` on ``split`` (lite: the hard test-time gates)."""
    model.eval()
    images, targets = data.split(split)
    parts = []
    for x in images.split(batch_size):
        out = model(x)
        # labels, not logits: a split's full-size logits would take gigabytes on NYUv2
        parts.append({t: out[t].argmax(1) if t == "segmentation" else out[t] for t in model.tasks})
    preds = {t: torch.cat([p[t] for p in parts]) for t in model.tasks}
    return {t: metrics.dense_task_metrics(t, preds[t], targets[t], data.num_classes) for t in model.tasks}


def run(
    root: str | Path,
    data_name: str,
    *,
    tasks: Sequence[str] | None = None,
    num_classes: int = 7,
    steps: int = 50,
    batch_size: int = 8,
    lr: float = 3e-3,
    width: int = 16,
    lite: bool = False,
    temperature: float = 0.1,
    limit: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Load ``data_name`` from ``root``, train, evaluate: ``{"tasks", "losses", "metrics" (split → task →
    metric → value), "alpha" [T]}``."""
    torch.manual_seed(seed)
    options: dict[str, Any] = {"limit": limit}
    if tasks is not None:
        options["tasks"] = list(tasks)
    if data_name == "cityscapes":
        options["num_classes"] = num_classes
    data = DENSE_DATASETS[data_name](root, seed, **options)
    print(data.summary())
    model = DenseSMTL(data.task_names, data.num_classes, width=width, lite=lite, temperature=temperature)
    losses = train(model, data, steps, batch_size, lr, seed)
    results = {split: evaluate(model, data, split) for split in ("val", "test") if len(data.splits[split])}
    return {"tasks": data.task_names, "losses": losses, "metrics": results, "alpha": model.alpha().detach()}


def report(out: dict[str, Any]) -> str:
    """The output of :func:`run` as text: first and last loss, a metrics table and the gates."""
    losses = out["losses"]
    lines = [f"loss: {losses[0]:.4f} at step 1, {losses[-1]:.4f} at step {len(losses)}" if losses else "no steps", ""]
    rows = [
        [split, task, key, fmt(value)]
        for split, by_task in out["metrics"].items()
        for task, values in by_task.items()
        for key, value in values.items()
    ]
    lines += [render(["split", "task", "metric", "value"], rows), ""]
    alpha = out["alpha"].tolist()
    lines += [f"α_{task} = {a:.3f} (weight of the public encoder)" for task, a in zip(out["tasks"], alpha)]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", help="the dataset's folder (with train/ and val/)")
    p.add_argument(
        "--make-fixtures",
        metavar="DIR",
        help="write a tiny fake dataset of --data into DIR and train on it (no real data needed)",
    )
    p.add_argument("--data", default="nyuv2", choices=sorted(DENSE_DATASETS))
    p.add_argument("--tasks", help="comma-separated, e.g. segmentation,depth (default: all of the dataset's)")
    p.add_argument("--num-classes", type=int, default=7, choices=(7, 19), help="CityScapes' label set")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--width", type=int, default=16, help="channels of every encoder and head")
    p.add_argument("--lite", action="store_true", help="straight-through binary gates (L-SMTL)")
    p.add_argument("--temperature", type=float, default=0.1, help="τ of the lite gates")
    p.add_argument("--limit", type=int, help="read only the first LIMIT images of train and of val")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if (args.root is None) == (args.make_fixtures is None):
        p.error("pass exactly one of --root and --make-fixtures")
    torch.set_num_threads(1)  # tiny convolutions: more threads only add overhead
    root = write_fake(args.make_fixtures, args.data, seed=args.seed) if args.make_fixtures else args.root
    tasks = args.tasks.split(",") if args.tasks else None
    out = run(
        root,
        args.data,
        tasks=tasks,
        num_classes=args.num_classes,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        width=args.width,
        lite=args.lite,
        temperature=args.temperature,
        limit=args.limit,
        seed=args.seed,
    )
    print(report(out))


if __name__ == "__main__":
    main()
