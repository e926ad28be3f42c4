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
     threads (partitioned offsets, mean mixing: docs/semantics.md "Which offset a head uses"'s preset for this peer); each timed
     call is the second of a fresh process, and the timed calls alternate with the peer's so
     that load changes hit both; medians reported, of wall time and of process CPU time (all
     threads), the latter being the fairer figure on a shared machine;
  4. compares the two outputs element by element, and both against docs/semantics.md "The forward" evaluated in
     float64 on sampled rows, so "matches" is judged against the rounding of either side.

The peer's package __init__ imports many optional modules; only its dilated_attention module
(and the core/utils modules that module imports) is loaded, by registering an empty package
object for `dilated_attention_pytorch` whose __path__ points at the peer's folder. Nothing of the
peer is modified or stubbed.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# load_peer stays importable from here: cuda_sdpa_and_peer.py imports it with exact_rows.
from peer_harness import (add_common_arguments, load_peer, our_command, rows_with_keys,  # noqa: E402,F401
                          sampled_rows, start_report, write_inputs, write_report)


def exact_rows(q, k, v, segments, dilations, causal, rows):
    """docs/semantics.md "The forward", partitioned offsets and mean mixing, in float64, for (b, x, h) rows."""
    dim, groups = q.shape[3], len(segments)
    scale = 1.0 / np.sqrt(dim)
    result = {}
    for (b, x, h), keys in rows_with_keys(q, segments, dilations, causal, rows):
        out = np.zeros(dim)
        if keys is not None:
            s = scale * (k[b, keys, h, :].astype(np.float64) @ q[b, x, h, :].astype(np.float64))
            p = np.exp(s - s.max())
            out = (p / p.sum()) @ v[b, keys, h, :].astype(np.float64)
        result[(b, x, h)] = out / groups
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser, binary="build/release/benchmarks/cpu_forward_from_files", work_dir="results/peer",
                         seed=20261122)
    args = parser.parse_args()

    import torch

    peer, segments, dilations, report = start_report(
        args, torch, "DarcStar-Solutions-Tech/dilated-attention-pytorch DilatedAttention")
    for n in [int(x) for x in args.seq_lens.split(",")]:
        shape, work, (q, k, v) = write_inputs(args, n, ("q", "k", "v"))

        # Timed calls alternate, peer then ours, so that a change in machine load during the
        # comparison falls on both sides alike. Peer: one warm-up call in this process first.
        # Ours: each timed call is the second call of a fresh cpu_forward_from_files process (the
        # first call is its warm-up and is dropped; file reading is outside both timings).
        module = peer.DilatedAttention(segment_lengths=segments, dilation_rates=dilations).eval()
        tq, tk, tv = (torch.from_numpy(a) for a in (q, k, v))
        out_path = os.path.join(work, "ours.f32")
        command, env = our_command(args, n, work, out_path)
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
        rows = sampled_rows(args, n)
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
    write_report(args, report, "peer_comparison.json")


if __name__ == "__main__":
    main()
