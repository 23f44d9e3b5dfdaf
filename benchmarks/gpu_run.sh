#!/usr/bin/env bash
# The CUDA checks on a GPU machine: tests/test_cuda.py, then benchmarks/gpu.py.
#
# That machine has torch, numpy, scipy, scikit-learn, matplotlib, xarray, h5py, pytest and
# hypothesis, but not pyro-ppl, arviz or torchjd, and it reaches no package registry. So:
#
#   1. here, where pip reaches PyPI (the repository's root, its venv):
#          bash benchmarks/gpu_run.sh prepare
#      downloads x86-64 CPython 3.12 wheels of what it lacks into .whl/ (git-ignored; about 24 MB),
#      at the versions this venv holds;
#   2. on the GPU machine, in a copy of the working tree with .whl/ carried along:
#          bash benchmarks/gpu_run.sh device
#      installs them into /tmp/site, installs pyromtl in editable mode (models/ and guides/ are
#      mapped to pyromtl.models and pyromtl.guides only by an install), runs the CUDA tests, then
#      the benchmarks, and leaves the logs and the JSON in $OUT (/tmp/gpu-out without one).
#      With this workplace's device tool: run(command="bash benchmarks/gpu_run.sh device",
#      carry=[".whl"], timeout_s=600); it takes about 5 minutes (estimated: not run yet).
#
# Time limits (a device call may run 10 minutes): the tests get TEST_TIMEOUT seconds (default
# 220); gpu.py starts no benchmark unit after GPU_BUDGET seconds (default 240) and is stopped at
# GPU_TIMEOUT (default 300). STAGES="tests" or STAGES="bench" runs one half (default both);
# GPU_ARGS adds arguments to gpu.py (e.g. "--only weighting" or "--scale 0.5" for a rerun).
# Exit status: non-zero if the tests or a benchmark unit failed.
set -uo pipefail
cd "$(dirname "$0")/.."

# What the GPU machine lacks: pyromtl's dependencies and theirs (torchjd's extras included), less
# cvxpy's SCS solver: its wheel alone is 43 MB of the 64 MiB a device call carries, and Nash-MTL
# (ECOS) and CAGrad (Clarabel) do not use it (checked: both train with `import scs` blocked).
PACKAGES=(
    pyro-ppl pyro-api
    arviz arviz-base arviz-plots arviz-stats xarray-einstats h5netcdf
    torchjd quadprog qpsolvers cvxpy clarabel highspy osqp qdldl sparsediffpy ecos cffi pycparser
)

prepare() {
    local py="${PYTHON:-.venv/bin/python}" dest="${WHEELS:-.whl}" name version
    mkdir -p "$dest"
    rm -f "$dest"/*.whl  # one version of each: two would stop the install there
    for name in "${PACKAGES[@]}"; do
        version="$("$py" -c "import importlib.metadata as m; print(m.version('$name'))")" || exit 1
        "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
            --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
            -d "$dest" "$name==$version" || exit 1
    done
    ls "$dest"
    du -sh "$dest"
}

device() {
    local out="${OUT:-/tmp/gpu-out}" status=0
    mkdir -p "$out"
    export PYTHONUNBUFFERED=1 PYROMTL_CACHE=/tmp/pyromtl-cache MPLBACKEND=Agg
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "installing the carried wheels failed: was .whl carried (bash benchmarks/gpu_run.sh prepare)?"; exit 1; }
    export PYTHONPATH=/tmp/site
    python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >"$out/install.log" 2>&1 \
        || { cat "$out/install.log"; exit 1; }
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
    python3 -c "import torch, pyro, torchjd, arviz, pyromtl.models; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" \
        | tee -a "$out/gpu.txt"

    local stages="${STAGES:-tests bench}"
    if [[ " $stages " == *" tests "* ]]; then
        timeout "${TEST_TIMEOUT:-220}" python3 -m pytest -m cuda tests/test_cuda.py -q -rs --durations=10 \
            -p no:cacheprovider --junitxml="$out/test_cuda.xml" 2>&1 | tee "$out/test_cuda.log"
        [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
    fi
    if [[ " $stages " == *" bench "* ]]; then
        # shellcheck disable=SC2086  # GPU_ARGS is a list of arguments
        timeout "${GPU_TIMEOUT:-300}" python3 benchmarks/gpu.py --budget "${GPU_BUDGET:-240}" --json "$out/gpu.json" \
            ${GPU_ARGS:-} 2>&1 | tee "$out/gpu.log"
        [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
    fi
    exit "$status"
}

case "${1:-}" in
    prepare) prepare ;;
    device) device ;;
    *)
        echo "usage: bash benchmarks/gpu_run.sh prepare|device (see the comments at its top)" >&2
        exit 2
        ;;
esac
