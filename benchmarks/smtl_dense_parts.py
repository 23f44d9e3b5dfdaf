"""The CityScapes shape of ``smtl_step.py``: dense SMTL variants in plain torch, and FLOP counts.

The paper's CityScapes setting (2 tasks: 7-class segmentation and depth, images 3×128×256)
uses Deeplab-ResNet: a dilated ResNet-50 encoder (output stride 8, 2048 channels) and one
DeepLab ASPP head per task. That does not train on one CPU thread in a benchmark's time, so the
timed models are a stand-in with the same layout and the same split of work between encoder
and decoders (see :func:`paper_flops`):

* encoder (:func:`encoder`): six 3×3 convolutions, three of them stride 2, with 32-64-128
  channels down to 1/8 resolution (16×32), the last one dilated (2) as in the dilated ResNet;
  ELU, no BatchNorm;
* decoder (:class:`ASPPHead`): an ASPP-like head, a 1×1 and three dilated 3×3 branches
  (rates 2, 4, 6) of 96 channels in parallel, a 1×1 fuse, a 1×1 to the task's channels
  (7 class logits or 1 depth), bilinear upsampling ×8 to 128×256.

The variants are built from the library's parts, as ``examples/smtl_dense.py`` builds its model:
the private encoders of ``stl`` and the SMTL variants are one vmapped ``TaskStack``
(``sample_dims=3``), the gates are ``mix_encoders`` of ``sigmoid(logit)`` (soft) or of
``straight_through_gate`` (lite), and the losses are the example's ``task_loss`` (cross-entropy
and L1 over valid pixels), summed over tasks (eq. 2). The heads differ per task (7 or 1 output
channels), so they run in turn, as in the example.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from smtl_dense import task_loss

from pyromtl.models.smtl import mix_encoders, select_tasks, straight_through_gate
from pyromtl.nn import TaskStack

TASKS = {"segmentation": 7, "depth": 1}
IMAGE = (3, 128, 256)
DENSE_VARIANTS = ("dmtl", "stl", "smtl", "lsmtl", "smtl-c", "lsmtl-c")


def _conv(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation), nn.ELU()]


def encoder() -> nn.Sequential:
    """The ResNet stand-in: ``[B, 3, H, W] -> [B, 128, H/8, W/8]``."""
    return nn.Sequential(
        *_conv(3, 32, 2),
        *_conv(32, 32),
        *_conv(32, 64, 2),
        *_conv(64, 64),
        *_conv(64, 128, 2),
        *_conv(128, 128, dilation=2),
    )


class ASPPHead(nn.Module):
    """An ASPP-like decoder: ``[B, 128, h, w] -> [B, out, 8h, 8w]``."""

    def __init__(self, out_channels: int, in_channels: int = 128, width: int = 96, rates=(2, 4, 6)):
        super().__init__()
        self.branches = nn.ModuleList(
            [nn.Conv2d(in_channels, width, 1)]
            + [nn.Conv2d(in_channels, width, 3, padding=r, dilation=r) for r in rates]
        )
        self.fuse = nn.Conv2d(width * (1 + len(rates)), width, 1)
        self.out = nn.Conv2d(width, out_channels, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = torch.cat([F.elu(b(z)) for b in self.branches], 1)
        return F.interpolate(self.out(F.elu(self.fuse(h))), scale_factor=8, mode="bilinear", align_corners=False)


def heads() -> nn.ModuleList:
    return nn.ModuleList([ASPPHead(k) for k in TASKS.values()])


class LoopStack(nn.ModuleList):
    """``TaskStack``'s interface over separate copies run one after another, stacked ``[T, B, ...]``:
    the alternative to ``torch.vmap`` that ``stl (loop)`` and ``smtl (loop)`` time."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([net(x) for net in self])


