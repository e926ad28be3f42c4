#!/usr/bin/env python3
"""GPU comparisons, to run on a machine with an NVIDIA GPU (H100/H200), all on the
same GPU in one session. Only our harness lives here; peers are never committed.

  (a) --sdpa: torch.nn.functional.scaled_dot_product_attention with the flash backend on the
      dense-equivalent shapes of benchmarks/cuda/cuda_forward_benchmark.cu (bf16, B*N = 16384 tokens,
      H*D = 2048, N = 2k..16k, D = 64 and 128, causal and not), joined with our
      BM_DenseEquivalent results (run the benchmark binary with --benchmark_format=json and pass
      the file as --ours-json) into a ratio table. Target: ours >= 0.9x SDPA-flash.
  (c) --peer: dilated-attention-pytorch's DilatedAttention (segments 2048,4096,8192, dilations
      1,2,4) on CUDA against our partitioned + mean forward (benchmarks/cuda_forward_from_files)
      on the same inputs: median times with CUDA events and the output match, both sides also
      checked against docs/semantics.md "The forward" in float64 on sampled rows. Target: >= 10x faster.

Setup (git-ignored folders only):

    python3 -m venv .venv-gpu && .venv-gpu/bin/pip install torch numpy einops
    mkdir -p peers && git -C <clone of dilated-attention-pytorch> archive HEAD \\
        dilated_attention_pytorch | tar -x -C peers/dilated-attention-pytorch
    cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90
    cmake --build build-gpu --target cuda_forward_benchmark cuda_forward_from_files
    build-gpu/benchmarks/cuda_forward_benchmark --benchmark_format=json \\
        --benchmark_out=results/cuda_bench.json
    .venv-gpu/bin/python benchmarks/peers/cuda_sdpa_and_peer.py --sdpa \\
        --ours-json results/cuda_bench.json --peer --binary build-gpu/benchmarks/cuda_forward_from_files

Record every figure with the GPU model in docs/performance.md.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare_dilated_attention_pytorch import exact_rows, load_peer  # noqa: E402
from peer_harness import cuda_time_ms  # noqa: E402


def useful_flops_dense(b, n, h, d, causal):
    """4 * D per attended pair, the count of Pattern::useful_flops() for one branch w = N, r = 1."""
    pairs = n * (n + 1) // 2 if causal else n * n
    return 4.0 * d * pairs * b * h


def run_sdpa(torch, args):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    ours = {}
    if args.ours_json:
        for bench in json.load(open(args.ours_json))["benchmarks"]:
            if bench["name"].startswith("BM_DenseEquivalent/") and "error_occurred" not in bench:
                key = (int(bench["N"]), int(bench["D"]), "causal:1" in bench["name"])
                ours[key] = bench["useful_TFLOP/s"]
    rows = []
    for d in (64, 128):
        for n in (2048, 4096, 8192, 16384):
            for causal in (False, True):
                b, h = 16384 // n, 2048 // d
                q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    ms = cuda_time_ms(torch, lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
                                      args.repeats)
                tflops = useful_flops_dense(b, n, h, d, causal) / (ms * 1e-3) * 1e-12
                mine = ours.get((n, d, causal))
                rows.append({"N": n, "D": d, "causal": causal, "sdpa_ms": ms, "sdpa_TFLOP/s": tflops,
                             "ours_TFLOP/s": mine, "ratio": (mine / tflops) if mine else None})
    print(f"{'N':>6} {'D':>4} {'causal':>6} {'SDPA TFLOP/s':>13} {'ours TFLOP/s':>13} {'ratio':>6}")
    for r in rows:
        ours_text = f"{r['ours_TFLOP/s']:13.1f}" if r["ours_TFLOP/s"] else f"{'-':>13}"
        ratio_text = f"{r['ratio']:6.2f}" if r["ratio"] else f"{'-':>6}"
        print(f"{r['N']:>6} {r['D']:>4} {str(r['causal']):>6} {r['sdpa_TFLOP/s']:13.1f} {ours_text} {ratio_text}")
    return rows


def run_sdpa_backward(torch, args):
    """SDPA-flash backward on BM_BackwardDense's shapes (bf16, N = 4096, D = 128, B*N = 16384,
    H*D = 2048), joined with our cuda_backward_benchmark JSON; FLOPs counted as 2.5x forward."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    ours = {}
    if args.ours_backward_json:
        for bench in json.load(open(args.ours_backward_json))["benchmarks"]:
            if bench["name"].startswith("BM_BackwardDense/") and "error_occurred" not in bench:
                ours[(int(bench["N"]), int(bench["D"]), "causal:1" in bench["name"])] = bench["useful_TFLOP/s"]
    rows = []
    n, d = 4096, 128
    for causal in (False, True):
        b, h = 16384 // n, 2048 // d
        q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        grad = torch.randn_like(out)
        ms = cuda_time_ms(torch, lambda: torch.autograd.grad(out, (q, k, v), grad, retain_graph=True),
                          args.repeats)
        tflops = 2.5 * useful_flops_dense(b, n, h, d, causal) / (ms * 1e-3) * 1e-12
        mine = ours.get((n, d, causal))
        rows.append({"N": n, "D": d, "causal": causal, "sdpa_backward_ms": ms, "sdpa_TFLOP/s": tflops,
                     "ours_TFLOP/s": mine, "ratio": (mine / tflops) if mine else None})
        print(json.dumps(rows[-1]))
    return rows


