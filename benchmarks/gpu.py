"""Every step benchmark of ``benchmarks/`` on one GPU, in one run: times, ratios, peak GPU memory.

It calls the benchmarks' own functions (it measures nothing itself), each against the baseline
it reports, in the same run:

* ``vmtl``: ``vmtl_step.bench_shape``, VMTL's step (``ours``, and under Pyro's stock
  ``TraceMeanField_ELBO``) against the hand-written PyTorch step of ``plain_vmtl.py``, at
  clusters-4/8/16/32 and office-home; first ``vmtl_step.check`` (same loss and gradients, T=4, 16);
* ``bayesagg``: ``bayesagg_step.step_ratio``, BayesAgg-MTL's aggregated step against linear
  scalarisation (LS), at each of the script's rows;
* ``hib``: ``hib_step.bench``, HIB against the authors'-style plain step and without noise channels, T = 2..32;
* ``smtl``: ``smtl_step.bench_shape``, every SMTL variant and stl against hard sharing (bmtl; dmtl
  at the cityscapes shape), training steps and inference, at conflict, wide and cityscapes;
* ``weighting``: ``weighting_step.bench_data``, every gradient-weighting baseline against LS, on
  digits-mixed and digits-binary.

Each unit (one shape, row or task count of one benchmark) runs with the peak of CUDA's
allocator reset before it, so ``peak_mb`` is the most memory allocated at once during that
unit, all of its sides together (``torch.cuda.max_memory_allocated``; ``reserved_mb`` is the
caching allocator's ``max_memory_reserved``). Units start while the time spent is under
``--budget`` seconds; the rest are listed as skipped. The JSON (``--json``) is rewritten after
every unit, so a run cut short keeps what it measured::

    {"environment": {...}, "device": "cuda", "smoke": false, "budget_s": 420, "seconds": 212.4,
     "settings": {benchmark: its step counts}, "checks": {"vmtl": {...}},
     "entries": [{"benchmark": "vmtl", "case": "clusters-4", "subject": "ours", "subject_ms": 9.1,
                  "baseline": "plain", "baseline_ms": 6.0, "ratio": 1.52, "peak_mb": 310.2,
                  "reserved_mb": 342.0, "unit_s": 8.3}, ...],
     "units": [{"benchmark": ..., "case": ..., "seconds": ..., "peak_mb": ..., "result": <the benchmark's own dict>}],
     "skipped": [{"benchmark": ..., "case": ..., "reason": ...}], "errors": [...]}

``ratio`` is the benchmark's own (a median of per-round ratios where it computes one, else the
ratio of the medians), against the baseline timed in the same run.

    python benchmarks/gpu.py --json gpu.json                     # on a GPU: about 3-5 minutes (estimated)
    python benchmarks/gpu.py --device cpu --smoke --json s.json  # anywhere: each benchmark, 1-2 steps, tiny sizes
    bash benchmarks/gpu_run.sh device                             # on the GPU machine (see benchmarks/README.md)

Without a CUDA device (and without ``--smoke``) it prints one line saying it skipped and exits 0.
It exits 1 if a unit failed (the others still run; ``errors`` holds the tracebacks' last lines).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
BENCHMARKS = ("vmtl", "bayesagg", "hib", "smtl", "weighting")

#: Each benchmark's settings on a GPU: the scripts' own CUDA (or docs/benchmarks.md) settings.
FULL: dict[str, dict[str, Any]] = {
    "vmtl": {
        "shapes": ["clusters-4", "clusters-8", "clusters-16", "clusters-32", "office-home"],
        "steps": 100,
        "warmup": 20,
        "rounds": 5,
        "mc": [10, 10],
        "hidden": None,
        "check_tasks": [4, 16],
    },
    "bayesagg": {"rows": "all", "steps": 5, "warmup": 2, "rounds": 15},
    "hib": {"tasks": [2, 4, 8, 16, 32], "steps": 300, "warmup": 20, "rounds": 30},
    "smtl": {
        "shapes": ["conflict", "wide", "cityscapes"],
        "steps": 20,
        "warmup": 3,
        "rounds": 3,
        "dense_steps": 5,
        "dense_batch": 4,
    },
    "weighting": {"data": ["digits-mixed", "digits-binary"], "methods": "all", "steps": 10, "warmup": 3, "rounds": 5},
}

#: ``--smoke``: the smallest shape of each, 1-2 steps, to check this script's logic (not a measurement).
SMOKE: dict[str, dict[str, Any]] = {
    "vmtl": {
        "shapes": ["clusters-4"],
        "steps": 1,
        "warmup": 1,
        "rounds": 1,
        "mc": [2, 2],
        "hidden": [32],
        "check_tasks": [4],
    },
    "bayesagg": {"rows": [["digits-mixed", {}]], "steps": 1, "warmup": 1, "rounds": 1},
    "hib": {"tasks": [2], "steps": 2, "warmup": 1, "rounds": 1},
    "smtl": {"shapes": ["conflict"], "steps": 1, "warmup": 1, "rounds": 1, "dense_steps": 1, "dense_batch": 1},
    "weighting": {"data": ["digits-mixed"], "methods": ["ls", "upgrad"], "steps": 1, "warmup": 1, "rounds": 1},
}


def scaled(settings: dict[str, Any], scale: float) -> dict[str, Any]:
    """``settings`` with the timed steps multiplied by ``scale`` (at least 1)."""
    out = dict(settings)
    for key in ("steps", "dense_steps"):
        if key in out:
            out[key] = max(1, round(out[key] * scale))
    return out


# ------------------------------------------------------------------------------------ units
#: A unit: (case label, function returning (entries, the benchmark's own result)).
Unit = tuple[str, Callable[[], tuple[list[dict[str, Any]], Any]]]


def entry(case: str, subject: str, subject_ms: float, baseline: str, baseline_ms: float, ratio: float) -> dict:
    return {
        "case": case,
        "subject": subject,
        "subject_ms": float(subject_ms),
        "baseline": baseline,
        "baseline_ms": float(baseline_ms),
        "ratio": float(ratio),
    }


def vmtl_units(s: dict[str, Any], device: torch.device, checks: dict[str, Any]) -> list[Unit]:
    import vmtl_step

    args = SimpleNamespace(
        steps=s["steps"],
        warmup=s["warmup"],
        rounds=s["rounds"],
        mc=tuple(s["mc"]),
        hidden=s["hidden"],
        z_components=None,
        optim="adam",
        profile=None,
    )

    def check() -> tuple[list[dict], Any]:
        checks["vmtl"] = {f"T={t}": vmtl_step.check(device, t) for t in s["check_tasks"]}
        return [], checks["vmtl"]

    def shape(name: str) -> Callable[[], tuple[list[dict], Any]]:
        def run() -> tuple[list[dict], Any]:
            r = vmtl_step.bench_shape(name, args, device)
            return [
                entry(name, "ours", r["ours_ms"], "plain", r["plain_ms"], r["ratio"]),
                entry(name, "ours (TraceMeanField_ELBO)", r["ours_stock_ms"], "plain", r["plain_ms"], r["ratio_stock"]),
            ], r

        return run

    return [("check", check)] + [(name, shape(name)) for name in s["shapes"]]


def bayesagg_units(s: dict[str, Any], device: torch.device) -> list[Unit]:
    import bayesagg_step
    import pyro

    rows = bayesagg_step.ROWS if s["rows"] == "all" else [(name, dict(options)) for name, options in s["rows"]]

    def row(name: str, options: dict[str, Any]) -> Callable[[], tuple[list[dict], Any]]:
        def run() -> tuple[list[dict], Any]:
            with pyro.settings.context(module_local_params=True):  # as bayesagg_step.main sets it
                r = bayesagg_step.step_ratio(
                    bayesagg_step.SHAPES[name], options, s["steps"], s["warmup"], s["rounds"], device
                )
            case = f"{name} ({bayesagg_step.variant(options)})"
            return [entry(case, "bayesagg", r["bayesagg_ms"], "ls", r["ls_ms"], r["ratio"])], r

        return run

    return [(f"{name} ({bayesagg_step.variant(options)})", row(name, options)) for name, options in rows]


def hib_units(s: dict[str, Any], device: torch.device) -> list[Unit]:
    import hib_step

    args = SimpleNamespace(steps=s["steps"], warmup=s["warmup"], rounds=s["rounds"], shape="multimnist")

    def tasks(t: int) -> Callable[[], tuple[list[dict], Any]]:
        def run() -> tuple[list[dict], Any]:
            r = hib_step.bench(t, args, device)
            return [
                entry(f"T={t}", "hib", r["hib_ms"], "no_noise", r["no_noise_ms"], r["ratio"]),
                entry(f"T={t}", "hib", r["hib_ms"], "authors", r["authors_ms"], r["ratio_authors"]),
            ], r

        return run

    return [(f"T={t}", tasks(t)) for t in s["tasks"]]


def smtl_units(s: dict[str, Any], device: torch.device) -> list[Unit]:
    import smtl_step

    args = SimpleNamespace(
        steps=s["steps"],
        warmup=s["warmup"],
        rounds=s["rounds"],
        dense_steps=s["dense_steps"],
        dense_batch=s["dense_batch"],
    )

    def shape(name: str) -> Callable[[], tuple[list[dict], Any]]:
        def run() -> tuple[list[dict], Any]:
            r = smtl_step.bench_shape(name, args, device)
            base = "dmtl" if "dmtl" in r["train_ms"] else "bmtl"
            out = [
                entry(name, subject, ms, base, r["train_ms"][base], r["train_ratio_vs_dmtl"][subject])
                for subject, ms in r["train_ms"].items()
                if subject != base
            ]
            out += [
                entry(
                    name, f"{subject} (inference)", ms, "dmtl", r["infer_ms"]["dmtl"], r["infer_ratio_vs_dmtl"][subject]
                )
                for subject, ms in r["infer_ms"].items()
                if subject != "dmtl"
            ]
            return out, r

        return run

    return [(name, shape(name)) for name in s["shapes"]]


def weighting_units(s: dict[str, Any], device: torch.device) -> list[Unit]:
    import weighting_step

    from pyromtl import datasets

    names = list(weighting_step.METHODS) if s["methods"] == "all" else list(s["methods"])
    if "ls" not in names:
        names.insert(0, "ls")

    def dataset(name: str) -> Callable[[], tuple[list[dict], Any]]:
        def run() -> tuple[list[dict], Any]:
            data = datasets.load(name)
            rows = weighting_step.bench_data(data, names, 64, s["steps"], s["warmup"], s["rounds"], device)
            out = [
                entry(name, method, row["ms"], "ls", rows["ls"]["ms"], row["vs_ls"])
                for method, row in rows.items()
                if method != "ls"
            ]
            return out, {"tasks": data.num_tasks, "batch_size": 64, "methods": rows}

        return run

    return [(name, dataset(name)) for name in s["data"]]


# ------------------------------------------------------------------------------------ the run
def memory_mb(device: torch.device) -> tuple[float | None, float | None]:
    """The peak allocated and reserved MiB since the last reset (``None`` off CUDA)."""
    if device.type != "cuda":
        return None, None
    return torch.cuda.max_memory_allocated(device) / 2**20, torch.cuda.max_memory_reserved(device) / 2**20


def fresh_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def write(doc: dict[str, Any], path: Path | None) -> None:
    if path is None:
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)


def table(doc: dict[str, Any]) -> str:
    lines = [
        "| benchmark | case | subject | ms | baseline | baseline ms | ratio | peak MiB |",
        "|---|---|---|---:|---|---:|---:|---:|",
    ]
    for e in doc["entries"]:
        peak = "" if e["peak_mb"] is None else f"{e['peak_mb']:.0f}"
        lines.append(
            f"| {e['benchmark']} | {e['case']} | {e['subject']} | {e['subject_ms']:.3f} | {e['baseline']} | "
            f"{e['baseline_ms']:.3f} | {e['ratio']:.2f} | {peak} |"
        )
    for name, check in doc["checks"].items():
        lines.append(f"\n{name} check: {json.dumps(check)}")
    for s in doc["skipped"]:
        lines.append(f"skipped: {s['benchmark']} {s['case']} ({s['reason']})")
    for e in doc["errors"]:
        lines.append(f"FAILED: {e['benchmark']} {e['case']}: {e['error']}")
    return "\n".join(lines)


def skip_reason(device_arg: str, smoke: bool) -> str | None:
    """Why this run does nothing, or ``None`` if it runs."""
    if device_arg not in ("auto", "cpu", "cuda"):
        raise SystemExit(f"gpu.py: --device must be auto, cpu or cuda, got {device_arg!r}")
    if device_arg in ("auto", "cuda") and not torch.cuda.is_available():
        if device_arg == "auto" and smoke:
            return None  # a smoke run on the CPU
        return "no CUDA device (torch.cuda.is_available() is false); pass --device cpu --smoke to check the script"
    if device_arg == "cpu" and not smoke:
        return "--device cpu runs only with --smoke (the measurements are for a GPU)"
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto (default: CUDA if there is one), cuda, or cpu with --smoke")
    p.add_argument("--smoke", action="store_true", help="each benchmark for 1-2 steps at its smallest shape")
    p.add_argument("--json", default=None, metavar="FILE", help="write the results here (after every unit)")
    p.add_argument("--only", default=",".join(BENCHMARKS), help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every benchmark's timed steps (default 1)")
    p.add_argument(
        "--budget", type=float, default=420.0, help="start no unit after this many seconds (default 420: 7 min)"
    )
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)

    reason = skip_reason(args.device, args.smoke)
    if reason is not None:
        print(f"gpu.py: skipped: {reason}")
        return 0
    only = [b.strip() for b in args.only.split(",") if b.strip()]
    if unknown := sorted(set(only) - set(BENCHMARKS)):
        raise SystemExit(f"gpu.py: unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")

    sys.path.insert(0, str(HERE))
    import vmtl_step

    plan = {name: scaled((SMOKE if args.smoke else FULL)[name], args.scale) for name in only}
    path = Path(args.json) if args.json else None
    start = time.perf_counter()
    doc: dict[str, Any] = {
        "environment": vmtl_step.environment(device),
        "device": device.type,
        "smoke": args.smoke,
        "budget_s": args.budget,
        "scale": args.scale,
        "settings": plan,
        "seconds": 0.0,
        "checks": {},
        "entries": [],
        "units": [],
        "skipped": [],
        "errors": [],
    }
    print(json.dumps(doc["environment"]), flush=True)
    builders = {
        "vmtl": lambda s: vmtl_units(s, device, doc["checks"]),
        "bayesagg": lambda s: bayesagg_units(s, device),
        "hib": lambda s: hib_units(s, device),
        "smtl": lambda s: smtl_units(s, device),
        "weighting": lambda s: weighting_units(s, device),
    }
    for bench in only:
        units = builders[bench](plan[bench])
        for case, run in units:
            spent = time.perf_counter() - start
            if spent > args.budget:
                doc["skipped"].append({"benchmark": bench, "case": case, "reason": f"budget: {spent:.0f} s spent"})
                print(f"{bench} {case}: skipped (budget: {spent:.0f} of {args.budget:.0f} s spent)", flush=True)
                continue
            fresh_peak(device)
            t0 = time.perf_counter()
            try:
                rows, result = run()
            except Exception as err:  # one broken unit must not lose the others' numbers
                last = traceback.format_exception_only(err)[-1].strip()
                doc["errors"].append({"benchmark": bench, "case": case, "error": last})
                print(f"{bench} {case}: FAILED: {last}", flush=True)
                traceback.print_exc()
                continue
            finally:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
            seconds = time.perf_counter() - t0
            peak, reserved = memory_mb(device)
            doc["units"].append(
                {
                    "benchmark": bench,
                    "case": case,
                    "seconds": seconds,
                    "peak_mb": peak,
                    "reserved_mb": reserved,
                    "result": result,
                }
            )
            for row in rows:
                doc["entries"].append(
                    {"benchmark": bench, **row, "peak_mb": peak, "reserved_mb": reserved, "unit_s": seconds}
                )
            shown = ", ".join(f"{r['subject']} {r['ratio']:.2f}x" for r in rows[:4]) + (" ..." if len(rows) > 4 else "")
            mem = "" if peak is None else f", peak {peak:.0f} MiB"
            print(f"{bench} {case}: {seconds:.1f} s{mem}{': ' + shown if shown else ''}", flush=True)
            doc["seconds"] = time.perf_counter() - start
            write(doc, path)
    doc["seconds"] = time.perf_counter() - start
    write(doc, path)
    print()
    print(table(doc))
    print(f"\n{doc['seconds']:.0f} s in all on {device.type}" + (f"; results in {path}" if path else ""))
    bad = [e for e in doc["entries"] if not (math.isfinite(e["ratio"]) and e["subject_ms"] > 0)]
    return 1 if doc["errors"] or bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
