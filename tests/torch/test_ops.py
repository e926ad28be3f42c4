"""torch.ops.dilated_attention: gradcheck, equality with the plain-PyTorch statement of
docs/semantics.md (tests/torch/semantics_reference.py), opcheck, torch.compile, strided inputs
without copies, low-precision dtypes, bad inputs. Small shapes: the whole file runs in seconds."""

import itertools
import unittest

import torch
from torch.library import opcheck

import semantics_reference as ref
from torch_test_support import MIXINGS, RULES, inputs, ops

OPS = ops()
torch.manual_seed(0)

# Awkward shapes: N a multiple of no segment length, r not dividing w, GQA, H a multiple of
# neither G nor r, a segment longer than the sequence.
CASES = [
    # b, n, h, hkv, d, segment_lengths, dilation_rates
    (1, 11, 3, 1, 4, [4, 6], [1, 3]),
    (2, 13, 4, 2, 4, [5, 16], [2, 4]),
]


def call(q, k, v, segs, rates, causal, rule, mixing, scale=None):
    return OPS.forward(q, k, v, segs, rates, causal, rule, mixing, scale)


class GradcheckTest(unittest.TestCase):
    def test_gradcheck_every_rule_mixing_causal(self):
        for (b, n, h, hkv, d, segs, rates), rule, mixing, causal in itertools.product(
                CASES[:1], RULES, MIXINGS, (False, True)):
            with self.subTest(rule=rule, mixing=mixing, causal=causal):
                q, k, v = inputs(b, n, h, hkv, d, requires_grad=True, seed=1)
                self.assertTrue(torch.autograd.gradcheck(
                    lambda q, k, v: call(q, k, v, segs, rates, causal, rule, mixing)[0],
                    (q, k, v), eps=1e-6, atol=1e-8, rtol=1e-6))

    def test_gradcheck_gqa_batch_long_segment_and_scale(self):
        b, n, h, hkv, d, segs, rates = CASES[1]
        for rule, causal in itertools.product(RULES, (False, True)):
            with self.subTest(rule=rule, causal=causal):
                q, k, v = inputs(b, n, h, hkv, d, requires_grad=True, seed=2)
                self.assertTrue(torch.autograd.gradcheck(
                    lambda q, k, v: call(q, k, v, segs, rates, causal, rule, "softmax", 0.3)[0],
                    (q, k, v), eps=1e-6, atol=1e-8, rtol=1e-6, fast_mode=True))


class ReferenceTest(unittest.TestCase):
    """Forward and gradients equal docs/semantics.md in plain PyTorch (double)."""

    def check(self, case, rule, mixing, causal, scale=None):
        b, n, h, hkv, d, segs, rates = case
        q, k, v = inputs(b, n, h, hkv, d, requires_grad=True, seed=3)
        d_out = torch.randn(b, n, h, d, dtype=torch.double)
        out, lse = call(q, k, v, segs, rates, causal, rule, mixing, scale)
        grads = torch.autograd.grad(out, (q, k, v), d_out)
        out_ref, lse_ref = ref.reference(q, k, v, segs, rates, causal, rule, mixing, scale)
        grads_ref = torch.autograd.grad(out_ref, (q, k, v), d_out)
        torch.testing.assert_close(out, out_ref, rtol=0, atol=1e-12)
        torch.testing.assert_close(lse, lse_ref, rtol=0, atol=1e-12)  # -inf rows match exactly
        for name, g, g_ref in zip(("d_q", "d_k", "d_v"), grads, grads_ref):
            scale_of = max(1.0, g_ref.abs().max().item())
            torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-10 * scale_of, msg=name)

    def test_every_rule_mixing_causal(self):
        for case, rule, mixing, causal in itertools.product(CASES, RULES, MIXINGS, (False, True)):
            with self.subTest(case=case, rule=rule, mixing=mixing, causal=causal):
                self.check(case, rule, mixing, causal)

    def test_explicit_scale(self):
        self.check(CASES[1], "modular", "softmax", True, scale=0.7)

    def test_empty_rows_are_zero_and_minus_infinity(self):
        q, k, v = inputs(1, 12, 4, 4, 4)
        out, lse = call(q, k, v, [4, 8], [2, 4], False, "partitioned", "mean")
        empty = torch.isinf(lse)
        self.assertTrue(empty.any())
        self.assertTrue((lse[empty] < 0).all())
        self.assertTrue((out.permute(0, 2, 1, 3)[empty] == 0).all())

    def test_mixing_weights_gradient(self):
        """Under softmax the branch weights exp(LSE_i - LSE) depend on q and k: the gradient
        through them is part of ours (equal to the merged-partials statement with autograd
        through its weights), and it is not negligible (detaching the weights changes d_q)."""
        b, n, h, hkv, d, segs, rates = CASES[1]
        q, k, v = inputs(b, n, h, hkv, d, requires_grad=True, seed=4)
        d_out = torch.randn(b, n, h, d, dtype=torch.double)
        ours = torch.autograd.grad(call(q, k, v, segs, rates, False, "modular", "softmax")[0],
                                   (q, k, v), d_out)
        merged = ref.reference_by_branches(q, k, v, segs, rates, False, "modular")
        torch.testing.assert_close(merged, call(q, k, v, segs, rates, False, "modular",
                                                "softmax")[0], rtol=0, atol=1e-12)
        full = torch.autograd.grad(merged, (q, k, v), d_out)
        detached = torch.autograd.grad(
            ref.reference_by_branches(q, k, v, segs, rates, False, "modular",
                                      detach_weights=True), (q, k, v), d_out)
        for g, g_full, g_detached in zip(ours, full, detached):
            torch.testing.assert_close(g, g_full, rtol=0, atol=1e-10)
        self.assertGreater((ours[0] - detached[0]).abs().max().item(), 1e-3)

    def test_lse_is_not_differentiable(self):
        q, k, v = inputs(1, 8, 2, 2, 4, requires_grad=True)
        out, lse = call(q, k, v, [4], [1], False, "modular", "softmax")
        self.assertTrue(out.requires_grad)
        self.assertFalse(lse.requires_grad)


