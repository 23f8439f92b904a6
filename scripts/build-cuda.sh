#!/usr/bin/env bash
# Build `bitnet` with the CUDA backend (`--features cuda`) on a machine that has no CUDA install
# and no GPU, for a Linux x86-64 machine that has an NVIDIA driver (CUDA 13) and CUDA 13's
# libraries (cuBLAS, cuRAND, NVRTC, the runtime: a PyTorch cu130 install carries them).
#
#   bash scripts/build-cuda.sh            # -> target/cuda/release/bitnet and carry/bitnet-cuda.xz
#   CUDA_COMPUTE_CAP=80 bash scripts/build-cuda.sh   # another GPU generation (default 90: H100)
#
# What it does:
#   1. puts CUDA 13.0's compiler (nvcc, cicc, ptxas) and headers into target/cuda-13.0, from
#      NVIDIA's own PyPI wheels (pinned below): candle's kernels are CUDA C++ compiled to PTX at
#      build time;
#   2. writes link stubs for the libraries candle links against (libcuda, cuBLAS, cuBLASLt,
#      cuRAND, NVRTC): a shared object with the real library's soname and every function name
#      cudarc declares, so the linker records the dependency; at run time the dynamic loader
#      finds the real libraries (set LD_LIBRARY_PATH to the folder holding them);
#   3. builds bitnet-cli with `--features cuda` into target/cuda (its own target folder, so the
#      CPU build is not rebuilt) and packs the binary, stripped, into carry/bitnet-cuda.xz
#      (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
tk=$root/target/cuda-13.0
cap=${CUDA_COMPUTE_CAP:-90}

wheels=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-cccl==13.0.85
  nvidia-cuda-runtime==13.0.96
)

if [ ! -x "$tk/bin/nvcc" ] || [ ! -f "$tk/.complete" ]; then
  echo "build-cuda: fetching CUDA 13.0's compiler from PyPI into $tk"
  rm -rf "$tk" && mkdir -p "$tk/wheels"
  python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_12_x86_64 --platform manylinux2010_x86_64 \
    -d "$tk/wheels" "${wheels[@]}"
  for w in "$tk"/wheels/*.whl; do
    python3 -m zipfile -e "$w" "$tk/unpacked"
  done
  # The wheels unpack to nvidia/cu13/{bin,include,lib,nvvm}: the layout nvcc.profile expects.
  mv "$tk/unpacked/nvidia/cu13"/* "$tk/"
  rm -rf "$tk/unpacked" "$tk/wheels"
  chmod +x "$tk"/bin/* "$tk"/nvvm/bin/*
  touch "$tk/.complete"
fi
"$tk/bin/nvcc" --version | tail -2

# Link stubs: soname and the cudarc module whose function names the library must define.
# (cudarc is an optional dependency: resolve it with the cuda feature on.)
src=$(cargo metadata --format-version 1 --features bitnet-cli/cuda --manifest-path "$root/Cargo.toml" |
  python3 -c 'import json,sys,os; m=json.load(sys.stdin); print(next(os.path.dirname(p["manifest_path"]) for p in m["packages"] if p["name"]=="cudarc"))')
stubs=$tk/lib
mkdir -p "$stubs"
stub() { # soname link-name cudarc-module...
  local soname=$1 link=$2
  shift 2
  local c=$tk/stub-${link}.c
  : >"$c"
  for m in "$@"; do
    grep -oE '^pub unsafe fn [A-Za-z_][A-Za-z0-9_]*\(' "$src/src/$m/sys/mod.rs" |
      sed -E 's/^pub unsafe fn ([A-Za-z0-9_]+)\(/void \1(void) {}/' >>"$c"
  done
  sort -u -o "$c" "$c"
  gcc -shared -fPIC -Wl,-soname,"$soname" -o "$stubs/$soname.stub" "$c"
  ln -sf "$soname.stub" "$stubs/lib$link.so"
}
stub libcuda.so.1 cuda driver
stub libcublas.so.13 cublas cublas
stub libcublasLt.so.13 cublasLt cublaslt
stub libcurand.so.10 curand curand
stub libnvrtc.so.13 nvrtc nvrtc
# The runtime is in the wheel itself (candle's MoE kernels link it): link the real one.
ln -sf libcudart.so.13 "$stubs/libcudart.so"

export PATH=$tk/bin:$PATH CUDA_HOME=$tk CUDA_COMPUTE_CAP=$cap CARGO_TARGET_DIR=$root/target/cuda
cargo build --release -p bitnet-cli --features cuda
# Stripped and compressed for the trip to the GPU machine (64 MiB carry limit):
# scripts/gpu/train-cuda.sh unpacks it there.
mkdir -p carry
strip -o target/cuda/bitnet-stripped target/cuda/release/bitnet
xz -T2 -6 -c target/cuda/bitnet-stripped >carry/bitnet-cuda.xz
echo "build-cuda: target/cuda/release/bitnet and carry/bitnet-cuda.xz (compute capability $cap)"
