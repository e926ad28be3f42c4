"""The inference-form operators (docs/torch.md "Inference forms"): forward_varlen,
forward_padded, forward_query_range, forward_kvcache and the backward operators, against the
existing `forward` operator on the equivalent data (whose bits test_bitwise.py ties to the
library's C++ calls): bitwise where docs/semantics.md "What is bitwise and what is within
rounding" promises it, within rounding on the decode path. gradcheck in double on awkward shapes
(lengths 1, N a multiple of no segment length, GQA), opcheck, torch.compile, bad inputs by name."""

import itertools
import unittest

import torch
from torch.library import opcheck

from torch_test_support import RULES, inputs, ops

OPS = ops()
SEGS, RATES = [4, 6], [1, 3]  # r = 3 does not divide w = 4; no length below is a multiple of both


def packed(lengths, h, hkv, d, dtype=torch.double, seed=0):
    """Sequences of these lengths packed back to back: q [total, h, d], k, v [total, hkv, d], and
    cu_seqlens (int32, as flash_attn_varlen_func takes them)."""
    total = sum(lengths)
    q, k, v = (t[0] for t in inputs(1, total, h, hkv, d, dtype=dtype, seed=seed))
    cu = torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32)
    return q, k, v, cu


def plain(q, k, v, causal, rule="modular", mixing="softmax", segs=SEGS, rates=RATES):
    """The existing operator on one sequence given as [n, heads, d] rows."""
    return OPS.forward(q[None], k[None], v[None], segs, rates, causal, rule, mixing)


def assert_bitwise(test, got, expected, what):
    test.assertTrue(torch.equal(got, expected),
                    f"{what}: max |diff| {(got - expected).abs().nan_to_num().max().item()}")


