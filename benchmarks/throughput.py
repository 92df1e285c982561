"""Throughput suite: several ``jaxbert bench`` cases in one go, each side in its own subprocess.

    python benchmarks/throughput.py                       # the recorded suite (see SUITES) -> table + JSON lines
    python benchmarks/throughput.py --suite base          # one case: BERT-base, seq 128, batch 256, with the HF peer
    python benchmarks/throughput.py --cases cases.json    # a list of case objects (keys: below)
    python benchmarks/throughput.py --suite scaling       # data-parallel (and fsdp) on 1, 2, 4, 8 local GPUs

A case may run another source tree (``src``), or a copy of this one with some model files replaced
(``overlay``: a folder of .py files copied over ``jaxbert/model``; ``replace``: [file, old, new] edits), which is
how before/after variants are measured in one run. Case keys: name, config, batch, seq, steps, warmup, micro,
precision (fp32 | bf16 | fp16 | fp8 | fp8_delayed), devices, group, set (config overrides), flags (XLA flags), peer
(true or a list of eager / compile), profile, src / overlay / replace, maxbatch, timeout, peer_timeout, skip_jax. ``maxbatch`` estimates the largest batch without
rematerialisation from the peak memory of two earlier cases (linear in the batch) and runs it.
Results: a table on stdout, ``results.jsonl`` and ``table.txt`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from jaxbert import bench  # noqa: E402

BASE = {"config": "base", "batch": 256, "seq": 128}
SUITES: dict[str, list[dict[str, Any]]] = {
    "base": [dict(BASE, name="base-128", peer=True, profile=True)],
    "final": [dict(BASE, name="base-128", peer=True, profile=True),
              dict(BASE, name="base-512", seq=512, batch=64),
              dict(BASE, name="small-128", config="small"),
              dict(BASE, name="mini-128", config="mini"),
              dict(BASE, name="base-128-b1024", batch=1024, steps=4),
              dict(BASE, name="base-128-max", maxbatch=["base-128", "base-128-b1024"], steps=3)],
    # data-parallel scaling over the GPUs of one host, 256 sequences per device (and the fsdp variant)
    "scaling": [dict(BASE, name=f"{group}-{n}", group=group, devices=n, batch=256 * n,
                     set=[f"distributed.fsdp={n if group == 'fsdp' else 1}"])
                for group in ("dp", "fsdp") for n in (1, 2, 4, 8) if not (group == "fsdp" and n == 1)],
}


def variant_tree(case: dict[str, Any], workdir: Path) -> str:
    """The ``src`` folder a case runs: this checkout's, another one, or a patched copy of this one."""
    if "src" in case:
        return case["src"]
    if "overlay" not in case and "replace" not in case:
        return str(ROOT / "src")
    target = workdir / case["name"] / "src"
    shutil.copytree(ROOT / "src", target, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for f in sorted(Path(case.get("overlay", "/nonexistent")).glob("*.py")):
        shutil.copy(f, target / "jaxbert" / "model" / f.name)
    for rel, old, new in case.get("replace", []):
        path = target / "jaxbert" / rel
        text = path.read_text()
        if old not in text:
            raise ValueError(f"case {case['name']}: '{old[:60]}' not found in {rel}")
        path.write_text(text.replace(old, new))
    return str(target)


def predicted_max_batch(rows: dict[str, dict[str, Any]], names: list[str], multiple: int = 64) -> int:
    """Largest batch whose peak memory fits, from two cases' (batch, peak) pairs, rounded down."""
    (b1, p1), (b2, p2) = [(rows[n]["batch"], rows[n]["peak_gib"]) for n in names]
    slope = (p2 - p1) / (b2 - b1)
    fixed = p1 - slope * b1
    limit = rows[names[1]]["limit_gib"]
    return int((0.97 * limit - fixed) / slope) // multiple * multiple


def run_case(case: dict[str, Any], rows: dict[str, dict[str, Any]], workdir: Path, out: Path,
             timeout: float) -> list[dict[str, Any]]:
    """The rows (jaxbert, then the peers if asked) of one case."""
    if "maxbatch" in case:
        if not all(n in rows and "peak_gib" in rows[n] for n in case["maxbatch"]):
            return [{"side": "jaxbert", "case": case["name"], "error": "needs the two earlier cases' memory"}]
        case = dict(case, batch=predicted_max_batch(rows, case["maxbatch"]))
    argv = ["--config", case["config"], "--batch", str(case["batch"]), "--seq", str(case["seq"]),
            "--steps", str(case.get("steps", 10)), "--warmup", str(case.get("warmup", 3)), *case.get("set", [])]
    if case.get("micro"):
        argv += ["--micro-batch", str(case["micro"])]
    if case.get("precision"):
        argv += ["--precision", case["precision"]]
    if case.get("devices", 1) > 1:
        argv += ["--devices", str(case["devices"])]
    if case.get("profile"):
        argv += ["--profile", str(workdir / f"profile-{case['name']}")]
    args = bench.bench_arguments(argv)
    cfg = bench.bench_config(args.config, args.batch, args.seq, args.micro_batch, args.precision,
                             tuple(args.overrides))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([variant_tree(case, workdir),
                                                       os.environ.get("PYTHONPATH", "")]))
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    dump = workdir / f"dump-{case['name']}"
    if case.get("flags"):
        flags = case["flags"].replace("DUMPDIR", str(dump))
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flags).strip()
    result = []
    if not case.get("skip_jax"):
        result.append(bench.run_json(bench.jax_command(args, ceiling=True), env, case.get("timeout", timeout),
                                     "jaxbert"))
    peer = case.get("peer") or []
    for mode in (["eager", "compile"] if peer is True else peer):
        result.append(bench.run_json(bench.peer_command(cfg, args, mode), env, case.get("peer_timeout", 2 * timeout),
                                     f"hf-{mode}"))
    if dump.is_dir():  # an XLA dump asked for with DUMPDIR in the flags: one archive
        shutil.make_archive(str(out / f"dump-{case['name']}"), "gztar", dump)
    for r in result:
        r["case"] = case["name"]
        if "group" in case:
            r["group"], r["devices"] = case["group"], case.get("devices", 1)
        if "error" not in r:
            bench.add_derived(r, cfg, None)
    trace = result[0].get("profile", {}).get("trace") if result else None
    if trace and Path(trace).is_file():
        shutil.copy(trace, out / f"trace-{case['name']}.json.gz")
    return result


