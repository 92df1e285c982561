"""End to end: `jaxbert pretrain` on a tiny synthetic corpus; SIGKILL + --resume is bit-identical; SIGTERM saves."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jaxbert import checkpoint as ckpt
from jaxbert import cli, config
from jaxbert.data.prepare import prepare
from jaxbert.tracking import read_jsonl

WORDS = ("the a cat dog sat on mat ran fast slow big small red blue house tree river city north south king queen "
         "over under near far old new").split()


def _corpus(path: Path) -> Path:
    rng = random.Random(0)
    docs = []
    for _ in range(300):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))).capitalize() + "."
                     for _ in range(rng.randint(2, 5))]
        docs.append(" ".join(sentences))
    path.write_text("\n\n".join(docs))
    return path


def _overrides(root: Path, **extra: object) -> list[str]:
    base = {"model.hidden": 32, "model.heads": 2, "model.ffn": 64, "model.max_positions": 64,
            "finetune.max_len": 64, "data.seq_len": 32, "data.max_predictions": 6, "data.val_fraction": 0.05,
            "data.source": root / "corpus.txt", "data.cache_dir": root / "cache", "tokenizer.vocab_size": 128,
            "train.micro_batch": 4, "train.batch_start": 4, "train.batch_end": 8, "train.batch_ramp_fraction": 0.3,
            "train.eval_batches": 2, "train.out_dir": root / "runs", "impl.log_every": 5, "tracking.plots": False}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A tiny corpus, prepared once (tokenizer and token streams cached under root/cache)."""
    root = tmp_path_factory.mktemp("pretrain")
    _corpus(root / "corpus.txt")
    prepare(config.load("tiny", _overrides(root)), progress=False)
    return root


def _env(root: Path) -> dict[str, str]:
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(root / "jax-cache"), JAX_PLATFORMS="cpu",
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


def _pretrain(root: Path, args: list[str], **popen) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "jaxbert.cli", "pretrain", "--quiet", "--config", "tiny", *args]
    return subprocess.Popen(cmd, env=_env(root), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **popen)


