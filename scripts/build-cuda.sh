#!/usr/bin/env bash
# Build the CUDA `cocomix` binary on a machine without a GPU or a system CUDA toolkit, using
# nvcc 13.0 and the CUDA headers from PyPI (the nvidia-cuda-*-cu12 wheels carry ptxas but
# no nvcc; the CUDA 13 wheels carry nvcc). Target: sm_90 (H100/H200). nvcc 13.0 matches the
# GPU machines' CUDA 13.0 driver, which rejects PTX from a newer toolkit.
#
#   scripts/build-cuda.sh            # → target/cuda/release/cocomix (cuda feature)
#   scripts/build-cuda.sh --nccl     # the same with data-parallel NCCL (cuda,nccl features),
#                                    # linked against libnccl from PyPI's nvidia-nccl-cu13
#
# Copy target/cuda/release/cocomix and a prepared data folder to the GPU machine; nothing there
# needs a registry. cudarc loads libcuda/libcublas/libcurand at run time from the driver
# install (or from the nvidia-*-cu12 wheels' lib folders on LD_LIBRARY_PATH). An --nccl binary
# also needs libnccl.so.2 there: the system's NCCL, or `pip install nvidia-nccl-cu13` and its
# nvidia/nccl/lib on LD_LIBRARY_PATH.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
features=cuda
case ${1:-} in
  --nccl) features=cuda,nccl ;;
  "") ;;
  *) echo "usage: scripts/build-cuda.sh [--nccl]" >&2; exit 2 ;;
esac
venv=${CUDA_VENV:-$root/target/cuda-venv}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  # Pin every part of the 13.0 toolchain: unpinned, nvvm and crt would come from a newer
  # release and emit PTX that this ptxas (and a 13.0 driver) rejects.
  "$venv/bin/pip" install --quiet nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 \
    nvidia-cuda-nvrtc==13.0.88 nvidia-curand==10.4.0.35 nvidia-cublas==13.0.2.14
fi
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cuda=$site/nvidia/cu13
export PATH="$cuda/bin:$PATH"
export CUDA_ROOT="$cuda" CUDA_PATH="$cuda" CUDA_HOME="$cuda"
# The CCCL wheel's headers (cuda/std, thrust) sit in a subfolder of its include.
export NVCC_PREPEND_FLAGS="-I$cuda/include -I$cuda/include/cccl ${NVCC_PREPEND_FLAGS:-}"
export CUDA_COMPUTE_CAP=90
export CUDARC_CUDA_VERSION=13000
nvcc --version | tail -2
# The linker wants unversioned names; the wheels ship libX.so.N.
lib=$cuda/lib
for l in cudart cublas cublasLt nvrtc; do ln -sf "lib$l.so.13" "$lib/lib$l.so"; done
ln -sf libcurand.so.10 "$lib/libcurand.so"
if [ "$features" = cuda,nccl ]; then
  # NCCL >= 2.30 (cudarc's `nccl` feature binds the 2.30 API).
  [ -f "$site/nvidia/nccl/lib/libnccl.so.2" ] || "$venv/bin/pip" install --quiet nvidia-nccl-cu13==2.32.3
  ln -sf "$site/nvidia/nccl/lib/libnccl.so.2" "$lib/libnccl.so"
fi
cd "$root"
build() { cargo build --release -p cocomix-cli --features "$features" --target-dir target/cuda; }
if [ ! -f "$lib/libcuda.so" ]; then
  # No wheel ships the driver's libcuda. Link against a stand-in with the same soname that
  # defines the driver symbols cudarc uses; the GPU machine's driver provides the real one.
  build || true
  rlib=$(ls target/cuda/release/deps/libcudarc-*.rlib | head -n 1)
  nm "$rlib" 2>/dev/null | awk '$1=="U" && $2 ~ /^cu[A-Z]/ {print "void " $2 "(void) {}"}' | sort -u > target/cuda/libcuda_stub.c
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$lib/libcuda.so" target/cuda/libcuda_stub.c
fi
build
ls -l target/cuda/release/cocomix
# On the GPU machine the CUDA 13 runtime libraries come with its image; elsewhere put
# $lib on LD_LIBRARY_PATH.
