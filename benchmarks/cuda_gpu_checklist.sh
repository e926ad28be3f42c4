#!/usr/bin/env bash
# Superseded by benchmarks/gpu/run_gpu_check.sh (one call, time-capped, runs on a bare GPU machine
# with the dependency bundle of benchmarks/gpu/make_bundle.sh); kept as a forwarder.
#
#   benchmarks/cuda_gpu_checklist.sh [OUTDIR]     # default results/cuda
root="$(cd "$(dirname "$0")/.." && pwd)"
exec "$root/benchmarks/gpu/run_gpu_check.sh" "${1:-$root/results/cuda}"
