#!/usr/bin/env bash
# The one-call GPU check of the CUDA back end (docs/cuda.md "GPU check"): builds only what the
# GPU needs, runs the `cuda` tests, compute-sanitizer (memcheck, racecheck, synccheck) on small
# cases, the SASS check, our benchmarks, PyTorch SDPA-flash and LongNet in plain PyTorch; writes
# OUTDIR/summary.txt and OUTDIR/gpu_check.tar.gz (every log and JSON) and nothing else there.
#
#   benchmarks/gpu/run_gpu_check.sh OUTDIR [--dry-run] [--build] [--budget SECONDS]
#
#   --dry-run   no GPU step runs, even with a GPU (they are listed as SKIP); configure only,
#               unless --build is given too. Without a GPU every GPU step skips anyway.
#   --build     with --dry-run: also build the targets (slow: nvcc, ~1 min per TU on 2 cores).
#   --budget S  the whole run's time limit in seconds (default 450, i.e. under 8 minutes with
#               margin); each step also has its own cap, and a step that would start with less
#               than 15 s left is skipped and reported.
#
# A bare GPU machine (CUDA 13, CMake, ninja, python3 with torch; no Eigen, GoogleTest or Google
# Benchmark, no network) needs the dependency bundle made by benchmarks/gpu/make_bundle.sh on a
# Debian machine: build/gpu-bundle/deps.tar.gz (or $GPU_BUNDLE/deps.tar.gz). It is unpacked and
# GoogleTest built from its source into the build folder; system packages are used without it.
# Nothing is edited in place: a step that needs a missing tool fails and says so in its log.
# Environment: PYTHON (default python3), BUILD (default build/gpu-check), CUDA_HOME (default
# /usr/local/cuda), CUDA_ARCH (default: the GPU's compute capability, 90 without a GPU).
set -uo pipefail

root="$(cd "$(dirname "$0")/../.." && pwd)"
[[ $# -ge 1 && "$1" != --* ]] || { sed -n '2,24p' "$0"; exit 2; }
outdir="$(mkdir -p "$1" && cd "$1" && pwd)"; shift
dry=0 build_in_dry=0 budget=450
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry=1 ;;
    --build) build_in_dry=1 ;;
    --budget) budget="$2"; shift ;;
    *) echo "run_gpu_check.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done

export PATH="${CUDA_HOME:-/usr/local/cuda}/bin:$PATH"
python="${PYTHON:-python3}"
build="${BUILD:-$root/build/gpu-check}"
bundle="${GPU_BUNDLE:-$root/build/gpu-bundle}"
work="$build/gpu_check"          # logs and results, archived at the end
rm -rf "$work" && mkdir -p "$work"
summary="$work/summary.txt"
start=$SECONDS
status=0

# --- the step runner: every step has a cap, the whole run a budget ------------------------------
line() { printf '%-22s %-8s %6s  %s\n' "$1" "$2" "$3" "$4" | tee -a "$summary"; }
left() { echo $((budget - (SECONDS - start))); }
# step NAME CAP_S COMMAND...: runs COMMAND under timeout, output in $work/NAME.log.
step() {
  local name="$1" cap="$2" remaining; shift 2
  remaining=$(left)
  if ((remaining < 15)); then line "$name" SKIP - "time budget spent"; return 0; fi
  ((cap > remaining - 5)) && cap=$((remaining - 5))
  local t0=$SECONDS rc
  # Through bash -c so that a step can be one of the functions below (exported with export -f).
  timeout --kill-after=10 "$cap" bash -c '"$@"' "$name" "$@" >"$work/$name.log" 2>&1
  rc=$?
  local took="$((SECONDS - t0))s"
  if ((rc == 0)); then line "$name" PASS "$took" "$(note "$name")"
  elif ((rc == 124 || rc == 137)); then line "$name" TIMEOUT "$took" "cap ${cap}s; see $name.log"; status=1
  else line "$name" FAIL "$took" "exit $rc; $(note "$name")"; status=1; fi
  return $rc
}
# gpu_step: a step that needs the GPU; skipped with the reason when there is none.
gpu_step() {
  if [[ -n "$no_gpu" ]]; then line "$1" SKIP - "$no_gpu"; return 0; fi
  step "$@"
}
# The one line a step's log contributes to the summary.
note() {
  local log="$work/$1.log"
  case "$1" in
    ctest) grep -E "tests passed|tests failed" "$log" | tail -1 ;;
    memcheck|racecheck|synccheck) grep -hE "ERROR SUMMARY|RACECHECK SUMMARY" "$work"/$1_*.log 2>/dev/null | sort | uniq -c | tr -s ' ' | paste -sd';' ;;
    sass) grep -E "^SASS check" "$log" | paste -sd' ' ;;
    *) tail -1 "$log" 2>/dev/null | cut -c1-100 ;;
  esac
}

