#!/usr/bin/env python3
"""Summarise one run of cpu_forward_benchmark: the main job's table, summary JSON and plot.

    plot_results.py RESULTS.json [--backward BACKWARD.json] [--out-dir DIR] [--no-plot]

Reads the Google Benchmark JSON (--benchmark_out) of ONE run, so every ratio compares figures
measured in the same process on the same machine state:

  useful GFLOP/s    Pattern::useful_flops() (4 * head_dim per attended pair) / median real time
  % peak            useful GFLOP/s / the measured FMA peak of the same binary (fma_peak/<isa>/threads:t
                    of the run's kernel_isa at its thread count): per wall second, and (in brackets)
                    per CPU second on both sides, which a shared machine disturbs less
  x SGEMM           useful GFLOP/s / GFLOP/s of the square Eigen SGEMM in the same binary
  x OpenBLAS        the same against OpenBLAS's SGEMM (when the binary was built with it)
  cpu               process CPU time / (wall time * threads): the share of its cores the run got
  x SGEMM/core      the x SGEMM ratio from GFLOP per second of CPU time on both sides: on a shared
                    machine it tracks what an idle one would show better than wall-time rates do
  x shaped/core     as x SGEMM/core, against Eigen's Q K^T and P V products at the block size
  dense / dilated   time of dense attention (one branch w = N, r = 1) / time of dilated, same N, D;
                    wall time, and in brackets process CPU time
  t(N)/t(N/4)       time of dilated at N / time at N/4 (linear cost gives 4); wall (CPU)
  peak MiB          q + k + v + out + lse + the heap the calls allocated on top (budget: +64 MiB)
  max err           max |ours - docs/semantics.md "The forward" in double| over sampled rows (out and lse)

With --backward (the JSON of cpu_backward_benchmark, forward and backward timed in one binary) a
second table covers the backward:

  bwd/fwd           backward time / forward time, same (N, D), same run (target <= 2.5)
  useful GFLOP/s    2.5 x Pattern::useful_flops() (FlashAttention-2's count of a backward) / time;
                    GFLOP/core-s divides by process CPU seconds instead (less load-sensitive)
  % peak            of the FMA peak measured in the same binary, wall (CPU seconds), as above
  t(N)/t(N/4)       of the backward (target <= 4.4)
  heap MiB          heap the backward calls allocated beyond q, k, v, out, lse, d_out, dq, dk, dv
  max rel err       largest gradient error on sampled rows against docs/semantics.md "The gradient" in double,
                    relative to the largest sampled entry (dQ, dK, dV)

Writes DIR/summary.json and, when matplotlib is importable, DIR/benchmark_cpu.png (time against
N, log-log, dilated and dense; with --backward also DIR/benchmark_cpu_backward.png). Only the
standard library is needed for the tables.
"""

import argparse
import json
import math
import os
import sys

UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}


def kind_of(run):
    return run["run_name"].split("/")[0]


