#!/usr/bin/env python3
"""In-process comparison of torch.ops.dilated_attention against the PyTorch peers (docs/torch.md,
docs/performance.md "PyTorch operators"). Not a timed test: a benchmark to run by hand.

One Python process, CPU, torch.set_num_threads(--threads) for everybody (our op uses
at::get_num_threads(), i.e. the same count). Per head dimension D and sequence length N, on the
same q, k, v ~ N(0, 1) float32 [B, N, H, D] and upstream gradient:

  ours        torch.ops.dilated_attention.forward, partitioned + mean (the seed's preset), and
              its autograd backward (the library's backward)
  seed        dilated-attention-pytorch's DilatedAttention (DarcStar-Solutions-Tech, the source
              exported into the git-ignored peers/dilated-attention-pytorch, docs/performance.md),
              .eval(), autograd for the backward
  torchscale  microsoft/torchscale's DilatedAttention logic (git-ignored peers/torchscale): its
              own gathering / scattering methods (dense_to_sparse, sparse_to_dense, the LSE
              merge) on [B, N, H, D]; APPROXIMATION: its attention core is flash_attn_func, which
              has no CPU build, so that one call is replaced by plain PyTorch math returning
              (out, lse) (scores, causal mask, logsumexp, softmax @ v). Projections left out, as
              for the others. Blocked offsets + softmax mixing. Only for N <= --torchscale-max.
  sdpa        dense torch.nn.functional.scaled_dot_product_attention on [B, H, N, D] (same
              causality), only for N <= --dense-max (its cost grows as N^2)

Calls alternate contender by contender inside each repeat, so that load changes from other
processes hit everybody; the report gives the median and the range (min-max) of the repeats, in
wall seconds and process CPU seconds (all threads). "fwd" runs under torch.no_grad();
"fwd+bwd" is forward with autograd then .backward(d_out). The segment lengths are clipped to N
(the seed needs N to be a multiple of each).

  .venv-torch/bin/python benchmarks/torch/compare_torch_ops.py [--quick] [--out docs/benchmarks/...]

A GPU section runs when torch.cuda.is_available(): the one-call check of the GPU issue (one
forward and one backward call of the operator on the device, float16 / bfloat16 / float32,
against the same call on the CPU in float32) and CUDA-event times against SDPA.
"""

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
import types

import importlib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-lens", default="4096,8192,16384,32768,65536")
    p.add_argument("--head-dims", default="64,128")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--segments", default="2048,4096,8192")
    p.add_argument("--dilations", default="1,2,4")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", default="5,4,3,2,2",
                   help="repeats per sequence length (the last value for the rest)")
    p.add_argument("--dense-max", type=int, default=16384)
    p.add_argument("--torchscale-max", type=int, default=16384,
                   help="largest N for the torchscale logic (its CPU stand-in is slow)")
    p.add_argument("--peer-root", default=os.path.join(REPO, "peers", "dilated-attention-pytorch"))
    p.add_argument("--torchscale-root", default=os.path.join(REPO, "peers", "torchscale"))
    p.add_argument("--out", default=None, help="JSON path (default docs/benchmarks/torch_ops_<UTC>.json)")
    p.add_argument("--quick", action="store_true", help="N = 4096, 8192; D = 64; 2 repeats")
    return p.parse_args()


def load_seed(root):
    package_dir = os.path.join(root, "dilated_attention_pytorch")
    if not os.path.isdir(package_dir):
        return None
    package = types.ModuleType("dilated_attention_pytorch")
    package.__path__ = [package_dir]
    sys.modules["dilated_attention_pytorch"] = package
    return importlib.import_module("dilated_attention_pytorch.dilated_attention")