# --- the machine ----------------------------------------------------------------------------------
no_gpu=""
if ((dry)); then no_gpu="dry run (--dry-run)"
elif ! command -v nvidia-smi >/dev/null; then no_gpu="no GPU: nvidia-smi not found"
elif ! nvidia-smi -L >"$work/gpu.txt" 2>&1; then no_gpu="no GPU: nvidia-smi -L failed ($(head -1 "$work/gpu.txt"))"
fi
{
  echo "GPU check of $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo '?') on ${HOSTNAME:-?}, $(date -u +%FT%TZ)"
  echo "nproc $(nproc), load $(cut -d' ' -f1-3 /proc/loadavg), nvcc $(nvcc --version 2>/dev/null | grep -o 'release [0-9.]*' || echo missing)"
  if [[ -z "$no_gpu" ]]; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader
  else
    echo "$no_gpu: every GPU step is skipped"
  fi
} | tee "$summary"
arch="${CUDA_ARCH:-}"
if [[ -z "$arch" ]]; then
  [[ -z "$no_gpu" ]] && arch="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d '.')"
  arch="${arch:-90}"
fi
echo "step                   status     time  note" | tee -a "$summary"

# --- dependencies: the bundle when present, else the system's ------------------------------------
prefix_args=()
if [[ -f "$bundle/deps.tar.gz" ]]; then
  deps="$build/deps"
  prepare_bundle() {
    set -e
    if [[ ! -f "$deps/.done" ]]; then
      rm -rf "$deps" && mkdir -p "$deps"
      tar -C "$deps" -xzf "$bundle/deps.tar.gz"
      cmake -S "$deps/googletest-src" -B "$deps/googletest-build" -G Ninja \
            -DCMAKE_BUILD_TYPE=Release -DCMAKE_INSTALL_PREFIX="$deps/prefix"
      cmake --build "$deps/googletest-build" --target install -j"$(nproc)"
      touch "$deps/.done"
    fi
  }
  export -f prepare_bundle; export deps bundle
  step deps 150 prepare_bundle || true
  prefix_args=(-DCMAKE_PREFIX_PATH="$deps/prefix")
else
  line deps SKIP - "no bundle at $bundle: using the system's Eigen, GoogleTest, Google Benchmark"
fi

# --- configure and build only the CUDA targets ---------------------------------------------------
targets=(cuda_launch_plan_test cuda_emulated_kernel_test cuda_emulated_backward_test
         cuda_forward_half_test cuda_forward_bfloat16_test cuda_forward_float_test
         cuda_backward_half_test cuda_backward_bfloat16_test cuda_backward_float_test
         ring_cuda_emulated_test ring_cuda_forward_test
         ring_cuda_backward_emulated_test ring_cuda_backward_test
         cuda_inference_emulated_test cuda_inference_test
         cuda_forward_benchmark cuda_backward_benchmark cuda_forward_from_files
         cuda_inference_benchmark)
