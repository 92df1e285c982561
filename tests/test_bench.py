"""The benchmark's bookkeeping: FLOP formula against the model's real matmul parameters, shapes of the benchmark
config, the profile summary and the result table. (Timing itself runs on the GPU machine, not in tests.)"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys

import equinox as eqx
import jax
import pytest

from jaxbert import bench, config
from jaxbert.model import BertModel


@pytest.mark.parametrize("ffn_type", ["mlp", "glu"])
def test_encoder_flops_are_six_times_the_matmul_weights(tiny_config, ffn_type):
    cfg = config.replace(tiny_config, model={"ffn_type": ffn_type})
    model = eqx.filter_eval_shape(BertModel, cfg.model, key=jax.random.PRNGKey(0))
    layers = model.layers
    weights = sum(d.weight.size for d in (layers.qkv, layers.out, layers.ffn_in, layers.ffn_out))
    flops = bench.flops_per_token(cfg.model, seq=32, predictions=None)
    assert flops["encoder"] == 6 * weights


def test_sparse_head_counts_only_predicted_positions(tiny_config):
    m = tiny_config.model
    full = bench.flops_per_token(m, seq=32, predictions=None)
    sparse = bench.flops_per_token(m, seq=32, predictions=4)
    assert sparse["head"] == pytest.approx(full["head"] * 4 / 32)
    assert full["head"] == 6 * (m.hidden * m.hidden + m.hidden * m.vocab_size)
    assert sparse["attention"] == full["attention"] == 12 * m.layers * 32 * m.hidden
    assert sparse["total"] == pytest.approx(sparse["encoder"] + sparse["attention"] + sparse["head"])


def test_bert_base_figures():
    cfg = config.load("base")
    flops = bench.flops_per_token(cfg.model, seq=128, predictions=19)
    assert flops["total"] / 1e6 == pytest.approx(546.7, abs=0.1)


@pytest.mark.parametrize("seq", [128, 512])
def test_bench_config_shapes(seq):
    cfg = bench.bench_config("base", batch=64, seq=seq, micro_batch=None, precision="bf16")
    assert (cfg.data.seq_len, cfg.train.micro_batch, cfg.train.batch_start, cfg.train.batch_end) == (seq, 64, 64, 64)
    assert cfg.data.max_predictions >= round(cfg.data.mlm_probability * seq)
    assert cfg.train.precision == "bf16"


def _trace(path, events):
    meta = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "pid": 7, "name": "process_name", "args": {"name": "/host:CPU"}}]
    path.mkdir(parents=True)
    with gzip.open(path / "perfetto_trace.json.gz", "wt") as fh:
        json.dump({"traceEvents": meta + events}, fh)


def test_summarise_trace_counts_device_time_by_kernel_and_category(tmp_path):
    events = [{"ph": "X", "pid": 1, "ts": 0, "dur": 600, "name": "nvjet_sm90_gemm"},
              {"ph": "X", "pid": 1, "ts": 600, "dur": 200, "name": "loop_add_fusion"},
              {"ph": "X", "pid": 1, "ts": 900, "dur": 100, "name": "cudnn_flash_fprop"},
              {"ph": "X", "pid": 7, "ts": 0, "dur": 5000, "name": "python host work"}]  # not device time
    _trace(tmp_path / "plugins" / "profile" / "run", events)
    out = bench.summarise_trace(str(tmp_path), steps=1)
    assert out["busy_ms_per_step"] == pytest.approx(0.9)
    assert out["span_ms_per_step"] == pytest.approx(1.0)
    assert out["by_category_ms"] == pytest.approx({"gemm": 0.6, "elementwise fusion": 0.2, "attention": 0.1})
    assert out["top"][0][0] == "nvjet_sm90_gemm"


def test_table_shows_ratio_and_errors():
    good = {"side": "jaxbert", "tokens_per_s": 200.0, "step_ms": 1.0, "mflop_per_token": 5.0, "mfu": 0.5,
            "compile_s": 1.0, "peak_gib": 1.0}
    ref = dict(good, side="hf-compile", tokens_per_s=100.0)
    text = bench.table([good, ref, {"side": "hf-eager", "error": "timed out"}], ref)
    assert "2.00x" in text and "1.00x" in text and "hf-eager       error: timed out" in text
    assert bench.median_ceiling([{"ceiling_tflops": 3.0}, {"ceiling_tflops": 1.0}, {}, {"ceiling_tflops": 2.0}]) == 2.0


def test_multi_device_timing_runs_the_same_step_as_one_device(tmp_path):
    """``--devices 2`` times the data-parallel step on a mesh: after the same steps on the same batches its loss is
    the one-device loss (fp32, CPU devices forced in a child process), and the worker refuses more devices than
    there are."""
    script = tmp_path / "child.py"
    script.write_text(
        "import json, sys\n"
        "from jaxbert import bench\n"
        "cfg = bench.bench_config('tiny', 8, 32, None, 'fp32', ())\n"
        "rows = [bench.time_train_step(cfg, warmup=1, steps=1, devices=n) for n in (1, 2)]\n"
        "try:\n"
        "    bench.time_train_step(cfg, warmup=1, steps=1, devices=3)\n"
        "    refused = ''\n"
        "except ValueError as err:\n"
        "    refused = str(err)\n"
        "print(json.dumps({'losses': [r['loss'] for r in rows], 'refused': refused}))\n")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    one, two = result["losses"]
    assert 1.0 < one < 20.0 and abs(one - two) < 1e-4
    assert result["refused"] == "--devices 3: only 2 local device(s) here"


def load_benchmark(relative: str):
    """A script under benchmarks/ (not a package) as a module."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_scaling_table_efficiency_against_one_device():
    throughput = load_benchmark("throughput.py")
    rows = [{"side": "jaxbert", "case": "dp-1", "group": "dp", "devices": 1, "batch": 256, "tokens_per_s": 100.0},
            {"side": "jaxbert", "case": "dp-2", "group": "dp", "devices": 2, "batch": 512, "tokens_per_s": 190.0},
            {"side": "jaxbert", "case": "dp-4", "group": "dp", "devices": 4, "error": "only 2 local device(s)"}]
    text = throughput.scaling_table(rows)
    assert "95.0%" in text and "100.0%" in text and "dp-4       error: only 2 local device(s)" in text