def torchscale_core(torch, root, heads, head_dim, segments, dilations):
    """A callable (q, k, v, causal) -> out [B, N, H, D] running torchscale's DilatedAttention
    gathering / attention / scattering loop, with the flash_attn_func core replaced (see the
    module docstring)."""
    if not os.path.isdir(os.path.join(root, "torchscale")):
        return None
    sys.path.insert(0, root)
    from einops import rearrange
    from torchscale.component.dilated_attention import DilatedAttention as TorchscaleDilated

    args = types.SimpleNamespace(
        flash_attention=True, segment_length=list(segments), dilated_ratio=list(dilations),
        seq_parallel=False, xpos_rel_pos=False, xpos_scale_base=512, multiway=False,
        layernorm_eps=1e-5)
    module = TorchscaleDilated(args, heads * head_dim, heads, dropout=0.0, self_attention=True)
    scale = 1.0 / math.sqrt(head_dim)

    def core_attention(q, k, v, key_padding_mask=None, attn_mask=None, rel_pos=None,
                       is_causal=False):
        # The stand-in for flash_attn_func on '(b h) l d' inputs: (out 'b l (h d)', lse [b, h, l]).
        s = torch.bmm(q, k.transpose(1, 2)) * scale
        if is_causal:
            length = s.shape[-1]
            mask = torch.ones(length, length, dtype=torch.bool).triu(1)
            s = s.masked_fill(mask, float("-inf"))
        lse = torch.logsumexp(s, dim=-1)
        out = torch.bmm(torch.exp(s - lse[..., None]), v)
        out = rearrange(out, "(b h) l d -> b l (h d)", h=heads)
        return out, rearrange(lse, "(b h) l -> b h l", h=heads)

    module.attention_ops = core_attention

    def run(q, k, v, causal):
        bsz, n = q.shape[0], q.shape[1]
        outs, lses = [], []
        for sl, dr in zip(segments, dilations):
            ki = module.gathering(k, dr, sl, is_causal=causal, offset=0, is_kv=True, seq_parall=False)
            vi = module.gathering(v, dr, sl, is_causal=causal, offset=0, is_kv=True, seq_parall=False)
            qi = module.gathering(q, dr, sl, is_causal=causal, offset=0, is_kv=False, seq_parall=False)
            out, lse = module.attention_ops(qi, ki, vi, is_causal=causal)
            outs.append(out)
            lses.append(lse)
        attn = module.scattering(outs, lses, n, bsz, offset=0)  # [b, n, (h d)]
        return attn.view(bsz, n, heads, head_dim)

    return run


def machine():
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "host": platform.node(),
            "load_average": os.getloadavg()}


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def summary(samples):
    walls = [w for w, _ in samples]
    cpus = [c for _, c in samples]
    return {"wall_median": statistics.median(walls), "wall_min": min(walls), "wall_max": max(walls),
            "cpu_median": statistics.median(cpus), "cpu_min": min(cpus), "cpu_max": max(cpus),
            "wall_all": walls, "cpu_all": cpus}


