#!/usr/bin/env bash
# The CPU tests on aarch64 (the NEON kernels) under user-mode emulation: cross-compiles
# cpu_attend_test, cpu_forward_test and cpu_threads_test with Debian's g++-aarch64-linux-gnu
# (statically linked, GoogleTest built from /usr/src/googletest) and runs them with
# qemu-aarch64. Opt-in (CTest: -DDILATED_ATTENTION_TEST_NEON_QEMU=ON, test cpu_neon_qemu), since
# it takes minutes: about 3 min to build and 1-2 min to run on a 2-core x86-64 machine.
#
# Needs: apt-get install g++-aarch64-linux-gnu qemu-user googletest libeigen3-dev
# Usage: tests/cpu/cpu_neon_qemu.sh [build-dir]        (default build/neon-qemu)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
out="${1:-$here/build/neon-qemu}"
cxx="${AARCH64_CXX:-aarch64-linux-gnu-g++}"
qemu="${QEMU_AARCH64:-qemu-aarch64}"
gtest="${GTEST_SOURCE:-/usr/src/googletest/googletest}"
eigen="${EIGEN_INCLUDE:-/usr/include/eigen3}"
for tool in "$cxx" "$qemu"; do
  command -v "$tool" > /dev/null || { echo "cpu_neon_qemu: $tool not found (see the header)"; exit 77; }
done
[[ -f "$gtest/src/gtest-all.cc" ]] || { echo "cpu_neon_qemu: no GoogleTest source at $gtest"; exit 77; }
mkdir -p "$out"
flags=(-std=c++17 -O2 -g0 -Wall -Wextra -I "$here/include" -I "$here/tests" -isystem "$eigen"
       -isystem "$gtest/include" -I "$gtest" -pthread)
if [[ ! -f "$out/gtest.o" ]]; then
  "$cxx" "${flags[@]}" -c "$gtest/src/gtest-all.cc" -o "$out/gtest.o"
  "$cxx" "${flags[@]}" -c "$gtest/src/gtest_main.cc" -o "$out/gtest_main.o"
fi
status=0
for test in cpu_attend_test cpu_forward_test cpu_threads_test; do
  "$cxx" "${flags[@]}" "$here/tests/cpu/$test.cpp" "$out/gtest.o" "$out/gtest_main.o" -static -o "$out/$test"
  echo "== $test (aarch64, $("$qemu" --version | head -1))"
  "$qemu" "$out/$test" --gtest_brief=1 || status=1
  if [[ "$test" == cpu_forward_test ]]; then
    echo "== $test with DILATED_ATTENTION_CPU_ISA=generic"
    DILATED_ATTENTION_CPU_ISA=generic "$qemu" "$out/$test" --gtest_brief=1 || status=1
  fi
done
exit "$status"
