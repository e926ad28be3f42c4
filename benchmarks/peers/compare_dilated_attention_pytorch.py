#!/usr/bin/env python3
"""Peer comparison: our partitioned + mean forward against dilated-attention-pytorch's
DilatedAttention, on the same inputs, the same machine and the same number of threads.

Only our harness lives here. The peer's source is put, never committed, in the git-ignored
peers/ folder (see docs/performance.md for the exact commands):

    git -C <bare clone> archive HEAD dilated_attention_pytorch | tar -x -C peers/dilated-attention-pytorch

and PyTorch (CPU) comes from PyPI into a git-ignored venv:

    python3 -m venv .venv-peers && .venv-peers/bin/pip install torch numpy einops
    .venv-peers/bin/python benchmarks/peers/compare_dilated_attention_pytorch.py \\
        --binary build/release/benchmarks/cpu_forward_from_files

What it does, per sequence length N:
  1. draws q, k, v ~ N(0, 1) float32 [B, N, H, D] with a fixed seed and writes them as raw
     float32 (q.f32, k.f32, v.f32) for our side;
  2. runs the peer's DilatedAttention(segment_lengths, dilation_rates) forward on CPU under
     torch.inference_mode() with torch.set_num_threads(threads): one warm-up, then `repeats` timed
     calls, median reported;
  3. runs our cpu_forward_from_files on the same files with DILATED_ATTENTION_NUM_THREADS =
     threads (partitioned offsets, mean mixing: docs/semantics.md §3's preset for this peer); each timed
     call is the second of a fresh process, and the timed calls alternate with the peer's so
     that load changes hit both; medians reported, of wall time and of process CPU time (all
     threads), the latter being the fairer figure on a shared machine;
  4. compares the two outputs element by element, and both against docs/semantics.md §2 evaluated in
     float64 on sampled rows, so "matches" is judged against the rounding of either side.

The peer's package __init__ imports many optional modules; only its dilated_attention module
(and the core/utils modules that module imports) is loaded, by registering an empty package
object for `dilated_attention_pytorch` whose __path__ points at the peer's folder. Nothing of the
peer is modified or stubbed.
"""

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
import types

import numpy as np


def load_peer(peer_root):
    package_dir = os.path.join(peer_root, "dilated_attention_pytorch")
    if not os.path.isdir(package_dir):
        sys.exit(f"peer source not found at {package_dir} (see this script's docstring)")
    package = types.ModuleType("dilated_attention_pytorch")
    package.__path__ = [package_dir]
    sys.modules["dilated_attention_pytorch"] = package
    return importlib.import_module("dilated_attention_pytorch.dilated_attention")


def peer_commit(peer_root):
    path = os.path.join(peer_root, "PEER_COMMIT")
    return open(path).read().strip() if os.path.exists(path) else None


def partition_ranges(heads, groups):
    base, extra = divmod(heads, groups)
    ranges, start = [], 0
    for g in range(groups):
        size = base + (1 if g < extra else 0)
        ranges.append((start, start + size))
        start += size
    return ranges


