#!/usr/bin/env bash
# The main job: build and run the CPU benchmark comparison on the embedded default (the issue's
# LongNet config), print a short table, write JSON and a PNG plot into results/.
# Run from anywhere; --help lists the options and environment overrides.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
  cat <<'EOF'
Usage: benchmarks/run_comparison.sh [options] [-- extra cpu_forward_benchmark flags]

Builds the cpu_forward_benchmark target (release preset, build/release), runs it with one line of
progress per benchmark, then prints a table (N, time, useful GFLOP/s, ratio to an Eigen SGEMM
measured in the same binary, ratio to dense attention, time(4N)/time(N), peak memory, max error
against docs/semantics.md §2 on sampled rows) and writes results/cpu_forward_benchmark.json,
results/summary.json and results/benchmark_cpu.png (time against N, log-log). Then the backward:
cpu_backward_benchmark times forward and backward on the same inputs at N=16384,65536 (D as
given) and checks sampled gradient rows against docs/semantics.md §7 (a wrong gradient fails the
job); its table (backward/forward time, useful GFLOP/s at 2.5x the forward's FLOPs,
time(4N)/time(N), heap beyond the tensors, gradient errors) follows the forward's, with
results/cpu_backward_benchmark.json and results/benchmark_cpu_backward.png.

Default input (the issue's): B=1, H=8, D=64, float32, branches w=2048,4096,8192 with r=1,2,4,
non-causal, modular offsets, softmax mixing, N=16384,65536,262144; dense attention (one branch
w=N, r=1, the same kernel) at N<=16384, since it is O(N^2) (N=65536 alone would take minutes).

Options (each also read from the environment variable in brackets):
  --seq-lens LIST         sequence lengths            [DA_SEQ_LENS=16384,65536,262144]
  --head-dims LIST        head dims, e.g. 64,128      [DA_HEAD_DIMS=64]
  --heads H               query heads                 [DA_HEADS=8]
  --batch B               batch                       [DA_BATCH=1]
  --segments LIST         segment lengths w_i         [DA_SEGMENTS=2048,4096,8192]
  --dilations LIST        dilation rates r_i          [DA_DILATIONS=1,2,4]
  --causal                causal masking              [DA_CAUSAL=false]
  --dense-max-seq-len N   measure dense up to this N  [DA_DENSE_MAX_SEQ_LEN=16384]
  --repetitions R         repetitions of the SGEMM runs and of the dilated runs up to
                          N=65536 (larger N run once); the median is reported
                                                      [DA_REPETITIONS=3]
  --threads T             threads for kernel and SGEMM (default: all cores)
                                                      [DILATED_ATTENTION_NUM_THREADS]
  --backward-seq-lens LIST  sequence lengths of the backward run
                                                      [DA_BACKWARD_SEQ_LENS=16384,65536]
  --no-backward           skip the backward run       [DA_BACKWARD=1]
  --quick                 a smoke run in well under a minute (N=4096,16384; 1 repetition)
  --results DIR           output folder               [DA_RESULTS=results]
  --build-dir DIR         CMake binary dir            [DA_BUILD_DIR=build/release]
  --no-install            never install missing packages, only name them
  -h, --help              this text

Missing tools (cmake, ninja, g++, Eigen 3.4, Google Benchmark; python3 and matplotlib for the
plot) are installed with apt-get on Debian/Ubuntu when running as root (or with sudo); otherwise
the script stops and names them. Without matplotlib the table and JSON are still written.
Timings depend on machine load: the JSON records the load average, and the script prints
`uptime` before and after.
EOF
}