class StridesTest(unittest.TestCase):
    def test_strided_views_are_read_in_place(self):
        """Slices of a packed qkv tensor (the last dimension contiguous) give the same bits as
        contiguous copies, in the forward and the backward."""
        packed = torch.randn(2, 17, 3, 4, 8)  # [b, n, (q|k|v), h, d]
        q, k, v = packed.unbind(2)
        self.assertFalse(q.is_contiguous())
        d_out = torch.randn(2, 17, 4, 8)
        results = []
        for tensors in ((q, k, v), tuple(t.contiguous() for t in (q, k, v))):
            leaves = [t.detach().requires_grad_() for t in tensors]
            if tensors[0].is_contiguous():
                strided = leaves
            else:  # keep the strides: differentiate through the views of one packed leaf
                base = packed.clone().requires_grad_()
                strided = list(base.unbind(2))
                leaves = [base]
            out, lse = call(*strided, [8, 16], [1, 2], True, "modular", "softmax")
            out.backward(d_out)
            grads = leaves[0].grad.unbind(2) if len(leaves) == 1 else [t.grad for t in leaves]
            results.append((out, lse, *grads))
        for a, b in zip(*results):
            self.assertTrue(torch.equal(a, b))

    def test_transposed_heads_and_expanded_batch(self):
        q = torch.randn(1, 4, 10, 8).transpose(1, 2)  # [1, 10, 4, 8], seq stride 8, head 80
        k = torch.randn(1, 10, 2, 8).expand(3, 10, 2, 8)  # batch stride 0 (read-only input)
        v = torch.randn(1, 10, 2, 8).expand(3, 10, 2, 8)
        out, _ = call(q.expand(3, 10, 4, 8), k, v, [4], [2], False, "blocked", "softmax")
        expected, _ = call(q.contiguous().expand(3, 10, 4, 8).contiguous(), k.contiguous(),
                           v.contiguous(), [4], [2], False, "blocked", "softmax")
        self.assertTrue(torch.equal(out, expected))


class DtypeTest(unittest.TestCase):
    def test_low_precision_forward_and_backward(self):
        q64, k64, v64 = inputs(1, 24, 4, 2, 16, requires_grad=True, seed=5)
        d_out = torch.randn(1, 24, 4, 16, dtype=torch.double)
        out_ref, _ = ref.reference(q64, k64, v64, [8, 24], [1, 2], True, "modular", "softmax")
        grads_ref = torch.autograd.grad(out_ref, (q64, k64, v64), d_out)
        for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 5e-2),
                                 (torch.float16, 1e-2)):
            with self.subTest(dtype=dtype):
                q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q64, k64, v64))
                out, lse = call(q, k, v, [8, 24], [1, 2], True, "modular", "softmax")
                self.assertEqual(out.dtype, dtype)
                self.assertEqual(lse.dtype, torch.float32)
                grads = torch.autograd.grad(out, (q, k, v), d_out.to(dtype))
                torch.testing.assert_close(out.double(), out_ref, rtol=0, atol=tolerance)
                for g, g_ref in zip(grads, grads_ref):
                    self.assertEqual(g.dtype, dtype)
                    torch.testing.assert_close(g.double(), g_ref, rtol=0,
                                               atol=tolerance * g_ref.abs().max().item() * 4)