def scaling_table(rows: list[dict[str, Any]]) -> str:
    """Tokens/s against the device count; efficiency = tokens/s(N) / (N x tokens/s of the 1-device dp case)."""
    ok = [r for r in rows if "group" in r and "tokens_per_s" in r and r["side"] == "jaxbert"]
    one = next((r["tokens_per_s"] for r in ok if r["devices"] == 1), None)
    lines = [f"{'case':<10} {'devices':>7} {'batch':>6} {'tokens/s':>11} {'per device':>11} {'efficiency':>10}"]
    for r in sorted(ok, key=lambda r: (r["group"] != "dp", r["devices"])):
        eff = f"{r['tokens_per_s'] / (r['devices'] * one):.1%}" if one else "-"
        lines.append(f"{r['case']:<10} {r['devices']:>7} {r['batch']:>6} {r['tokens_per_s']:>11,.0f} "
                     f"{r['tokens_per_s'] / r['devices']:>11,.0f} {eff:>10}")
    lines += [f"{r['case']:<10} error: {r['error']}" for r in rows if "group" in r and "error" in r]
    return "\n".join(lines)


def commit() -> str:
    """The commit measured: $COMMIT when set (a copied tree on the device may report a stale HEAD), else git's."""
    if os.environ.get("COMMIT"):
        return os.environ["COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def finish(all_rows: list[dict[str, Any]], out: Path) -> str:
    """Apply the run's best ceiling to every row; the table of all cases with ratios to HF compiled."""
    ceiling = bench.median_ceiling(all_rows)
    stamp = {"date": time.strftime("%Y-%m-%d", time.gmtime()), "commit": commit()}
    for r in all_rows:
        for key, value in stamp.items():
            r.setdefault(key, value)
    lines = [f"bf16 matmul ceiling measured in this run (median): {ceiling or float('nan'):.0f} TFLOP/s"]
    for r in all_rows:
        if ceiling and "tokens_per_s" in r:
            r["ceiling_used_tflops"] = ceiling
            r["mfu"] = r["tokens_per_s"] * r["mflop_per_token"] * 1e6 / (ceiling * 1e12 * r.get("devices", 1))
    reference = next((r for r in all_rows if r["side"] == "hf-compile" and "error" not in r), None)
    for name in dict.fromkeys(r["case"] for r in all_rows):
        rows = [r for r in all_rows if r["case"] == name]
        first = rows[0]
        lines += ["", f"[{name}] {first.get('config', '')} seq {first.get('seq', '')} batch {first.get('batch', '')}"
                  f" {first.get('xla_flags', '')}", bench.table(rows, reference)]
    if any("group" in r for r in all_rows):
        lines += ["", scaling_table(all_rows)]
    text = "\n".join(lines)
    (out / "table.txt").write_text(text + "\n")
    with open(out / "results.jsonl", "w") as fh:
        for r in all_rows:
            fh.write(json.dumps(r) + "\n")
    return text


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", default="final", choices=sorted(SUITES))
    p.add_argument("--cases", default=None, help="a JSON file holding a list of cases (replaces --suite)")
    p.add_argument("--only", default=None, help="comma-separated case names to run")
    p.add_argument("--out", default="benchmarks/out", help="folder for results.jsonl, table.txt, traces")
    p.add_argument("--timeout", type=float, default=150.0, help="seconds per jaxbert case (peers: twice)")
    args = p.parse_args(argv)
    cases = json.loads(Path(args.cases).read_text()) if args.cases else SUITES[args.suite]
    if args.only:
        cases = [c for c in cases if c["name"] in args.only.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    all_rows: list[dict[str, Any]] = []
    by_name: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="jaxbert-bench-") as tmp:
        for case in cases:
            case = dict({"config": "base", "batch": 256, "seq": 128}, **case)
            try:
                rows = run_case(case, by_name, Path(tmp), out, args.timeout)
            except (OSError, ValueError, KeyError) as err:  # a bad case must not stop the others
                rows = [{"side": "jaxbert", "case": case["name"], "error": f"{type(err).__name__}: {err}"}]
            by_name[case["name"]] = rows[0] if rows else {}
            all_rows += rows
            with open(out / "partial.jsonl", "a") as fh:  # survives a run stopped half-way
                fh.writelines(json.dumps(r) + "\n" for r in rows)
            for r in rows:
                brief = {k: r.get(k) for k in ("case", "side", "batch", "tokens_per_s", "step_ms", "compile_s",
                                               "peak_gib", "error")}
                print(json.dumps(brief), flush=True)
                if "profile" in r:
                    print(json.dumps(r["profile"], indent=None), flush=True)
    print(finish(all_rows, out))
    return 0 if all("error" not in r for r in all_rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
