#!/usr/bin/env bash
# Checks that the C++ and CUDA lines changed since a base commit follow .clang-format, with
# `git clang-format --diff` (only changed lines are looked at; existing code is never reformatted).
#   FORMAT_BASE   the base commit (default: the commit that added .clang-format)
# Covers committed and uncommitted changes (staged or not) of *.h *.hpp *.cpp *.cc *.cu *.cuh.
# Exit 0 and "format: N files checked, clean"; exit 1 with the offending diff otherwise.
# Needs clang-format (git-clang-format); as root on Debian it is installed with apt-get.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${repo_root}"

find_git_clang_format() {
  local candidate
  for candidate in git-clang-format git-clang-format-14 git-clang-format-15 git-clang-format-16 \
                   /usr/lib/llvm-14/bin/git-clang-format; do
    if command -v "${candidate}" > /dev/null 2>&1; then command -v "${candidate}"; return 0; fi
  done
  return 1
}
if ! tool="$(find_git_clang_format)"; then
  if [[ "$(id -u)" -eq 0 ]] && command -v apt-get > /dev/null 2>&1; then
    echo "check_format.sh: installing clang-format with apt-get (provides git-clang-format)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q > /dev/null
    apt-get install -y -q --no-install-recommends clang-format > /dev/null
    tool="$(find_git_clang_format)" || { echo "check_format.sh: git-clang-format still missing" >&2; exit 1; }
  else
    echo "check_format.sh: git-clang-format not found: install the package clang-format" \
         "(Debian/Ubuntu: sudo apt-get install --no-install-recommends clang-format)" >&2
    exit 1
  fi
fi
# git-clang-format runs `clang-format`; a versioned binary only (clang-format-14) needs naming.
binary=()
if ! command -v clang-format > /dev/null 2>&1; then
  for candidate in clang-format-14 clang-format-15 clang-format-16; do
    if command -v "${candidate}" > /dev/null 2>&1; then binary=(--binary "$(command -v "${candidate}")"); break; fi
  done
fi

base="${FORMAT_BASE:-$(git log --diff-filter=A --format=%H -- .clang-format | tail -1)}"
if [[ -z "${base}" ]]; then
  echo "check_format.sh: no base: .clang-format is not committed yet; set FORMAT_BASE" >&2
  exit 1
fi
extensions=h,hpp,cpp,cc,cxx,cu,cuh
# Changed files between base and the work tree (committed, staged and unstaged), still present.
mapfile -t files < <(git diff --name-only --diff-filter=ACMR "${base}" -- \
                       '*.h' '*.hpp' '*.cpp' '*.cc' '*.cxx' '*.cu' '*.cuh')
if [[ ${#files[@]} -eq 0 ]]; then
  echo "format: 0 files checked, clean"
  exit 0
fi
# Without --staged, git clang-format compares the work tree with the commit.
set +e
output="$("${tool}" "${binary[@]}" --diff --extensions "${extensions}" "${base}" -- "${files[@]}" 2>&1)"
status=$?
set -e
case "${output}" in
  "" | "no modified files to format" | "clang-format did not modify any files")
    echo "format: ${#files[@]} files checked, clean"
    exit 0 ;;
esac
echo "${output}"
echo "check_format.sh: the lines above are not formatted as .clang-format says (base ${base});" \
     "fix with: git clang-format --extensions ${extensions} ${base}" >&2
[[ ${status} -ne 0 ]] || status=1
exit 1
