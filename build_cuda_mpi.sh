#!/usr/bin/env bash
# Build a CUDA-aware Open MPI 5.0.x from a source tarball, offline, and point mpi4py at it.
#
#   bash build_cuda_mpi.sh [--prefix DIR] [--cuda DIR] [--jobs N] TARBALL
#
#   --prefix DIR  where to install (default $HOME/.local/ompi-cuda, outside the repository)
#   --cuda DIR    the CUDA toolkit (default $CUDA_HOME, else /usr/local/cuda)
#   --jobs N      parallel make jobs (default: nproc)
#   TARBALL       openmpi-5.0.x.tar.{bz2,gz,xz} from https://www.open-mpi.org/software/ompi/v5.0/
#                 or Debian's openmpi_5.0.x.orig.tar.xz (the same pristine source)
#
# Why: no MPI on PyPI is CUDA-aware (the `openmpi` and `mpich` wheels lack CUDA), so GPU tensors
# get staged through host memory; this Open MPI's smcuda BTL moves them with CUDA IPC instead.
#
# mpi4py needs no rebuild: the PyPI mpi4py wheel carries two extensions, one built for Open MPI
# and one for MPICH, and picks one at import time by the library named in MPI4PY_LIBMPI.
# Setting MPI4PY_LIBMPI=$PREFIX/lib/libmpi.so.40 makes it load this Open MPI.
#
# One runtime rule: each rank must create its CUDA context (select its GPU, allocate once)
# BEFORE MPI_Init, because smcuda sets up CUDA IPC during MPI_Init; otherwise it prints
# "Failed to create accelerator ipc_stream stream" and device messages take a slow fallback.
# The KV-Runahead programs do this themselves.
#
# Re-running is safe: a working CUDA-aware install in the prefix is kept (delete it to rebuild).
set -euo pipefail

die() { echo "build_cuda_mpi.sh: error: $*" >&2; exit 1; }

PREFIX="$HOME/.local/ompi-cuda"
CUDA="${CUDA_HOME:-/usr/local/cuda}"
JOBS="$(nproc)"
TARBALL=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --prefix) PREFIX="${2:?--prefix needs a directory}"; shift 2 ;;
    --cuda)   CUDA="${2:?--cuda needs a directory}"; shift 2 ;;
    --jobs)   JOBS="${2:?--jobs needs a number}"; shift 2 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *)  [[ -z $TARBALL ]] || die "only one TARBALL, got '$TARBALL' and '$1'"; TARBALL="$1"; shift ;;
  esac
done
[[ $JOBS =~ ^[1-9][0-9]*$ ]] || die "--jobs wants a positive integer, got '$JOBS'"
PREFIX="$(realpath -m "$PREFIX")"                    # absolute: it is baked into the install

# "Built with CUDA" is a compile-time fact that ompi_info reports as ...:value:true.
# (No grep -q: quitting early would kill ompi_info with SIGPIPE and trip pipefail.)
cuda_aware() {
  [[ -x $PREFIX/bin/ompi_info && -e $PREFIX/lib/libmpi.so.40 ]] || return 1
  local line
  line="$("$PREFIX/bin/ompi_info" --parsable --all 2>/dev/null | grep mpi_built_with_cuda_support:value || true)"
  [[ $line == *:true ]]
}

if cuda_aware; then
  echo "CUDA-aware Open MPI already installed in $PREFIX: skipping the build."
