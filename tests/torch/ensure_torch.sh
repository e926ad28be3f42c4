#!/usr/bin/env bash
# Makes sure the torch tests have their Python: a git-ignored virtual environment .venv-torch/ at
# the repository root with torch, numpy and einops (einops only for the seed comparison) from
# PyPI. When it is missing, says what it installs and how large it is, then installs it.
# PyPI's default torch wheel is the CUDA build: ~3 GB of downloads (torch and its nvidia-*
# wheels), ~5.4 GB on disk; it runs on CPU-only machines too.
#
# Usage: bash tests/torch/ensure_torch.sh        (exit 0 when the environment is ready)
# Environment: DILATED_ATTENTION_TORCH_VENV (default <repo>/.venv-torch), PYTHON (default python3).
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
venv="${DILATED_ATTENTION_TORCH_VENV:-${repo_root}/.venv-torch}"
python="${PYTHON:-python3}"

if [[ -x "${venv}/bin/python" ]] && "${venv}/bin/python" -c "import torch, numpy, einops" 2> /dev/null; then
  echo "    torch tests: ${venv} has $("${venv}/bin/python" -c 'import torch, numpy; print(f"torch {torch.__version__}, numpy {numpy.__version__}")') ($(du -sh "${venv}" | cut -f1))"
  exit 0
fi
if ! command -v "${python}" > /dev/null 2>&1; then
  echo "ensure_torch.sh: no ${python}: install Python 3.9+ (Debian: apt-get install python3 python3-venv)" >&2
  exit 1
fi
if ! "${python}" -m venv --help > /dev/null 2>&1 || ! "${python}" -c "import ensurepip" 2> /dev/null; then
  if [[ "$(id -u)" -eq 0 ]] && command -v apt-get > /dev/null 2>&1; then
    echo "    installing python3-venv with apt-get (for the torch tests' virtual environment)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3-venv
  else
    echo "ensure_torch.sh: ${python} cannot create virtual environments: install python3-venv" >&2
    exit 1
  fi
fi
echo "    torch tests: creating ${venv} and installing torch numpy einops from PyPI"
echo "    (the default torch wheel is the CUDA build: about 3 GB to download with its nvidia-*"
echo "    wheels, about 5.4 GB on disk; it also runs without a GPU. A few minutes.)"
[[ -x "${venv}/bin/python" ]] || "${python}" -m venv "${venv}"
"${venv}/bin/python" -m pip install --progress-bar off --disable-pip-version-check -q torch numpy einops
echo "    torch tests: installed $("${venv}/bin/python" -c 'import torch, numpy; print(f"torch {torch.__version__}, numpy {numpy.__version__}")') into ${venv} ($(du -sh "${venv}" | cut -f1))"