SEQ_LENS="${DA_SEQ_LENS:-16384,65536,262144}"
HEAD_DIMS="${DA_HEAD_DIMS:-64}"
HEADS="${DA_HEADS:-8}"
BATCH="${DA_BATCH:-1}"
SEGMENTS="${DA_SEGMENTS:-2048,4096,8192}"
DILATIONS="${DA_DILATIONS:-1,2,4}"
CAUSAL="${DA_CAUSAL:-false}"
DENSE_MAX="${DA_DENSE_MAX_SEQ_LEN:-16384}"
REPETITIONS="${DA_REPETITIONS:-3}"
RESULTS="${DA_RESULTS:-results}"
BUILD_DIR="${DA_BUILD_DIR:-build/release}"
BACKWARD_SEQ_LENS="${DA_BACKWARD_SEQ_LENS:-16384,65536}"
BACKWARD="${DA_BACKWARD:-1}"
INSTALL=1
EXTRA=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    --seq-lens) SEQ_LENS="$2"; shift 2 ;;
    --head-dims) HEAD_DIMS="$2"; shift 2 ;;
    --heads) HEADS="$2"; shift 2 ;;
    --batch) BATCH="$2"; shift 2 ;;
    --segments) SEGMENTS="$2"; shift 2 ;;
    --dilations) DILATIONS="$2"; shift 2 ;;
    --causal) CAUSAL=true; shift ;;
    --dense-max-seq-len) DENSE_MAX="$2"; shift 2 ;;
    --repetitions) REPETITIONS="$2"; shift 2 ;;
    --threads) export DILATED_ATTENTION_NUM_THREADS="$2"; shift 2 ;;
    --backward-seq-lens) BACKWARD_SEQ_LENS="$2"; shift 2 ;;
    --no-backward) BACKWARD=0; shift ;;
    --quick) SEQ_LENS=4096,16384; BACKWARD_SEQ_LENS=4096,16384; DENSE_MAX=4096; REPETITIONS=1; shift ;;
    --results) RESULTS="$2"; shift 2 ;;
    --build-dir) BUILD_DIR="$2"; shift 2 ;;
    --no-install) INSTALL=0; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "run_comparison.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
done

cd "$ROOT"
say() { printf '\n==> %s\n' "$*"; }

# ---- 1. What the build needs -----------------------------------------------------------------
missing_packages=()
need_tool() { command -v "$1" >/dev/null 2>&1 || missing_packages+=("$2"); }
need_tool cmake cmake
need_tool c++ g++
need_tool ninja ninja-build
[[ -f /usr/include/eigen3/Eigen/Core || -f /usr/local/include/eigen3/Eigen/Core ]] || missing_packages+=(libeigen3-dev)
[[ -f /usr/include/benchmark/benchmark.h || -f /usr/local/include/benchmark/benchmark.h ]] || missing_packages+=(libbenchmark-dev)
need_tool python3 python3

apt_install() {
  local sudo=()
  [[ $(id -u) -eq 0 ]] || { command -v sudo >/dev/null 2>&1 && sudo=(sudo -n); } || return 1
  command -v apt-get >/dev/null 2>&1 || return 1
  "${sudo[@]}" apt-get update -qq && DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "$@"
}