class VarlenTest(unittest.TestCase):
    LENGTHS = [1, 13, 7, 20]

    def test_each_sequence_is_the_forward_over_it_alone_bitwise(self):
        for dtype, causal, rule, mixing in ((torch.float32, True, "modular", "softmax"),
                                            (torch.float32, False, "partitioned", "mean"),
                                            (torch.double, True, "blocked", "softmax")):
            with self.subTest(dtype=dtype, causal=causal, rule=rule):
                q, k, v, cu = packed(self.LENGTHS, 4, 2, 8, dtype=dtype, seed=1)
                out, lse = OPS.forward_varlen(q, k, v, cu, cu, SEGS, RATES, causal, rule, mixing)
                self.assertEqual(out.shape, q.shape)
                self.assertEqual(lse.shape, (4, q.shape[0]))
                for b in range(len(self.LENGTHS)):
                    s, e = cu[b].item(), cu[b + 1].item()
                    o, l = plain(q[s:e], k[s:e], v[s:e], causal, rule, mixing)
                    assert_bitwise(self, out[s:e], o[0], f"out of sequence {b}")
                    assert_bitwise(self, lse[:, s:e], l[0], f"lse of sequence {b}")

    def test_gradients_are_each_sequences_backward_bitwise(self):
        q, k, v, cu = packed(self.LENGTHS, 4, 2, 8, dtype=torch.float32, seed=2)
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        d_out = torch.randn_like(q)
        out, _ = OPS.forward_varlen(q, k, v, cu, cu, SEGS, RATES, True)
        grads = torch.autograd.grad(out, (q, k, v), d_out)
        for b in range(len(self.LENGTHS)):
            s, e = cu[b].item(), cu[b + 1].item()
            o, _ = plain(q[s:e], k[s:e], v[s:e], True)
            expected = torch.autograd.grad(o[0], (q, k, v), d_out[s:e])
            for name, g, g_ref in zip(("d_q", "d_k", "d_v"), grads, expected):
                assert_bitwise(self, g[s:e], g_ref[s:e], f"{name} of sequence {b}")

    def test_query_begins_give_rows_of_the_sequence(self):
        """Sequence 0: its rows 2..4 of 10 (a prefill chunk, non-causal so later keys count);
        sequence 1: all of its 12 rows."""
        q_all, k, v, cu_k = packed([10, 12], 4, 4, 8, seed=3)
        q = torch.cat([q_all[2:5], q_all[10:]])
        cu_q = torch.tensor([0, 3, 15])
        begins = torch.tensor([2, 0])
        out, lse = OPS.forward_varlen(q, k, v, cu_q, cu_k, SEGS, RATES, False,
                                      query_begins=begins)
        o0, l0 = plain(q_all[:10], k[:10], v[:10], False)
        o1, l1 = plain(q_all[10:], k[10:], v[10:], False)
        assert_bitwise(self, out[:3], o0[0, 2:5], "chunk rows")
        assert_bitwise(self, lse[:, :3], l0[0, :, 2:5], "chunk lse")
        assert_bitwise(self, out[3:], o1[0], "whole sequence")

    def test_decode_batch_is_the_last_rows_within_rounding(self):
        """One query row per sequence: the decode path (its own summation order)."""
        lengths = [1, 9, 23]
        _, k, v, cu_k = packed(lengths, 4, 2, 16, seed=4)
        q_all = inputs(1, sum(lengths), 4, 2, 16, seed=5)[0][0]
        last = cu_k[1:].long() - 1
        q = q_all[last]
        cu_q = torch.arange(len(lengths) + 1, dtype=torch.int32)
        out, lse = OPS.forward_varlen(q, k, v, cu_q, cu_k, SEGS, RATES, True)
        for b, n in enumerate(lengths):
            s, e = cu_k[b].item(), cu_k[b + 1].item()
            o, l = plain(q_all[s:e], k[s:e], v[s:e], True)
            torch.testing.assert_close(out[b], o[0, -1], rtol=0, atol=1e-13)
            torch.testing.assert_close(lse[:, b], l[0, :, -1], rtol=0, atol=1e-13)

    def test_gradcheck(self):
        for causal, rule in ((True, "modular"), (False, "partitioned"), (True, "blocked")):
            with self.subTest(causal=causal, rule=rule):
                q, k, v, cu = packed([1, 9, 5], 4, 2, 4, seed=6)
                self.assertTrue(torch.autograd.gradcheck(
                    lambda q, k, v: OPS.forward_varlen(q, k, v, cu, cu, SEGS, RATES, causal,
                                                       rule)[0],
                    tuple(t.requires_grad_() for t in (q, k, v)), eps=1e-6, atol=1e-8,
                    rtol=1e-6))

    def test_gradcheck_with_query_begins(self):
        """Chunks of 3 and 1 rows in the middle of their sequences: gradients flow to every
        key of the sequence (non-causal) or to those up to the chunk's end (causal)."""
        _, k, v, cu_k = packed([11, 7], 4, 2, 4, seed=7)
        q = inputs(1, 4, 4, 2, 4, seed=8)[0][0]
        cu_q, begins = torch.tensor([0, 3, 4]), torch.tensor([5, 2])
        for causal in (False, True):
            with self.subTest(causal=causal):
                self.assertTrue(torch.autograd.gradcheck(
                    lambda q, k, v: OPS.forward_varlen(q, k, v, cu_q, cu_k, SEGS, RATES, causal,
                                                       query_begins=begins)[0],
                    tuple(t.detach().requires_grad_() for t in (q, k, v)), eps=1e-6, atol=1e-8,
                    rtol=1e-6))

    def test_strided_packed_views_are_read_in_place(self):
        qkv = torch.randn(30, 3, 4, 8)  # packed [total, (q|k|v), heads, d]
        q, k, v = qkv.unbind(1)
        cu = torch.tensor([0, 12, 30])
        out, lse = OPS.forward_varlen(q, k, v, cu, cu, SEGS, RATES, True)
        again = OPS.forward_varlen(q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, SEGS,
                                   RATES, True)
        assert_bitwise(self, out, again[0], "out")
        assert_bitwise(self, lse, again[1], "lse")