def _finish(process: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, out
    return out


def _wait_for(condition, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"run ended before the condition: {process.communicate()[0]}")
        if time.time() > deadline:
            process.kill()
            pytest.fail("timed out")
        time.sleep(0.02)


def _final_files(run_dir: Path) -> dict[str, bytes]:
    latest = ckpt.checkpoint_dirs(run_dir)[-1]
    return {name: (latest / name).read_bytes() for name in (ckpt.MODEL_FILE, ckpt.STATE_FILE)}


def test_sigkill_then_resume_is_bit_identical_to_an_uninterrupted_run(root):
    steps = 40
    common = _overrides(root, **{"train.steps": steps, "train.checkpoint_every": 2, "train.eval_every": 0})
    reference = root / "runs" / "reference"
    out = _finish(_pretrain(root, [*common, "train.run_name=reference"]))
    assert "held-out MLM" in out

    killed = root / "runs" / "killed"
    process = _pretrain(root, [*common, "train.run_name=killed"])
    _wait_for(lambda: bool(ckpt.checkpoint_dirs(killed)), process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    interrupted_at = int(ckpt.read_manifest(ckpt.checkpoint_dirs(killed)[-1], verify=False)["step"])
    assert interrupted_at < steps  # it really was killed mid-run

    out = _finish(_pretrain(root, [*common, "--resume", "--run-dir", str(killed)]))
    assert f"step {interrupted_at}" in out or "resuming" in out
    assert _final_files(killed) == _final_files(reference)  # parameters and optimizer state, bitwise
    final = ckpt.read_manifest(ckpt.checkpoint_dirs(killed)[-1])
    assert final["step"] == steps and final["data_position"] == ckpt.read_manifest(
        ckpt.checkpoint_dirs(reference)[-1])["data_position"]

    cfg, model, tokenizer_path = ckpt.load_pretrained(reference)  # the run dir is usable for finetuning
    assert cfg.model.vocab_size == model.config.vocab_size and (tokenizer_path / "tokenizer.json").is_file()
    records = read_jsonl(reference / "metrics.jsonl")
    evals = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [0, steps] and evals[-1]["loss"] < evals[0]["loss"]
    assert {"loss", "accuracy", "lr", "batch_size", "tokens_per_second"} <= set(records[1])
    assert (reference / "config.yaml").is_file()


def test_sigterm_saves_a_checkpoint_at_the_current_step(root):
    run = root / "runs" / "terminated"
    args = _overrides(root, **{"train.steps": 100000, "train.checkpoint_every": 0, "train.eval_every": 0,
                               "impl.log_every": 1, "train.run_name": "terminated"})
    process = _pretrain(root, args)
    metrics = run / "metrics.jsonl"
    _wait_for(lambda: metrics.is_file() and any(r["split"] == "train" for r in read_jsonl(metrics)), process)
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, out
    assert "--resume" in out
    saved = ckpt.checkpoint_dirs(run)
    assert len(saved) == 1 and 0 < ckpt.read_manifest(saved[0])["step"] < 100000


def test_resume_with_an_incompatible_config_is_one_clear_error(root):
    run = root / "runs" / "reference"
    if not ckpt.checkpoint_dirs(run):
        pytest.skip("needs the reference run of the resume test")
    process = _pretrain(root, [*_overrides(root, **{"model.hidden": 64}), "--resume", "--run-dir", str(run)])
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 1
    assert "incompatible config" in out and "model.hidden" in out and "Traceback" not in out


def test_data_made_with_another_tokenizer_is_one_clear_error(root, tmp_path):
    from jaxbert import pretrain
    from jaxbert.tokenizer import train_tokenizer

    prepared = next(p for p in (root / "cache").iterdir() if (p / "meta.json").is_file())
    other = train_tokenizer(["completely different words here"] * 50,
                            config.TokenizerConfig(vocab_size=64, min_frequency=1), progress=False)
    other.save(tmp_path / "tok")
    cfg = config.load("tiny", _overrides(root, **{"data.source": prepared, "tokenizer.path": tmp_path / "tok"}))
    with pytest.raises(ValueError, match="different vocabulary"):
        pretrain.load_data(cfg, echo=lambda s: None)
    missing = config.load("tiny", _overrides(root, **{"data.source": tmp_path / "nowhere"}))
    with pytest.raises((FileNotFoundError, ValueError), match="nowhere"):
        pretrain.load_data(missing, echo=lambda s: None)


def test_quickstart_reports_before_after_baseline_and_fill_mask(root):
    args = _overrides(root, **{"train.steps": 4, "train.run_name": "quick", "train.eval_every": 0})
    cmd = [sys.executable, "-m", "jaxbert.cli", "quickstart", "--quiet", *args]
    out = subprocess.run(cmd, env=_env(root), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    for expected in ("before training: loss", "after training:  loss", "unigram baseline", "fill-mask",
                     "(truth:", "checkpoint:"):
        assert expected in out.stdout
    assert "4 steps" in out.stdout and ckpt.checkpoint_dirs(root / "runs" / "quick")


def _saved_run(tmp_path: Path) -> tuple[Path, list[str]]:
    """A run directory holding only the config.yaml a tiny run (seq_len 32) would have written."""
    overrides = _overrides(tmp_path, **{"train.run_name": "r1", "model.vocab_size": 128})
    (tmp_path / "corpus.txt").write_text("unused")
    run = tmp_path / "runs" / "r1"
    config.save(config.load("tiny", overrides), run)
    return run, overrides


def test_resume_keeps_the_runs_corpus_and_config(tmp_path):  # issue 19, defect 3
    from jaxbert import pretrain

    run, _ = _saved_run(tmp_path)
    before = (run / "config.yaml").read_bytes()
    other = tmp_path / "other.yaml"
    other.write_text(f"data:\n  source: {tmp_path / 'elsewhere.txt'}\n")
    args = config.parse_args(cli.pretrain_parser(), ["--resume", "--run-dir", str(run), "--config", str(other)])
    with pytest.raises(ValueError, match=r"incompatible config: --config .*other.yaml gives data.source="):
        pretrain.resolve_config(args)
    args = config.parse_args(cli.pretrain_parser(), ["--resume", "--run-dir", str(run),
                                                       f"data.source={tmp_path / 'elsewhere.txt'}"])
    with pytest.raises(ValueError, match="'data.source': the run .* keeps its corpus"):
        pretrain.resolve_config(args)
    assert (run / "config.yaml").read_bytes() == before
    args = config.parse_args(cli.pretrain_parser(), ["--resume", "--run-dir", str(run)])
    cfg, run_dir = pretrain.resolve_config(args)
    assert run_dir == run and cfg.data.source == str(tmp_path / "corpus.txt") and cfg.data.seq_len == 32


def test_resume_of_a_run_saved_without_the_bias_key_keeps_its_biases(tmp_path):
    from jaxbert import pretrain

    run, _ = _saved_run(tmp_path)
    saved = run / "config.yaml"
    text = saved.read_text()
    assert text.count("  bias: false\n") == 1
    saved.write_text(text.replace("  bias: false\n", ""))  # as written when biases were the default
    args = config.parse_args(cli.pretrain_parser(), ["--resume", "--run-dir", str(run), "train.steps=9"])
    cfg, _ = pretrain.resolve_config(args)
    assert cfg.model.bias is True and cfg.train.steps == 9


def test_resume_overrides_are_checked_against_the_run(tmp_path):  # issue 19, defect 4
    from jaxbert import pretrain

    run, _ = _saved_run(tmp_path)
    # valid for the run (seq_len 32), invalid for the base preset (seq_len 128 masks 19 positions)
    argv = ["train.steps=7", "--resume", f"train.out_dir={tmp_path / 'runs'}", "train.run_name=r1",
            "data.max_predictions=5"]
    cfg, run_dir = pretrain.resolve_config(config.parse_args(cli.pretrain_parser(), argv))
    assert run_dir == run and cfg.train.steps == 7 and cfg.data.max_predictions == 5 and cfg.model.hidden == 32
    with pytest.raises(config.ConfigError, match="'data.max_predictions'"):
        pretrain.resolve_config(config.parse_args(cli.pretrain_parser(), [*argv, "data.max_predictions=1"]))


def test_shifted_windows_reach_the_training_loader_only(root, monkeypatch):
    from jaxbert import pretrain

    calls: list[tuple[int, int, bool]] = []
    real = pretrain.get_samples

    def spy(stream, seed, start, count, seq_len, *split, shift=False):
        calls.append((start + count, stream.n_chunks(seq_len, shift), shift))
        return real(stream, seed, start, count, seq_len, *split, shift=shift)

    monkeypatch.setattr(pretrain, "get_samples", spy)
    cfg = config.load("tiny", _overrides(root, **{"train.steps": 45, "train.checkpoint_every": 0,
                                                  "train.eval_every": 0, "data.shift_windows": True,
                                                  "train.run_name": "shifted"}))
    result = pretrain.pretrain(cfg, console=False)
    held_out, training = calls[0], calls[1:]
    assert held_out[2] is False and training and all(shift for _, _, shift in training)
    assert training[-1][0] > training[-1][1]  # the run went past its first epoch, where windows shift
    evals = [metrics["loss"] for _, metrics in result.evals]
    assert len(evals) == 2 and evals[-1] < evals[0]
