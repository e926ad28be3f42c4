#!/usr/bin/env python3
"""Backward peer comparison: our partitioned + mean backward against the autograd backward of
dilated-attention-pytorch's DilatedAttention, on the same inputs, machine and thread count.

Set up exactly as the forward comparison (compare_dilated_attention_pytorch.py; the peer's source
in the git-ignored peers/ folder, PyTorch from PyPI in the git-ignored .venv-peers):

    cmake --build build/release --target cpu_backward_from_files
    .venv-peers/bin/python benchmarks/peers/compare_backward_pytorch.py \\
        --binary build/release/benchmarks/cpu_backward_from_files --work-dir results/peer-backward

Per sequence length N:
  1. draws q, k, v, dO ~ N(0, 1) float32 [B, N, H, D] with a fixed seed and writes them raw;
  2. peer: q, k, v as leaf tensors with requires_grad, out = DilatedAttention(...)(q, k, v), then
     out.backward(dO); the forward and the backward are timed separately (one warm-up pair, then
     `repeats` timed pairs, medians);
  3. ours: cpu_backward_from_files on the same files (our forward once, then backward twice; the
     second backward call is the timed one), alternating with the peer's timed calls;
  4. compares dQ, dK, dV element by element (largest difference relative to the largest |gradient|),
     and dQ of sampled rows of both sides against docs/semantics.md "The gradient" evaluated in float64.
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
from peer_harness import (add_common_arguments, our_command, rows_with_keys, sampled_rows,  # noqa: E402
                          start_report, write_inputs, write_report)


def exact_dq_rows(q, k, v, d_out, segments, dilations, causal, rows):
    """dQ of docs/semantics.md "The gradient" (partitioned offsets, mean mixing) in float64 for (b, x, h) rows."""
    scale, groups = 1.0 / np.sqrt(q.shape[3]), len(segments)
    result = {}
    for (b, x, h), keys in rows_with_keys(q, segments, dilations, causal, rows):
        dq = np.zeros(q.shape[3])
        if keys is not None:
            kk = k[b, keys, h, :].astype(np.float64)
            vv = v[b, keys, h, :].astype(np.float64)
            s = scale * (kk @ q[b, x, h, :].astype(np.float64))
            p = np.exp(s - s.max())
            p /= p.sum()
            dp = vv @ (d_out[b, x, h, :].astype(np.float64) / groups)
            ds = p * (dp - p @ dp)
            dq = scale * (ds @ kk)
        result[(b, x, h)] = dq
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser, binary="build/release/benchmarks/cpu_backward_from_files",
                         work_dir="results/peer-backward", seed=20261129)
    args = parser.parse_args()

    import torch

    peer, segments, dilations, report = start_report(
        args, torch, "DarcStar-Solutions-Tech/dilated-attention-pytorch DilatedAttention (autograd backward)")
    for n in [int(x) for x in args.seq_lens.split(",")]:
        shape, work, (q, k, v, d_out) = write_inputs(args, n, ("q", "k", "v", "d_out"))

        module = peer.DilatedAttention(segment_lengths=segments, dilation_rates=dilations).eval()
        command, env = our_command(args, n, work, work)

        def peer_call():
            tq, tk, tv = (torch.from_numpy(a).clone().requires_grad_(True) for a in (q, k, v))
            cpu0, t0 = time.process_time(), time.perf_counter()
            out = module(tq, tk, tv, is_causal=args.causal)
            cpu1, t1 = time.process_time(), time.perf_counter()
            out.backward(torch.from_numpy(d_out))
            cpu2, t2 = time.process_time(), time.perf_counter()
            return (t1 - t0, cpu1 - cpu0, t2 - t1, cpu2 - cpu1), (tq.grad, tk.grad, tv.grad)

        peer_call()  # warm-up
        peer_fwd, peer_fwd_cpu, peer_bwd, peer_bwd_cpu = [], [], [], []
        our_fwd, our_fwd_cpu, our_bwd, our_bwd_cpu = [], [], [], []
        load_before = os.getloadavg()
        for _ in range(args.repeats):
            times, grads = peer_call()
            peer_fwd.append(times[0]); peer_fwd_cpu.append(times[1])
            peer_bwd.append(times[2]); peer_bwd_cpu.append(times[3])
            result = json.loads(subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout)
            our_fwd.append(result["forward_s"]); our_fwd_cpu.append(result["forward_cpu_s"])
            our_bwd.append(result["times_s"][1]); our_bwd_cpu.append(result["cpu_times_s"][1])
        load_after = os.getloadavg()
        peer_grads = [g.numpy().astype(np.float64) for g in grads]
        ours = [np.fromfile(os.path.join(work, f"{name}.f32"), dtype=np.float32).reshape(shape).astype(np.float64)
                for name in ("dq", "dk", "dv")]
        comparison = {}
        for name, a, b in zip(("dq", "dk", "dv"), ours, peer_grads):
            largest = float(np.abs(b).max())
            diff = float(np.abs(a - b).max())
            comparison[name] = {"max_abs_diff": diff, "max_abs_value": largest,
                                "max_rel_diff": diff / largest if largest > 0 else diff}
        rows = sampled_rows(args, n)
        exact = exact_dq_rows(q, k, v, d_out, segments, dilations, args.causal, rows)
        scale_dq = max(float(np.abs(e).max()) for e in exact.values()) or 1.0
        ours_err = max(float(np.abs(ours[0][b, x, h] - e).max()) for (b, x, h), e in exact.items()) / scale_dq
        peer_err = max(float(np.abs(peer_grads[0][b, x, h] - e).max()) for (b, x, h), e in exact.items()) / scale_dq
        run = {
            "N": n,
            "peer_forward_median_s": statistics.median(peer_fwd),
            "peer_backward_median_s": statistics.median(peer_bwd),
            "peer_backward_median_cpu_s": statistics.median(peer_bwd_cpu),
            "peer_forward_median_cpu_s": statistics.median(peer_fwd_cpu),
            "ours_forward_median_s": statistics.median(our_fwd),
            "ours_backward_median_s": statistics.median(our_bwd),
            "ours_backward_median_cpu_s": statistics.median(our_bwd_cpu),
            "ours_forward_median_cpu_s": statistics.median(our_fwd_cpu),
            "backward_speedup": statistics.median(peer_bwd) / statistics.median(our_bwd),
            "backward_speedup_cpu_time": statistics.median(peer_bwd_cpu) / statistics.median(our_bwd_cpu),
            "peer_times": {"forward_s": peer_fwd, "backward_s": peer_bwd, "backward_cpu_s": peer_bwd_cpu},
            "our_times": {"forward_s": our_fwd, "backward_s": our_bwd, "backward_cpu_s": our_bwd_cpu},
            "gradients": comparison,
            "dq_rel_err_vs_fp64_sampled": {"ours": ours_err, "peer": peer_err, "rows": len(rows)},
            "load_average_before": load_before,
            "load_average_after": load_after,
        }
        report["runs"].append(run)
        rel = ", ".join(f"{k} {v['max_rel_diff']:.1e}" for k, v in comparison.items())
        print(f"N={n}: backward peer {run['peer_backward_median_s']:.3f} s ({run['peer_backward_median_cpu_s']:.2f} CPU s), "
              f"ours {run['ours_backward_median_s']:.3f} s ({run['ours_backward_median_cpu_s']:.2f} CPU s): "
              f"speedup {run['backward_speedup']:.2f}x wall, {run['backward_speedup_cpu_time']:.2f}x CPU; "
              f"max |ours - peer| / max |grad|: {rel}; dQ vs fp64 on {len(rows)} rows: ours {ours_err:.1e}, "
              f"peer {peer_err:.1e}", flush=True)
        for name in ("q", "k", "v", "d_out", "dq", "dk", "dv"):
            os.remove(os.path.join(work, f"{name}.f32"))
    write_report(args, report, "peer_backward_comparison.json")


if __name__ == "__main__":
    main()