def exact_rows(q, k, v, segments, dilations, causal, rows):
    """docs/semantics.md §2, partitioned offsets and mean mixing, in float64, for (b, x, h) rows."""
    _, n, heads, dim = q.shape
    groups = len(segments)
    ranges = partition_ranges(heads, groups)
    scale = 1.0 / np.sqrt(dim)
    result = {}
    for b, x, h in rows:
        g = next(i for i, (lo, hi) in enumerate(ranges) if lo <= h < hi)
        w, r = segments[g], dilations[g]
        offset = g % r
        start = (x // w) * w
        length = min(w, n - start)
        out = np.zeros(dim)
        if (x - start) % r == offset:
            keys = np.arange(start + offset, start + length, r)
            if causal:
                keys = keys[keys <= x]
            s = scale * (k[b, keys, h, :].astype(np.float64) @ q[b, x, h, :].astype(np.float64))
            p = np.exp(s - s.max())
            out = (p / p.sum()) @ v[b, keys, h, :].astype(np.float64)
        result[(b, x, h)] = out / groups
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peer-root", default="peers/dilated-attention-pytorch")
    parser.add_argument("--binary", default="build/release/benchmarks/cpu_forward_from_files")
    parser.add_argument("--work-dir", default="results/peer")
    parser.add_argument("--seq-lens", default="16384,65536")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--segments", default="2048,4096,8192")
    parser.add_argument("--dilations", default="1,2,4")
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=20261122)
    parser.add_argument("--sample-rows", type=int, default=64)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    peer = load_peer(args.peer_root)
    segments = [int(s) for s in args.segments.split(",")]
    dilations = [int(r) for r in args.dilations.split(",")]
    os.makedirs(args.work_dir, exist_ok=True)
    report = {
        "peer": "DarcStar-Solutions-Tech/dilated-attention-pytorch DilatedAttention",
        "peer_commit": peer_commit(args.peer_root),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "our_threads": args.threads,
        "config": {"batch": args.batch, "heads": args.heads, "head_dim": args.head_dim, "segments": segments,
                   "dilations": dilations, "causal": args.causal, "ours": "partitioned + mean"},
        "runs": [],
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; peer commit {report['peer_commit']}")
    for n in [int(x) for x in args.seq_lens.split(",")]:
        shape = (args.batch, n, args.heads, args.head_dim)
        rng = np.random.default_rng(args.seed + n)
        q, k, v = (rng.standard_normal(shape, dtype=np.float32) for _ in range(3))
        work = os.path.join(args.work_dir, f"N{n}")
        os.makedirs(work, exist_ok=True)
        for name, array in (("q", q), ("k", k), ("v", v)):
            array.tofile(os.path.join(work, f"{name}.f32"))

        # Timed calls alternate, peer then ours, so that a change in machine load during the
        # comparison falls on both sides alike. Peer: one warm-up call in this process first.
        # Ours: each timed call is the second call of a fresh cpu_forward_from_files process (the
        # first call is its warm-up and is dropped; file reading is outside both timings).
        module = peer.DilatedAttention(segment_lengths=segments, dilation_rates=dilations).eval()
        tq, tk, tv = (torch.from_numpy(a) for a in (q, k, v))
        out_path = os.path.join(work, "ours.f32")
        command = [args.binary, f"--input={work}", f"--output={out_path}", f"--batch={args.batch}",
                   f"--seq_len={n}", f"--heads={args.heads}", f"--head_dim={args.head_dim}",
                   f"--segments={args.segments}", f"--dilations={args.dilations}", "--offsets=partitioned",
                   "--mixing=mean", f"--causal={'true' if args.causal else 'false'}", "--repeats=2"]
        env = dict(os.environ, DILATED_ATTENTION_NUM_THREADS=str(args.threads))
        peer_times, our_times, peer_cpu, our_cpu = [], [], [], []
        load_before = os.getloadavg()
        with torch.inference_mode():
            peer_out = module(tq, tk, tv, is_causal=args.causal)  # warm-up
            for _ in range(args.repeats):
                cpu_start, start = time.process_time(), time.perf_counter()
                peer_out = module(tq, tk, tv, is_causal=args.causal)
                peer_times.append(time.perf_counter() - start)
                peer_cpu.append(time.process_time() - cpu_start)
                result = json.loads(subprocess.run(command, env=env, check=True, capture_output=True,
                                                   text=True).stdout)
                our_times.append(result["times_s"][1])
                our_cpu.append(result["cpu_times_s"][1])
        load_after = os.getloadavg()
        peer_out = peer_out.numpy().astype(np.float32)
        ours = np.fromfile(out_path, dtype=np.float32).reshape(shape)

        diff = np.abs(ours.astype(np.float64) - peer_out.astype(np.float64))
        rng_rows = np.random.default_rng(args.seed)
        rows = [(int(rng_rows.integers(args.batch)), int(rng_rows.integers(n)), int(rng_rows.integers(args.heads)))
                for _ in range(args.sample_rows)]
        exact = exact_rows(q, k, v, segments, dilations, args.causal, rows)
        ours_err = max(float(np.abs(ours[b, x, h] - e).max()) for (b, x, h), e in exact.items())
        peer_err = max(float(np.abs(peer_out[b, x, h] - e).max()) for (b, x, h), e in exact.items())
        run = {
            "N": n,
            "peer_median_s": statistics.median(peer_times),
            "peer_times_s": peer_times,
            "ours_median_s": statistics.median(our_times),
            "ours_times_s": our_times,
            "speedup": statistics.median(peer_times) / statistics.median(our_times),
            "peer_median_cpu_s": statistics.median(peer_cpu),
            "ours_median_cpu_s": statistics.median(our_cpu),
            "speedup_cpu_time": statistics.median(peer_cpu) / statistics.median(our_cpu),
            "max_abs_diff": float(diff.max()),
            "max_abs_value": float(np.abs(peer_out).max()),
            "ours_max_err_vs_fp64_sampled": ours_err,
            "peer_max_err_vs_fp64_sampled": peer_err,
            "sampled_rows": len(rows),
            "load_average_before": load_before,
            "load_average_after": load_after,
        }
        report["runs"].append(run)
        print(f"N={n}: peer {run['peer_median_s']:.3f} s, ours {run['ours_median_s']:.3f} s, "
              f"speedup {run['speedup']:.2f}x (CPU seconds: peer {run['peer_median_cpu_s']:.2f}, ours "
              f"{run['ours_median_cpu_s']:.2f}, ratio {run['speedup_cpu_time']:.2f}x); max |ours - peer| = {run['max_abs_diff']:.2e} "
              f"(max |out| {run['max_abs_value']:.2f}); vs fp64 on {len(rows)} rows: ours {ours_err:.2e}, "
              f"peer {peer_err:.2e}", flush=True)
        for name in ("q", "k", "v"):
            os.remove(os.path.join(work, f"{name}.f32"))
        os.remove(out_path)
    path = os.path.join(args.work_dir, "peer_comparison.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"written {path}")


if __name__ == "__main__":
    main()