step configure 120 cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
     -DCMAKE_CUDA_ARCHITECTURES="$arch" -DDILATED_ATTENTION_ENABLE_MPI=OFF \
     -DDILATED_ATTENTION_ENABLE_NCCL=OFF -DDILATED_ATTENTION_INSTALL=OFF \
     -DDILATED_ATTENTION_BENCH_NATIVE=OFF -DBUILD_TESTING=ON \
     -DDILATED_ATTENTION_BUILD_BENCHMARKS=ON "${prefix_args[@]}"
configured=$?
built=1
if ((configured != 0)); then
  line build SKIP - "configure failed"
elif ((dry && !build_in_dry)); then
  line build SKIP - "dry run without --build"
else
  step build 300 cmake --build "$build" -j"$(nproc)" --target "${targets[@]}" && built=0
fi
tests="$build/tests"
if ((built != 0)) && [[ -z "$no_gpu" ]]; then no_gpu="not built"; fi

# --- correctness, sanitizers, SASS ---------------------------------------------------------------
gpu_step ctest 180 ctest --test-dir "$build" -L '^cuda$' -j4 --output-on-failure --timeout 150
# Small cases only: the sanitizers slow kernels down 10-100x. The six executables in parallel.
sanitize() {
  local tool="$1" filter="$2" pids=() rc=0
  for t in forward_half forward_bfloat16 forward_float backward_half backward_bfloat16 backward_float; do
    compute-sanitizer --tool "$tool" --error-exitcode 1 "$tests/cuda_${t}_test" \
        --gtest_filter="$filter" >"$work/${tool}_${t}.log" 2>&1 &
    pids+=($!)
  done
  # The ring's CUDA back ends (forward, backward) and loopback transport: their small cases,
  # beside the six.
  compute-sanitizer --tool "$tool" --error-exitcode 1 "$tests/ring_cuda_forward_test" \
      --gtest_filter='RingCudaForward.SmallCases*' >"$work/${tool}_ring.log" 2>&1 &
  pids+=($!)
  compute-sanitizer --tool "$tool" --error-exitcode 1 "$tests/ring_cuda_backward_test" \
      --gtest_filter='RingCudaBackward.SmallCases*' >"$work/${tool}_ring_backward.log" 2>&1 &
  pids+=($!)
  for p in "${pids[@]}"; do wait "$p" || rc=1; done
  cat "$work/${tool}"_*.log
  return $rc
}
export -f sanitize; export work tests
# Forward: *HeadDim64* and *OtherHeadDims* (every case at D = 64, a spread at 32/96/128);
# backward: *HeadDim64* (every backward case at D = 64).
small='*Gpu.MatchesReferenceEveryCaseHeadDim64*:*Gpu.MatchesReferenceOtherHeadDims*'
gpu_step memcheck 90 sanitize memcheck "$small:*Gpu.StreamArgumentIsHonoured*"
gpu_step racecheck 120 sanitize racecheck '*Gpu.MatchesReferenceEveryCaseHeadDim64*'
gpu_step synccheck 60 sanitize synccheck '*Gpu.MatchesReferenceEveryCaseHeadDim64*'
# The inference forms (decode split-KV, varlen, paged, padded): their GPU test once more under
# memcheck (ctest above ran it plain), every case but the longest.
gpu_step inference_memcheck 60 compute-sanitizer --tool memcheck --error-exitcode 1 \
    "$tests/cuda_inference_test" --gtest_filter='CudaInference.*:-*DecodeLoopEveryRuleAndMixing*'
if ((built == 0)); then
  # Needs no GPU: the SASS of the built test binaries (bf16 and fp16 kernels).
  sass() {
    local rc=0
    for t in half bfloat16; do cuobjdump -sass "$tests/cuda_forward_${t}_test"; done >"$work/forward.sass" || return 1
    for t in half bfloat16; do cuobjdump -sass "$tests/cuda_backward_${t}_test"; done >"$work/backward.sass" || return 1
    "$python" "$root/benchmarks/gpu/sass_check.py" "$work/forward.sass" || rc=1
    "$python" "$root/benchmarks/gpu/sass_check.py" --kernel tensor_core_backward "$work/backward.sass" || rc=1
    return $rc
  }
  export -f sass; export python root
  step sass 60 sass
