#!/usr/bin/env bash
# Compile-only check of the CUDA op (csrc/dpo_logratio_cuda.cu) for sm_90 with the local nvcc.
# CPU machines have nvcc but a CPU torch (no libtorch_cuda): the .cu is compiled (`nvcc -c`), never
# linked or run; GPU machines build and test it through tools/bench/gpu_check.sh.
# Flags mirror torch.utils.cpp_extension's CUDAExtension build (plus setup.py's -O3);
# -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE stands in for a header the CPU wheel lacks.
# Env: PYTHON (default .venv/bin/python), NVCC (default /usr/local/cuda/bin/nvcc),
#      CUDA_ARCH (default 90).
set -euo pipefail
cd "$(dirname "$0")/.."

NVCC=${NVCC:-/usr/local/cuda/bin/nvcc}
PYTHON=${PYTHON:-.venv/bin/python}
CUDA_ARCH=${CUDA_ARCH:-90}
SOURCE=csrc/dpo_logratio_cuda.cu

if [ ! -x "$NVCC" ]; then
  echo "nvcc not found: skipping ($NVCC)"
  exit 0
fi
if [ ! -x "$PYTHON" ] && ! command -v "$PYTHON" >/dev/null 2>&1; then
  echo "error: no python at $PYTHON (set PYTHON=...)" >&2
  exit 2
fi

TORCH_DIR=$("$PYTHON" -c 'import os, torch; print(os.path.dirname(torch.__file__))')
PY_INCLUDE=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
CXX11_ABI=$("$PYTHON" -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))')

OUT_DIR=$(mktemp -d)
trap 'rm -rf "$OUT_DIR"' EXIT

echo "nvcc -c $SOURCE (sm_$CUDA_ARCH) ..."
start=$(date +%s)
"$NVCC" -c "$SOURCE" -o "$OUT_DIR/dpo_logratio_cuda.o" \
  -std=c++20 -O3 -Xcompiler -fPIC \
  -gencode "arch=compute_${CUDA_ARCH},code=sm_${CUDA_ARCH}" \
  -D_GLIBCXX_USE_CXX11_ABI="$CXX11_ABI" -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE \
  -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_dpo_cuda \
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
  -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ \
  --expt-relaxed-constexpr -Werror all-warnings \
  -isystem "$TORCH_DIR/include" \
  -isystem "$TORCH_DIR/include/torch/csrc/api/include" \
  -isystem "$PY_INCLUDE"
echo "ok: $SOURCE compiles for sm_$CUDA_ARCH ($(( $(date +%s) - start )) s)"
