"""Compiled CPU kernels of BayesAgg-MTL's regression step, built once per machine with the system's
C compiler and loaded with ctypes (the source: ``bayesagg_regression.c`` beside this file).

Why: at the paper's regression sizes (B = 120, K = 11, d = 64) the torch path of the step's
moments and aggregation is about 25 tensor ops over ``[K, B, d]``, each costing more in dispatch
and memory traffic than in arithmetic. One C loop per sample does the same in about a quarter of
the time. ``torch.compile`` was measured too: its code was 2.7× slower than this loop (it does not
vectorise the logarithms along the task axis) and took 7–30 s to compile, where this takes 0.4 s.
The batch posterior's 65 × 65 inverse is the other large cost: LAPACK's, called once per step
after the network's pass, runs with cold caches, and a plain Cholesky loop is faster there.

What it needs: a C compiler (``$CC``, else ``cc``, ``gcc`` or ``clang``) and glibc's ``libmvec``
(the vector ``logf`` and ``expf``, glibc ≥ 2.22). Where either is missing, :func:`unavailable`
says why and callers stay on the torch path. The shared object is cached in ``kernels/`` of the
dataset cache folder (:func:`pyromtl.data.cache.cache_dir`; a temporary folder when that is
off), named by a hash of the source, the flags and the compiler, and written atomically.

It is built without ``-ffast-math``: a shared object linked with it sets flush-to-zero for the
whole process. Its sums run in another order than torch's, so results agree to float32 rounding.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from pyromtl.data.cache import cache_dir

SOURCE = Path(__file__).with_name("bayesagg_regression.c")
#: -O3 vectorises the loops; -fopenmp-simd honours their pragmas (no OpenMP runtime is linked)
FLAGS = ("-O3", "-fopenmp-simd", "-fno-math-errno", "-fPIC")
_I64, _PTR, _F32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float


def _compiler() -> str | None:
    given = os.environ.get("CC", "").strip()
    if given:
        return shutil.which(given) or given
    return next((path for name in ("cc", "gcc", "clang") if (path := shutil.which(name))), None)


def _build(compiler: str, folder: Path) -> Path:
    """The shared object in ``folder``, compiled first unless an intact one is there."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = "\n".join([SOURCE.read_text(), " ".join(FLAGS), compiler, version, platform.machine(), platform.system()])
    target = folder / f"bayesagg_regression-{hashlib.sha256(key.encode()).hexdigest()[:20]}.so"
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".build-") as tmp:
        obj, lib = Path(tmp) / "kernel.o", Path(tmp) / "kernel.so"
        for command in ([compiler, *FLAGS, "-c", str(SOURCE), "-o", str(obj)],
                        [compiler, "-shared", str(obj), "-o", str(lib), "-lm"]):
            done = subprocess.run(command, capture_output=True, text=True, timeout=300)
            if done.returncode != 0:
                raise OSError(f"`{' '.join(command)}` failed: {(done.stderr or done.stdout).strip()[-500:]}")
        os.replace(lib, target)  # atomic: a concurrent process sees no file or the whole one
    return target


@functools.cache
def _library() -> ctypes.CDLL | str:
    """The loaded kernel, or why there is none (tried once per process)."""
    compiler = _compiler()
    if compiler is None:
        return "no C compiler found (set CC)"
    folder = cache_dir()
    try:
        path = _build(compiler, folder / "kernels" if folder is not None else Path(tempfile.mkdtemp(prefix="pyromtl-")))
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as err:
        return f"the kernel could not be built or loaded: {err}"
    lib.pyromtl_spd_inverse.argtypes = [_I64, _PTR, _I64, _I64, _PTR, _I64, _PTR, _PTR]
    lib.pyromtl_regression_aggregate.argtypes = [_I64, _I64, _I64, _I64, _PTR, _I64, _PTR, _I64, _PTR, _I64, _PTR,
                                                 _I64, _I64, _PTR, _I64, _F32, _PTR, _I64, _PTR]
    lib.pyromtl_spd_inverse.restype = lib.pyromtl_regression_aggregate.restype = ctypes.c_int
    return lib


def unavailable() -> str | None:
    """Why the compiled kernel cannot run on this machine, or ``None`` when it can (builds it on first call)."""
    lib = _library()
    return lib if isinstance(lib, str) else None


def _loaded() -> ctypes.CDLL:
    lib = _library()
    if isinstance(lib, str):
        raise RuntimeError(f"pyromtl's compiled kernel is unavailable: {lib}")
    return lib


