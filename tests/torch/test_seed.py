"""The drop-in claim: dilated_attention_torch's DilatedAttention and MultiheadDilatedAttention
against dilated-attention-pytorch's (the seed, DarcStar-Solutions-Tech/dilated-attention-pytorch,
its source exported into the git-ignored peers/dilated-attention-pytorch as docs/performance.md
says; skipped when absent). Same constructor arguments, same inputs; the multi-head modules share
one state_dict. Forward and gradients, double (to rounding) and float."""

import importlib
import os
import sys
import types
import unittest

import torch

from torch_test_support import REPO, inputs, ops

ops()
PEER = os.path.join(REPO, "peers", "dilated-attention-pytorch")


def load_seed():
    package_dir = os.path.join(PEER, "dilated_attention_pytorch")
    if not os.path.isdir(package_dir):
        return None
    package = types.ModuleType("dilated_attention_pytorch")
    package.__path__ = [package_dir]
    sys.modules["dilated_attention_pytorch"] = package
    try:
        core = importlib.import_module("dilated_attention_pytorch.dilated_attention")
        multi = importlib.import_module("dilated_attention_pytorch.multihead_dilated_attention")
    except ImportError as error:
        print(f"seed not importable: {error}")
        return None
    return core, multi


SEED = load_seed()


@unittest.skipUnless(SEED, f"the seed's source is not in {PEER}")
class SeedTest(unittest.TestCase):
    def test_dilated_attention_drop_in(self):
        import dilated_attention_torch as ours

        for dtype, tolerance, causal in ((torch.double, 1e-12, False), (torch.double, 1e-12, True),
                                         (torch.float32, 2e-6, True)):
            with self.subTest(dtype=dtype, causal=causal):
                args = dict(segment_lengths=[8, 16, 32], dilation_rates=[1, 2, 4])
                seed, mine = SEED[0].DilatedAttention(**args).eval(), ours.DilatedAttention(**args)
                q, k, v = inputs(2, 64, 5, 5, 16, dtype=dtype, seed=8, requires_grad=True)
                d_out = torch.randn(2, 64, 5, 16, dtype=dtype)
                expected = seed(q, k, v, is_causal=causal)
                got = mine(q, k, v, is_causal=causal)
                torch.testing.assert_close(got, expected, rtol=0, atol=tolerance)
                for g, g_seed in zip(torch.autograd.grad(got, (q, k, v), d_out),
                                     torch.autograd.grad(expected, (q, k, v), d_out)):
                    torch.testing.assert_close(g, g_seed, rtol=0,
                                               atol=tolerance * 10 * g_seed.abs().max().item())

    def test_multihead_drop_in_shares_the_state_dict(self):
        import dilated_attention_torch as ours

        args = dict(embed_dim=64, num_heads=4, dilation_rates=[1, 2], segment_lengths=[16, 32],
                    dtype=torch.double)
        torch.manual_seed(1)
        seed = SEED[1].MultiheadDilatedAttention(**args).eval()
        mine = ours.MultiheadDilatedAttention(**args)
        mine.load_state_dict(seed.state_dict(), strict=True)
        x = torch.randn(2, 64, 64, dtype=torch.double, requires_grad=True)
        expected = seed(x, is_causal=True)
        got = mine(x, is_causal=True)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
        g, = torch.autograd.grad(got.sum(), x)
        g_seed, = torch.autograd.grad(expected.sum(), x)
        torch.testing.assert_close(g, g_seed, rtol=0, atol=1e-10)


if __name__ == "__main__":
    unittest.main(verbosity=2)
