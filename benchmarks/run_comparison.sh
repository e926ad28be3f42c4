#!/usr/bin/env bash
# The main job: build and run the CPU benchmark comparison on the project's default input (the
# LongNet configuration), print a short table, write JSON and a PNG plot into a folder of its own
# under results/. Run from anywhere; --help lists the options and environment overrides.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
  cat <<'EOF'
Usage: benchmarks/run_comparison.sh [options] [-- extra cpu_forward_benchmark flags]

Steps, each announced by a line starting with "==>":
  1. check the tools and libraries it needs; as root on Debian/Ubuntu, install what is missing
     with apt-get --no-install-recommends, naming each package and what it is for
  2. configure (release preset, build/release) and build the cpu_forward_benchmark target;
     Ninja prints one [done/total] line per finished step
  3. run the forward benchmarks, announcing each one ("... running <name>") before it starts;
     then the backward: cpu_backward_benchmark times forward and backward on the same inputs at
     N=16384,65536 (D as given) and checks sampled gradient rows against docs/semantics.md "The gradient"
     (a wrong gradient fails the job)
  4. print a table (N, time, useful GFLOP/s, its share of the FMA peak measured in the same
     binary (fma_peak/<isa>/threads:t of the kernel's instruction set), ratio to an Eigen SGEMM
     and (when libopenblas-dev is installed) an OpenBLAS SGEMM measured in the same binary,
     ratio to dense attention, time(4N)/time(N), peak memory, max error against
     docs/semantics.md "The forward" on sampled rows), then the backward's (backward/forward time, useful
     GFLOP/s at 2.5x the forward's FLOPs and its share of the backward binary's own FMA peak,
     time(4N)/time(N), heap beyond the tensors, gradient errors), and write, into RESULTS/<UTC date and time>/: cpu_forward_benchmark.json,
     cpu_backward_benchmark.json, summary.json, benchmark_cpu.png and benchmark_cpu_backward.png
     (time against N, log-log). RESULTS/latest points to the newest run; earlier runs are kept.
Whenever a step prints nothing for DA_PROGRESS_SECONDS (15) seconds, a "... still running" line
says how long it has been at it. On 2 cores the build takes under a minute the first time, and
the benchmarks 1 to 4 minutes depending on the CPU and on what else runs (--quick: about 10 s).

Default input: B=1, H=8, D=64, float32, branches w=2048,4096,8192 with r=1,2,4, non-causal,
modular offsets, softmax mixing, N=16384,65536,262144; dense attention (one branch w=N, r=1, the
same kernel) at N<=16384, since it is O(N^2) (N=65536 alone would take minutes).

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
  --no-decode             skip the decode run (cpu_inference_benchmark: a STREAM copy, a read, the
                          decode step's rows read alone (Decode_read) and
                          decode steps of B=1 and 16, H=8, Hkv=8, D as given, LongNet
                          branches w=2048..32768, causal, at kv_len 16k and 1M; its
                          tokens/s and share of the copy's bandwidth go into the table)
                                                      [DA_DECODE=1]
  --quick                 a smoke run: N=4096,16384 (backward too), dense at N=4096,
                          1 repetition (well under a minute of benchmarks after the build);
                          its folder ends in -quick
  --results DIR           parent of the per-run folders [DA_RESULTS=results]
  --build-dir DIR         CMake binary dir            [DA_BUILD_DIR=build/release]
                          (build parallelism: DA_BUILD_JOBS, default all cores)
  --no-install            never install missing packages, only name them
  -h, --help              this text

Packages: cmake, ninja-build, g++, libeigen3-dev (the library), libbenchmark-dev (the timing
harness) and python3 (the table) are required; python3-matplotlib draws the plot and is
optional (without it the table and JSON are still written; it is installed together with
python3-munkres, which keeps SciPy and the Boost headers out). As root (or with passwordless
sudo) on Debian/Ubuntu, missing ones are installed with `apt-get install --no-install-recommends`;
otherwise the script stops and names them.
Google Benchmark prints "Library was built as DEBUG" when the system's libbenchmark was compiled
without NDEBUG (Debian's is): that concerns the harness library, not the timed code, which is
built -O3 -DNDEBUG -march=native; the script says so beside that line.
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
DECODE="${DA_DECODE:-1}"
PROGRESS_SECONDS="${DA_PROGRESS_SECONDS:-15}"
INSTALL=1
QUICK=0
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
    --no-decode) DECODE=0; shift ;;
    --quick) SEQ_LENS=4096,16384; BACKWARD_SEQ_LENS=4096,16384; DENSE_MAX=4096; REPETITIONS=1
             QUICK=1; shift ;;
    --results) RESULTS="$2"; shift 2 ;;
    --build-dir) BUILD_DIR="$2"; shift 2 ;;
    --no-install) INSTALL=0; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "run_comparison.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
