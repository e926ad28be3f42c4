#!/bin/sh
# Bytes per rank and time of the ring over MPI for P = 1, 2, 4 against the single-process forward.
# Usage: benchmarks/ring/ring_benchmark.sh <build dir> [N H D causal repeats]
set -eu
build=${1:?usage: ring_benchmark.sh <build dir> [N H D causal repeats]}
shift
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
for ranks in 1 2 4; do
  mpiexec -n "$ranks" --oversubscribe --bind-to none "$build/benchmarks/ring_benchmark" "$@"
done
