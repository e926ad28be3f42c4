#!/usr/bin/env bash
# The GPU checklist of docs/cuda.md in one run, for a machine with an NVIDIA GPU (H100/H200):
# build (Release, the GPU's own architecture), correctness tests per dtype, compute-sanitizer
# memcheck and racecheck, SASS summary, timings (a) (b) (c), and the SDPA / peer comparison when
# a Python with torch is given. Logs and JSON go to ${OUT:-results/cuda}; a short table is
# printed last.
#
#   benchmarks/cuda_gpu_checklist.sh [python-with-torch]
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
out="${OUT:-$root/results/cuda}"
build="${BUILD:-$root/build-gpu}"
python="${1:-}"
mkdir -p "$out"
export PATH="/usr/local/cuda/bin:$PATH"

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
arch="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d '.')"

cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
      -DCMAKE_CUDA_ARCHITECTURES="$arch" >"$out/configure.log"
cmake --build "$build" -j"$(nproc)" --target cuda_forward_half_test cuda_forward_bfloat16_test \
      cuda_forward_float_test cuda_launch_plan_test cuda_emulated_kernel_test \
      cuda_forward_benchmark cuda_forward_from_files >"$out/build.log"

status=0
# 1. correctness per dtype
ctest --test-dir "$build" -L cuda --output-on-failure >"$out/ctest.log" 2>&1 || status=1
# 2-3. sanitizers (racecheck on the full-coverage case list only: it is slow)
for t in half bfloat16 float; do
  compute-sanitizer --tool memcheck --error-exitcode 1 \
      "$build/tests/cuda_forward_${t}_test" >"$out/memcheck_${t}.log" 2>&1 || status=1
  compute-sanitizer --tool racecheck --error-exitcode 1 \
      "$build/tests/cuda_forward_${t}_test" --gtest_filter='*Gpu.MatchesReferenceEveryCase*' \
      >"$out/racecheck_${t}.log" 2>&1 || status=1
done
# 4. SASS: tensor-core, ldmatrix, cp.async instructions and local-memory traffic
if command -v cuobjdump >/dev/null; then
  cuobjdump -sass "$build/benchmarks/cuda_forward_benchmark" >"$out/sass.txt" || true
  for op in HMMA LDSM LDGSTS LDL STL; do
    printf '%-7s %s\n' "$op" "$(grep -c "$op" "$out/sass.txt" || true)"
  done | tee "$out/sass_summary.txt"
fi
# 5-7. timings
"$build/benchmarks/cuda_forward_benchmark" --benchmark_format=json \
    --benchmark_out="$out/cuda_bench.json" --benchmark_out_format=json >"$out/cuda_bench.txt"
if [[ -n "$python" ]]; then
  "$python" "$root/benchmarks/peers/cuda_sdpa_and_peer.py" --sdpa --ours-json "$out/cuda_bench.json" \
      --peer --binary "$build/benchmarks/cuda_forward_from_files" --json-out "$out/cuda_peers.json" \
      >"$out/cuda_peers.txt" 2>&1 || status=1
fi

echo "== results in $out"
grep -E "tests passed|tests failed" "$out/ctest.log" || true
for f in "$out"/memcheck_*.log "$out"/racecheck_*.log; do
  printf '%-28s %s\n' "$(basename "$f")" "$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$f" | tail -1)"
done
grep -E "^BM_" "$out/cuda_bench.txt" | awk '{print $1, $2, $3}' | column -t || true
[[ -f "$out/cuda_peers.txt" ]] && tail -25 "$out/cuda_peers.txt"
exit $status
