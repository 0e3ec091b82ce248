#!/usr/bin/env bash
# Prepare wheels for tools/gpu_check.sh on a CUDA machine that cannot reach a package index.
#
#   bash tools/gpu_wheels.sh [--full] [--ort-gpu] [DEST]      # DEST defaults to .whl (ignored by git)
#
# Targets CPython 3.12 on manylinux x86-64 (the lent nvidia-h200 machine). Each wheel is fetched
# with --no-deps, one version per name, so that `pip install --no-index --find-links DEST` there
# sees exactly these.
#
# Sets (measured 2026-12-01, onnxruntime-gpu 1.31.1):
#   default   what the nvidia-h200 image lacks for cet-onnx: onnx-ir>=1.1 (it has 1.0.0) and
#             onnxsim: about 10 MB. For a venv made with --system-site-packages over that image
#             (numpy, scipy, onnx, protobuf, ml_dtypes, click, pytest, setuptools, sympy, the
#             CUDA 13 runtime libraries cuBLAS / cuDNN 9 / cuFFT / cuRAND / NVRTC are all there):
#             gpu_check.sh's SYSTEM_SITE=1.
#   --full    everything cet-onnx and the tests need in a bare venv (numpy, scipy, onnx, ...):
#             about 77 MB, over the device tool's 64 MiB working-tree limit on its own.
#   --ort-gpu also onnxruntime-gpu itself (CUDA 13 build; its CUDA libraries come from the image).
#             The wheel is 255 MB (libonnxruntime_providers_cuda.so alone is 284 MB unpacked and
#             still 186 MB under xz), about four times the 64 MiB a device call may carry. It is
#             saved to DEST-ort/ and split there into parts of PART_MB (default 56) MB with a
#             SHA256SUMS file, for a relay over several calls to one warm machine (README
#             "GPU check"); gpu_check.sh's ORT_GPU_WHEEL accepts the wheel or that folder of parts.
set -euo pipefail
cd "$(dirname "$0")/.."

full=0; ort=0; dest=.whl
for a in "$@"; do
  case "$a" in
    --full) full=1 ;;
    --ort-gpu) ort=1 ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    -*) echo "gpu_wheels: unknown option $a" >&2; exit 2 ;;
    *) dest=$a ;;
  esac
done
PY=${PY:-python3}
PART_MB=${PART_MB:-56}
ORT_GPU_VERSION=${ORT_GPU_VERSION:-1.31.1}
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
fetch() {  # fetch DIR REQ...
  local dir=$1; shift
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$dir" "$@"
}

mkdir -p "$dest"
fetch "$dest" "onnx-ir>=1.1" "onnxsim>=0.4.36"
if [ "$full" = 1 ]; then
  fetch "$dest" "numpy>=1.24" "scipy>=1.10" "click>=8.1" "onnx>=1.20" protobuf ml_dtypes typing_extensions sympy \
    mpmath packaging flatbuffers "pytest>=8" iniconfig pluggy pygments "setuptools>=69" wheel
fi
echo "gpu_wheels: $dest"
ls -l "$dest"/*.whl | awk '{printf "  %10d  %s\n", $5, $NF}'
du -sh "$dest" | awk '{print "gpu_wheels: total " $1}'

if [ "$ort" = 1 ]; then
  odir="${dest%/}-ort"
  mkdir -p "$odir"
  fetch "$odir" "onnxruntime-gpu==$ORT_GPU_VERSION"
  wheel=$(ls "$odir"/onnxruntime_gpu-*.whl | head -1)
  name=$(basename "$wheel")
  rm -f "$odir"/"$name".part.*
  split -b "${PART_MB}M" -d -a 2 "$wheel" "$odir/$name.part."
  (cd "$odir" && sha256sum "$name" > SHA256SUMS)
  echo "gpu_wheels: $wheel ($(du -h "$wheel" | cut -f1)) split into $(ls "$odir"/"$name".part.* | wc -l) parts in $odir:"
  ls -l "$odir"/"$name".part.* | awk '{printf "  %10d  %s\n", $5, $NF}'
  echo "gpu_wheels: the whole wheel exceeds one device call's 64 MiB: carry one part per call (README \"GPU check\")"
fi