def representative_runs(benchmarks):
    """One entry per benchmark: Google Benchmark's median aggregate when it wrote one, else the
    run with the median real time among its repetitions."""
    iterations, medians = {}, {}
    for run in benchmarks:
        name = run["run_name"]
        if run.get("run_type") == "aggregate":
            if run.get("aggregate_name") == "median":
                medians[name] = run
        else:
            iterations.setdefault(name, []).append(run)
    result = []
    for name, runs in iterations.items():
        if name in medians:
            result.append(dict(medians[name], repetitions_used=len(runs)))
        else:
            runs = sorted(runs, key=lambda r: r["real_time"])
            result.append(dict(runs[len(runs) // 2], repetitions_used=len(runs)))
    return result


def seconds(run):
    return run["real_time"] * UNIT_SECONDS[run.get("time_unit", "ns")]


def cpu_seconds(run):
    return run["cpu_time"] * UNIT_SECONDS[run.get("time_unit", "ns")] if "cpu_time" in run else None


def per_core_rate(run):
    """GFLOP per second of process CPU time (per busy core) of a GFLOPs-counter benchmark: the
    rate with the other processes' share of the machine taken out."""
    cpu = cpu_seconds(run)
    return run["GFLOPs"] * seconds(run) / cpu if cpu else None


def cpu_share(run):
    """Process CPU time / (real time * threads): 1.0 when the run had its cores to itself; on a
    shared machine it falls with the load, and the run's times are inflated about 1/share."""
    threads = run.get("worker_threads")
    if not threads or "cpu_time" not in run:
        return None
    return run["cpu_time"] / (run["real_time"] * threads)


def fma_peaks(runs):
    """{(isa, threads): run} of the fma_peak/<isa>/threads:t rows."""
    peaks = {}
    for r in runs:
        if kind_of(r) == "fma_peak":
            parts = r["run_name"].split("/")
            peaks[(parts[1], int(parts[2].split(":")[1]))] = r
    return peaks


def peak_for(runs, context, threads):
    """The peak a kernel run is measured against: its instruction set (the JSON's kernel_isa;
    without one, the widest measured) on its worker threads. None when the run measured none."""
    peaks = fma_peaks(runs)
    isa = context.get("kernel_isa")
    candidates = [isa] if isa in {i for i, _ in peaks} else sorted({i for i, _ in peaks}, key=lambda i: i != "avx512")
    for i in candidates:
        if (i, threads) in peaks:
            return peaks[(i, threads)]
    return None


def peak_shares(row, peak, flops):
    """Adds the share of `peak` (a fma_peak run) to `row`: by wall time and by CPU time."""
    row["peak_name"] = peak["run_name"].split("/repeats")[0] if peak else None
    row["peak_GFLOPs"] = peak["GFLOPs"] if peak else None
    row["peak_GFLOP_per_core_s"] = per_core_rate(peak) if peak else None
    row["share_of_peak"] = row["useful_GFLOPs"] / peak["GFLOPs"] if peak else None
    core, peak_core = row.get("useful_GFLOP_per_core_s"), row["peak_GFLOP_per_core_s"]
    row["share_of_peak_per_core"] = core / peak_core if core and peak_core else None


def summarise(data):
    runs = representative_runs(data["benchmarks"])
    context = data.get("context", {})
    sgemm = [r for r in runs if kind_of(r) == "sgemm"]
    openblas = [r for r in runs if kind_of(r) == "sgemm_openblas"]
    shaped = {int(r["run_name"].split("/D:")[1].split("/")[0]): r for r in runs if kind_of(r) == "sgemm_attention_shaped"}
    sgemm_gflops = sgemm[0]["GFLOPs"] if sgemm else None
    sgemm_share = cpu_share(sgemm[0]) if sgemm else None
    sgemm_core = per_core_rate(sgemm[0]) if sgemm else None
    openblas_gflops = openblas[0]["GFLOPs"] if openblas else None
    openblas_core = per_core_rate(openblas[0]) if openblas else None
    attention = {}
    for r in runs:
        kind = kind_of(r)
        if kind in ("dense", "dilated"):
            attention[(kind, int(r["D"]), int(r["N"]))] = r

    rows = []
    for (kind, d, n), r in sorted(attention.items(), key=lambda item: (item[0][1], item[0][0] != "dilated", item[0][2])):
        t = seconds(r)
        gflops = r["useful_flops"] / t * 1e-9
        row = {
            "kind": kind,
            "D": d,
            "N": n,
            "time_s": t,
            "repetitions": r.get("repetitions_used", 1),
            "useful_flops": r["useful_flops"],
            "useful_GFLOPs": gflops,
            "cpu_share": cpu_share(r),
            "cpu_time_s": cpu_seconds(r),
            "useful_GFLOP_per_core_s": r["useful_flops"] / cpu_seconds(r) * 1e-9 if cpu_seconds(r) else None,
            "ratio_to_sgemm": gflops / sgemm_gflops if sgemm_gflops else None,
            "ratio_to_openblas": gflops / openblas_gflops if openblas_gflops else None,
            "ratio_to_shaped_sgemm": gflops / shaped[d]["GFLOPs"] if d in shaped else None,
            "tensors_MiB": r.get("tensors_MiB"),
            "heap_peak_MiB": r.get("heap_peak_MiB"),
            "peak_MiB": r.get("peak_MiB"),
            "budget_MiB": r.get("budget_MiB"),
            "rss_peak_delta_MiB": r.get("rss_peak_delta_MiB"),
            "max_err_out": r.get("max_err_out"),
            "max_err_lse": r.get("max_err_lse"),
            "sampled_rows": r.get("sampled_rows"),
        }
        core = row["useful_GFLOP_per_core_s"]
        row["ratio_to_sgemm_per_core"] = core / sgemm_core if core and sgemm_core else None
        row["ratio_to_openblas_per_core"] = core / openblas_core if core and openblas_core else None
        peak_shares(row, peak_for(runs, context, r.get("worker_threads")), r["useful_flops"])
        shaped_core = per_core_rate(shaped[d]) if d in shaped else None
        row["ratio_to_shaped_sgemm_per_core"] = core / shaped_core if core and shaped_core else None
        row["idle_estimate_s"] = row["cpu_time_s"] / r["worker_threads"] if row["cpu_time_s"] and r.get("worker_threads") else None
        dense = attention.get(("dense", d, n))
        row["dense_over_dilated"] = seconds(dense) / t if kind == "dilated" and dense else None
        row["dense_over_dilated_cpu"] = (cpu_seconds(dense) / cpu_seconds(r)
                                         if kind == "dilated" and dense and cpu_seconds(dense) and cpu_seconds(r) else None)
        quarter = attention.get((kind, d, n // 4)) if n % 4 == 0 else None
        row["time_ratio_4x"] = t / seconds(quarter) if quarter else None
        row["time_ratio_4x_cpu"] = (cpu_seconds(r) / cpu_seconds(quarter)
                                    if quarter and cpu_seconds(r) and cpu_seconds(quarter) else None)
        rows.append(row)

    return {
        "context": {k: context.get(k) for k in ("date", "host_name", "num_cpus", "mhz_per_cpu", "load_avg",
                                                  "implementation", "config", "sgemm_threads", "kernel_threads", "heap_counter",
                                                  "kernel_isa", "best_isa", "build_flags", "openblas_core",
                                                  "eigen_version", "compiler", "assertions")},
        "fma_peak": summarise_peaks(runs),
        "sgemm": {"name": sgemm[0]["run_name"], "GFLOPs": sgemm_gflops, "cpu_share": sgemm_share,
                  "GFLOP_per_core_s": sgemm_core} if sgemm else None,
        "sgemm_openblas": {"name": openblas[0]["run_name"], "GFLOPs": openblas_gflops,
                           "cpu_share": cpu_share(openblas[0]), "GFLOP_per_core_s": openblas_core} if openblas else None,
        "sgemm_attention_shaped": {str(d): {"name": r["run_name"], "GFLOPs": r["GFLOPs"],
                                           "GFLOP_per_core_s": per_core_rate(r)} for d, r in shaped.items()},
        "rows": rows,
    }


def summarise_peaks(runs):
    return {f"{isa}/threads:{t}": {"GFLOPs": r["GFLOPs"], "GFLOP_per_core_s": per_core_rate(r), "cpu_share": cpu_share(r)}
            for (isa, t), r in sorted(fma_peaks(runs).items())}


def print_peaks(peaks, out=sys.stdout):
    for name, p in peaks.items():
        print(f"FMA peak ({name}): {p['GFLOPs']:.1f} GFLOP/s (cpu share {fmt(p['cpu_share'], '.0%')}; "
              f"{fmt(p['GFLOP_per_core_s'], '.1f')} GFLOP per core-second)", file=out)


def fmt(value, spec, missing="-"):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    return format(value, spec)


def both(wall, cpu, spec):
    return "-" if wall is None else f"{format(wall, spec)} ({fmt(cpu, spec)})"


def percent(wall, cpu):
    """A share of the peak, wall (CPU), in per cent."""
    return "-" if wall is None else f"{100 * wall:.0f} % ({fmt(cpu and 100 * cpu, '.0f')} %)"


def print_table(summary, out=sys.stdout):
    ctx = summary["context"]
    print(f"implementation: {ctx.get('implementation')}   config: {ctx.get('config')}", file=out)
    print(f"machine: {ctx.get('num_cpus')} CPUs @ {ctx.get('mhz_per_cpu')} MHz, load average at start "
          f"{', '.join(format(x, '.2f') for x in ctx.get('load_avg') or [])}", file=out)
    print(f"kernel isa: {ctx.get('kernel_isa')} (best here: {ctx.get('best_isa')})", file=out)
    print_peaks(summary.get("fma_peak") or {}, out)
    for key, label in (("sgemm", "Eigen SGEMM"), ("sgemm_openblas", "OpenBLAS SGEMM")):
        s = summary.get(key)
        if s:
            print(f"{label} ({s['name'].split('/repeats')[0]}): {s['GFLOPs']:.1f} GFLOP/s "
                  f"(cpu share {fmt(s['cpu_share'], '.0%')}; {fmt(s['GFLOP_per_core_s'], '.1f')} GFLOP per core-second)",
                  file=out)
    for d, s in summary["sgemm_attention_shaped"].items():
        print(f"Eigen attention-shaped products (Q K^T, P V; {s['name'].split('/repeats')[0]}): "
              f"{s['GFLOPs']:.1f} GFLOP/s ({fmt(s['GFLOP_per_core_s'], '.1f')} GFLOP per core-second)", file=out)
    header = ("kind", "D", "N", "time", "cpu", "GFLOP/s", "% peak wall (cpu)", "xSGEMM", "xSGEMM/core",
              "xOpenBLAS/core", "xshaped/core",
              "dense/dil wall (cpu)", "t(N)/t(N/4) wall (cpu)",
              "peak MiB (budget)", "max err O", "max err LSE")
    lines = []
    for r in summary["rows"]:
        t = r["time_s"]
        time_text = f"{t * 1e3:.1f} ms" if t < 10 else f"{t:.2f} s"
        peak = f"{fmt(r['peak_MiB'], '.1f')} ({fmt(r['budget_MiB'], '.0f')})"
        lines.append((r["kind"], str(r["D"]), str(r["N"]), time_text, fmt(r["cpu_share"], ".0%"),
                      fmt(r["useful_GFLOPs"], ".1f"), percent(r["share_of_peak"], r["share_of_peak_per_core"]),
                      fmt(r["ratio_to_sgemm"], ".2f"), fmt(r["ratio_to_sgemm_per_core"], ".2f"),
                      fmt(r["ratio_to_openblas_per_core"], ".2f"),
                      fmt(r["ratio_to_shaped_sgemm_per_core"], ".2f"),
                      both(r["dense_over_dilated"], r["dense_over_dilated_cpu"], ".1f"),
                      both(r["time_ratio_4x"], r["time_ratio_4x_cpu"], ".2f"), peak,
                      fmt(r["max_err_out"], ".1e"), fmt(r["max_err_lse"], ".1e")))
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)), file=out)
    for line in lines:
        print("  ".join(c.rjust(w) for c, w in zip(line, widths)), file=out)
    print("cpu = process CPU time / (wall time x threads): below ~90% the machine was shared and the times are "
          "inflated;\n/core and (cpu) = the same ratios from process CPU seconds (less sensitive to load)",
          file=out)
    missing_dense = sorted({(r["D"], r["N"]) for r in summary["rows"] if r["kind"] == "dilated" and r["dense_over_dilated"] is None})
    if missing_dense:
        print("dense attention not measured at " + ", ".join(f"D={d} N={n}" for d, n in missing_dense) +
              " (O(N^2); raise --dense-max-seq-len to include it)", file=out)


def print_markdown(summary, out=sys.stdout):
    """The rows as a Markdown table, for docs/performance.md."""
    print("| kind | D | N | wall time | CPU share | CPU s / threads | useful GFLOP/s | % of FMA peak wall (CPU) | "
          "x SGEMM (wall) | x SGEMM (per core) | x OpenBLAS (per core) | x shaped (per core) | "
          "dense / dilated wall (CPU) | t(N)/t(N/4) wall (CPU) | "
          "peak MiB (budget) | heap MiB | max err O | max err LSE |", file=out)
    print("|" + "---|" * 18, file=out)
    for r in summary["rows"]:
        t = r["time_s"]
        print(f"| {r['kind']} | {r['D']} | {r['N']} | {t:.2f} s | {fmt(r['cpu_share'], '.0%')} | "
              f"{fmt(r['idle_estimate_s'], '.2f')} s | {fmt(r['useful_GFLOPs'], '.1f')} | "
              f"{percent(r['share_of_peak'], r['share_of_peak_per_core'])} | "
              f"{fmt(r['ratio_to_sgemm'], '.2f')} | {fmt(r['ratio_to_sgemm_per_core'], '.2f')} | "
              f"{fmt(r['ratio_to_openblas_per_core'], '.2f')} | "
              f"{fmt(r['ratio_to_shaped_sgemm_per_core'], '.2f')} | "
              f"{both(r['dense_over_dilated'], r['dense_over_dilated_cpu'], '.1f')} | "
              f"{both(r['time_ratio_4x'], r['time_ratio_4x_cpu'], '.2f')} | "
              f"{fmt(r['peak_MiB'], '.1f')} ({fmt(r['budget_MiB'], '.0f')}) | {fmt(r['heap_peak_MiB'], '.2f')} | "
              f"{fmt(r['max_err_out'], '.1e')} | {fmt(r['max_err_lse'], '.1e')} |", file=out)


def plot(summary, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot skipped: matplotlib is not importable by " + sys.executable +
              " (apt-get install python3-matplotlib, or pip install matplotlib)", file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(7, 5))
    dims = sorted({r["D"] for r in summary["rows"]})
    colors = {"dilated": "tab:blue", "dense": "tab:red"}
    markers = ["o", "s", "^", "D"]
    for i, d in enumerate(dims):
        for kind in ("dilated", "dense"):
            pts = sorted((r["N"], r["time_s"]) for r in summary["rows"] if r["kind"] == kind and r["D"] == d)
            if not pts:
                continue
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker=markers[i % len(markers)], color=colors[kind],
                    linestyle="-" if i == 0 else "--", label=f"{kind}, D={d} (measured)")
            est = sorted((r["N"], r["idle_estimate_s"]) for r in summary["rows"]
                         if r["kind"] == kind and r["D"] == d and r.get("idle_estimate_s"))
            shared = any(r.get("cpu_share") is not None and r["cpu_share"] < 0.9
                         for r in summary["rows"] if r["kind"] == kind and r["D"] == d)
            if est and shared:
                ex, ey = zip(*est)
                ax.plot(ex, ey, marker=markers[i % len(markers)], color=colors[kind], alpha=0.45, linewidth=1,
                        markerfacecolor="none", label=f"{kind}, D={d}: CPU seconds / threads (idle-machine estimate)")
            for x, y in pts:
                ax.annotate(f"{y:.2f} s" if y >= 0.1 else f"{y * 1e3:.0f} ms", (x, y), textcoords="offset points",
                            xytext=(4, -12 if kind == "dilated" else 6), fontsize=7, color=colors[kind])
        # Dense beyond its last measured N, scaled as N^2, dotted and labelled as an extrapolation.
        dense = sorted((r["N"], r["time_s"]) for r in summary["rows"] if r["kind"] == "dense" and r["D"] == d)
        dilated_ns = sorted(r["N"] for r in summary["rows"] if r["kind"] == "dilated" and r["D"] == d)
        if dense and dilated_ns and dilated_ns[-1] > dense[-1][0]:
            n0, t0 = dense[-1]
            xs = [n for n in dilated_ns if n >= n0]
            ax.plot(xs, [t0 * (n / n0) ** 2 for n in xs], color=colors["dense"], linestyle=":",
                    label=f"dense, D={d}: N^2 extrapolation (not measured)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length N")
    ax.set_ylabel("forward time per call (s)")
    ctx = summary["context"]
    load = ctx.get("load_avg") or []
    machine = f"\n{ctx.get('num_cpus')} CPUs, {(ctx.get('date') or '')[:16]}"
    if load:
        machine += f", load average at start {load[0]:.1f}"
    ax.set_title(f"CPU forward, {ctx.get('config', '')}".replace(" causal", "\ncausal") + machine, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    # Below the axes: inside, wherever it goes, it covers a line (the N^2 extrapolation climbs to
    # the top right corner).
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=1, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


def summarise_backward(data):
    runs = representative_runs(data["benchmarks"])
    context = data.get("context", {})
    by_key = {(kind_of(r), int(r["D"]), int(r["N"])): r for r in runs
              if kind_of(r) in ("forward", "backward") and "D" in r}
    rows = []
    for (kind, d, n), r in sorted(by_key.items(), key=lambda item: (item[0][1], item[0][2])):
        if kind != "backward":
            continue
        t = seconds(r)
        fwd = by_key.get(("forward", d, n))
        quarter = by_key.get(("backward", d, n // 4)) if n % 4 == 0 else None
        rows.append({
            "D": d,
            "N": n,
            "forward_s": seconds(fwd) if fwd else None,
            "backward_s": t,
            "backward_over_forward": t / seconds(fwd) if fwd else None,
            "backward_over_forward_cpu": (cpu_seconds(r) / cpu_seconds(fwd)
                                          if fwd and cpu_seconds(r) and cpu_seconds(fwd) else None),
            "cpu_share": cpu_share(r),
            "forward_idle_estimate_s": (cpu_seconds(fwd) / fwd["worker_threads"]
                                        if fwd and cpu_seconds(fwd) and fwd.get("worker_threads") else None),
            "backward_idle_estimate_s": (cpu_seconds(r) / r["worker_threads"]
                                         if cpu_seconds(r) and r.get("worker_threads") else None),
            "useful_flops": r["useful_flops"],
            "useful_GFLOPs": r["useful_flops"] / t * 1e-9,
            "useful_GFLOP_per_core_s": r["useful_flops"] / cpu_seconds(r) * 1e-9 if cpu_seconds(r) else None,
            "time_ratio_4x": t / seconds(quarter) if quarter else None,
            "time_ratio_4x_cpu": (cpu_seconds(r) / cpu_seconds(quarter)
                                  if quarter and cpu_seconds(r) and cpu_seconds(quarter) else None),
            "tensors_MiB": r.get("tensors_MiB"),
            "heap_peak_MiB": r.get("heap_peak_MiB"),
            "forward_heap_peak_MiB": fwd.get("heap_peak_MiB") if fwd else None,
            "max_rel_err_dq": r.get("max_rel_err_dq"),
            "max_rel_err_dk": r.get("max_rel_err_dk"),
            "max_rel_err_dv": r.get("max_rel_err_dv"),
            "error": r.get("error_message"),
        })
        peak = peak_for(runs, context, r.get("worker_threads"))
        peak_shares(rows[-1], peak, r["useful_flops"])
        if fwd:
            forward = {"useful_GFLOPs": fwd["useful_flops"] / seconds(fwd) * 1e-9,
                       "useful_GFLOP_per_core_s": (fwd["useful_flops"] / cpu_seconds(fwd) * 1e-9
                                                   if cpu_seconds(fwd) else None)}
            peak_shares(forward, peak, fwd["useful_flops"])
            rows[-1]["forward_share_of_peak"] = forward["share_of_peak"]
            rows[-1]["forward_share_of_peak_per_core"] = forward["share_of_peak_per_core"]
    return {"context": {k: context.get(k) for k in ("date", "num_cpus", "load_avg", "implementation", "config",
                                                      "kernel_threads", "kernel_isa", "best_isa", "heap_counter",
                                                      "compiler")},
            "fma_peak": summarise_peaks(runs),
            "rows": rows}


def print_backward_table(summary, out=sys.stdout, markdown=False):
    ctx = summary["context"]
    print(f"\nbackward ({ctx.get('implementation')}; {ctx.get('config')}; load average at start "
          f"{', '.join(format(x, '.2f') for x in ctx.get('load_avg') or [])})", file=out)
    if not markdown:
        print_peaks(summary.get("fma_peak") or {}, out)
    header = ("D", "N", "forward", "backward", "cpu", "bwd/fwd wall (cpu)", "GFLOP/s", "GFLOP/core-s",
              "% peak wall (cpu)", "fwd % peak wall (cpu)", "t(N)/t(N/4) wall (cpu)", "heap MiB",
              "max rel err dQ/dK/dV")
    lines = []
    for r in summary["rows"]:
        errors = "/".join(fmt(r[k], ".1e") for k in ("max_rel_err_dq", "max_rel_err_dk", "max_rel_err_dv"))
        if r.get("error"):
            errors = "FAILED: " + r["error"]
        lines.append((str(r["D"]), str(r["N"]), fmt(r["forward_s"], ".3f") + " s", f"{r['backward_s']:.3f} s",
                      fmt(r["cpu_share"], ".0%"), both(r["backward_over_forward"], r["backward_over_forward_cpu"], ".2f"),
                      fmt(r["useful_GFLOPs"], ".1f"), fmt(r["useful_GFLOP_per_core_s"], ".1f"),
                      percent(r["share_of_peak"], r["share_of_peak_per_core"]),
                      percent(r.get("forward_share_of_peak"), r.get("forward_share_of_peak_per_core")),
                      both(r["time_ratio_4x"], r["time_ratio_4x_cpu"], ".2f"),
                      fmt(r["heap_peak_MiB"], ".2f"), errors))
    if markdown:
        print("| " + " | ".join(header) + " |", file=out)
        print("|" + "---|" * len(header), file=out)
        for line in lines:
            print("| " + " | ".join(line) + " |", file=out)
        return
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)), file=out)
    for line in lines:
        print("  ".join(c.rjust(w) for c, w in zip(line, widths)), file=out)


def plot_backward(summary, path):
    """Time per call against N: CPU seconds / threads (what an idle machine would show; solid)
    and wall time (faint), forward and backward; labels give backward / forward in CPU time."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7.5, 5.2))
    markers = ["o", "s", "^", "D"]
    for i, d in enumerate(sorted({r["D"] for r in summary["rows"]})):
        rows = sorted((r for r in summary["rows"] if r["D"] == d), key=lambda r: r["N"])
        for kind, color in (("forward", "tab:blue"), ("backward", "tab:orange")):
            for key, alpha, suffix in ((f"{kind}_idle_estimate_s", 1.0, "CPU s / threads"), (f"{kind}_s", 0.35, "wall")):
                pts = [(r["N"], r[key]) for r in rows if r.get(key)]
                if not pts:
                    continue
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker=markers[i % len(markers)], color=color, alpha=alpha,
                        linestyle="-" if i == 0 else "--", label=f"{kind}, D={d} ({suffix})")
                if alpha == 1.0:
                    for x, y in pts:
                        ax.annotate(f"{y:.2f} s", (x, y), textcoords="offset points", xytext=(4, -12), fontsize=7,
                                    color=color)
        for r in rows:
            if r.get("backward_over_forward_cpu") and r.get("backward_idle_estimate_s"):
                ax.annotate(f"bwd/fwd {r['backward_over_forward_cpu']:.2f}", (r["N"], r["backward_idle_estimate_s"]),
                            textcoords="offset points", xytext=(-62, 6), fontsize=7, color="tab:orange")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length N")
    ax.set_ylabel("time per call (s)")
    ctx = summary["context"]
    load = ctx.get("load_avg") or []
    config = (ctx.get("config") or "").replace(" causal", "\ncausal")
    ax.set_title(f"CPU backward vs forward, {config}\n{ctx.get('num_cpus')} CPUs, {(ctx.get('date') or '')[:16]}"
                 + (f", load average at start {load[0]:.1f}" if load else ""), fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


def summarise_inference(data):
    """Decode rows of cpu_inference_benchmark (float, and bf16 / half storage): step time,
    tokens/s, K/V bytes per step and per second and their share of the STREAM-like copy measured
    in the same binary; prefill rows: useful GFLOP/s and their share of the binary's FMA peak."""
    stream = stream_read = None
    rows, prefill, roofs = [], [], {}
    runs = representative_runs(data.get("benchmarks", []))
    context = data.get("context", {})
    dtypes = {"Decode": "float", "Decode_bf16": "bf16", "Decode_half": "half"}
    for run in runs:
        name = run["run_name"]
        kind = kind_of(run)
        if name.startswith("Stream/copy"):
            stream = run.get("bytes_per_second")
        elif name.startswith("Stream/read"):
            stream_read = run.get("bytes_per_second")
        elif kind == "Decode_read":
            fields = dict(part.split(":", 1) for part in name.split("/")[1:] if ":" in part)
            key = (int(fields["kv_len"]), int(fields["Hkv"]), int(fields["D"]), int(fields["batch"]))
            roofs[key] = run.get("kv_bytes_per_second")
        elif kind in dtypes:
            fields = dict(part.split(":", 1) for part in name.split("/")[1:] if ":" in part)
            rows.append({
                "dtype": dtypes[kind],
                "kv_len": int(fields["kv_len"]), "kv_heads": int(fields["Hkv"]),
                "head_dim": int(fields["D"]), "batch": int(fields["batch"]),
                "step_us": seconds(run) * 1e6, "tokens_per_second": run.get("tokens_per_second"),
                "kv_bytes_per_step": run.get("kv_bytes_per_step"),
                "kv_bytes_per_second": run.get("kv_bytes_per_second"),
                "copy_bytes_per_second": run.get("copy_bytes_per_second"),
                "share_of_copy": run.get("share_of_copy"),
                "error": run.get("error_occurred", False), "max_err_out": run.get("max_err_out"),
            })
        elif kind == "Prefill" and run.get("useful_flops"):
            row = {"name": name, "time_s": seconds(run),
                   "useful_GFLOPs": run["useful_flops"] / seconds(run) * 1e-9,
                   "useful_GFLOP_per_core_s": None, "max_err_out": run.get("max_err_out")}
            peak_shares(row, peak_for(runs, context, run.get("worker_threads")), run["useful_flops"])
            prefill.append(row)
    for row in rows:
        # The copy measured beside the row where the binary reports it; else the Stream/copy row.
        bw = row["kv_bytes_per_second"]
        row["bandwidth_share"] = row.get("share_of_copy") or (bw / stream if stream and bw else None)
        row["read_share"] = bw / stream_read if stream_read and bw else None
        roof = roofs.get((row["kv_len"], row["kv_heads"], row["head_dim"], row["batch"]))
        row["roof_share"] = bw / roof if roof and bw and row["dtype"] == "float" else None
    return {"stream_bytes_per_second": stream, "read_bytes_per_second": stream_read,
            "fma_peak": summarise_peaks(runs), "decode": rows,
            "prefill": prefill}


def print_inference_table(summary, out=sys.stdout, markdown=False):
    stream = summary.get("stream_bytes_per_second")
    read = summary.get("read_bytes_per_second")
    print(f"decode steps (STREAM-like copy: {fmt(stream and stream / 1e9, '.1f')} GB/s, pure read: "
          f"{fmt(read and read / 1e9, '.1f')} GB/s; 'of copy' divides by the copy measured beside each row, "
          "'copy GB/s'; 'of read' by the pure read; 'of roof' by the same rows read alone, Decode_read)", file=out)
    header = ["dtype", "kv_len", "Hkv", "D", "batch", "step (us)", "tokens/s", "K/V MB/step", "K/V GB/s", "copy GB/s",
              "of copy", "of read", "of roof", "max err"]
    lines = []
    order = {"float": 0, "bf16": 1, "half": 2}
    for row in sorted(summary["decode"], key=lambda r: (r["head_dim"], r["batch"], r["kv_heads"], r["kv_len"],
                                                        order.get(r.get("dtype", "float"), 3))):
        share = row["bandwidth_share"]
        step_bytes = row.get("kv_bytes_per_step")
        lines.append([row.get("dtype", "float"), str(row["kv_len"]), str(row["kv_heads"]), str(row["head_dim"]),
                      str(row["batch"]),
                      "ERROR" if row["error"] else fmt(row["step_us"], ".0f"),
                      fmt(row["tokens_per_second"], ".0f"),
                      fmt(step_bytes and step_bytes / 1e6, ".2f"),
                      fmt(row["kv_bytes_per_second"] and row["kv_bytes_per_second"] / 1e9, ".2f"),
                      fmt(row.get("copy_bytes_per_second") and row["copy_bytes_per_second"] / 1e9, ".1f"),
                      fmt(share and 100 * share, ".0f") + ("%" if share else ""),
                      fmt(row.get("read_share") and 100 * row["read_share"], ".0f") + ("%" if row.get("read_share") else ""),
                      fmt(row.get("roof_share") and 100 * row["roof_share"], ".0f") + ("%" if row.get("roof_share") else ""),
                      fmt(row["max_err_out"], ".1e")])
    prefill = summary.get("prefill") or []
    if markdown:
        print("| " + " | ".join(header) + " |", file=out)
        print("|" + "---|" * len(header), file=out)
        for line in lines:
            print("| " + " | ".join(line) + " |", file=out)
    else:
        widths = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h) for i, h in enumerate(header)]
        print("  ".join(h.rjust(w) for h, w in zip(header, widths)), file=out)
        for line in lines:
            print("  ".join(c.rjust(w) for c, w in zip(line, widths)), file=out)
    for row in prefill:
        print(f"{row['name']}: {row['time_s'] * 1e3:.1f} ms, {row['useful_GFLOPs']:.1f} useful GFLOP/s, "
              f"{percent(row['share_of_peak'], None).split(' (')[0]} of the FMA peak ({row['peak_name']})"
              if row["share_of_peak"] is not None else
              f"{row['name']}: {row['time_s'] * 1e3:.1f} ms, {row['useful_GFLOPs']:.1f} useful GFLOP/s", file=out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", nargs="?", default=None,
                        help="JSON written by cpu_forward_benchmark --benchmark_out (optional with --backward)")
    parser.add_argument("--out-dir", default=None, help="where summary.json and benchmark_cpu.png go "
                        "(default: the JSON's folder)")
    parser.add_argument("--no-plot", action="store_true", help="print the table and write summary.json only")
    parser.add_argument("--markdown", action="store_true", help="also print the rows as a Markdown table")
    parser.add_argument("--backward", default=None, help="JSON written by cpu_backward_benchmark --benchmark_out")
    parser.add_argument("--inference", default=None, help="JSON written by cpu_inference_benchmark --benchmark_out")
    args = parser.parse_args()
    if args.results is None and args.backward is None and args.inference is None:
        parser.error("give the forward JSON, --backward JSON, --inference JSON, or several")
    summary = {"rows": []}
    if args.results is not None:
        with open(args.results) as f:
            data = json.load(f)
        summary = summarise(data)
    out_dir = args.out_dir or os.path.dirname(os.path.abspath(args.results or args.backward or args.inference))
    os.makedirs(out_dir, exist_ok=True)
    if args.results is not None:
        print_table(summary)
        if args.markdown:
            print()
            print_markdown(summary)
            print()
    if args.backward:
        with open(args.backward) as f:
            summary["backward"] = summarise_backward(json.load(f))
        print_backward_table(summary["backward"])
        if args.markdown:
            print()
            print_backward_table(summary["backward"], markdown=True)
            print()
    if args.inference:
        with open(args.inference) as f:
            summary["inference"] = summarise_inference(json.load(f))
        print_inference_table(summary["inference"])
        if args.markdown:
            print()
            print_inference_table(summary["inference"], markdown=True)
            print()
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"summary: {os.path.join(out_dir, 'summary.json')}")
    if not args.no_plot:
        png = os.path.join(out_dir, "benchmark_cpu.png")
        if args.results is not None and plot(summary, png):
            print(f"plot:    {png}")
        if args.backward:
            png = os.path.join(out_dir, "benchmark_cpu_backward.png")
            if plot_backward(summary["backward"], png):
                print(f"plot:    {png}")


if __name__ == "__main__":
    main()
