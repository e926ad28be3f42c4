#!/usr/bin/env bash
# The full test suite, as CI runs it (.ci/run):
#   debug   Debug build, every CTest test (CUDA code compiled when nvcc is found; GPU tests skip
#           without a GPU)                     ~17 min on 2 idle Zen 3 cores, torch tests included
#           and the PyTorch operator tests (label torch, tests/torch): before this phase
#           tests/torch/ensure_torch.sh installs torch + numpy from PyPI into the git-ignored
#           .venv-torch/ when missing (~3 GB download, once)      +1-2 min
#   asan    AddressSanitizer + UndefinedBehaviorSanitizer build, every CTest test       ~14 min
#   tsan    ThreadSanitizer build, the tests labelled `tsan`                             ~5 min
#   format  the C++/CUDA lines changed since .clang-format was added follow it
#           (tests/check_format.sh, git clang-format)                                    seconds
#
# Usage: bash tests/run_all.sh [--fresh] [debug] [asan] [tsan] [format]   (default: all four phases)
#        bash tests/run_all.sh -h | --help                            (this text)
#   --fresh   reconfigure each phase from scratch (cmake --workflow --fresh)
# Environment: JOBS (default: nproc) build and test parallelism; PROGRESS_SECONDS (default 15);
#   DILATED_ATTENTION_SKIP_TORCH=1 neither installs PyTorch nor runs the torch tests.
# The asan and tsan phases never run the torch tests (a sanitizer build cannot load PyTorch).
#
# Progress: each phase prints its configure output, one [done/total] line per finished build
# step, one line per finished test, and its wall time; whenever nothing is printed for
# PROGRESS_SECONDS, a "... still running" line says for how long and what ran last.
# On Debian/Ubuntu, missing tools and libraries are installed with apt-get --no-install-recommends
# when running as root, each named with what it is for; otherwise the script stops and names
# them. Every phase runs even when an earlier one fails; the exit status is non-zero if any failed.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${repo_root}"

fresh=()
phases=()
for arg in "$@"; do
  case "${arg}" in
    --fresh) fresh=(--fresh) ;;
    debug | asan | tsan | format) phases+=("${arg}") ;;
    -h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "run_all.sh: unknown argument '${arg}' (expected --fresh, debug, asan, tsan, format)" >&2; exit 2 ;;
  esac
done
[[ ${#phases[@]} -eq 0 ]] && phases=(format debug asan tsan)

# ---- dependencies ------------------------------------------------------------------------------
progress_seconds="${PROGRESS_SECONDS:-15}"
clock() { local s=$(($1)); printf '%dm%02ds' $((s / 60)) $((s % 60)); }

# with_progress LABEL COMMAND...: runs COMMAND with its output (stdout and stderr) passed through
# line by line; when it prints nothing for progress_seconds, one line says it is still running,
# for how long, and the last progress line (Ninja's [done/total], CTest's "Start"). Returns
# COMMAND's status.
with_progress() {
  local label="$1"; shift
  local started=${SECONDS} status
  set +e
  "$@" 2>&1 | {
    partial="" last=""
    while true; do
      rc=0
      IFS= read -r -t "${progress_seconds}" line || rc=$?
      if [[ ${rc} -eq 0 ]]; then
        line="${partial}${line}"; partial=""
        printf '%s\n' "${line}"
        [[ "${line}" =~ ^\[[0-9]+/[0-9]+\]|Start\ +[0-9]+:|^Executing\ workflow ]] && last="${line:0:90}"
      elif [[ ${rc} -gt 128 ]]; then  # timed out: keep any partial line, say we are still here
        partial="${partial}${line}"
        printf '    ... %s: still running, %s so far%s\n' "${label}" "$(clock SECONDS-started)" \
          "${last:+ (last: ${last#"${last%%[![:space:]]*}"})}"
      else
        [[ -n "${partial}${line}" ]] && printf '%s\n' "${partial}${line}"
        break
      fi
    done
  }
  status=${PIPESTATUS[0]}
  set -e
  return "${status}"
}

echo "==== checking what the suite needs ===="
# Debian package -> what it is for, and how to tell it is present without dpkg (other systems).
declare -A purpose=(
  [cmake]="configures the builds (>= 3.25)"
  [ninja-build]="runs the builds"
  [g++]="the C++17 compiler"
  [libeigen3-dev]="Eigen 3, the library's dependency"
  [libgtest-dev]="GoogleTest headers and libraries"
  [googletest]="GoogleTest sources (gmock)"
  [libbenchmark-dev]="Google Benchmark, for the main job's build"
  [libopenmpi-dev]="MPI, for the MPI ring transport tests"
  [openmpi-bin]="mpirun, to start the MPI tests"
)
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
  for package in "${missing[@]}"; do echo "    missing ${package}: ${purpose[${package}]}"; done
  if [[ "$(id -u)" -eq 0 ]] && command -v apt-get > /dev/null 2>&1; then
    echo "==== installing ${missing[*]} with apt-get (one line per package; a minute or more) ===="
    export DEBIAN_FRONTEND=noninteractive
    echo "    apt-get update (refreshing the package lists)"
    with_progress "apt-get update" apt-get update -q
    echo "    apt-get install -y -q --no-install-recommends ${missing[*]}"
    with_progress "apt-get install" apt-get install -y -q --no-install-recommends "${missing[@]}"
  else
    echo "run_all.sh: missing: ${missing[*]}" >&2
    echo "  install them (Debian/Ubuntu: sudo apt-get install --no-install-recommends ${missing[*]})" >&2
    echo "  and run again; needed: CMake >= 3.25, Ninja, a C++17 compiler, Eigen 3.4+, GoogleTest," >&2
    echo "  Open MPI (Google Benchmark only for the main job)." >&2
    exit 1
  fi
else
  echo "    found ${packages[*]}"
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
  started=${SECONDS}
  if [[ "${phase}" == format ]]; then
    echo "==== format: tests/check_format.sh (changed lines against .clang-format) ===="
    command=(bash tests/check_format.sh)
  else
    if [[ "${phase}" == debug ]]; then
      if [[ "${DILATED_ATTENTION_SKIP_TORCH:-0}" == 1 ]]; then
        echo "==== torch tests: skipped (DILATED_ATTENTION_SKIP_TORCH=1, read by tests/torch/CMakeLists.txt) ===="
      else
        echo "==== torch tests: their Python (tests/torch/ensure_torch.sh) ===="
        if with_progress "ensure_torch" bash tests/torch/ensure_torch.sh; then
          :
        else
          echo "run_all.sh: could not set up PyTorch for the torch tests (above); they will not be registered" >&2
          failed=1
        fi
      fi
    fi
    echo "==== ${phase}: cmake --workflow --preset ${phase} ${fresh[*]:-} (jobs ${jobs}):" \
         "configure, build, test ===="
    command=(cmake --workflow --preset "${phase}" "${fresh[@]}")
  fi
  if with_progress "${phase}" "${command[@]}"; then
    result=passed
  else
    result=FAILED
    failed=1
  fi
  elapsed=$((SECONDS - started))
  summary+=("$(printf '%-6s %-7s %3dm%02ds' "${phase}" "${result}" $((elapsed / 60)) $((elapsed % 60)))")
  echo "==== ${phase} ${result} in $(clock elapsed) ===="
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