class OpcheckTest(unittest.TestCase):
    def test_opcheck_forward(self):
        for rule, mixing, dtype in (("modular", "softmax", torch.double),
                                    ("partitioned", "mean", torch.float32),
                                    ("blocked", "softmax", torch.bfloat16)):
            with self.subTest(rule=rule, dtype=dtype):
                q, k, v = inputs(1, 12, 4, 2, 8, dtype=dtype, requires_grad=True)
                opcheck(torch.ops.dilated_attention.forward.default, (q, k, v, [4, 8], [1, 2]),
                        {"causal": True, "offsets": rule, "mixing": mixing})

    def test_opcheck_backward(self):
        q, k, v = inputs(1, 12, 4, 2, 8, dtype=torch.float32)
        out, lse = call(q, k, v, [4, 8], [1, 2], True, "modular", "softmax")
        opcheck(torch.ops.dilated_attention.backward.default,
                (torch.randn_like(out), q, k, v, out, lse, [4, 8], [1, 2]), {"causal": True},
                test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


class CompileTest(unittest.TestCase):
    def test_compiled_module_forward_and_backward(self):
        from dilated_attention_torch import MultiheadDilatedAttention

        torch.manual_seed(0)
        module = MultiheadDilatedAttention(32, 4, [1, 2], [8, 16])
        compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
        x = torch.randn(2, 32, 32, requires_grad=True)
        eager = module(x, is_causal=True)
        eager.sum().backward()
        eager_grad, x.grad = x.grad, None
        got = compiled(x, is_causal=True)
        got.sum().backward()
        torch.testing.assert_close(got, eager, rtol=0, atol=1e-6)
        torch.testing.assert_close(x.grad, eager_grad, rtol=0, atol=1e-5)

    def test_inductor(self):
        from dilated_attention_torch import DilatedAttention

        module = DilatedAttention([4, 8], [1, 2])
        q, k, v = inputs(1, 16, 2, 2, 8, dtype=torch.float32, requires_grad=True)
        compiled = torch.compile(module, fullgraph=True)
        torch.testing.assert_close(compiled(q, k, v, is_causal=True),
                                   module(q, k, v, is_causal=True), rtol=0, atol=0)


class BadInputTest(unittest.TestCase):
    def assert_raises(self, fragment, *args, **kwargs):
        with self.assertRaises(ValueError) as raised:
            OPS.forward(*args, **kwargs)
        self.assertIn(fragment, str(raised.exception))

    def test_library_messages_arrive_unchanged(self):
        q, k, v = inputs(1, 8, 2, 2, 4)
        self.assert_raises("config.dilation_rates[0] = 9 exceeds config.segment_lengths[0] = 8",
                           q, k, v, [8], [9])
        self.assert_raises("config.dilation_rates has 2 entries but config.segment_lengths has 1",
                           q, k, v, [8], [1, 2])
        self.assert_raises("partitioned", q, k, v, [2, 4, 8], [1, 1, 1], offsets="partitioned")
        q3, k3, v3 = inputs(1, 8, 3, 2, 4)
        self.assert_raises("num_kv_heads", q3, k3, v3, [8], [1])
        self.assert_raises("config.scale", q, k, v, [8], [1], scale=-1.0)

    def test_rejected_by_name(self):
        q, k, v = inputs(1, 8, 2, 2, 4)
        self.assert_raises("k has dtype Float but q has Double", q, k.float(), v, [8], [1])
        self.assert_raises("q has dtype Int", q.int(), k.int(), v.int(), [8], [1])
        self.assert_raises("v has 3 dimensions", q, k, v[0], [8], [1])
        self.assert_raises("q.stride(-1) = 2", q.transpose(2, 3).contiguous().transpose(2, 3),
                           k, v, [8], [1])
        self.assert_raises("offsets = 'diagonal'", q, k, v, [8], [1], offsets="diagonal")
        self.assert_raises("mixing = 'max'", q, k, v, [8], [1], mixing="max")
        self.assert_raises("num_threads = -1", q, k, v, [8], [1], num_threads=-1)
        self.assert_raises("but k has [1, 4, 2, 4]", q, k[:, :4], v[:, :4], [8], [1])
        if torch.backends.mps.is_available() or torch.cuda.is_available():
            return
        self.assert_raises("is on meta but q is on cpu", q, k.to("meta"), v, [8], [1])

    def test_backward_rejects_by_name(self):
        q, k, v = inputs(1, 8, 2, 2, 4)
        out, lse = OPS.forward(q, k, v, [8], [1])
        with self.assertRaisesRegex(ValueError, "lse has dtype Float"):
            OPS.backward(out, q, k, v, out, lse.float(), [8], [1])
        with self.assertRaisesRegex(ValueError, "lse has shape"):
            OPS.backward(out, q, k, v, out, lse[:, :1], [8], [1])
        with self.assertRaisesRegex(ValueError, r"grad_out.stride\(-1\)"):
            OPS.backward(out.transpose(2, 3).contiguous().transpose(2, 3), q, k, v, out, lse,
                         [8], [1])


class ThreadsTest(unittest.TestCase):
    def test_thread_counts_give_the_same_bits(self):
        q, k, v = inputs(1, 64, 4, 4, 16, dtype=torch.float32)
        first = OPS.forward(q, k, v, [16, 32], [1, 2], True, num_threads=1)
        for threads in (2, 3, 0):
            again = OPS.forward(q, k, v, [16, 32], [1, 2], True, num_threads=threads)
            self.assertTrue(torch.equal(first[0], again[0]) and torch.equal(first[1], again[1]))


if __name__ == "__main__":
    unittest.main(verbosity=2)