class PaddedTest(unittest.TestCase):
    def test_equals_the_forward_per_element_bitwise_and_ignores_padding(self):
        lengths = torch.tensor([1, 9, 0, 6])
        q, k, v = inputs(4, 9, 6, 2, 8, dtype=torch.float32, seed=10)
        for t in (q, k, v):  # padding is never read
            for b, n in enumerate(lengths.tolist()):
                t[b, n:] = float("nan")
        out, lse = OPS.forward_padded(q, k, v, lengths, SEGS, RATES, True, "partitioned")
        for b, n in enumerate(lengths.tolist()):
            if n:
                o, l = OPS.forward(q[b:b + 1, :n], k[b:b + 1, :n], v[b:b + 1, :n], SEGS, RATES,
                                   True, "partitioned")
                assert_bitwise(self, out[b, :n], o[0], f"out of element {b}")
                assert_bitwise(self, lse[b, :, :n], l[0], f"lse of element {b}")
            self.assertTrue((out[b, n:] == 0).all())
            self.assertTrue((lse[b, :, n:] == float("-inf")).all())

    def test_gradients_per_element_bitwise(self):
        lengths = torch.tensor([7, 1, 9], dtype=torch.int32)
        q, k, v = inputs(3, 9, 4, 4, 8, dtype=torch.float32, seed=11, requires_grad=True)
        d_out = torch.randn_like(q)
        out, _ = OPS.forward_padded(q, k, v, lengths, SEGS, RATES, False)
        grads = torch.autograd.grad(out, (q, k, v), d_out)
        for b, n in enumerate(lengths.tolist()):
            o, _ = OPS.forward(q[b:b + 1, :n], k[b:b + 1, :n], v[b:b + 1, :n], SEGS, RATES, False)
            expected = torch.autograd.grad(o, (q, k, v), d_out[b:b + 1, :n])
            for name, g, g_ref in zip(("d_q", "d_k", "d_v"), grads, expected):
                assert_bitwise(self, g[b], g_ref[b], f"{name} of element {b}")

    def test_gradcheck(self):
        lengths = torch.tensor([1, 9, 5])
        for causal, mixing in ((True, "softmax"), (False, "mean")):
            with self.subTest(causal=causal, mixing=mixing):
                q, k, v = inputs(3, 9, 4, 2, 4, seed=12, requires_grad=True)
                self.assertTrue(torch.autograd.gradcheck(
                    lambda q, k, v: OPS.forward_padded(q, k, v, lengths, SEGS, RATES, causal,
                                                       "modular", mixing)[0],
                    (q, k, v), eps=1e-6, atol=1e-8, rtol=1e-6))


