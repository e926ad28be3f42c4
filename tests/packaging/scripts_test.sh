#!/usr/bin/env bash
# The README's two commands, benchmarks/run_comparison.sh and tests/run_all.sh, must say what they
# do (test packaging.scripts):
#   - --help exits 0 and documents every option the argument parser accepts and every
#     environment variable the script reads; an unknown option exits 2;
#   - their progress wrapper (with_progress) passes output through line by line, keeps a line
#     that arrives in pieces whole, prints a "... still running" line naming the last progress
#     line whenever the command is quiet for the progress interval, and returns the command's
#     exit status; run_comparison.sh's explains Google Benchmark's DEBUG warning.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
failures=0
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }
pass() { echo "ok    $*"; }

for script in benchmarks/run_comparison.sh tests/run_all.sh; do
  path="${root}/${script}"
  section=${failures}
  help="$(bash "${path}" --help)" || fail "${script} --help exited non-zero"
  [[ "$(bash "${path}" -h)" == "${help}" ]] || fail "${script}: -h and --help differ"
  # The patterns of the argument parser's case statement: `--seq-lens)`, `-h|--help)`,
  # `debug | asan | tsan)`.
  options="$(sed -n '/^ *case "\$\(1\|{arg}\)" in/,/^ *esac/p' "${path}" |
             sed -n 's/^ *\([-a-z| ]*\)).*/\1/p' | tr '|' '\n' | tr -d ' ' | grep -v '^$' || true)"
  [[ -n "${options}" ]] || fail "${script}: found no options to check (parser changed?)"
  for option in ${options}; do
    grep -q -- "${option}" <<< "${help}" || fail "${script}: option ${option} missing from --help"
  done
  # Environment variables it reads: ${DA_X:-...}, ${JOBS:-...}, ${PROGRESS_SECONDS:-...}.
  for variable in $(grep -o '\${[A-Z][A-Z_]*:-' "${path}" | sed 's/^\${//; s/:-$//' | sort -u); do
    grep -q -- "${variable}" <<< "${help}" || fail "${script}: variable ${variable} missing from --help"
  done
  status=0
  bash "${path}" --no-such-option > /dev/null 2>&1 || status=$?
  [[ ${status} -eq 2 ]] || fail "${script}: an unknown option exited ${status}, not 2"
  [[ ${section} -eq ${failures} ]] && pass "${script}: --help documents $(wc -w <<< "${options}") options and the environment"

  # The progress wrapper, taken from the script itself.
  functions="$(sed -n '/^ *clock() {/p; /^with_progress() {/,/^}/p' "${path}")"
  [[ "${functions}" == *"with_progress()"* ]] || { fail "${script}: no with_progress function"; continue; }
  output="$(PROGRESS_SECONDS=1 progress_seconds=1 bash -c "
    set -euo pipefail
    PROGRESS_SECONDS=1 progress_seconds=1
    ${functions}
    status=0
    with_progress demo bash -c 'echo \"[1/2] first step\"; sleep 2.5; printf \"one li\"; sleep 1.5; echo \"ne\";
      echo \"***WARNING*** Library was built as DEBUG. Timings may be affected.\"; exit 7' || status=\$?
    echo \"status \${status}\"
    with_progress quick true && echo 'status 0 for true'
  " 2>&1)"
  section=${failures}
  grep -qx '\[1/2\] first step' <<< "${output}" || fail "${script}: output not passed through: ${output}"
  grep -q '^    \.\.\. demo: still running, 0m0[1-9]s so far (last: \[1/2\] first step)$' <<< "${output}" ||
    fail "${script}: no 'still running' line during a quiet spell: ${output}"
  grep -qx 'one line' <<< "${output}" || fail "${script}: a line printed in two pieces was split: ${output}"
  grep -qx 'status 7' <<< "${output}" || fail "${script}: the command's exit status was lost: ${output}"
  grep -qx 'status 0 for true' <<< "${output}" || fail "${script}: a succeeding command failed: ${output}"
  if [[ "${script}" == benchmarks/run_comparison.sh ]]; then
    grep -A1 'Library was built as DEBUG' <<< "${output}" | grep -q "system's Google Benchmark library" ||
      fail "${script}: the DEBUG warning is not explained: ${output}"
  fi
  [[ ${section} -eq ${failures} ]] && pass "${script}: with_progress passes output through, reports quiet spells, keeps the status"
done

if [[ ${failures} -ne 0 ]]; then
  echo "${failures} check(s) failed"
  exit 1
fi
echo "all checks passed"