class DenseVariant(nn.Module):
    """One variant at the CityScapes shape; ``forward(x [B, 3, H, W])`` gives one map per task.

    ``dmtl``: a public encoder and the task heads. ``stl``: a private encoder per task (one
    ``TaskStack``) and the heads. ``smtl``/``lsmtl``: ``h_t(g_t f_S(x) + (1 − g_t) f_t(x))`` (eq. 1;
    lite: straight-through gates, eq. 3–4). ``smtl-c``/``lsmtl-c``: ``g_t h_{S,t}(f_S(x)) + (1 − g_t)
    h_t(f_t(x))`` (§3.4), with a public head per task as well.
    """

    def __init__(self, name: str, temperature: float = 0.1, loop: bool = False):
        super().__init__()
        self.name, T = name, len(TASKS)
        self.lite, self.combine_outputs = name.startswith("l"), name.endswith("-c")
        self.public = encoder() if name != "stl" else None
        self.private = None
        if name != "dmtl":  # loop: the same private encoders as separate modules run in turn (for comparison)
            self.private = (
                LoopStack([encoder() for _ in TASKS]) if loop else TaskStack([encoder() for _ in TASKS], sample_dims=3)
            )
        self.heads = heads()
        self.public_heads = heads() if self.combine_outputs else None
        self.gate_logit = nn.Parameter(torch.zeros(T)) if name not in ("dmtl", "stl") else None
        self.register_buffer("tau", torch.tensor(temperature))

    def gate(self) -> torch.Tensor:
        return straight_through_gate(self.gate_logit, self.tau) if self.lite else torch.sigmoid(self.gate_logit)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.name == "dmtl":
            z = self.public(x)
            return [h(z) for h in self.heads]
        if self.name == "stl":
            z = self.private(x)  # [T, B, 128, h, w]
            return [h(z[i]) for i, h in enumerate(self.heads)]
        gate = self.gate()
        if not self.combine_outputs:
            z = mix_encoders(gate, self.public(x), self.private(x))  # [T, B, 128, h, w]
            return [h(z[i]) for i, h in enumerate(self.heads)]
        zs, zp = self.public(x), self.private(x)
        # outputs have 7 or 1 channels: mixed task by task, with the same eq.-1 mix
        return [
            mix_encoders(gate[i : i + 1], hs(zs)[None], h(zp[i])[None])[0]
            for i, (hs, h) in enumerate(zip(self.public_heads, self.heads))
        ]


