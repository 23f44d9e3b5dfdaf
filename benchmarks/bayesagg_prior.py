"""Time and peak memory of BayesAgg-MTL's full-data prior (pyromtl.infer.bayesagg).

At the end of every epoch BayesAgg rebuilds each head's prior from the features of the whole
training set. This measures, on N = 45,000 samples and d = 64, 128, 160 features, with one
CPU thread:

* ``stream``: :class:`GaussianStats` fed in chunks of 512 (regression, K = 11 outputs), then
  its posterior; its memory is O(d² + K·d) plus the chunks waiting to be summed, whatever N is;
* ``one-shot``: :func:`regression_posterior` on all features at once (for comparison: the
  same numbers, but the caller must hold ``H [N, d]``);
* ``laplace``: :func:`laplace_posterior` on all features for K = 10 binary heads, summed in
  chunks of 4096.

Each d runs in its own subprocess, so its peak resident memory (``ru_maxrss``) is its own.
``peak`` is the process's whole peak (Python, torch and the ``[N, d]`` features included),
``extra`` what the step added on top of the peak before it. tracemalloc is not used: it does
not see torch's allocations.

    python benchmarks/bayesagg_prior.py            # about 30 s, mostly the three subprocesses' imports

Measured with that command (otherwise idle 2-core machine; 1 torch thread; float32 features;
torch 2.14.1; 2026-12-02). ``mean gap``: largest difference between the streamed (float64 sums)
and the one-shot (float32) posterior means.

    | d   | stream s | one-shot s | laplace s | peak MB | extra MB (stream / one-shot / laplace) | mean gap |
    |-----|----------|------------|-----------|---------|----------------------------------------|----------|
    | 64  |    0.098 |      0.016 |     0.374 |     587 | 16.4 / 0.4 / 32.0                      |  2.5e-07 |
    | 128 |    0.222 |      0.041 |     0.846 |     624 | 31.0 / 0.5 / 42.3                      |  2.4e-07 |
    | 160 |    0.355 |      0.080 |     1.925 |     661 | 37.4 / 0.5 / 69.2                      |  2.7e-07 |

The target for the stream was 30 s and 4 GB: it takes under 0.4 s and adds under 40 MB (the
chunks waiting to be summed, up to ``GaussianStats.flush_rows`` rows, and their float64 copy).
The Laplace row's extra memory is its chunk's ``[4096, K, d+1]`` intermediates (``chunk`` bounds it).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from pyromtl.infer.bayesagg import GaussianStats, laplace_posterior, regression_posterior


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(step) -> tuple[float, float, object]:
    """Seconds and extra peak MB of ``step()``, and its result."""
    before = _peak_mb()
    start = time.perf_counter()
    result = step()
    return time.perf_counter() - start, max(0.0, _peak_mb() - before), result


def measure(n: int, dim: int, outputs: int, tasks: int, chunk: int) -> dict[str, float]:
    """One configuration, in this process."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, dim, generator=g)
    y = h @ torch.randn(dim, outputs, generator=g) / dim**0.5 + torch.randn(n, outputs, generator=g)
    labels = (torch.rand(n, tasks, generator=g) < 0.3).float()
    w, b = 0.1 * torch.randn(tasks, dim, generator=g), torch.zeros(tasks)

    def stream():
        stats = GaussianStats()
        for start in range(0, n, chunk):
            stats.update(h[start : start + chunk], y[start : start + chunk])
        return stats.posterior(0.0, 1.0)

    stream_s, stream_mb, (mean, _) = _timed(stream)
    shot_s, shot_mb, (shot_mean, _) = _timed(lambda: regression_posterior(h, y, 0.0, 1.0))
    laplace_s, laplace_mb, _ = _timed(lambda: laplace_posterior(h, labels, w, b, 0.0, 1.0, chunk=4096))
    return {
        "d": dim,
        "stream_s": stream_s,
        "one_shot_s": shot_s,
        "laplace_s": laplace_s,
        "peak_mb": _peak_mb(),
        "stream_extra_mb": stream_mb,
        "one_shot_extra_mb": shot_mb,
        "laplace_extra_mb": laplace_mb,
        "max_mean_gap": (mean - shot_mean).abs().max().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=45_000)
    parser.add_argument("--dims", default="64,128,160")
    parser.add_argument("--outputs", type=int, default=11, help="regression outputs (QM9 has 11 targets)")
    parser.add_argument("--tasks", type=int, default=10, help="binary heads for the Laplace row")
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child mode: measure one d, print JSON
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(measure(args.n, args.one, args.outputs, args.tasks, args.chunk)))
        return
    print(f"N = {args.n}, K = {args.outputs} regression outputs, {args.tasks} binary heads, 1 thread")
    print("| d   | stream s | one-shot s | laplace s | peak MB | extra MB (stream / one-shot / laplace) | mean gap |")
    print("|-----|----------|------------|-----------|---------|----------------------------------------|----------|")
    for dim in map(int, args.dims.split(",")):
        child = [
            sys.executable,
            __file__,
            "--one",
            str(dim),
            "--n",
            str(args.n),
            "--outputs",
            str(args.outputs),
            "--tasks",
            str(args.tasks),
            "--chunk",
            str(args.chunk),
        ]
        r = json.loads(subprocess.run(child, check=True, capture_output=True, text=True).stdout)
        extra = f"{r['stream_extra_mb']:.1f} / {r['one_shot_extra_mb']:.1f} / {r['laplace_extra_mb']:.1f}"
        print(
            f"| {dim:<3} | {r['stream_s']:8.3f} | {r['one_shot_s']:10.3f} | {r['laplace_s']:9.3f} | "
            f"{r['peak_mb']:7.0f} | {extra:<38} | {r['max_mean_gap']:8.1e} |"
        )


if __name__ == "__main__":
    main()
