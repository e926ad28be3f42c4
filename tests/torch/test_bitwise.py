"""The operators return exactly the bits of the library's own C++ calls (forward and backward,
float and double) on the same inputs: tests/torch/library_calls.cpp, built with the extension's
optimisation. Path of that program: $DILATED_ATTENTION_LIBRARY_CALLS."""

import os
import subprocess
import tempfile
import unittest

import numpy as np
import torch

from torch_test_support import inputs, ops

OPS = ops()
PROGRAM = os.environ.get("DILATED_ATTENTION_LIBRARY_CALLS")

CASES = [
    # dtype, b, n, h, hkv, d, segments, rates, causal, offsets, mixing
    (torch.float32, 1, 300, 4, 2, 64, [64, 128, 256], [1, 2, 4], True, "modular", "softmax"),
    (torch.float32, 2, 100, 3, 3, 32, [40, 64], [1, 3], False, "partitioned", "mean"),
    (torch.float32, 1, 77, 6, 2, 16, [16, 32], [2, 4], True, "blocked", "mean"),
    (torch.float64, 1, 50, 4, 4, 8, [16, 32], [1, 2], True, "blocked", "softmax"),
]


@unittest.skipUnless(PROGRAM and os.path.exists(PROGRAM), "DILATED_ATTENTION_LIBRARY_CALLS not set")
class BitwiseTest(unittest.TestCase):
    def test_equal_bits(self):
        for dtype, b, n, h, hkv, d, segs, rates, causal, rule, mixing in CASES:
            with self.subTest(dtype=dtype, rule=rule, mixing=mixing), \
                    tempfile.TemporaryDirectory() as work:
                q, k, v = inputs(b, n, h, hkv, d, dtype=dtype, seed=7, requires_grad=True)
                d_out = torch.randn(b, n, h, d, dtype=dtype)
                for name, t in (("q", q), ("k", k), ("v", v), ("d_out", d_out)):
                    t.detach().numpy().tofile(os.path.join(work, name + ".bin"))
                type_name = "float" if dtype == torch.float32 else "double"
                subprocess.run([PROGRAM, work, type_name, str(b), str(n), str(h), str(hkv), str(d),
                                ",".join(map(str, segs)), ",".join(map(str, rates)),
                                "1" if causal else "0", rule, mixing], check=True)
                out, lse = OPS.forward(q, k, v, segs, rates, causal, rule, mixing)
                grads = torch.autograd.grad(out, (q, k, v), d_out)
                numpy_type = np.float32 if dtype == torch.float32 else np.float64
                expected = {name: np.fromfile(os.path.join(work, name + ".bin"), numpy_type)
                            for name in ("out", "lse", "d_q", "d_k", "d_v")}
                for name, got in (("out", out), ("lse", lse), ("d_q", grads[0]),
                                  ("d_k", grads[1]), ("d_v", grads[2])):
                    got = got.detach().contiguous().numpy().ravel()
                    self.assertEqual(got.shape, expected[name].shape, name)
                    if not np.array_equal(got.view(np.uint8), expected[name].view(np.uint8)):
                        finite = np.isfinite(expected[name])
                        self.fail(f"{name} differs: max |diff| on finite entries "
                                  f"{np.abs(got[finite] - expected[name][finite]).max()}")


if __name__ == "__main__":
    unittest.main(verbosity=2)
