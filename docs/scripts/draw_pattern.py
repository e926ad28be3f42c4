#!/usr/bin/env python3
"""Draw the attention pattern of a small dilated-attention config: docs/images/pattern.png.

For each offset rule (rows) and query head (columns), a query x key grid coloured by the
multiplicity C_h(x, y) = number of branches in which query x of head h attends key y.

A drawing aid only. The pattern is computed here directly from the formulas of docs/semantics.md "The forward"
and 3 (segments sigma = floor(x / w), in-segment index rho = x - sigma * w, selection
rho mod r == offset), independently of the C++ code; the C++ tests are what check the library.

    python3 docs/scripts/draw_pattern.py [--causal] [--output docs/images/pattern.png]
Needs numpy and matplotlib.
"""

import argparse
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import BoundaryNorm, ListedColormap  # noqa: E402

N = 16
BRANCHES = [(4, 1), (8, 2), (16, 4)]  # (segment length w, dilation rate r)
HEADS = 4
RULES = ["modular", "blocked", "partitioned"]


def offset(rule, branch, head):
    """o_i(h) of docs/semantics.md "Which offset a head uses", or None when head h does not run branch i."""
    w, r = BRANCHES[branch]
    g_count = len(BRANCHES)
    if rule == "modular":
        return head % r
    if rule == "blocked":
        return head // math.ceil(HEADS / r)
    # partitioned: G contiguous groups, the first H mod G one head larger; group g runs branch g.
    sizes = [HEADS // g_count + (1 if g < HEADS % g_count else 0) for g in range(g_count)]
    begin = sum(sizes[:branch])
    if begin <= head < begin + sizes[branch]:
        return branch % r
    return None


def multiplicity(rule, head, causal):
    """C_h(x, y) for every query x (rows) and key y (columns)."""
    c = np.zeros((N, N), dtype=int)
    for i, (w, r) in enumerate(BRANCHES):
        o = offset(rule, i, head)
        if o is None:
            continue
        for x in range(N):
            if (x - (x // w) * w) % r != o:
                continue  # x is not selected: no keys in this branch
            for y in range(N):
                same_segment = y // w == x // w
                selected = (y - (y // w) * w) % r == o
                if same_segment and selected and (not causal or y <= x):
                    c[x, y] += 1
    return c


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--causal", action="store_true", help="draw the causal pattern")
    parser.add_argument("--output", type=Path,
                        default=Path(__file__).resolve().parent.parent / "images" / "pattern.png")
    args = parser.parse_args()

    g_count = len(BRANCHES)
    colours = ["#ffffff", "#9ecae1", "#3182bd", "#08306b"][: g_count + 1]
    cmap = ListedColormap(colours)
    norm = BoundaryNorm(np.arange(-0.5, g_count + 1), cmap.N)

    fig, axes = plt.subplots(len(RULES), HEADS, figsize=(2.6 * HEADS + 1.2, 2.75 * len(RULES) + 0.9),
                             constrained_layout=True)
    for row, rule in enumerate(RULES):
        for head in range(HEADS):
            ax = axes[row, head]
            c = multiplicity(rule, head, args.causal)
            image = ax.imshow(c, cmap=cmap, norm=norm, interpolation="nearest")
            ax.set_xticks(np.arange(-0.5, N, 1), minor=True)
            ax.set_yticks(np.arange(-0.5, N, 1), minor=True)
            ax.grid(which="minor", color="#d9d9d9", linewidth=0.4)
            ax.tick_params(which="minor", length=0)
            ax.set_xticks(range(0, N, 4))
            ax.set_yticks(range(0, N, 4))
            ax.tick_params(labelsize=7)
            offsets = []
            for i in range(g_count):
                o = offset(rule, i, head)
                offsets.append("-" if o is None else str(o))
            ax.set_title(f"{rule}, head {head}\noffsets ({', '.join(offsets)})", fontsize=9)
            if head == 0:
                ax.set_ylabel("query x", fontsize=8)
            if row == len(RULES) - 1:
                ax.set_xlabel("key y", fontsize=8)
    bar = fig.colorbar(image, ax=axes, ticks=range(g_count + 1), shrink=0.5, aspect=25)
    bar.set_label("multiplicity C_h(x, y)", fontsize=9)
    branches = ", ".join(f"({w},{r})" for w, r in BRANCHES)
    fig.suptitle(f"Dilated attention pattern, N={N}, branches (w,r) = {branches}, H={HEADS}"
                 f"{', causal' if args.causal else ''}", fontsize=11)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=110)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