def main():
    options = parse()
    import torch

    sys.path.insert(0, os.path.join(REPO, "python"))
    import dilated_attention_torch as dat

    dat.load_ops()
    torch.set_num_threads(options.threads)
    lengths = [4096, 8192] if options.quick else [int(x) for x in options.seq_lens.split(",")]
    dims = [64] if options.quick else [int(x) for x in options.head_dims.split(",")]
    repeat_list = [2] if options.quick else [int(x) for x in options.repeats.split(",")]
    base_segments = [int(x) for x in options.segments.split(",")]
    dilations = [int(x) for x in options.dilations.split(",")]
    seed_module = load_seed(options.peer_root)
    started = datetime.datetime.now(datetime.timezone.utc)
    report = {"script": "benchmarks/torch/compare_torch_ops.py", "started_utc": started.isoformat(),
              "machine": machine(), "torch": torch.__version__, "threads": options.threads,
              "batch": options.batch, "heads": options.heads, "dilations": dilations,
              "causal": options.causal, "peer_commit": None, "rows": []}
    commit_file = os.path.join(options.peer_root, "PEER_COMMIT")
    if os.path.exists(commit_file):
        report["peer_commit"] = open(commit_file).read().strip()
    print(f"# {report['machine']['cpu']}, {options.threads} threads, torch {torch.__version__}, "
          f"load {report['machine']['load_average']}")
    causal = options.causal

    for d in dims:
        for index, n in enumerate(lengths):
            repeats = repeat_list[min(index, len(repeat_list) - 1)]
            segments = [min(w, n) for w in base_segments]
            gen = torch.Generator().manual_seed(n * 1000 + d)
            shape = (options.batch, n, options.heads, d)
            q, k, v, d_out = (torch.randn(shape, generator=gen) for _ in range(4))
            contenders = {}

            def ours_forward(q, k, v):
                return torch.ops.dilated_attention.forward(q, k, v, segments, dilations, causal,
                                                           "partitioned", "mean")[0]
            contenders["ours"] = ours_forward
            if seed_module is not None:
                seed = seed_module.DilatedAttention(segments, dilations).eval()
                contenders["seed"] = lambda q, k, v, seed=seed: seed(q, k, v, is_causal=causal)
            ts = None
            if n <= options.torchscale_max:
                ts = torchscale_core(torch, options.torchscale_root, options.heads, d, segments,
                                     dilations)
            if ts is not None:
                contenders["torchscale"] = lambda q, k, v, ts=ts: ts(q, k, v, causal)
            if n <= options.dense_max:
                def sdpa(q, k, v):
                    return torch.nn.functional.scaled_dot_product_attention(
                        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                        is_causal=causal).transpose(1, 2)
                contenders["sdpa"] = sdpa

            # Agreement with the seed (same function: partitioned + mean).
            with torch.no_grad():
                ours_out = ours_forward(q, k, v)
                agreement = {}
                if "seed" in contenders:
                    agreement["max_abs_diff_vs_seed"] = (ours_out - contenders["seed"](q, k, v)).abs().max().item()

            for mode in ("fwd", "fwd+bwd"):
                samples = {name: [] for name in contenders}
                for name, fn in contenders.items():  # warm-up
                    run_once(torch, fn, q, k, v, d_out, mode)
                for _ in range(repeats):
                    for name, fn in contenders.items():
                        samples[name].append(timed(lambda: run_once(torch, fn, q, k, v, d_out, mode)))
                row = {"head_dim": d, "seq_len": n, "segments": segments, "mode": mode,
                       "repeats": repeats, **agreement,
                       "results": {name: summary(s) for name, s in samples.items()}}
                results = row["results"]
                line = f"D={d:4d} N={n:6d} {mode:8s}"
                for name, r in results.items():
                    line += f" | {name} {r['wall_median']:.3f}s ({r['wall_min']:.3f}-{r['wall_max']:.3f})"
                if "seed" in results:
                    ratios = [s / o for s, o in zip(results["seed"]["wall_all"], results["ours"]["wall_all"])]
                    row["seed_over_ours_wall"] = {"median": statistics.median(ratios),
                                                  "min": min(ratios), "max": max(ratios)}
                    cpu_ratios = [s / o for s, o in zip(results["seed"]["cpu_all"], results["ours"]["cpu_all"])]
                    row["seed_over_ours_cpu"] = {"median": statistics.median(cpu_ratios),
                                                 "min": min(cpu_ratios), "max": max(cpu_ratios)}
                    line += f" || seed/ours wall {row['seed_over_ours_wall']['median']:.2f}x"
                    line += f" ({min(ratios):.2f}-{max(ratios):.2f})"
                for other in ("torchscale", "sdpa"):
                    if other in results:
                        ratio = results[other]["wall_median"] / results["ours"]["wall_median"]
                        row[f"{other}_over_ours_wall"] = ratio
                        line += f", {other}/ours {ratio:.2f}x"
                print(line, flush=True)
                report["rows"].append(row)

    report["gpu"] = gpu_section(torch) if torch.cuda.is_available() else None
    report["finished_utc"] = datetime.datetime.now(datetime.timezone.utc).isoformat()
    report["machine"]["load_average_end"] = os.getloadavg()
    out = options.out or os.path.join(
        REPO, "docs", "benchmarks", f"torch_ops_{started.strftime('%Y-%m-%dT%H%M')}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"# wrote {out}")


def run_once(torch, fn, q, k, v, d_out, mode):
    if mode == "fwd":
        with torch.no_grad():
            fn(q, k, v)
        return
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    out.backward(d_out)


def gpu_section(torch):
    """The GPU issue's one-call check and CUDA-event times (only where a GPU answers)."""
    import dilated_attention_torch  # noqa: F401  (the operators are loaded already)

    section = {"device": torch.cuda.get_device_name(), "check": [], "times": []}
    segments, dilations = [2048, 4096, 8192], [1, 2, 4]
    gen = torch.Generator().manual_seed(0)
    q, k, v, d_out = (torch.randn(1, 16384, 8, 64, generator=gen) for _ in range(4))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out_cpu = torch.ops.dilated_attention.forward(*leaves, segments, dilations, True)[0]
    grads_cpu = torch.autograd.grad(out_cpu, leaves, d_out)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        leaves = [t.to("cuda", dtype).requires_grad_() for t in (q, k, v)]
        out = torch.ops.dilated_attention.forward(*leaves, segments, dilations, True)[0]
        grads = torch.autograd.grad(out, leaves, d_out.to("cuda", dtype))
        torch.cuda.synchronize()
        errors = {"out": (out.float().cpu() - out_cpu).abs().max().item()}
        for name, g, g_cpu in zip(("d_q", "d_k", "d_v"), grads, grads_cpu):
            errors[name] = (g.float().cpu() - g_cpu).abs().max().item() / g_cpu.abs().max().item()
        section["check"].append({"dtype": str(dtype), **errors})
        print(f"GPU one-call check {dtype}: {errors}")
    for n in (16384, 65536, 262144):
        for dtype in (torch.float16, torch.bfloat16):
            x = [torch.randn(1, n, 8, 64, device="cuda", dtype=dtype) for _ in range(3)]

            def ours():
                torch.ops.dilated_attention.forward(*x, segments, dilations, True)

            def sdpa():
                torch.nn.functional.scaled_dot_product_attention(
                    *(t.transpose(1, 2) for t in x), is_causal=True)

            row = {"seq_len": n, "dtype": str(dtype)}
            for name, fn in (("ours", ours), ("sdpa", sdpa)):
                fn()
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(5):
                    fn()
                stop.record()
                torch.cuda.synchronize()
                row[f"{name}_ms"] = start.elapsed_time(stop) / 5
            section["times"].append(row)
            print(f"GPU N={n} {dtype}: {row}")
    return section


if __name__ == "__main__":
    main()
