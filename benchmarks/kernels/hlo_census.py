"""Census of data movement in an optimized XLA module: transposes, copies and converts, with their bytes.

Issue 17's lever 2 (remove the transposes and stray casts at their source) starts from this list. Dump the
training step's HLO with a throughput case whose ``flags`` hold ``--xla_dump_to=DUMPDIR --xla_dump_hlo_as_text
--xla_dump_hlo_module_re=.*single_step.*`` (``benchmarks/throughput.py`` archives the dump as
``dump-<case>.tar.gz``), then:

    python3 benchmarks/kernels/hlo_census.py DUMP_DIR_OR_FILE [--top 25]

It reads the ``*after_optimizations.txt`` module of the step (the largest one when several match), and prints,
per op kind, how many instructions move data and their output bytes, counting ops inside fusions too (a
transpose fused into a loop fusion still costs a strided pass), then the largest of them with the op that XLA
attributes them to (``metadata op_name``).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

MOVERS = ("transpose", "copy", "convert")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
          "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%(?P<name>[\w.\-]+) = (?P<dtype>[a-z0-9]+)\[(?P<dims>[0-9,]*)\]\S* "
                          r"(?P<op>[a-z\-]+)\(")
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%(?P<name>[\w.\-]+) .*\{\s*$")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def tensor_bytes(dtype: str, dims: str) -> int:
    size = 1
    for d in filter(None, dims.split(",")):
        size *= int(d)
    return size * _BYTES.get(dtype, 4)


def census(text: str) -> list[dict[str, object]]:
    """One record per transpose / copy / convert instruction: op, bytes, shape, computation, op_name."""
    found, computation = [], "?"
    for line in text.splitlines():
        head = _COMPUTATION.match(line)
        if head:
            computation = head["name"]
            continue
        m = _INSTRUCTION.match(line)
        if not m or m["op"] not in MOVERS:
            continue
        op_name = _OP_NAME.search(line)
        found.append({"op": m["op"], "bytes": tensor_bytes(m["dtype"], m["dims"]),
                      "shape": f"{m['dtype']}[{m['dims']}]", "computation": computation,
                      "op_name": op_name[1] if op_name else ""})
    return found


def find_module(path: Path) -> Path:
    if path.is_file():
        return path
    candidates = [p for p in path.rglob("*after_optimizations.txt") if "single_step" in p.name or
                  "micro_step" in p.name]
    if not candidates:
        raise SystemExit(f"hlo_census: no *after_optimizations.txt of a training step under {path}")
    return max(candidates, key=lambda p: p.stat().st_size)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path", type=Path, help="an XLA dump folder or one *after_optimizations.txt file")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args(argv)
    module = find_module(args.path)
    records = census(module.read_text())
    print(f"{module.name}: {len(records)} data-movement instructions")
    count, size = Counter(), Counter()
    for r in records:
        count[r["op"]] += 1
        size[r["op"]] += r["bytes"]
    for op in MOVERS:
        print(f"  {op:<10} {count[op]:>6}  {size[op] / 2**20:>10.1f} MiB")
    print(f"largest {args.top}:")
    for r in sorted(records, key=lambda r: -r["bytes"])[:args.top]:
        print(f"  {r['bytes'] / 2**20:>8.1f} MiB  {r['op']:<9} {r['shape']:<24} in {r['computation']:<28} "
              f"{r['op_name'][-90:]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