else
  line sass SKIP - "not built"
fi

# --- timings -------------------------------------------------------------------------------------
gpu_step benchmark 150 "$build/benchmarks/cuda_forward_benchmark" --benchmark_min_time=0.2 \
    --benchmark_out="$work/cuda_bench.json" --benchmark_out_format=json
gpu_step backward_benchmark 60 "$build/benchmarks/cuda_backward_benchmark" --benchmark_min_time=0.1 \
    --benchmark_out="$work/cuda_backward_bench.json" --benchmark_out_format=json
gpu_step inference_benchmark 45 "$build/benchmarks/cuda_inference_benchmark" --benchmark_min_time=0.05 \
    --benchmark_out="$work/cuda_inference_bench.json" --benchmark_out_format=json
have_torch() { "$python" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; }
if [[ -z "$no_gpu" ]] && ! have_torch 2>/dev/null; then torch_missing="no python with torch+CUDA ($python)"; fi
if [[ -n "${torch_missing:-}" ]]; then
  line sdpa SKIP - "$torch_missing"; line longnet_torch SKIP - "$torch_missing"
else
  gpu_step sdpa 90 "$python" "$root/benchmarks/peers/cuda_sdpa_and_peer.py" --sdpa --repeats 10 \
      --ours-json "$work/cuda_bench.json" --sdpa-backward \
      --ours-backward-json "$work/cuda_backward_bench.json" --json-out "$work/sdpa.json"
  gpu_step longnet_torch 120 "$python" "$root/benchmarks/peers/cuda_longnet_torch.py" \
      --ours-json "$work/cuda_bench.json" --binary "$build/benchmarks/cuda_forward_from_files" \
      --json-out "$work/longnet_torch.json"
fi

# --- summary and archive -------------------------------------------------------------------------
{
  for f in sass sdpa longnet_torch; do
    [[ -s "$work/$f.log" ]] && { echo; echo "== $f"; tail -25 "$work/$f.log"; }
  done
  for json in cuda_bench cuda_backward_bench; do
    [[ -s "$work/$json.json" ]] || continue
    echo; echo "== $json (useful TFLOP/s, ms)"
    "$python" - "$work/$json.json" <<'PY' || true
import json, sys
for b in json.load(open(sys.argv[1]))["benchmarks"]:
    if "error_occurred" in b:
        print(f"{b['name']:<50} error: {b.get('error_message', '')}")
    else:
        print(f"{b['name']:<50} {b.get('useful_TFLOP/s', 0):8.1f} {b.get('ms', 0):9.3f}")
PY
  done
  if [[ -s "$work/cuda_inference_bench.json" ]]; then
    echo; echo "== cuda_inference_bench (decode: us, kv_GB/s; varlen: ms, useful TFLOP/s)"
    "$python" - "$work/cuda_inference_bench.json" <<'PY' || true
import json, sys
for b in json.load(open(sys.argv[1]))["benchmarks"]:
    if "error_occurred" in b:
        print(f"{b['name']:<50} error: {b.get('error_message', '')}")
    elif "kv_GB/s" in b:
        print(f"{b['name']:<50} {b.get('us', 0):9.1f} us {b.get('kv_GB/s', 0):8.1f} GB/s")
    else:
        print(f"{b['name']:<50} {b.get('ms', 0):9.3f} ms {b.get('useful_TFLOP/s', 0):8.1f} TFLOP/s")
PY
  fi
  echo
  echo "total $((SECONDS - start))s of a ${budget}s budget; overall: $([[ $status == 0 ]] && echo PASS || echo FAIL)"
} | tee -a "$summary"
cp "$summary" "$outdir/summary.txt"
tar -C "$build" -czf "$outdir/gpu_check.tar.gz" gpu_check
exit $status
