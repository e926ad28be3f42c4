#!/usr/bin/env python3
"""Draw the ring schedule of a small config: docs/images/ring_schedule.png.

Left: the sequence split into P shards, and each branch's segments over it. Then two space-time
diagrams (non-causal, causal): ranks down, steps across. At step 0 every rank attends its own
rows. At step t = 1..P-1 rank p sends to (p + t) mod P only the rows the receiver's queries
attend (per branch: rows of the shared segment with in-segment index = offset mod r); arrows are
coloured by branch and labelled with the rows sent per head; dashed grey means the pair's step is
skipped (no shared segment, or a future shard when causal): no transport call at all.

A drawing aid only, computed here from the formulas of docs/semantics.md "The forward" (segments
sigma = floor(x / w), selection rho mod r == offset) independently of the C++ code; the C++ tests
are what check the library.

    python3 docs/scripts/draw_ring.py [--output docs/images/ring_schedule.png]
Needs matplotlib.
"""

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, Rectangle  # noqa: E402

N, P = 32, 4
BRANCHES = [(4, 1), (16, 2), (32, 4)]  # (w, r)
HEADS = 4  # modular offsets: head h uses offset h mod r
COLOURS = ["#1b9e77", "#d95f02", "#7570b3"]
L = N // P


def shard(p):
    return range(p * L, (p + 1) * L)


def rows_sent(p, q, w, r, offset, causal):
    """Rows of shard p that some query of shard q attends in branch (w, r) at this offset."""
    if causal and q < p:
        return 0
    count = 0
    for y in shard(p):
        if (y % w) % r != offset:
            continue
        if any(x // w == y // w and (x % w) % r == offset for x in shard(q)):
            count += 1
    return count


def per_head_rows(p, q, w, r, causal):
    """Rows sent per query head (heads of one offset share a kv head under MHA)."""
    offsets = sorted({h % r for h in range(HEADS)})
    return {o: rows_sent(p, q, w, r, o, causal) for o in offsets}


def draw_layout(ax):
    ax.set_title(f"N = {N}, P = {P} shards of {L}", fontsize=9)
    for p in range(P):
        ax.add_patch(Rectangle((p * L, len(BRANCHES)), L, 0.8, facecolor="#dddddd", edgecolor="black"))
        ax.text(p * L + L / 2, len(BRANCHES) + 0.4, f"rank {p}", ha="center", va="center", fontsize=8)
    for i, (w, r) in enumerate(BRANCHES):
        level = len(BRANCHES) - 1 - i
        for s in range(0, N, w):
            ax.add_patch(Rectangle((s, level + 0.1), min(w, N - s), 0.6, facecolor=COLOURS[i],
                                   alpha=0.35, edgecolor=COLOURS[i]))
        ax.text(-0.5, level + 0.4, f"w={w}, r={r}", ha="right", va="center", fontsize=8, color=COLOURS[i])
    ax.set_xlim(-12, N + 0.5)
    ax.set_ylim(-0.2, len(BRANCHES) + 1)
    ax.axis("off")


def draw_steps(ax, causal):
    """Space-time diagram: ranks down, steps across; an arrow per (sender, branch) at each step."""
    ax.set_title("causal" if causal else "non-causal", fontsize=9)
    for p in range(P):
        ax.axhline(p, color="#eeeeee", lw=6, zorder=0)
        ax.text(-0.75, p, f"rank {p}", ha="right", va="center", fontsize=8)
    for t in range(P):
        ax.text(t, -0.75, "step 0\n(local)" if t == 0 else f"step {t}\n(p -> p+{t})",
                ha="center", va="bottom", fontsize=8)
    # Step 0: which branches compute locally on each rank (every branch has local rows here).
    for p in range(P):
        for i in range(len(BRANCHES)):
            ax.plot(0 + (i - 1) * 0.15, p, "o", color=COLOURS[i], ms=5)
    for t in range(1, P):
        for p in range(P):
            q = (p + t) % P
            sent_any = False
            for i, (w, r) in enumerate(BRANCHES):
                rows = per_head_rows(p, q, w, r, causal)
                if sum(rows.values()) == 0:
                    continue
                sent_any = True
                dy = (i - 1) * 0.12
                ax.add_patch(FancyArrowPatch((t - 0.38, p + dy), (t + 0.38, q + dy), arrowstyle="-|>",
                                             mutation_scale=8, color=COLOURS[i], lw=1.1))
                per = sorted(set(rows.values()))
                ax.text(t - 0.42, p + dy, "/".join(map(str, per)), color=COLOURS[i], fontsize=6,
                        ha="right", va="center")
            if not sent_any:
                ax.add_patch(FancyArrowPatch((t - 0.38, p), (t + 0.38, q), arrowstyle="-|>", mutation_scale=6,
                                             color="#c8c8c8", lw=0.7, linestyle=(0, (3, 3))))
    ax.set_xlim(-1.6, P - 0.4)
    ax.set_ylim(P - 0.4, -1.1)
    ax.axis("off")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(Path(__file__).resolve().parents[1] / "images" / "ring_schedule.png"))
    args = parser.parse_args()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), gridspec_kw={"width_ratios": [1.1, 1, 1]})
    draw_layout(axes[0])
    draw_steps(axes[1], causal=False)
    draw_steps(axes[2], causal=True)
    fig.suptitle("Ring schedule: who sends to whom at each step, by branch "
                 "(numbers: rows sent per head; dashed grey: step skipped, no transport call)", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.output, dpi=110)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
