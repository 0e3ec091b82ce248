#!/usr/bin/env bash
# GPU check: on a machine with CUDA, install cet-onnx with onnxruntime-gpu in a fresh venv, run the
# tests marked `cuda` and a probe benchmark on CPU and on CUDA with the same settings.
#
# Usage (from anywhere; it works in the repository root):
#   bash tools/gpu_check.sh                      # online: pip reaches a package index
#   WHEELS=.whl SYSTEM_SITE=1 ORT_GPU_WHEEL=.whl-ort bash tools/gpu_check.sh
#                                                # offline, over an image that has numpy, scipy, onnx, ...
#   bash tools/gpu_check.sh --cpu-dry-run        # no GPU: no runtime swap, CUDA tests skip, CPU benchmark only
#
# Steps (exit non-zero at the first failure; about 2-5 minutes):
#   1. a fresh venv at $VENV (default /tmp/cet-gpu-venv; SYSTEM_SITE=1: --system-site-packages);
#   2. `pip install .`, then the runtime swap of README "GPU (CUDA)": uninstall onnxruntime,
#      `pip install --force-reinstall --no-deps onnxruntime-gpu`. With WHEELS=DIR every pip call is
#      `pip install --no-index --find-links DIR` (tools/gpu_wheels.sh prepares DIR). ORT_GPU_WHEEL
#      names the onnxruntime-gpu wheel, or a folder with it, or a folder with its parts and SHA256SUMS
#      (tools/gpu_wheels.sh --ort-gpu), reassembled and checked here;
#   3. CUDA libraries that pip packages ship (site-packages/nvidia/...) are put on LD_LIBRARY_PATH;
#      `CUDAExecutionProvider` must be listed and a session must really run on it;
#   4. `pytest -m cuda tests/test_cuda.py` against the installed package, with
#      CET_ONNX_REQUIRE_CUDA=1 so that no CUDA test may skip;
#   5. tools/gpu_bench.py: `cet-onnx analyze` on the bundled digits model and on a synthetic MLP
#      (tools/make_large_model.py, BENCH_GB=0.1 GB in layers of BENCH_WIDTH=2048), on CPU and CUDA;
#      prints the table (device, probe forward passes, passes/s, probe s, wall s, CUDA/CPU ratio).
#
# Output: the log and the table go to stdout; with $OUT set (the device tool's collected folder)
# also to $OUT/gpu_check.log, $OUT/gpu_bench.md and $OUT/gpu_bench.json.
# Environment: PY (python for the venv, default python3), VENV, WHEELS, SYSTEM_SITE, ORT_GPU_WHEEL,
# ORT_GPU_SPEC (online: the onnxruntime-gpu requirement, default onnxruntime-gpu), CPU_DRY_RUN=1
# (same as --cpu-dry-run), BENCH_GB, BENCH_WIDTH, BENCH_PROBE_SIZE, OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

CPU_DRY_RUN=${CPU_DRY_RUN:-0}
for a in "$@"; do
  case "$a" in
    --cpu-dry-run) CPU_DRY_RUN=1 ;;
    -h|--help) sed -n '2,33p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $a" >&2; exit 2 ;;
  esac
done
PY=${PY:-python3}
VENV=${VENV:-/tmp/cet-gpu-venv}
WHEELS=${WHEELS:-}
SYSTEM_SITE=${SYSTEM_SITE:-0}
ORT_GPU_WHEEL=${ORT_GPU_WHEEL:-}
ORT_GPU_SPEC=${ORT_GPU_SPEC:-onnxruntime-gpu}
BENCH_GB=${BENCH_GB:-0.1}
BENCH_WIDTH=${BENCH_WIDTH:-2048}
BENCH_PROBE_SIZE=${BENCH_PROBE_SIZE:-64}
OUT=${OUT:-}
if [ -n "$OUT" ]; then
  mkdir -p "$OUT"
  exec > >(tee "$OUT/gpu_check.log") 2>&1
fi
[ -n "$WHEELS" ] && WHEELS=$(cd "$WHEELS" && pwd)

t_start=$(date +%s)
step() { echo "== gpu_check [$(( $(date +%s) - t_start ))s]: $*"; }
fail() { echo "gpu_check: FAILED: $*" >&2; exit 1; }
trap 'echo "gpu_check: FAILED at line $LINENO (exit $?)" >&2' ERR

step "fresh venv $VENV ($("$PY" --version 2>&1); system site packages: $SYSTEM_SITE; wheels: ${WHEELS:-index}; cpu dry run: $CPU_DRY_RUN)"
rm -rf "$VENV"
venv_args=()
[ "$SYSTEM_SITE" = 1 ] && venv_args=(--system-site-packages)
"$PY" -m venv "${venv_args[@]}" "$VENV"
V="$VENV/bin/python"
pip_install() {
  if [ -n "$WHEELS" ]; then
    local iso=()
    [ "$SYSTEM_SITE" = 1 ] && iso=(--no-build-isolation)  # setuptools comes from the image
    "$V" -m pip install -q --disable-pip-version-check --no-index --find-links "$WHEELS" "${iso[@]}" "$@"
  else
    "$V" -m pip install -q --disable-pip-version-check "$@"
  fi
}

