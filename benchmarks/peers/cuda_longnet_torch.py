#!/usr/bin/env python3
"""LongNet in plain PyTorch on the GPU -- gather, SDPA (flash), scatter per branch, the math of
dilated-attention-pytorch's DilatedAttention without its xformers dependency -- timed against our
cuda_forward_benchmark on the same shapes, and checked against our kernel's output on a smaller
case (cuda_forward_from_files) and against docs/semantics.md "The forward" in float64 on sampled rows.

Two mixings, each written only with public PyTorch ops plus, for softmax mixing, the flash
attention op that also returns the log-sum-exp:
  * mean (the peer's math: partitioned heads, each head group runs one branch, outputs summed
    and divided by G): O = (1/G) sum_i scatter_i(SDPA(gather_i(Q, K, V)));
  * softmax (LongNet's: modular offsets h mod r, every head runs every branch):
    O = sum_i exp(LSE_i - LSE) scatter_i(O_i), LSE = log sum_i exp(LSE_i), per row; rows a branch
    does not select have LSE_i = -inf.
Both need N % w == 0 and w % r == 0 (true for every configuration used here).

    python3 benchmarks/peers/cuda_longnet_torch.py --ours-json cuda_bench.json \\
        --binary build-gpu/benchmarks/cuda_forward_from_files --json-out longnet_torch.json
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peer_harness import cuda_time_ms, partition_ranges  # noqa: E402


def gather(t, w, r, offset, heads):
    """[B, N, H, D] -> [B * N/w, h, w/r, D]: rows offset, offset+r, ... of each segment."""
    b, n, _, d = t.shape
    x = t.view(b, n // w, w, t.shape[2], d)[:, :, offset::r, heads, :]
    return x.reshape(b * (n // w), w // r, -1, d).transpose(1, 2)


def scatter_add(out, x, w, r, offset, heads, weight=None):
    b, n, _, d = out.shape
    x = x.transpose(1, 2).reshape(b, n // w, w // r, -1, d)
    view = out.view(b, n // w, w, out.shape[2], d)
    if weight is None:
        view[:, :, offset::r, heads, :] += x
    else:
        view[:, :, offset::r, heads, :] += x * weight


def longnet_mean_partitioned(torch, q, k, v, segments, rates, causal):
    import torch.nn.functional as F
    out = torch.zeros(q.shape, device=q.device, dtype=torch.float32)
    groups = len(segments)
    for i, ((lo, hi), w, r) in enumerate(zip(partition_ranges(q.shape[2], groups), segments, rates)):
        if lo == hi:
            continue
        heads, offset = slice(lo, hi), i % r
        o = F.scaled_dot_product_attention(gather(q, w, r, offset, heads), gather(k, w, r, offset, heads),
                                           gather(v, w, r, offset, heads), is_causal=causal)
        scatter_add(out, o.float(), w, r, offset, heads)
    return (out / groups).to(q.dtype)


def longnet_softmax_modular(torch, q, k, v, segments, rates, causal):
    """Needs aten::_scaled_dot_product_flash_attention (returns the LSE), present in torch 2.x."""
    b, n, h, d = q.shape
    flash = torch.ops.aten._scaled_dot_product_flash_attention
    parts = []
    for w, r in zip(segments, rates):
        for offset in range(min(r, h)):
            heads = slice(offset, h, r)  # modular: head h has offset h mod r
            o, lse = flash(gather(q, w, r, offset, heads), gather(k, w, r, offset, heads),
                           gather(v, w, r, offset, heads), 0.0, causal)[:2]
            parts.append((w, r, offset, heads, o.float(), lse))  # lse [B*N/w, h, w/r] float
    neg = torch.full((b, n, h), -math.inf, device=q.device)
    lse_all = []
    for w, r, offset, heads, o, lse in parts:
        full = neg.clone()
        full.view(b, n // w, w, h)[:, :, offset::r, heads] = lse.transpose(1, 2).reshape(b, n // w, w // r, -1)
        lse_all.append(full)
    total = torch.logsumexp(torch.stack(lse_all), dim=0)  # [B, N, H]
    out = torch.zeros(q.shape, device=q.device, dtype=torch.float32)
    for (w, r, offset, heads, o, _), full in zip(parts, lse_all):
        weight = torch.exp(full - total).view(b, n // w, w, h)[:, :, offset::r, heads]
        scatter_add(out, o, w, r, offset, heads, weight.reshape(b, n // w, w // r, -1, 1))
    return out.to(q.dtype)


def exact_rows(q, k, v, segments, rates, causal, mixing, offsets, rows):
    """docs/semantics.md "The forward" in float64 for (b, x, h) rows; q, k, v float64 numpy [B, N, H, D]."""
    _, n, heads, d = q.shape
    groups = len(segments)
    ranges = partition_ranges(heads, groups)
    result = {}
    for (b, x, h) in rows:
        branch_keys = []
        for i, (w, r) in enumerate(zip(segments, rates)):
            if offsets == "partitioned":
                if not (ranges[i][0] <= h < ranges[i][1]):
                    branch_keys.append([])
                    continue
                offset = i % r
            else:
                offset = h % r
            start = (x // w) * w
            if (x - start) % r != offset:
                branch_keys.append([])
                continue
            keys = [y for y in range(start + offset, min(start + w, n), r) if not causal or y <= x]
            branch_keys.append(keys)
        s = lambda y: float(q[b, x, h] @ k[b, y, h]) / math.sqrt(d)
        if mixing == "mean":
            o = np.zeros(d)
            for keys in branch_keys:
                if keys:
                    sc = np.array([s(y) for y in keys]); p = np.exp(sc - sc.max()); p /= p.sum()
                    o += (p[:, None] * v[b, keys, h]).sum(0) / groups
        else:
            all_keys = [y for keys in branch_keys for y in keys]
            if all_keys:
                sc = np.array([s(y) for y in all_keys]); p = np.exp(sc - sc.max()); p /= p.sum()
                o = (p[:, None] * v[b, all_keys, h]).sum(0)
            else:
                o = np.zeros(d)
        result[(b, x, h)] = o
    return result


CASES = {
    # name: segments, rates, offsets, mixing, (B, N, H, D), our benchmark name prefix
    "longnet_softmax": ([2048, 4096, 8192], [1, 2, 4], "modular", "softmax", (1, 65536, 16, 128), "BM_LongNet/causal:"),
    "partitioned_mean_8k": ([2048, 4096, 8192], [1, 2, 4], "partitioned", "mean", (1, 8192, 12, 64), "BM_PartitionedMean/N:8192"),
    "partitioned_mean_32k": ([2048, 4096, 8192], [1, 2, 4], "partitioned", "mean", (1, 32768, 12, 64), "BM_PartitionedMean/N:32768"),
}


def useful_flops(segments, rates, offsets, shape, causal):
    b, n, h, d = shape
    ranges = partition_ranges(h, len(segments))
    pairs = 0
    for i, (w, r) in enumerate(zip(segments, rates)):
        heads = ranges[i][1] - ranges[i][0] if offsets == "partitioned" else h
        m = w // r  # rows per block
        per_block = m * (m + 1) // 2 if causal else m * m
        pairs += heads * (n // w) * per_block  # one offset per head: one block per segment
    return 4.0 * d * pairs * b


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ours-json", help="cuda_forward_benchmark JSON (BM_LongNet, BM_PartitionedMean)")
    parser.add_argument("--binary", help="cuda_forward_from_files, for the output check")
    parser.add_argument("--check-seq-len", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json-out")
    args = parser.parse_args()
    import torch
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: torch.cuda.is_available() is False")
    ours = {}
    if args.ours_json:
        for bench in json.load(open(args.ours_json))["benchmarks"]:
            if "error_occurred" not in bench and "useful_TFLOP/s" in bench:
                ours[bench["name"]] = bench
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "timings": [], "checks": []}
    print(f"{'case':<22} {'causal':>6} {'torch ms':>9} {'torch TF/s':>10} {'ours ms':>8} {'ours TF/s':>9} {'speedup':>7}")
    for name, (segments, rates, offsets, mixing, shape, bench) in CASES.items():
        for causal in ((False, True) if mixing == "softmax" else (False,)):
            gen = torch.Generator(device="cuda").manual_seed(1)
            q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
            fn = longnet_softmax_modular if mixing == "softmax" else longnet_mean_partitioned
            try:
                ms = cuda_time_ms(torch, lambda: fn(torch, q, k, v, segments, rates, causal), args.repeats)
            except Exception as error:  # e.g. the private flash op missing in this torch
                print(f"{name}: torch side failed: {error}")
                continue
            tf = useful_flops(segments, rates, offsets, shape, causal) / (ms * 1e-3) * 1e-12
            key = bench + (str(int(causal)) if bench.endswith(":") else "")
            mine = next((b for n_, b in ours.items() if n_.startswith(key)), None)
            entry = {"case": name, "causal": causal, "torch_ms": ms, "torch_TFLOP/s": tf,
                     "ours_ms": mine["ms"] if mine else None, "ours_TFLOP/s": mine["useful_TFLOP/s"] if mine else None}
            entry["speedup"] = ms / entry["ours_ms"] if mine else None
            report["timings"].append(entry)
            fmt = lambda x, f: (f % x) if x is not None else "-"
            print(f"{name:<22} {str(causal):>6} {ms:9.3f} {tf:10.1f} {fmt(entry['ours_ms'], '%8.3f'):>8} "
                  f"{fmt(entry['ours_TFLOP/s'], '%9.1f'):>9} {fmt(entry['speedup'], '%7.2f'):>7}")
            del q, k, v
    if args.binary:  # output check on a smaller case, same inputs for all three
        n = args.check_seq_len
        for offsets, mixing, (h, d) in (("modular", "softmax", (16, 128)), ("partitioned", "mean", (12, 64))):
            for causal in (False, True):
                segments, rates = [2048, 4096, 8192], [1, 2, 4]
                rng = np.random.default_rng(n + h)
                host = [torch.from_numpy(rng.standard_normal((1, n, h, d), dtype=np.float32)).to(torch.bfloat16)
                        for _ in range(3)]
                with tempfile.TemporaryDirectory() as folder:
                    for nm, t in zip("qkv", host):
                        t.float().numpy().tofile(os.path.join(folder, f"{nm}.f32"))
                    out_path = os.path.join(folder, "out.f32")
                    cmd = [args.binary, f"--input={folder}", f"--output={out_path}", "--dtype=bf16", "--batch=1",
                           f"--seq_len={n}", f"--heads={h}", f"--head_dim={d}", "--segments=2048,4096,8192",
                           "--dilations=1,2,4", f"--offsets={offsets}", f"--mixing={mixing}",
                           f"--causal={'true' if causal else 'false'}", "--repeats=3"]
                    subprocess.run(cmd, check=True, capture_output=True, text=True)
                    our_out = np.fromfile(out_path, dtype=np.float32).reshape(1, n, h, d)
                fn = longnet_softmax_modular if mixing == "softmax" else longnet_mean_partitioned
                tq, tk, tv = (t.cuda() for t in host)
                torch_out = fn(torch, tq, tk, tv, segments, rates, causal).float().cpu().numpy()
                q64, k64, v64 = (t.double().numpy() for t in host)
                rng2 = np.random.default_rng(7)
                sample = [(0, int(x), int(hh)) for x in rng2.integers(0, n, 8) for hh in range(h)]
                exact = exact_rows(q64, k64, v64, segments, rates, causal, mixing, offsets, sample)
                entry = {"offsets": offsets, "mixing": mixing, "causal": causal, "N": n, "H": h, "D": d,
                         "max_abs_ours_vs_torch": float(np.abs(our_out - torch_out).max()),
                         "sampled_error_ours": float(max(np.abs(our_out[r] - exact[r]).max() for r in sample)),
                         "sampled_error_torch": float(max(np.abs(torch_out[r] - exact[r]).max() for r in sample))}
                report["checks"].append(entry)
                print(json.dumps(entry))
    if args.json_out:
        json.dump(report, open(args.json_out, "w"), indent=2)


if __name__ == "__main__":
    main()
