"""What the peer comparisons share. The CPU ones (compare_dilated_attention_pytorch.py for the
forward, compare_backward_pytorch.py for the backward): loading the peer, the command line, the
report header, the input files, our driver's command, the sampled rows and the per-row key
selection of docs/semantics.md "The forward" (partitioned offsets) that both float64 oracles use. The CUDA
ones (cuda_sdpa_and_peer.py, cuda_longnet_torch.py): the head partition and the CUDA-event timer.

PyTorch is never imported here: the scripts import it in main(), after argument parsing, so that
--help works without it.
"""

import importlib
import json
import os
import statistics
import sys
import types

import numpy as np


def load_peer(peer_root):
    """The peer's dilated_attention module alone, through an empty package object for
    `dilated_attention_pytorch` whose __path__ points at the peer's folder (nothing stubbed)."""
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


def row_keys(n, heads, segments, dilations, causal, x, h):
    """The keys query row x of head h attends to (docs/semantics.md "The forward", partitioned offsets), or
    None when x is not on its branch's dilated grid; heads split into len(segments) groups."""
    ranges = partition_ranges(heads, len(segments))
    g = next(i for i, (lo, hi) in enumerate(ranges) if lo <= h < hi)
    w, r = segments[g], dilations[g]
    offset = g % r
    start = (x // w) * w
    length = min(w, n - start)
    if (x - start) % r != offset:
        return None
    keys = np.arange(start + offset, start + length, r)
    if causal:
        keys = keys[keys <= x]
    return keys


def rows_with_keys(q, segments, dilations, causal, rows):
    """(row, keys) for each (b, x, h) row of q [B, N, H, D], keys as row_keys gives them."""
    _, n, heads, _ = q.shape
    for b, x, h in rows:
        yield (b, x, h), row_keys(n, heads, segments, dilations, causal, x, h)


def cuda_time_ms(torch, fn, repeats):
    """Median milliseconds of fn() over `repeats` calls after one warm-up, with CUDA events
    (torch is passed in, never imported here)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def add_common_arguments(parser, binary, work_dir, seed):
    parser.add_argument("--peer-root", default="peers/dilated-attention-pytorch")
    parser.add_argument("--binary", default=binary)
    parser.add_argument("--work-dir", default=work_dir)
    parser.add_argument("--seq-lens", default="16384,65536")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--segments", default="2048,4096,8192")
    parser.add_argument("--dilations", default="1,2,4")
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=seed)
    parser.add_argument("--sample-rows", type=int, default=64)


def start_report(args, torch, peer_name):
    """Sets torch's threads, loads the peer, makes the work folder and prints the header line;
    returns (peer module, segments, dilations, report)."""
    torch.set_num_threads(args.threads)
    peer = load_peer(args.peer_root)
    segments = [int(s) for s in args.segments.split(",")]
    dilations = [int(r) for r in args.dilations.split(",")]
    os.makedirs(args.work_dir, exist_ok=True)
    report = {
        "peer": peer_name,
        "peer_commit": peer_commit(args.peer_root),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "our_threads": args.threads,
        "config": {"batch": args.batch, "heads": args.heads, "head_dim": args.head_dim, "segments": segments,
                   "dilations": dilations, "causal": args.causal, "ours": "partitioned + mean"},
        "runs": [],
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; peer commit {report['peer_commit']}")
    return peer, segments, dilations, report


def write_inputs(args, n, names):
    """Draws one N(0, 1) float32 [B, N, H, D] array per name with the seed args.seed + n, writes
    each as <work>/<name>.f32 and returns (shape, work folder, arrays)."""
    shape = (args.batch, n, args.heads, args.head_dim)
    rng = np.random.default_rng(args.seed + n)
    arrays = [rng.standard_normal(shape, dtype=np.float32) for _ in names]
    work = os.path.join(args.work_dir, f"N{n}")
    os.makedirs(work, exist_ok=True)
    for name, array in zip(names, arrays):
        array.tofile(os.path.join(work, f"{name}.f32"))
    return shape, work, arrays


def our_command(args, n, work, output):
    """Our driver on <work>, two calls per process (the first is its warm-up), with its thread
    count in the environment; returns (command, env)."""
    command = [args.binary, f"--input={work}", f"--output={output}", f"--batch={args.batch}",
               f"--seq_len={n}", f"--heads={args.heads}", f"--head_dim={args.head_dim}",
               f"--segments={args.segments}", f"--dilations={args.dilations}", "--offsets=partitioned",
               "--mixing=mean", f"--causal={'true' if args.causal else 'false'}", "--repeats=2"]
    env = dict(os.environ, DILATED_ATTENTION_NUM_THREADS=str(args.threads))
    return command, env


def sampled_rows(args, n):
    """args.sample_rows (b, x, h) rows drawn with args.seed, for the float64 oracle."""
    rng_rows = np.random.default_rng(args.seed)
    return [(int(rng_rows.integers(args.batch)), int(rng_rows.integers(n)), int(rng_rows.integers(args.heads)))
            for _ in range(args.sample_rows)]


def write_report(args, report, name):
    """The report as <work-dir>/<name>, indented JSON; prints where it went."""
    path = os.path.join(args.work_dir, name)
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"written {path}")