if [[ ${#missing_packages[@]} -gt 0 ]]; then
  if [[ $INSTALL -eq 1 ]] && apt_install "${missing_packages[@]}"; then
    say "installed: ${missing_packages[*]}"
  else
    echo "run_comparison.sh: missing ${missing_packages[*]}." >&2
    echo "  Install them (Debian/Ubuntu: apt-get install ${missing_packages[*]}) and run again." >&2
    exit 1
  fi
fi

# A python that can plot: python3 itself, else the system one; else try to install matplotlib.
PYTHON=python3
if ! python3 -c 'import matplotlib' >/dev/null 2>&1; then
  if [[ -x /usr/bin/python3 ]] && /usr/bin/python3 -c 'import matplotlib' >/dev/null 2>&1; then
    PYTHON=/usr/bin/python3
  elif [[ $INSTALL -eq 1 ]] && { apt_install python3-matplotlib >/dev/null 2>&1 ||
        python3 -m pip install --quiet --user matplotlib >/dev/null 2>&1; }; then
    if python3 -c 'import matplotlib' >/dev/null 2>&1; then PYTHON=python3
    elif /usr/bin/python3 -c 'import matplotlib' >/dev/null 2>&1; then PYTHON=/usr/bin/python3; fi
  fi
fi

# ---- 2. Configure and build the benchmark target only ----------------------------------------
JOBS="${DA_BUILD_JOBS:-$(nproc 2>/dev/null || echo 2)}"
if [[ ! -f "$BUILD_DIR/CMakeCache.txt" ]]; then
  say "configuring $BUILD_DIR"
  if [[ "$BUILD_DIR" == build/release && -f CMakePresets.json ]] && grep -q '"release"' CMakePresets.json; then
    cmake --preset release -DBUILD_TESTING=OFF -DDILATED_ATTENTION_BUILD_BENCHMARKS=ON
  else
    cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_TESTING=OFF \
      -DDILATED_ATTENTION_BUILD_BENCHMARKS=ON
  fi
fi
say "building cpu_forward_benchmark ($BUILD_DIR, -j$JOBS)"
cmake --build "$BUILD_DIR" --target cpu_forward_benchmark -j "$JOBS"
BINARY="$BUILD_DIR/benchmarks/cpu_forward_benchmark"
if [[ $BACKWARD -eq 1 ]]; then
  say "building cpu_backward_benchmark ($BUILD_DIR, -j$JOBS)"
  cmake --build "$BUILD_DIR" --target cpu_backward_benchmark -j "$JOBS"
fi

# ---- 3. Run, one progress line per benchmark ---------------------------------------------------
mkdir -p "$RESULTS"
JSON="$RESULTS/cpu_forward_benchmark.json"
say "running (load before: $(uptime | sed 's/.*load average/load average/'))"
echo "    B=$BATCH H=$HEADS D=$HEAD_DIMS w=$SEGMENTS r=$DILATIONS causal=$CAUSAL N=$SEQ_LENS;" \
     "dense up to N=$DENSE_MAX; $REPETITIONS repetition(s)"
"$BINARY" --seq_lens="$SEQ_LENS" --head_dims="$HEAD_DIMS" --heads="$HEADS" --batch="$BATCH" \
  --segments="$SEGMENTS" --dilations="$DILATIONS" --causal="$CAUSAL" \
  --dense_max_seq_len="$DENSE_MAX" --repetitions="$REPETITIONS" \
  --benchmark_out="$JSON" --benchmark_out_format=json ${EXTRA[@]+"${EXTRA[@]}"}
echo "    load after: $(uptime | sed 's/.*load average/load average/')"

BACKWARD_ARGS=()
if [[ $BACKWARD -eq 1 ]]; then
  BACKWARD_JSON="$RESULTS/cpu_backward_benchmark.json"
  say "running the backward (load before: $(uptime | sed 's/.*load average/load average/'))"
  echo "    B=$BATCH H=$HEADS D=$HEAD_DIMS w=$SEGMENTS r=$DILATIONS causal=$CAUSAL N=$BACKWARD_SEQ_LENS;"        "$REPETITIONS repetition(s)"
  # Exit status 4: a sampled gradient row disagrees with docs/semantics.md §7 (set -e stops here).
  "$BUILD_DIR/benchmarks/cpu_backward_benchmark" --seq_lens="$BACKWARD_SEQ_LENS" --head_dims="$HEAD_DIMS"     --heads="$HEADS" --batch="$BATCH" --segments="$SEGMENTS" --dilations="$DILATIONS" --causal="$CAUSAL"     --repetitions="$REPETITIONS" --benchmark_out="$BACKWARD_JSON" --benchmark_out_format=json
  echo "    load after: $(uptime | sed 's/.*load average/load average/')"
  BACKWARD_ARGS=(--backward "$BACKWARD_JSON")
fi

# ---- 4. Table, summary JSON, plot --------------------------------------------------------------
say "summary"
"$PYTHON" benchmarks/plot_results.py "$JSON" --out-dir "$RESULTS" ${BACKWARD_ARGS[@]+"${BACKWARD_ARGS[@]}"}
echo "raw Google Benchmark JSON: $JSON"
