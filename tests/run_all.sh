#!/usr/bin/env bash
# The full test suite, as CI runs it (.ci/run):
#   debug   Debug build, every CTest test (CUDA code compiled when nvcc is found; GPU tests skip
#           without a GPU)
#   asan    AddressSanitizer + UndefinedBehaviorSanitizer build, every CTest test
#   tsan    ThreadSanitizer build, the tests labelled `tsan`
#
# Usage: bash tests/run_all.sh [--fresh] [debug] [asan] [tsan]      (default: all three phases)
# Environment: JOBS (default: nproc) build and test parallelism.
#
# On Debian/Ubuntu, missing tools and libraries are installed with apt-get when running as root;
# otherwise the script stops and names what is missing. Every phase runs even when an earlier one
# fails; the exit status is non-zero if any phase failed.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${repo_root}"

fresh=()
phases=()
for arg in "$@"; do
  case "${arg}" in
    --fresh) fresh=(--fresh) ;;
    debug | asan | tsan) phases+=("${arg}") ;;
    -h | --help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "run_all.sh: unknown argument '${arg}' (expected --fresh, debug, asan, tsan)" >&2; exit 2 ;;
  esac
done
[[ ${#phases[@]} -eq 0 ]] && phases=(debug asan tsan)

# ---- dependencies ------------------------------------------------------------------------------
# Debian package -> how to tell it is present without dpkg (for other distributions).
declare -A probe=(
  [cmake]="command:cmake"
  [ninja-build]="command:ninja"
  [g++]="command:g++"
  [libeigen3-dev]="file:/usr/include/eigen3/Eigen/Core"
  [libgtest-dev]="file:/usr/include/gtest/gtest.h"
  [googletest]="skip"
  [libbenchmark-dev]="file:/usr/include/benchmark/benchmark.h"
  [libopenmpi-dev]="command:mpicxx"
  [openmpi-bin]="command:mpirun"
)
packages=(cmake ninja-build g++ libeigen3-dev libgtest-dev googletest libbenchmark-dev libopenmpi-dev openmpi-bin)

missing=()
for package in "${packages[@]}"; do
  if command -v dpkg-query > /dev/null 2>&1; then
    status="$(dpkg-query -W -f='${Status}' "${package}" 2> /dev/null || true)"
    [[ "${status}" == "install ok installed" ]] || missing+=("${package}")
  else
    check="${probe[${package}]}"
    case "${check}" in
      command:*) command -v "${check#command:}" > /dev/null 2>&1 || missing+=("${package}") ;;
      file:*) [[ -e "${check#file:}" ]] || missing+=("${package}") ;;
    esac
  fi
done

if [[ ${#missing[@]} -gt 0 ]]; then
  if [[ "$(id -u)" -eq 0 ]] && command -v apt-get > /dev/null 2>&1; then
    echo "run_all.sh: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
  else
    echo "run_all.sh: missing: ${missing[*]}" >&2
    echo "  install them (Debian/Ubuntu: sudo apt-get install ${missing[*]}) and run again;" >&2
    echo "  needed: CMake >= 3.25, Ninja, a C++17 compiler, Eigen 3.3+, GoogleTest, Open MPI" >&2
    echo "  (Google Benchmark only for the main job)." >&2
    exit 1
  fi
fi

cmake_version="$(cmake --version | head -n1 | awk '{print $3}')"
if ! printf '3.25.0\n%s\n' "${cmake_version}" | sort -V -C; then
  echo "run_all.sh: CMake ${cmake_version} is too old: workflow presets need CMake >= 3.25" >&2
  exit 1
fi

# nvcc is optional: with it, the CUDA code compiles (and its tests skip when no GPU answers).
if ! command -v nvcc > /dev/null 2>&1 && [[ -x /usr/local/cuda/bin/nvcc ]]; then
  export PATH="/usr/local/cuda/bin:${PATH}"
fi

# Open MPI refuses to start as root unless told; containers also lack the kernel's cross-memory
# attach, which Open MPI's shared-memory transport would otherwise try first.
if [[ "$(id -u)" -eq 0 ]]; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
export OMPI_MCA_btl_vader_single_copy_mechanism="${OMPI_MCA_btl_vader_single_copy_mechanism:-none}"

jobs="${JOBS:-$(nproc)}"
export CMAKE_BUILD_PARALLEL_LEVEL="${jobs}" CTEST_PARALLEL_LEVEL="${jobs}"

# ---- phases ------------------------------------------------------------------------------------
summary=()
failed=0
started_all=${SECONDS}
for phase in "${phases[@]}"; do
  echo
  echo "==== ${phase}: cmake --workflow --preset ${phase} ${fresh[*]:-} (jobs ${jobs}) ===="
  started=${SECONDS}
  if cmake --workflow --preset "${phase}" "${fresh[@]}"; then
    result=passed
  else
    result=FAILED
    failed=1
  fi
  elapsed=$((SECONDS - started))
  summary+=("$(printf '%-6s %-7s %3dm%02ds' "${phase}" "${result}" $((elapsed / 60)) $((elapsed % 60)))")
done

total=$((SECONDS - started_all))
echo
echo "==== summary (build/<preset>; logs above) ===="
printf '%s\n' "${summary[@]}"
printf 'total  %dm%02ds\n' $((total / 60)) $((total % 60))
if [[ ${failed} -ne 0 ]]; then
  echo "run_all.sh: FAILED"
  exit 1
fi
echo "run_all.sh: all phases passed"
