"""Shared by the torch tests: paths, the operators (compiled once per build tree by the
torch.build_extension fixture into $TORCH_EXTENSIONS_DIR, loaded from that cache here) and
small input helpers."""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
for path in (os.path.join(REPO, "python"), HERE):
    if path not in sys.path:
        sys.path.insert(0, path)

import torch  # noqa: E402

import dilated_attention_torch  # noqa: E402


def ops():
    """The CPU build (what docs/torch.md's first block loads, so the cache is shared), or the
    CUDA build with DILATED_ATTENTION_TORCH_CUDA=1 (a GPU machine's check)."""
    cuda = os.environ.get("DILATED_ATTENTION_TORCH_CUDA") == "1"
    return dilated_attention_torch.load_ops(cuda=cuda)


RULES = ("modular", "blocked", "partitioned")
MIXINGS = ("softmax", "mean")


def inputs(b, n, h, hkv, d, dtype=torch.double, seed=0, requires_grad=False):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(b, n, h, d, generator=generator, dtype=torch.double).to(dtype)
    k = torch.randn(b, n, hkv, d, generator=generator, dtype=torch.double).to(dtype)
    v = torch.randn(b, n, hkv, d, generator=generator, dtype=torch.double).to(dtype)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]