def test_hlo_census_counts_data_movement_inside_fusions_too():
    """benchmarks/kernels/hlo_census.py: transposes, copies and converts with their bytes, fused or not."""
    hlo = load_benchmark("kernels/hlo_census.py")
    text = """HloModule jit_single_step

%fused_computation.1 (p: bf16[4,8]) -> bf16[8,4] {
  %p = bf16[4,8]{1,0} parameter(0)
  ROOT %transpose.1 = bf16[8,4]{1,0} transpose(%p), dimensions={1,0}
}

ENTRY %main.9 (a: f32[4,8]) -> bf16[8,4] {
  %a = f32[4,8]{1,0} parameter(0)
  %convert.2 = bf16[4,8]{1,0} convert(%a), metadata={op_name="jit(single_step)/convert_element_type"}
  %add.3 = bf16[4,8]{1,0} add(%convert.2, %convert.2)
  ROOT %fusion.4 = bf16[8,4]{1,0} fusion(%add.3), kind=kLoop, calls=%fused_computation.1
}
"""
    records = hlo.census(text)
    assert [(r["op"], r["bytes"], r["computation"]) for r in records] == [
        ("transpose", 64, "fused_computation.1"), ("convert", 64, "main.9")]
    assert records[1]["op_name"] == "jit(single_step)/convert_element_type"


def test_quality_curve_groups_seed_scores_by_recipe_and_minutes(tmp_path):
    """benchmarks/quality/curve.py: rows join a curve through their 'curve' key; every seed is a point."""
    curve = load_benchmark("quality/curve.py")
    rows = [{"curve": "a", "pretrain_minutes": 3.0, "mnli_m": 66.0, "per_seed": {"m": [65.0, 67.0]}},
            {"curve": "a", "pretrain_minutes": 3, "mnli_m": 66.5},  # no per-seed scores: the median is the point
            {"curve": "a", "pretrain_minutes": 6.0, "mnli_m": 68.0, "per_seed": {"m": [68.0, 68.2]}},
            {"curve": "b", "pretrain_minutes": 6.0, "mnli_m": 69.0, "per_seed": {"m": [69.0]}},
            {"pretrain_minutes": 3.0, "mnli_m": 70.0},  # a lever's rung, not on a curve
            {"curve": "a", "pretrain_minutes": 12.0, "mnli_m": None}]  # not finetuned
    data = curve.curves(rows)
    assert {k: dict(v) for k, v in data.items()} == {"a": {3.0: [65.0, 67.0, 66.5], 6.0: [68.0, 68.2]},
                                                      "b": {6.0: [69.0]}}
    target = tmp_path / "curve.png"
    curve.draw(data, target)
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"



def test_quality_gap_counts_passes_and_sets_held_out_beside_training_loss():
    """benchmarks/quality/gap.py: tokens follow the logged batch sizes; the gap is held-out minus nearby training."""
    gap = load_benchmark("quality/gap.py")
    records = [{"step": 0, "split": "eval", "loss": 10.0},
               {"step": 50, "split": "train", "loss": 5.0, "batch_size": 2},
               {"step": 100, "split": "train", "loss": 4.0, "batch_size": 4},
               {"step": 100, "split": "eval", "loss": 4.3},
               {"step": 400, "split": "train", "loss": 3.0, "batch_size": 4},
               {"step": 400, "split": "eval", "loss": 3.2},
               {"step": 900, "split": "eval", "loss": 3.1}]  # no training record within the window: left out
    rows = gap.gap_rows(records, corpus_tokens=1000, seq_len=2, window=60)
    assert [r["step"] for r in rows] == [100, 400]
    assert [r["tokens"] for r in rows] == [50 * 2 * 2 + 50 * 4 * 2, 600 + 300 * 4 * 2]
    assert rows[0]["passes"] == 0.6 and rows[0]["train_loss"] == 4.5 and abs(rows[0]["gap"] + 0.2) < 1e-12
    assert abs(rows[1]["gap"] - 0.2) < 1e-12
    text = gap.table("run", rows, every=400)
    assert text.splitlines()[-1] == "| 400 | 0M | 3.0 | 3.200 | 3.000 | +0.200 |" and "| 100 |" not in text
