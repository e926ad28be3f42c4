#!/usr/bin/env python3
"""SASS check of the CUDA kernels (cuobjdump -sass output on stdin or as a file argument).

For every kernel whose name matches --kernel (default: the tensor-core forward), counts the
instructions that say the kernel is what docs/cuda.md claims -- HMMA (mma.sync), LDSM (ldmatrix),
LDGSTS (cp.async) -- and local-memory traffic (LDL/STL), separately inside loops (the range of a
backward branch: from its target to the branch) and elsewhere. Exit status 1 when a matching
kernel lacks HMMA/LDSM/LDGSTS or has LDL/STL inside a loop, or when no kernel matches.
"""

import argparse
import re
import sys

FUNCTION = re.compile(r"^\s*Function\s*:\s*(\S+)")
INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")


def parse(lines):
    kernels, name = {}, None
    for line in lines:
        m = FUNCTION.match(line)
        if m:
            name = m.group(1)
            kernels[name] = []
            continue
        m = INSTRUCTION.search(line)
        if m and name is not None:
            kernels[name].append((int(m.group(1), 16), m.group(2)))
    return kernels


def loops(instructions):
    ranges = []
    for address, text in instructions:
        if re.search(r"\bBRA\b", text):
            target = re.search(r"0x([0-9a-f]+)", text)
            if target and int(target.group(1), 16) <= address:
                ranges.append((int(target.group(1), 16), address))
    return ranges


def summarise(instructions):
    ranges = loops(instructions)
    in_loop = lambda a: any(lo <= a <= hi for lo, hi in ranges)
    count = {"HMMA": 0, "LDSM": 0, "LDGSTS": 0, "LDL_loop": 0, "STL_loop": 0, "LDL_other": 0,
             "STL_other": 0, "instructions": len(instructions), "loops": len(ranges)}
    for address, text in instructions:
        opcode = re.sub(r"^@!?U?P\w+\s+", "", text).split()[0] if text.split() else ""
        base = opcode.split(".")[0]
        if base in ("HMMA", "LDSM", "LDGSTS"):
            count[base] += 1
        elif base in ("LDL", "STL"):
            count[base + ("_loop" if in_loop(address) else "_other")] += 1
    return count


def short_name(mangled):
    """tensor_core_forward_kernel<__nv_bfloat16, 64> from the mangled name, without c++filt."""
    m = re.search(r"(\d+)([a-z_]+_kernel)I(\d+)?(\w+?)Li(\d+)E", mangled)
    if not m:
        return mangled[:60]
    return f"{m.group(2)}<{m.group(4)}, {m.group(5)}>"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sass", nargs="?", help="cuobjdump -sass output (default: stdin)")
    parser.add_argument("--kernel", default="tensor_core_forward_kernel")
    args = parser.parse_args()
    lines = open(args.sass).readlines() if args.sass else sys.stdin.readlines()
    kernels = {k: v for k, v in parse(lines).items() if args.kernel in k}
    if not kernels:
        print(f"FAIL: no kernel matching {args.kernel}")
        return 1
    failed = False
    print(f"{'kernel':<60} {'HMMA':>5} {'LDSM':>5} {'LDGSTS':>6} {'LDL/STL in loop':>15} {'LDL/STL other':>13}")
    for name, instructions in sorted(kernels.items()):
        c = summarise(instructions)
        bad = (c["HMMA"] == 0 or c["LDSM"] == 0 or c["LDGSTS"] == 0 or c["LDL_loop"] + c["STL_loop"] > 0)
        failed |= bad
        print(f"{short_name(name):<60} {c['HMMA']:>5} {c['LDSM']:>5} {c['LDGSTS']:>6} "
              f"{c['LDL_loop'] + c['STL_loop']:>15} {c['LDL_other'] + c['STL_other']:>13}"
              f"{'  FAIL' if bad else ''}")
    print("SASS check:", "FAIL" if failed else "PASS")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