else
  # --- check the inputs, one clear line each -----------------------------------------------
  [[ -n $TARBALL ]] || die "no TARBALL given; download openmpi-5.0.x.tar.bz2 from https://www.open-mpi.org/software/ompi/v5.0/"
  [[ -f $TARBALL ]] || die "tarball '$TARBALL' not found; download openmpi-5.0.x.tar.bz2 from https://www.open-mpi.org/software/ompi/v5.0/"
  [[ -x $CUDA/bin/nvcc && -f $CUDA/include/cuda.h ]] || die "no CUDA toolkit at '$CUDA' (need bin/nvcc and include/cuda.h); pass --cuda DIR or set CUDA_HOME"
  # Open MPI links against the driver's libcuda.so, which a build machine may lack: link against
  # the toolkit's stub, named explicitly (auto-detection has failed for others). At run time the
  # real driver's libcuda.so.1 is loaded; never put the stubs directory on LD_LIBRARY_PATH.
  STUBS="$CUDA/lib64/stubs"
  [[ -f $STUBS/libcuda.so ]] || die "no $STUBS/libcuda.so (the CUDA driver stub that ships with the toolkit)"
  CC="${CC:-cc}"
  command -v "$CC" >/dev/null || die "no C compiler '$CC' (install gcc, or set CC)"
  command -v make >/dev/null || die "no make (install make)"

  # --- extract into a temporary build directory, removed on exit ---------------------------
  mkdir -p "$PREFIX"
  LOG="$PREFIX/build.log"; : >"$LOG"                 # outside BUILD: it survives a failure
  BUILD="$(mktemp -d "${TMPDIR:-/tmp}/ompi-cuda-build.XXXXXX")"
  trap 'rm -rf "$BUILD"' EXIT
  trap 'echo "build_cuda_mpi.sh: error: a step failed; last lines of $LOG:" >&2; tail -n 25 "$LOG" >&2' ERR
  echo "==> extracting $TARBALL (full log: $LOG)"
  tar -xf "$TARBALL" -C "$BUILD" 2>>"$LOG"            # GNU tar detects .bz2/.gz/.xz by itself
  SRC="$(find "$BUILD" -mindepth 1 -maxdepth 1 -type d -name 'openmpi-5.*' | head -n 1)"
  [[ -n $SRC && -x $SRC/configure ]] || die "'$TARBALL' is not an Open MPI 5.0.x source tarball"

  # --- configure: CUDA on; bundled hwloc/libevent/PMIx/PRRTE so no system MPI pieces leak in;
  # network stacks (UCX, libfabric, verbs, ...) and Fortran/OpenSHMEM/ROMIO/Java off: one node.
  echo "==> configuring (CUDA from $CUDA)"
  (cd "$SRC" && CC="$CC" ./configure --prefix="$PREFIX" --with-cuda="$CUDA" \
     --with-cuda-libdir="$STUBS" --without-ucx --without-ofi --without-verbs \
     --without-psm2 --without-ucc --without-hcoll --with-hwloc=internal --with-libevent=internal \
     --with-pmix=internal --with-prrte=internal --disable-mpi-fortran --disable-oshmem \
     --disable-io-romio --disable-mpi-java --disable-dependency-tracking --disable-static) >>"$LOG" 2>&1
  grep -q '^#define OPAL_CUDA_SUPPORT 1' "$SRC/opal/include/opal_config.h" \
    || die "configure did not enable CUDA (see 'checking if have cuda support' in $LOG)"
  echo "==> make -j$JOBS and make install (16 cores take ~4 min; 2 cores far longer)"
  make -C "$SRC" -j"$JOBS" >>"$LOG" 2>&1
  make -C "$SRC" install >>"$LOG" 2>&1
  cuda_aware || die "installed, but '$PREFIX/bin/ompi_info --parsable --all' does not report mpi_built_with_cuda_support:value:true"
  echo "==> built and installed a CUDA-aware Open MPI in $PREFIX"
fi

# --- the environment, as a file to source and as lines to copy --------------------------------
q="$(printf %q "$PREFIX")"
cat >"$PREFIX/env.sh" <<EOF
# Written by build_cuda_mpi.sh. 'source' this to use the CUDA-aware Open MPI in $PREFIX.
export PATH=$q/bin:\$PATH
export LD_LIBRARY_PATH=$q/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}
export MPI4PY_LIBMPI=$q/lib/libmpi.so.40
# Open MPI refuses to start as root (common in containers) unless told twice.
if [ "\$(id -u)" = 0 ]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi
EOF
cat <<EOF

Use it (or: source $q/env.sh):
  export PATH=$q/bin:\$PATH
  export LD_LIBRARY_PATH=$q/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}
  export MPI4PY_LIBMPI=$q/lib/libmpi.so.40
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1   # only when running as root
Run with this mpirun ($PREFIX/bin/mpirun, not the venv's MPICH one); it forwards
only the variables that -x names:
  mpirun -np 4 --mca btl smcuda,sm,self -x PATH -x LD_LIBRARY_PATH -x MPI4PY_LIBMPI python runahead.py --device cuda
EOF