class PrunedDense(nn.Module):
    """A lite dense variant at hard gates with only the chosen parts (Fig. 1, right): the public
    encoder and the public tasks' heads (``h_t``, or ``h_{S,t}`` for ``-c``), the private tasks'
    encoders (a ``TaskStack`` cut by the library's ``select_tasks``) and heads."""

    def __init__(self, model: DenseVariant, gate: torch.Tensor):
        super().__init__()
        chosen = gate.bool()
        pub, priv = chosen.nonzero().flatten().tolist(), (~chosen).nonzero().flatten().tolist()
        public_heads = model.public_heads if model.combine_outputs else model.heads
        self.public = copy.deepcopy(model.public) if pub else None
        self.public_heads = nn.ModuleList([copy.deepcopy(public_heads[t]) for t in pub])
        self.private = select_tasks(model.private, torch.tensor(priv)) if priv else None
        self.heads = nn.ModuleList([copy.deepcopy(model.heads[t]) for t in priv])
        self.order = [(pub + priv).index(t) for t in range(len(chosen))]

    def encoders(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return (
            self.public(x) if self.public is not None else None,
            self.private(x) if self.private is not None else None,
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        zs, zp = self.encoders(x)
        out = [h(zs) for h in self.public_heads] + [h(zp[i]) for i, h in enumerate(self.heads)]
        return [out[i] for i in self.order]


def random_batch(batch: int, gen: torch.Generator) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Random images, labels in 0..6 and depths in [1, 5], about 10% of each target missing."""
    _, H, W = IMAGE
    x = torch.rand(batch, *IMAGE, generator=gen)
    seg = torch.randint(0, TASKS["segmentation"], (batch, H, W), generator=gen)
    seg[torch.rand(batch, H, W, generator=gen) < 0.1] = -1
    depth = 1 + 4 * torch.rand(batch, 1, H, W, generator=gen)
    depth[torch.rand(batch, 1, H, W, generator=gen) < 0.1] = 0
    return x, [seg, depth]


def train_step(model: DenseVariant, optim: torch.optim.Optimizer):
    def step(batch) -> None:
        x, targets = batch
        out = model(x)
        loss = sum(task_loss(t, o, y) for t, o, y in zip(TASKS, out, targets))  # eq. 2: summed
        optim.zero_grad()
        loss.backward()
        optim.step()

    return step


def flops(fn, *args) -> int:
    """Floating-point operations of ``fn(*args)`` as ``FlopCounterMode`` counts them (convolutions
    and matrix products, forward and backward; element-wise work is not counted)."""
    with FlopCounterMode(display=False) as mode:
        fn(*args)
    return mode.get_total_flops()


# ---------------------------------------------------------------------------- the paper's network
class Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int, dilation: int):
        super().__init__()
        cout = 4 * width
        self.body = nn.Sequential(
            nn.Conv2d(cin, width, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, stride, dilation, dilation, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.skip = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x):
        return F.relu(self.body(x) + self.skip(x))


def resnet50_dilated() -> nn.Sequential:
    """torchvision's ResNet-50 with ``replace_stride_with_dilation=[False, True, True]`` (output
    stride 8), without its classifier: LibMTL's ``resnet_dilated('resnet50')``."""
    layers: list[nn.Module] = [
        nn.Conv2d(3, 64, 7, 2, 3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),
    ]
    cin = 64
    for width, blocks, stride, dilation in ((64, 3, 1, 1), (128, 4, 2, 1), (256, 6, 1, 2), (512, 3, 1, 4)):
        for b in range(blocks):
            # torchvision: the first block of a dilated stage keeps the previous dilation
            d = dilation if b else max(1, dilation // 2)
            layers.append(Bottleneck(cin, width, stride if b == 0 else 1, d))
            cin = 4 * width
    return nn.Sequential(*layers)


class DeepLabHead(nn.Module):
    """torchvision's ``DeepLabHead(2048, out)`` (ASPP at rates 12, 24, 36, as LibMTL uses it)."""

    def __init__(self, out_channels: int, cin: int = 2048, width: int = 256):
        super().__init__()

        def cbr(k, d=1, c=cin):
            return nn.Sequential(
                nn.Conv2d(c, width, k, padding=d if k == 3 else 0, dilation=d, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(),
            )

        self.branches = nn.ModuleList([cbr(1)] + [cbr(3, r) for r in (12, 24, 36)])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, width, 1, bias=False), nn.ReLU())
        self.project = cbr(1, c=5 * width)
        self.tail = nn.Sequential(cbr(3, 1, width), nn.Conv2d(width, out_channels, 1))

    def forward(self, z):
        pooled = self.pool(z).expand(-1, -1, *z.shape[-2:])
        h = self.project(torch.cat([b(z) for b in self.branches] + [pooled], 1))
        return F.interpolate(self.tail(h), scale_factor=8, mode="bilinear", align_corners=False)


def part_flops(make_encoder, make_head, batch: int) -> dict[str, float]:
    """Forward and forward+backward FLOPs of one encoder and of each task's head, on the meta device."""
    with torch.device("meta"):
        enc, hs = make_encoder(), [make_head(k) for k in TASKS.values()]
        x = torch.empty(batch, *IMAGE)
        z = enc(x)
        zd = torch.empty(z.shape, requires_grad=True)
    out = {"encoder": flops(enc, x), "encoder train": flops(lambda: enc(x).sum().backward())}
    out["decoders"] = sum(flops(h, zd) for h in hs)
    out["decoders train"] = sum(flops(lambda h=h: h(zd).sum().backward()) for h in hs)
    return out


def flop_model(parts: dict[str, float]) -> dict[str, dict[str, float]]:
    """FLOPs of every row from those of one encoder E and the T heads D (2 tasks, hard gates
    1 public + 1 private for inference): dmtl E + D, stl and SMTL 2E + D and 3E + D, ``-c``
    3E + 2D; inference dmtl E + D, gated 3E + D (``-c``: 3E + 2D), pruned 2E + D, chosen 2E."""
    E, D, Et, Dt = parts["encoder"], parts["decoders"], parts["encoder train"], parts["decoders train"]
    train = {
        "dmtl": Et + Dt,
        "stl": 2 * Et + Dt,
        "smtl": 3 * Et + Dt,
        "lsmtl": 3 * Et + Dt,
        "smtl-c": 3 * Et + 2 * Dt,
        "lsmtl-c": 3 * Et + 2 * Dt,
    }
    infer = {
        "dmtl": E + D,
        "lsmtl gated": 3 * E + D,
        "lsmtl pruned": 2 * E + D,
        "lsmtl chosen": 2 * E,
        "lsmtl-c gated": 3 * E + 2 * D,
        "lsmtl-c pruned": 2 * E + D,
        "lsmtl-c chosen": 2 * E,
    }
    return {"train": train, "infer": infer}


def paper_flops(batch: int) -> dict:
    """The FLOP model of Deeplab-ResNet-50 (:func:`resnet50_dilated` + :class:`DeepLabHead`) and of
    the stand-in at the CityScapes shape, with ratios against dmtl."""
    out = {}
    for name, make_encoder, make_head in (
        ("deeplab-resnet50", resnet50_dilated, DeepLabHead),
        ("stand-in", encoder, ASPPHead),
    ):
        parts = part_flops(make_encoder, make_head, batch)
        rows = flop_model(parts)
        out[name] = {
            "parts_gflop": {k: v / 1e9 for k, v in parts.items()},
            "encoder_share_of_dmtl_forward": parts["encoder"] / (parts["encoder"] + parts["decoders"]),
            **{f"{k}_ratio_vs_dmtl": {r: v / rows[k]["dmtl"] for r, v in rows[k].items()} for k in rows},
        }
    return out