done

cd "$ROOT"
STARTED=$SECONDS
say() { printf '\n==> %s\n' "$*"; }
clock() { local s=$(($1)); printf '%dm%02ds' $((s / 60)) $((s % 60)); }

# with_progress LABEL COMMAND...: runs COMMAND with its output (stdout and stderr) passed through
# line by line. When it prints nothing for PROGRESS_SECONDS, one line says it is still running,
# for how long, and the last progress line it printed (Ninja's [done/total], "... running").
# Google Benchmark's DEBUG warning gets an explanation beside it. Returns COMMAND's status.
with_progress() {
  local label="$1"; shift
  local started=$SECONDS status
  set +e
  "$@" 2>&1 | {
    partial="" last=""
    while true; do
      rc=0
      IFS= read -r -t "$PROGRESS_SECONDS" line || rc=$?
      if [[ $rc -eq 0 ]]; then
        line="$partial$line"; partial=""
        printf '%s\n' "$line"
        [[ "$line" =~ ^\[[0-9]+/[0-9]+\]|\.\.\.\ running ]] && last="${line:0:90}"
        if [[ "$line" == *"Library was built as DEBUG"* ]]; then
          echo "    (run_comparison.sh: that warning is about the system's Google Benchmark library, built"
          echo "    without NDEBUG; the timed code is this project's, built -O3 -DNDEBUG -march=native)"
        fi
      elif [[ $rc -gt 128 ]]; then  # timed out: keep any partial line, say we are still here
        partial="$partial$line"
        printf '    ... %s: still running, %s so far%s\n' "$label" "$(clock SECONDS-started)" \
          "${last:+ (last: ${last#"${last%%[![:space:]]*}"})}"
      else
        [[ -n "$partial$line" ]] && printf '%s\n' "$partial$line"
        break
      fi
    done
  }
  status=${PIPESTATUS[0]}
  set -e
  return "$status"
}

# ---- 1. What the build needs -----------------------------------------------------------------
say "checking what the build needs"
missing_packages=()
why=()
need() {  # need PACKAGE WHAT-FOR PRESENT-TEST...
  local package="$1" purpose="$2"; shift 2
  if "$@" >/dev/null 2>&1; then return; fi
  missing_packages+=("$package"); why+=("$package ($purpose)")
}
has_file() { local f; for f in "$@"; do [[ -f "$f" ]] && return 0; done; return 1; }
need cmake "configures the build" command -v cmake
need g++ "the C++17 compiler" command -v c++
need ninja-build "runs the build" command -v ninja
need libeigen3-dev "Eigen 3, the library's one dependency" \
  has_file /usr/include/eigen3/Eigen/Core /usr/local/include/eigen3/Eigen/Core
need libbenchmark-dev "Google Benchmark, the timing harness" \
  has_file /usr/include/benchmark/benchmark.h /usr/local/include/benchmark/benchmark.h
need python3 "prints the table" command -v python3

# apt_install PACKAGE...: as root or with passwordless sudo on Debian/Ubuntu; line-per-package
# output (-q drops only the progress bars), without recommended extras.
apt_install() {
  local sudo=()
  [[ $(id -u) -eq 0 ]] || { command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null && sudo=(sudo -n); } || return 1
  command -v apt-get >/dev/null 2>&1 || return 1
  echo "    apt-get update (refreshing the package lists)"
  with_progress "apt-get update" "${sudo[@]}" apt-get update -q || return 1
  echo "    apt-get install -y -q --no-install-recommends $*"
  with_progress "apt-get install" "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -q --no-install-recommends "$@"
}