step "install cet-onnx (pip install .)"
pip_install .
"$V" -P -c "import pytest" 2>/dev/null || pip_install "pytest>=8"

if [ "$CPU_DRY_RUN" = 1 ]; then
  step "cpu dry run: onnxruntime is not swapped for onnxruntime-gpu"
else
  step "swap onnxruntime for onnxruntime-gpu (README 'GPU (CUDA)')"
  # In a --system-site-packages venv the image's onnxruntime lies outside the venv: pip leaves it
  # alone (and says so); the venv's onnxruntime-gpu comes first on sys.path.
  "$V" -m pip uninstall -y onnxruntime || echo "gpu_check: (no onnxruntime to uninstall in the venv)"
  if [ -n "$ORT_GPU_WHEEL" ]; then
    src=$ORT_GPU_WHEEL
    if [ -d "$src" ]; then
      whl=$(ls "$src"/onnxruntime_gpu-*.whl 2>/dev/null | head -1 || true)
      if [ -z "$whl" ]; then
        first=$(ls "$src"/onnxruntime_gpu-*.whl.part.* 2>/dev/null | head -1 || true)
        [ -n "$first" ] || fail "ORT_GPU_WHEEL=$src holds neither onnxruntime_gpu-*.whl nor its parts"
        name=$(basename "${first%.part.*}")
        mkdir -p "$VENV/ort-wheel"
        whl="$VENV/ort-wheel/$name"
        cat "$src/$name".part.* > "$whl"
        if [ -f "$src/SHA256SUMS" ]; then
          (cd "$VENV/ort-wheel" && sha256sum -c "$(cd "$src" && pwd)/SHA256SUMS") || fail "reassembled $name is corrupt"
        fi
      fi
      src=$whl
    fi
    "$V" -m pip install -q --disable-pip-version-check --no-index --force-reinstall --no-deps "$src"
  elif [ -n "$WHEELS" ]; then
    pip_install --force-reinstall --no-deps onnxruntime-gpu
  else
    "$V" -m pip install -q --disable-pip-version-check --force-reinstall --no-deps "$ORT_GPU_SPEC"
  fi
fi

step "CUDA libraries from pip packages onto LD_LIBRARY_PATH"
libs=$("$V" -P - <<'EOF'
import importlib.util, os
dirs = set()
spec = importlib.util.find_spec("nvidia")
for base in (list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []):
    for d, _, files in os.walk(base):
        if any(f.startswith("lib") and ".so" in f for f in files):
            dirs.add(d)
print(":".join(sorted(dirs)))
EOF
)
if [ -n "$libs" ]; then
  export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  echo "$libs" | tr ':' '\n' | sed 's/^/  /'
else
  echo "  (none: the system's CUDA libraries are used)"
fi

step "onnxruntime providers"
REQUIRE=$([ "$CPU_DRY_RUN" = 1 ] && echo 0 || echo 1) "$V" -P - <<'EOF'
import os, sys
import numpy as np
import onnx
from onnx import TensorProto, helper
import onnxruntime as ort
providers = ort.get_available_providers()
print(f"  onnxruntime {ort.__version__} from {os.path.dirname(ort.__file__)}: {providers}")
if os.environ["REQUIRE"] != "1":
    sys.exit(0)
if "CUDAExecutionProvider" not in providers:
    sys.exit("gpu_check: CUDAExecutionProvider is not listed: onnxruntime-gpu is not the onnxruntime imported")
g = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "smoke",
                      [helper.make_tensor_value_info(n, TensorProto.FLOAT, [64, 64]) for n in "ab"],
                      [helper.make_tensor_value_info("c", TensorProto.FLOAT, [64, 64])])
m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
m.ir_version = 8
s = ort.InferenceSession(m.SerializeToString(), providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
if s.get_providers()[0] != "CUDAExecutionProvider":
    sys.exit(f"gpu_check: a session asked for CUDA got {s.get_providers()} (CUDA or cuDNN libraries not found?)")
a = np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32)
c = s.run(None, {"a": a, "b": a})[0]
print(f"  a session runs on CUDA: max |c - a@a| = {np.abs(c - a @ a).max():.2e}")
EOF

step "pytest -m cuda tests/test_cuda.py"
# -P: the installed cet-onnx is tested, not the checkout's copy on the current directory
if [ "$CPU_DRY_RUN" = 1 ]; then
  "$V" -P -m pytest -q -p no:cacheprovider -m cuda -rs tests/test_cuda.py
else
  CET_ONNX_REQUIRE_CUDA=1 "$V" -P -m pytest -q -p no:cacheprovider -m cuda -rs tests/test_cuda.py
fi

devices=cpu,cuda
[ "$CPU_DRY_RUN" = 1 ] && devices=cpu
step "probe benchmark on $devices (tools/gpu_bench.py)"
bench_out=()
[ -n "$OUT" ] && bench_out=(--out "$OUT/gpu_bench")
"$V" -P tools/gpu_bench.py --devices "$devices" --probe-size "$BENCH_PROBE_SIZE" --large-gb "$BENCH_GB" \
  --large-width "$BENCH_WIDTH" "${bench_out[@]}"

step "done: all checks passed"