class QueryRangeTest(unittest.TestCase):
    def test_chunk_rows_are_rows_of_the_forward_bitwise(self):
        q, k, v = inputs(2, 19, 4, 2, 8, dtype=torch.float32, seed=20)
        for begin, count, causal in ((0, 5, True), (5, 7, True), (13, 6, False), (3, 4, False)):
            with self.subTest(begin=begin, count=count, causal=causal):
                n = begin + count if causal else 19  # causal: later keys do not matter
                out, lse = OPS.forward_query_range(q[:, begin:begin + count], k[:, :n], v[:, :n],
                                                   begin, SEGS, RATES, causal)
                o, l = OPS.forward(q[:, :n], k[:, :n], v[:, :n], SEGS, RATES, causal)
                assert_bitwise(self, out, o[:, begin:begin + count], "out")
                assert_bitwise(self, lse, l[:, :, begin:begin + count], "lse")

    def test_decode_row_within_rounding(self):
        q, k, v = inputs(2, 23, 4, 2, 16, seed=21)
        for t in range(23):
            out, lse = OPS.forward_query_range(q[:, t:t + 1], k[:, :t + 1], v[:, :t + 1], t,
                                               SEGS, RATES, True)
            o, l = OPS.forward(q[:, :t + 1], k[:, :t + 1], v[:, :t + 1], SEGS, RATES, True)
            torch.testing.assert_close(out, o[:, t:t + 1], rtol=0, atol=1e-13)
            torch.testing.assert_close(lse, l[:, :, t:t + 1], rtol=0, atol=1e-13)

    def test_chunk_gradients_sum_to_the_whole_sequences(self):
        q, k, v = inputs(1, 17, 4, 2, 8, seed=22, requires_grad=True)
        d_out = torch.randn_like(q)
        whole = torch.autograd.grad(OPS.forward(q, k, v, SEGS, RATES, True)[0], (q, k, v), d_out)
        d_q, d_k, d_v = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for begin, end in ((0, 6), (6, 7), (7, 17)):
            out, _ = OPS.forward_query_range(q[:, begin:end], k[:, :end], v[:, :end], begin,
                                             SEGS, RATES, True)
            g_q, g_k, g_v = torch.autograd.grad(out, (q, k, v), d_out[:, begin:end])
            d_q, d_k, d_v = d_q + g_q, d_k + g_k, d_v + g_v
        for name, g, g_ref in zip(("d_q", "d_k", "d_v"), (d_q, d_k, d_v), whole):
            torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-12, msg=name)

    def test_gradcheck(self):
        for begin, count, causal in ((4, 1, True), (2, 3, False), (0, 11, True), (10, 1, False)):
            with self.subTest(begin=begin, count=count, causal=causal):
                q, k, v = inputs(2, 11, 4, 2, 4, seed=23)
                q = q[:, begin:begin + count].clone()
                self.assertTrue(torch.autograd.gradcheck(
                    lambda q, k, v: OPS.forward_query_range(q, k, v, begin, SEGS, RATES,
                                                            causal)[0],
                    tuple(t.requires_grad_() for t in (q, k, v)), eps=1e-6, atol=1e-8,
                    rtol=1e-6))