def run_peer(torch, args):
    peer = load_peer(args.peer_root)
    segments, dilations = [2048, 4096, 8192], [1, 2, 4]
    results = []
    for n in args.peer_seq_lens:
        b, h, d = 1, args.heads, args.head_dim
        rng = np.random.default_rng(n)
        # Round the inputs to bf16 once, so that both sides read identical values.
        host = [torch.from_numpy(rng.standard_normal((b, n, h, d), dtype=np.float32)).to(torch.bfloat16)
                for _ in range(3)]
        with tempfile.TemporaryDirectory() as folder:
            for name, tensor in zip("qkv", host):
                tensor.float().numpy().tofile(os.path.join(folder, f"{name}.f32"))
            out_path = os.path.join(folder, "out.f32")
            command = [args.binary, f"--input={folder}", f"--output={out_path}", "--dtype=bf16",
                       f"--batch={b}", f"--seq_len={n}", f"--heads={h}", f"--head_dim={d}",
                       "--segments=2048,4096,8192", "--dilations=1,2,4", "--offsets=partitioned",
                       "--mixing=mean", f"--repeats={args.repeats}"]
            ours = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
            our_out = np.fromfile(out_path, dtype=np.float32).reshape(b, n, h, d)
        module = peer.DilatedAttention(segment_lengths=segments, dilation_rates=dilations).cuda().eval()
        tq, tk, tv = (t.cuda() for t in host)
        with torch.inference_mode():
            peer_ms = cuda_time_ms(torch, lambda: module(tq, tk, tv, is_causal=False), args.repeats)
            peer_out = module(tq, tk, tv, is_causal=False).float().cpu().numpy()
        q64, k64, v64 = (t.float().numpy() for t in host)
        sample = [(0, int(x), int(hh)) for x in rng.integers(0, n, 16) for hh in range(h)]
        exact = exact_rows(q64, k64, v64, segments, dilations, False, sample)
        err_ours = max(np.abs(our_out[r] - exact[r]).max() for r in sample)
        err_peer = max(np.abs(peer_out[r] - exact[r]).max() for r in sample)
        entry = {"N": n, "H": h, "D": d, "ours_ms": ours["median_ms"], "peer_ms": peer_ms,
                 "speedup": peer_ms / ours["median_ms"],
                 "max_abs_diff_ours_vs_peer": float(np.abs(our_out - peer_out).max()),
                 "sampled_error_ours": float(err_ours), "sampled_error_peer": float(err_peer)}
        results.append(entry)
        print(json.dumps(entry))
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sdpa", action="store_true", help="(a) SDPA-flash on the dense-equivalent shapes")
    parser.add_argument("--ours-json", help="cuda_forward_benchmark --benchmark_format=json output")
    parser.add_argument("--sdpa-backward", action="store_true", help="SDPA-flash backward vs ours")
    parser.add_argument("--ours-backward-json", help="cuda_backward_benchmark JSON output")
    parser.add_argument("--peer", action="store_true", help="(c) dilated-attention-pytorch DilatedAttention")
    parser.add_argument("--peer-root", default="peers/dilated-attention-pytorch")
    parser.add_argument("--binary", default="build-gpu/benchmarks/cuda_forward_from_files")
    parser.add_argument("--peer-seq-lens", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json-out", help="write all results here")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        sys.exit("no CUDA device: torch.cuda.is_available() is False")
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    if args.sdpa:
        report["sdpa"] = run_sdpa(torch, args)
    if args.sdpa_backward:
        report["sdpa_backward"] = run_sdpa_backward(torch, args)
    if args.peer:
        report["peer"] = run_peer(torch, args)
    if args.json_out:
        json.dump(report, open(args.json_out, "w"), indent=2)


if __name__ == "__main__":
    main()
