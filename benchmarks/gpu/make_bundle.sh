#!/usr/bin/env bash
# Prepares the dependency bundle that benchmarks/gpu/run_gpu_check.sh needs on a GPU machine
# with no network and none of Eigen, GoogleTest, Google Benchmark installed (the device machine
# of docs/cuda.md "GPU check"). Run it on a Debian 12 machine with these packages installed:
#
#   apt-get install libeigen3-dev googletest libbenchmark-dev
#
#   benchmarks/gpu/make_bundle.sh [DEST]        # DEST defaults to build/gpu-bundle (git-ignored)
#
# DEST then holds deps.tar.gz (~2 MB; gzip, which every image has) and its MANIFEST, with:
#   prefix/include/eigen3/Eigen, prefix/share/eigen3/cmake   Eigen 3.4 headers + CMake config
#                                                            (libeigen3-dev; `unsupported/` left out)
#   prefix/include/benchmark, prefix/lib/x86_64-linux-gnu/libbenchmark.so.*,
#   prefix/lib/x86_64-linux-gnu/cmake/benchmark              Google Benchmark 1.7.1 as Debian built
#                                                            it (libbenchmark-dev: x86-64, needs
#                                                            glibc >= 2.32 and libstdc++; relocatable
#                                                            CMake config)
#   googletest-src/                                          GoogleTest 1.12.1 source (googletest),
#                                                            built by run_gpu_check.sh into prefix/
#
# Hand DEST's folder to the GPU session with the device tool's `carry` (e.g. carry
# ["build/gpu-bundle"]); run_gpu_check.sh looks for it there (or in $GPU_BUNDLE).
set -euo pipefail

root="$(cd "$(dirname "$0")/../.." && pwd)"
dest="${1:-$root/build/gpu-bundle}"
multiarch="x86_64-linux-gnu"

need() { [[ -e "$1" ]] || { echo "make_bundle.sh: $1 missing (install $2)" >&2; exit 1; }; }
need /usr/include/eigen3/Eigen/Core libeigen3-dev
need /usr/share/eigen3/cmake/Eigen3Config.cmake libeigen3-dev
need /usr/src/googletest/CMakeLists.txt googletest
need /usr/include/benchmark/benchmark.h libbenchmark-dev
need "/usr/lib/$multiarch/cmake/benchmark/benchmarkConfig.cmake" libbenchmark-dev

stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
p="$stage/prefix"
mkdir -p "$p/include/eigen3" "$p/share/eigen3" "$p/lib/$multiarch/cmake" "$p/include"
cp -a /usr/include/eigen3/Eigen /usr/include/eigen3/signature_of_eigen3_matrix_library \
      "$p/include/eigen3/"
cp -a /usr/share/eigen3/cmake "$p/share/eigen3/"
cp -a /usr/include/benchmark "$p/include/"
cp -a /usr/lib/$multiarch/libbenchmark.so* /usr/lib/$multiarch/libbenchmark_main.a "$p/lib/$multiarch/"
cp -a "/usr/lib/$multiarch/cmake/benchmark" "$p/lib/$multiarch/cmake/"
cp -a /usr/src/googletest "$stage/googletest-src"
{
  echo "made by benchmarks/gpu/make_bundle.sh on $(date -u +%FT%TZ)"
  dpkg-query -W -f='${Package} ${Version}\n' libeigen3-dev googletest libbenchmark-dev 2>/dev/null || true
} >"$stage/MANIFEST"

mkdir -p "$dest"
tar -C "$stage" -czf "$dest/deps.tar.gz" prefix googletest-src MANIFEST
cp "$stage/MANIFEST" "$dest/MANIFEST"
rm -f "$dest/deps.tar.xz"  # the earlier format
echo "bundle: $dest/deps.tar.gz ($(du -h "$dest/deps.tar.gz" | cut -f1))"