def scatter_into_pages(k_cache, lengths, page_size, num_pages, seed=0):
    """The rows of a contiguous cache [B, cache_len, Hkv, D] copied into shuffled pages
    [num_pages, page_size, Hkv, D] (the spare pages filled with NaN), and the block_table."""
    b_count, cache_len, hkv, d = k_cache.shape
    columns = -(-cache_len // page_size)
    order = torch.randperm(num_pages, generator=torch.Generator().manual_seed(seed))
    pages = torch.full((num_pages, page_size, hkv, d), float("nan"), dtype=k_cache.dtype)
    table = torch.full((b_count, columns), 10**6, dtype=torch.int32)  # unused entries: never read
    used = 0
    for b, n in enumerate(lengths):
        for j in range(-(-n // page_size)):
            page = order[used].item()
            used += 1
            rows = k_cache[b, j * page_size:min(n, (j + 1) * page_size)]
            pages[page, :rows.shape[0]] = rows
            table[b, j] = page
    return pages, table


class KvcacheTest(unittest.TestCase):
    LENGTHS = [5, 16, 1, 11]

    def cache(self, dtype=torch.float32, seed=30, cache_len=16):
        k, v = (inputs(4, cache_len, 2, 2, 16, dtype=dtype, seed=seed + i)[1] for i in range(2))
        return k, v, torch.tensor(self.LENGTHS, dtype=torch.int32)

    def test_decode_rows_are_the_causal_forwards_last_rows(self):
        k, v, seqlens = self.cache(dtype=torch.double)
        q = inputs(4, 16, 4, 2, 16, seed=33)[0]
        rows = torch.stack([q[b, n - 1] for b, n in enumerate(self.LENGTHS)])[:, None]
        with torch.no_grad():
            out, lse = OPS.forward_kvcache(rows, k, v, seqlens, SEGS, RATES, True)
        self.assertEqual(out.shape, (4, 1, 4, 16))
        self.assertEqual(lse.shape, (4, 4, 1))
        for b, n in enumerate(self.LENGTHS):
            o, l = OPS.forward(q[b:b + 1, :n], k[b:b + 1, :n], v[b:b + 1, :n], SEGS, RATES, True)
            torch.testing.assert_close(out[b, 0], o[0, n - 1], rtol=0, atol=1e-13)
            torch.testing.assert_close(lse[b, :, 0], l[0, :, n - 1], rtol=0, atol=1e-13)

    def test_decode_equals_varlen_decode_bitwise(self):
        """Both take the decode path over the same rows: contiguous cache, pages, packed K/V."""
        k, v, seqlens = self.cache()
        q = torch.randn(4, 1, 4, 16)
        out, lse = OPS.forward_kvcache(q, k, v, seqlens, SEGS, RATES, True)
        cu_k = torch.tensor([0] + list(itertools.accumulate(self.LENGTHS)))
        k_packed = torch.cat([k[b, :n] for b, n in enumerate(self.LENGTHS)])
        v_packed = torch.cat([v[b, :n] for b, n in enumerate(self.LENGTHS)])
        o, l = OPS.forward_varlen(q[:, 0], k_packed, v_packed, torch.arange(5), cu_k, SEGS, RATES,
                                  True)
        assert_bitwise(self, out[:, 0], o, "out")
        assert_bitwise(self, lse[:, :, 0], l.t(), "lse")

    def test_chunk_rows_are_the_forwards_rows_bitwise(self):
        k, v, _ = self.cache()
        seqlens = torch.tensor([5, 16, 3, 11])
        q = torch.randn(4, 3, 4, 16)
        out, lse = OPS.forward_kvcache(q, k, v, seqlens, SEGS, RATES, True)
        for b, n in enumerate(seqlens.tolist()):
            q_full = torch.zeros(1, n, 4, 16)
            q_full[0, n - 3:] = q[b]
            o, l = OPS.forward(q_full, k[b:b + 1, :n], v[b:b + 1, :n], SEGS, RATES, True)
            assert_bitwise(self, out[b], o[0, n - 3:], f"out of sequence {b}")
            assert_bitwise(self, lse[b], l[0, :, n - 3:], f"lse of sequence {b}")

    def test_pages_equal_the_contiguous_cache_bitwise(self):
        k, v, _ = self.cache()
        for rows, page_size, lengths in ((1, 4, self.LENGTHS), (1, 3, self.LENGTHS),
                                         (1, 1, self.LENGTHS), (3, 5, [5, 16, 3, 11])):
            with self.subTest(rows=rows, page_size=page_size):
                seqlens = torch.tensor(lengths, dtype=torch.int32)
                q = torch.randn(4, rows, 4, 16)
                expected = OPS.forward_kvcache(q, k, v, seqlens, SEGS, RATES, True)
                k_pages, table = scatter_into_pages(k, lengths, page_size, 40, seed=rows)
                v_pages, _ = scatter_into_pages(v, lengths, page_size, 40, seed=rows)
                got = OPS.forward_kvcache(q, k_pages, v_pages, seqlens, SEGS, RATES, True,
                                          block_table=table)
                assert_bitwise(self, got[0], expected[0], "out")
                assert_bitwise(self, got[1], expected[1], "lse")
                got64 = OPS.forward_kvcache(q, k_pages, v_pages, seqlens.long(), SEGS, RATES,
                                            True, block_table=table.long())
                assert_bitwise(self, got64[0], expected[0], "out with int64 indices")

    def test_thread_counts_give_the_same_bits(self):
        k, v, seqlens = self.cache()
        q = torch.randn(4, 1, 4, 16)
        first = OPS.forward_kvcache(q, k, v, seqlens, SEGS, RATES, True, num_threads=1)
        for threads in (2, 3, 0):
            again = OPS.forward_kvcache(q, k, v, seqlens, SEGS, RATES, True, num_threads=threads)
            assert_bitwise(self, again[0], first[0], f"out at {threads} threads")

    def test_inference_only(self):
        k, v, seqlens = self.cache()
        q = torch.randn(4, 1, 4, 16, requires_grad=True)
        with self.assertRaisesRegex(NotImplementedError, "forward_kvcache is inference-only"):
            OPS.forward_kvcache(q, k, v, seqlens, SEGS, RATES, True)
        with torch.no_grad():
            out, _ = OPS.forward_kvcache(q, k, v, seqlens, SEGS, RATES, True)
        with torch.inference_mode():
            again, _ = OPS.forward_kvcache(q, k, v, seqlens, SEGS, RATES, True)
        self.assertFalse(out.requires_grad)
        assert_bitwise(self, again, out, "inference_mode")


class OpcheckTest(unittest.TestCase):
    def test_opcheck_forwards(self):
        q, k, v, cu = packed([3, 8], 4, 2, 8, dtype=torch.float32)
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        opcheck(torch.ops.dilated_attention.forward_varlen.default, (q, k, v, cu, cu, SEGS, RATES),
                {"causal": True})
        opcheck(torch.ops.dilated_attention.forward_varlen.default,
                (q[:4], k, v, torch.tensor([0, 1, 4]), cu, SEGS, RATES),
                {"query_begins": torch.tensor([1, 5])})
        q4, k4, v4 = inputs(2, 9, 4, 2, 8, dtype=torch.float32, requires_grad=True)
        opcheck(torch.ops.dilated_attention.forward_padded.default,
                (q4, k4, v4, torch.tensor([9, 4]), SEGS, RATES), {"offsets": "blocked"})
        opcheck(torch.ops.dilated_attention.forward_query_range.default,
                (q4[:, 2:5], k4, v4, 2, SEGS, RATES), {"mixing": "mean"})
        k_cache, v_cache = (torch.randn(3, 8, 2, 8) for _ in range(2))
        for block_table in (None, torch.tensor([[2, 0], [1, 2]], dtype=torch.int32)):
            opcheck(torch.ops.dilated_attention.forward_kvcache.default,
                    (q4[:, :1].detach(), k_cache if block_table is not None else k_cache[:2],
                     v_cache if block_table is not None else v_cache[:2],
                     torch.tensor([7, 12]) if block_table is not None else torch.tensor([7, 3]),
                     SEGS, RATES), {"causal": True, "block_table": block_table})

    def test_opcheck_backwards(self):
        utils = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
        q, k, v, cu = packed([3, 8], 4, 2, 8, dtype=torch.float32)
        out, lse = OPS.forward_varlen(q, k, v, cu, cu, SEGS, RATES, True)
        opcheck(torch.ops.dilated_attention.backward_varlen.default,
                (torch.randn_like(out), q, k, v, out, lse, cu, cu, SEGS, RATES), {"causal": True},
                test_utils=utils)
        q4, k4, v4 = inputs(2, 9, 4, 2, 8, dtype=torch.float32)
        lengths = torch.tensor([9, 4])
        out, lse = OPS.forward_padded(q4, k4, v4, lengths, SEGS, RATES)
        opcheck(torch.ops.dilated_attention.backward_padded.default,
                (torch.randn_like(out), q4, k4, v4, out, lse, lengths, SEGS, RATES),
                test_utils=utils)
        out, lse = OPS.forward_query_range(q4[:, 2:5], k4, v4, 2, SEGS, RATES)
        opcheck(torch.ops.dilated_attention.backward_query_range.default,
                (torch.randn_like(out), q4[:, 2:5], k4, v4, out, lse, 2, SEGS, RATES),
                test_utils=utils)


class CompileTest(unittest.TestCase):
    def test_compiled_varlen_forward_and_backward(self):
        q, k, v, cu = packed([5, 12, 1], 4, 2, 8, dtype=torch.float32)
        q, k, v = (t.requires_grad_() for t in (q, k, v))

        def step(q, k, v, cu):
            out, _ = torch.ops.dilated_attention.forward_varlen(q, k, v, cu, cu, SEGS, RATES, True)
            return (out * out).sum()

        eager = torch.autograd.grad(step(q, k, v, cu), (q, k, v))
        compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
        got = torch.autograd.grad(compiled(q, k, v, cu), (q, k, v))
        for g, g_ref in zip(got, eager):
            assert_bitwise(self, g, g_ref, "gradient")

    def test_inductor_padded_and_kvcache(self):
        q, k, v = inputs(2, 9, 4, 2, 8, dtype=torch.float32)
        lengths = torch.tensor([9, 4])
        k_cache, v_cache = (torch.randn(2, 12, 2, 8) for _ in range(2))
        seqlens = torch.tensor([12, 5])

        def step(q, k, v, lengths, k_cache, v_cache, seqlens):
            out, _ = torch.ops.dilated_attention.forward_padded(q, k, v, lengths, SEGS, RATES)
            dec, _ = torch.ops.dilated_attention.forward_kvcache(q[:, :1], k_cache, v_cache,
                                                                 seqlens, SEGS, RATES, True)
            return out.sum(1) + dec[:, 0]

        args = (q, k, v, lengths, k_cache, v_cache, seqlens)
        with torch.no_grad():
            torch.testing.assert_close(torch.compile(step, fullgraph=True)(*args), step(*args),
                                       rtol=0, atol=0)


class BadInputTest(unittest.TestCase):
    def assert_raises(self, fragments, op, *args, error=ValueError, **kwargs):
        with self.assertRaises(error) as raised:
            op(*args, **kwargs)
        for fragment in fragments:
            self.assertIn(fragment, str(raised.exception))

    def test_varlen(self):
        q, k, v, cu = packed([3, 4, 3], 2, 2, 4)
        bad = torch.tensor([0, 7, 3, 10])
        self.assert_raises(["sequences.query_offsets[2] = 3 is less than sequences.query_offsets[1]",
                            "[query_offsets is cu_seqlens_q]"],
                           OPS.forward_varlen, q, k, v, bad, cu, SEGS, RATES)
        self.assert_raises(["sequences.kv_offsets[2] = 3 is less than", "[kv_offsets is cu_seqlens_k]"],
                           OPS.forward_varlen, q, k, v, cu, bad, SEGS, RATES)
        self.assert_raises(["cu_seqlens_q has dtype Float: expected int32 or int64"],
                           OPS.forward_varlen, q, k, v, cu.float(), cu, SEGS, RATES)
        self.assert_raises(["cu_seqlens_k has 3 entries: expected 4"],
                           OPS.forward_varlen, q, k, v, cu, cu[:3], SEGS, RATES)
        self.assert_raises(["cu_seqlens_q[-1] = 9 but q has 10 rows"],
                           OPS.forward_varlen, q, k, v, torch.tensor([0, 3, 7, 9]), cu, SEGS,
                           RATES)
        self.assert_raises(["sequence 1: query_begin + query_count = 2 + 4 = 6 exceeds",
                            "query_begins"],
                           OPS.forward_varlen, q, k, v, cu, cu, SEGS, RATES,
                           query_begins=torch.tensor([0, 2, 0]))
        self.assert_raises(["k has dtype Float but q has Double"],
                           OPS.forward_varlen, q, k.float(), v, cu, cu, SEGS, RATES)
        self.assert_raises(["q has 4 dimensions: expected 3, [total, heads, head_dim]"],
                           OPS.forward_varlen, q[None], k, v, cu, cu, SEGS, RATES)
        self.assert_raises(["config.dilation_rates[0] = 9 exceeds config.segment_lengths[0] = 8"],
                           OPS.forward_varlen, q, k, v, cu, cu, [8], [9])
        out, lse = OPS.forward_varlen(q, k, v, cu, cu, SEGS, RATES)
        self.assert_raises(["lse has shape [2, 9]: expected [2, 10]"], OPS.backward_varlen, out,
                           q, k, v, out, lse[:, :9], cu, cu, SEGS, RATES)

    def test_padded(self):
        q, k, v = inputs(2, 9, 2, 2, 4)
        self.assert_raises(["valid_lengths.lengths[1] = 10 exceeds shape.seq_len = 9",
                            "valid_lengths.lengths is lengths", "shape.seq_len is q.size(1)"],
                           OPS.forward_padded, q, k, v, torch.tensor([9, 10]), SEGS, RATES)
        self.assert_raises(["valid_lengths.lengths[0] = -1: lengths must be non-negative"],
                           OPS.forward_padded, q, k, v, torch.tensor([-1, 3]), SEGS, RATES)
        self.assert_raises(["lengths has 3 entries: expected 2"],
                           OPS.forward_padded, q, k, v, torch.tensor([1, 2, 3]), SEGS, RATES)
        self.assert_raises(["lengths has dtype Float"],
                           OPS.forward_padded, q, k, v, torch.tensor([1.0, 2.0]), SEGS, RATES)
        self.assert_raises(["q has dtype Int"], OPS.forward_padded, q.int(), k.int(), v.int(),
                           torch.tensor([1, 2]), SEGS, RATES)

    def test_query_range(self):
        q, k, v = inputs(1, 9, 2, 2, 4)
        self.assert_raises(["query_range.begin + query_range.count = 7 + 3 = 10 exceeds "
                            "shape.seq_len = 9", "query_range.begin is query_begin",
                            "shape.seq_len is k.size(1)"],
                           OPS.forward_query_range, q[:, :3], k, v, 7, SEGS, RATES)
        self.assert_raises(["query_range.begin = -1"], OPS.forward_query_range, q[:, :3], k, v,
                           -1, SEGS, RATES)
        self.assert_raises(["batch and head_dim must agree"], OPS.forward_query_range, q[:, :3],
                           k[:, :, :, :2], v[:, :, :, :2], 0, SEGS, RATES)

    def test_kvcache(self):
        q = torch.randn(2, 1, 4, 8)
        k_cache, v_cache = torch.randn(6, 4, 2, 8), torch.randn(6, 4, 2, 8)
        table = torch.tensor([[0, 1, 2], [3, 9, 5]], dtype=torch.int32)
        self.assert_raises(["paged.page_table[1 * 3 + 1] = 9 is not a page (paged.num_pages = 6)",
                            "paged.page_table is block_table", "paged.num_pages is k_cache.size(0)"],
                           OPS.forward_kvcache, q, k_cache, v_cache, torch.tensor([9, 10]), SEGS,
                           RATES, block_table=table)
        self.assert_raises(["cache_seqlens[1] = 13 needs 4 pages of 4 rows but block_table has 3"],
                           OPS.forward_kvcache, q, k_cache, v_cache, torch.tensor([9, 13]), SEGS,
                           RATES, block_table=table)
        self.assert_raises(["block_table has dtype Float"], OPS.forward_kvcache, q, k_cache,
                           v_cache, torch.tensor([9, 10]), SEGS, RATES, block_table=table.float())
        self.assert_raises(["cache_seqlens[0] = 5 exceeds k_cache.size(1) = 4"],
                           OPS.forward_kvcache, q, k_cache[:2], v_cache[:2], torch.tensor([5, 1]),
                           SEGS, RATES)
        self.assert_raises(["sequences.kv_lengths[1] = -2: lengths must be non-negative",
                            "[kv_lengths is cache_seqlens]"],
                           OPS.forward_kvcache, q, k_cache[:2], v_cache[:2], torch.tensor([1, -2]),
                           SEGS, RATES)
        self.assert_raises(["v_cache has strides", "one layout"], OPS.forward_kvcache, q,
                           k_cache[:2], v_cache[:2].transpose(1, 2).contiguous().transpose(1, 2),
                           torch.tensor([1, 2]), SEGS, RATES)
        self.assert_raises(["cache_seqlens[1] = 0 is less than q.size(1) = 1"],
                           OPS.forward_kvcache, q, k_cache[:2], v_cache[:2], torch.tensor([1, 0]),
                           SEGS, RATES)
        self.assert_raises(["k_cache has batch 6 but q has 2"], OPS.forward_kvcache, q, k_cache,
                           v_cache, torch.tensor([1, 2]), SEGS, RATES)
        self.assert_raises(["k_cache has dtype Double but q has Float"], OPS.forward_kvcache, q,
                           k_cache[:2].double(), v_cache[:2].double(), torch.tensor([1, 2]), SEGS,
                           RATES)


if __name__ == "__main__":
    unittest.main(verbosity=2)