def _rows(name: str, t: Tensor, shape: tuple[int, ...]) -> None:
    if t.shape != shape or t.dtype != torch.float32 or t.device.type != "cpu" or (t.dim() == 2 and t.stride(1) != 1):
        raise ValueError(f"{name}: expected a float32 CPU tensor of shape {list(shape)} with unit stride along its "
                         f"rows, got {t.dtype} {t.device.type} {list(t.shape)} with strides {t.stride()}")


def spd_inverse(matrix: Tensor, rhs: Tensor) -> tuple[Tensor, Tensor] | None:
    """``(S, rhs @ S)`` with ``S = matrix⁻¹`` for one SPD ``matrix [P, P]`` and ``rhs [K, P]`` (float32, CPU).

    The inverse goes through a Cholesky factor computed in float32, like LAPACK's ``spotrf``.
    Returns ``None`` when that factorisation fails (the matrix is not positive definite in
    float32), so the caller can retry with a jitter.

    Raises:
        RuntimeError: when :func:`unavailable` gives a reason.
    """
    lib = _loaded()
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1] or rhs.dim() != 2:
        raise ValueError(f"matrix and rhs: expected [P, P] and [K, P], got {list(matrix.shape)} and {list(rhs.shape)}")
    size = matrix.shape[0]
    _rows("matrix", matrix, (size, size))
    _rows("rhs", rhs, (rhs.shape[0], size))
    inverse, product = matrix.new_empty(size, size), matrix.new_empty(rhs.shape[0], size)
    status = lib.pyromtl_spd_inverse(size, matrix.data_ptr(), matrix.stride(0), rhs.shape[0], rhs.data_ptr(),
                                     rhs.stride(0), inverse.data_ptr(), product.data_ptr())
    if status == 2:
        raise MemoryError("pyromtl's compiled kernel could not allocate its work buffer")
    return None if status else (inverse, product)


def regression_aggregate(features: Tensor, r: Tensor, mean: Tensor, y: Tensor, diag: Tensor, s: float,
                         coords: int) -> tuple[Tensor, Tensor]:
    """``aggregate(*regression_moments(features, mean, cov, y, coords), s)`` for one shared ``cov = S``.

    Args:
        features: ``[B, P]``; r: ``features @ S`` ``[B, P]``; mean: ``[K, P]``; y: ``[B, K]``;
            diag: ``S``'s diagonal ``[P]`` (a view is fine); all float32 on the CPU.
        s: eq. 7's power, ≥ 0. coords: aggregate the first ``coords ≤ P`` coordinates.

    Returns:
        ``g [B, coords]`` and, per head, the sum over samples and coordinates of its normalised
        weight ``λ_k^s / Σ_i λ_i^s`` ``[K]``.

    Raises:
        RuntimeError: when :func:`unavailable` gives a reason.
    """
    lib = _loaded()
    batch, size = features.shape
    num_heads = mean.shape[0]
    _rows("features", features, (batch, size))
    _rows("r", r, (batch, size))
    _rows("mean", mean, (num_heads, size))
    if y.shape != (batch, num_heads) or y.dtype != torch.float32 or y.device.type != "cpu":
        raise ValueError(f"y: expected a float32 CPU tensor of shape {[batch, num_heads]}, got {y.dtype} "
                         f"{y.device.type} {list(y.shape)}")
    if diag.shape != (size,) or diag.dtype != torch.float32 or diag.device.type != "cpu":
        raise ValueError(f"diag: expected a float32 CPU tensor of shape {[size]}, got {list(diag.shape)}")
    if not 0 < coords <= size or not s >= 0:
        raise ValueError(f"coords is {coords} and s is {s}; expected 0 < coords ≤ {size} and s ≥ 0")
    g = features.new_empty(batch, coords)
    sums = features.new_empty(num_heads)
    status = lib.pyromtl_regression_aggregate(
        batch, num_heads, size, coords, features.data_ptr(), features.stride(0), r.data_ptr(), r.stride(0),
        mean.data_ptr(), mean.stride(0), y.data_ptr(), y.stride(0), y.stride(1), diag.data_ptr(), diag.stride(0),
        s, g.data_ptr(), g.stride(0), sums.data_ptr())
    if status != 0:
        raise MemoryError("pyromtl's compiled kernel could not allocate its work buffer")
    return g, sums