if [[ ${#missing_packages[@]} -gt 0 ]]; then
  echo "    missing: ${why[*]}"
  if [[ $INSTALL -eq 1 ]]; then
    say "installing ${missing_packages[*]} with apt-get (one line per package; a minute or two)"
  fi
  if [[ $INSTALL -eq 1 ]] && apt_install "${missing_packages[@]}"; then
    echo "    installed: ${missing_packages[*]}"
  else
    echo "run_comparison.sh: missing ${missing_packages[*]}." >&2
    echo "  Install them (Debian/Ubuntu: apt-get install --no-install-recommends ${missing_packages[*]})" >&2
    echo "  and run again." >&2
    exit 1
  fi
else
  echo "    found cmake, g++, ninja, Eigen 3, Google Benchmark, python3"
fi

# A python that can plot: python3 itself, else the system one; else install matplotlib (the plot
# only: the table and JSON need nothing but python3).
PYTHON=python3
has_matplotlib() { "$1" -c 'import matplotlib' >/dev/null 2>&1; }
if has_matplotlib python3; then
  echo "    found matplotlib (for the plot)"
elif [[ -x /usr/bin/python3 ]] && has_matplotlib /usr/bin/python3; then
  PYTHON=/usr/bin/python3
  echo "    found matplotlib for /usr/bin/python3 (for the plot)"
elif [[ $INSTALL -eq 1 ]]; then
  # python3-munkres satisfies python3-fonttools' "python3-scipy | python3-munkres" dependency, so
  # apt does not pull SciPy, Pythran and the Boost headers in for a plot (Debian 12: 33 packages,
  # 28 MB to download, instead of 51 and 54 MB with recommends and SciPy).
  say "installing python3-matplotlib for the plot (python3-munkres keeps SciPy and Boost out)"
  if ! apt_install python3-matplotlib python3-munkres && ! apt_install python3-matplotlib; then
    echo "    apt-get could not install it; trying: python3 -m pip install --user matplotlib"
    with_progress "pip install" python3 -m pip install --user matplotlib || true
  fi
  if has_matplotlib python3; then PYTHON=python3
  elif [[ -x /usr/bin/python3 ]] && has_matplotlib /usr/bin/python3; then PYTHON=/usr/bin/python3
  else echo "    no matplotlib: the table and JSON will be written, the plot skipped"; fi
else
  echo "    no matplotlib (--no-install): the table and JSON will be written, the plot skipped"
fi

# ---- 2. Configure and build the benchmark target only ----------------------------------------
JOBS="${DA_BUILD_JOBS:-$(nproc 2>/dev/null || echo 2)}"
if [[ ! -f "$BUILD_DIR/CMakeCache.txt" ]]; then
  say "configuring $BUILD_DIR (Release, benchmarks only; a few seconds)"
  if [[ "$BUILD_DIR" == build/release && -f CMakePresets.json ]] && grep -q '"release"' CMakePresets.json; then
    with_progress configure cmake --preset release -DBUILD_TESTING=OFF -DDILATED_ATTENTION_BUILD_BENCHMARKS=ON
  else
    with_progress configure cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release \
      -DBUILD_TESTING=OFF -DDILATED_ATTENTION_BUILD_BENCHMARKS=ON
  fi
fi
say "building cpu_forward_benchmark ($BUILD_DIR, -j$JOBS; about a minute on 2 cores the first time)"
with_progress build cmake --build "$BUILD_DIR" --target cpu_forward_benchmark -j "$JOBS"
BINARY="$BUILD_DIR/benchmarks/cpu_forward_benchmark"
if [[ $BACKWARD -eq 1 ]]; then
  say "building cpu_backward_benchmark ($BUILD_DIR, -j$JOBS; about a minute the first time)"
  with_progress build cmake --build "$BUILD_DIR" --target cpu_backward_benchmark -j "$JOBS"
fi
if [[ $DECODE -eq 1 ]]; then
  say "building cpu_inference_benchmark ($BUILD_DIR, -j$JOBS)"
  with_progress build cmake --build "$BUILD_DIR" --target cpu_inference_benchmark -j "$JOBS"
fi

# ---- 3. Run, one progress line per benchmark ---------------------------------------------------
RUN_DIR="$RESULTS/$(date -u +%Y-%m-%dT%H%M%SZ)"
[[ $QUICK -eq 1 ]] && RUN_DIR="$RUN_DIR-quick"
mkdir -p "$RUN_DIR"
ln -sfn "$(basename "$RUN_DIR")" "$RESULTS/latest"
JSON="$RUN_DIR/cpu_forward_benchmark.json"
say "running the benchmarks (load before: $(uptime | sed 's/.*load average/load average/'))"
echo "    B=$BATCH H=$HEADS D=$HEAD_DIMS w=$SEGMENTS r=$DILATIONS causal=$CAUSAL N=$SEQ_LENS;" \
     "dense up to N=$DENSE_MAX; $REPETITIONS repetition(s)"
echo "    results go to $RUN_DIR/ ($RESULTS/latest points there; earlier runs are kept)"
with_progress benchmarks "$BINARY" --seq_lens="$SEQ_LENS" --head_dims="$HEAD_DIMS" --heads="$HEADS" \
  --batch="$BATCH" --segments="$SEGMENTS" --dilations="$DILATIONS" --causal="$CAUSAL" \
  --dense_max_seq_len="$DENSE_MAX" --repetitions="$REPETITIONS" \
  --benchmark_out="$JSON" --benchmark_out_format=json ${EXTRA[@]+"${EXTRA[@]}"}
echo "    load after: $(uptime | sed 's/.*load average/load average/')"

BACKWARD_ARGS=()
if [[ $BACKWARD -eq 1 ]]; then
  BACKWARD_JSON="$RUN_DIR/cpu_backward_benchmark.json"
  say "running the backward (load before: $(uptime | sed 's/.*load average/load average/'))"
  echo "    B=$BATCH H=$HEADS D=$HEAD_DIMS w=$SEGMENTS r=$DILATIONS causal=$CAUSAL N=$BACKWARD_SEQ_LENS;" \
       "$REPETITIONS repetition(s)"
  # Exit status 4: a sampled gradient row disagrees with docs/semantics.md "The gradient" (set -e stops here).
  with_progress backward "$BUILD_DIR/benchmarks/cpu_backward_benchmark" --seq_lens="$BACKWARD_SEQ_LENS" \
    --head_dims="$HEAD_DIMS" --heads="$HEADS" --batch="$BATCH" --segments="$SEGMENTS" \
    --dilations="$DILATIONS" --causal="$CAUSAL" --repetitions="$REPETITIONS" \
    --benchmark_out="$BACKWARD_JSON" --benchmark_out_format=json
  echo "    load after: $(uptime | sed 's/.*load average/load average/')"
  BACKWARD_ARGS=(--backward "$BACKWARD_JSON")
fi

if [[ $DECODE -eq 1 ]]; then
  DECODE_JSON="$RUN_DIR/cpu_inference_benchmark.json"
  DECODE_DIMS="$(echo "$HEAD_DIMS" | tr ',' '|')"
  say "running the decode steps (load before: $(uptime | sed 's/.*load average/load average/'))"
  # Exit status 1: a sampled decode row disagrees with docs/semantics.md "The forward".
  with_progress decode "$BUILD_DIR/benchmarks/cpu_inference_benchmark" \
    --benchmark_filter="Stream|Decode(_read)?/kv_len:(16384|1048576)/Hkv:8/D:($DECODE_DIMS)/" \
    --benchmark_out="$DECODE_JSON" --benchmark_out_format=json
  echo "    load after: $(uptime | sed 's/.*load average/load average/')"
  BACKWARD_ARGS+=(--inference "$DECODE_JSON")
fi

# ---- 4. Table, summary JSON, plot --------------------------------------------------------------
say "summary"
"$PYTHON" -u benchmarks/plot_results.py "$JSON" --out-dir "$RUN_DIR" ${BACKWARD_ARGS[@]+"${BACKWARD_ARGS[@]}"}
echo "raw Google Benchmark JSON: $JSON${BACKWARD_JSON:+, $BACKWARD_JSON}${DECODE_JSON:+, $DECODE_JSON}"
echo "run_comparison.sh: done in $(clock SECONDS-STARTED); results in $RUN_DIR/ (also $RESULTS/latest/)"
