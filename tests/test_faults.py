"""Fault injection (issue 19): `prepare`, `tokenizer train` and `pretrain` under a full disk (a writer that fails
after N bytes) and under kill -9 at random points. Each case either behaves correctly or exits non-zero with one
line naming the file and what was expected; nothing already written is lost or overwritten, and a rerun or
resume gives byte-for-byte the output of an uninterrupted run."""

from __future__ import annotations

import errno
import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_pretrain import _corpus, _env, _final_files, _finish, _overrides, _pretrain, _wait_for

from jaxbert import checkpoint as ckpt
from jaxbert import cli, io as fileio

STEPS = 60  # pretraining runs: long enough to be killed between checkpoints
WORDS = ("a quiet harbour town keeps its boats painted in bright colours and every spring the fishermen mend "
         "their nets on the stone quay while gulls circle over the market").split()


class FullDisk:
    """``fileio.open_write`` replaced by files that accept ``limit`` bytes in all, then fail with ENOSPC."""

    def __init__(self, limit: int):
        self.left = limit

    def open(self, path: str | Path) -> "_LimitedFile":
        return _LimitedFile(open(path, "wb"), self)


class _LimitedFile:
    def __init__(self, handle, disk: FullDisk):
        self.handle, self.disk = handle, disk

    def write(self, data) -> int:
        data = bytes(data)
        if len(data) > self.disk.left:
            self.handle.write(data[: self.disk.left])  # a partial write, as on a real full disk
            self.disk.left = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self.disk.left -= len(data)
        return self.handle.write(data)

    def __getattr__(self, name):  # flush, fileno, close, name
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.handle.close()


def _write_corpus(path: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(12, 60))) for _ in range(n)]
    path.write_text("\n\n".join(docs) + "\n")
    return path


def _prepare_args(corpus: Path, cache: Path) -> list[str]:
    return ["--config", "tiny", "--quiet", f"data.source={corpus}", f"data.cache_dir={cache}",
            "tokenizer.vocab_size=256", "data.val_fraction=0.05", "data.min_doc_chars=10", "impl.encode_batch=64"]


def _snapshot(cache: Path) -> dict[str, bytes]:
    """Every file under a cache, meta.json without its timestamps."""
    files = {}
    for path in sorted(p for p in cache.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if path.name == "meta.json":
            meta = json.loads(data)
            meta.pop("created"), meta.pop("seconds")
            data = json.dumps(meta, sort_keys=True).encode()
        files[str(path.relative_to(cache))] = data
    return files


def _temporaries(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob("*") if ".tmp" in p.name or ".old-" in p.name]


def _one_error_line(err: str, command: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"jaxbert {command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


# ------------------------------------------------------------------------------------------ disk full


@pytest.fixture(scope="module")
def reference_cache(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("faults-prepare")
    corpus = _write_corpus(root / "corpus.txt", 2000)
    assert cli.main(["prepare", *_prepare_args(corpus, root / "cache")]) == 0
    return corpus, root / "cache"


@pytest.mark.parametrize("limit", [0, 3000, 20_000, 60_000])
def test_prepare_on_a_full_disk_fails_in_one_line_and_leaves_nothing(reference_cache, tmp_path, monkeypatch,
                                                                      capsys, limit):
    corpus, reference = reference_cache
    cache = tmp_path / "cache"
    kept = cache / "keep" / "meta.json"  # something already in the cache must survive
    kept.parent.mkdir(parents=True)
    kept.write_text("{}")
    capsys.readouterr()
    monkeypatch.setattr(fileio, "open_write", FullDisk(limit).open)
    assert cli.main(["prepare", *_prepare_args(corpus, cache)]) == 1
    line = _one_error_line(capsys.readouterr().err, "prepare")
    assert "cannot write '" in line and "No space left on device; expected free space" in line
    assert _temporaries(cache) == [] and kept.read_text() == "{}"
    assert not any((p / "meta.json").is_file() for p in cache.iterdir() if p.name not in ("keep", "tokenizers"))
    monkeypatch.undo()  # the disk has room again: the rerun gives exactly the uninterrupted result
    assert cli.main(["prepare", *_prepare_args(corpus, cache)]) == 0
    kept.unlink(), kept.parent.rmdir()
    assert _snapshot(cache) == _snapshot(reference)


def test_tokenizer_train_on_a_full_disk_fails_in_one_line_and_leaves_nothing(reference_cache, tmp_path,
                                                                             monkeypatch, capsys):
    corpus, _ = reference_cache
    out = tmp_path / "tok"
    monkeypatch.setattr(fileio, "open_write", FullDisk(5000).open)
    assert cli.main(["tokenizer", "train", "--config", "tiny", "--out", str(out), "--quiet",
                     f"data.source={corpus}", "tokenizer.vocab_size=256"]) == 1
    line = _one_error_line(capsys.readouterr().err, "tokenizer")
    assert "tokenizer.json" in line and "No space left on device" in line
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def pretrain_root(tmp_path_factory) -> Path:
    """A tiny corpus and an uninterrupted reference run of STEPS steps, checkpointed every 5."""
    root = tmp_path_factory.mktemp("faults-pretrain")
    _corpus(root / "corpus.txt")
    _finish(_pretrain(root, _pretrain_args(root, "reference")))
    return root


def _pretrain_args(root: Path, name: str) -> list[str]:
    return _overrides(root, **{"train.steps": STEPS, "train.checkpoint_every": 5, "train.eval_every": 0,
                               "train.run_name": name})


_DRIVER = ("import sys\nsys.path.insert(0, {tests!r})\nfrom test_faults import FullDisk\nfrom jaxbert import cli, "
           "io as fileio\nfileio.open_write = FullDisk({limit}).open\nsys.exit(cli.main({argv!r}))\n")


def test_pretrain_on_a_full_disk_exits_non_zero_and_keeps_the_last_checkpoint(pretrain_root):
    reference = pretrain_root / "runs" / "reference"
    one = sum(p.stat().st_size for p in ckpt.checkpoint_dirs(reference)[-1].rglob("*") if p.is_file())
    limit = (reference / "config.yaml").stat().st_size + 2 * one + one // 2  # room for two checkpoints
    argv = ["pretrain", "--quiet", "--config", "tiny", *_pretrain_args(pretrain_root, "full")]
    code = _DRIVER.format(tests=str(Path(__file__).parent), limit=limit, argv=argv)
    proc = subprocess.run([sys.executable, "-c", code], env=_env(pretrain_root), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    run = pretrain_root / "runs" / "full"
    assert f"final checkpoint (step {STEPS})" in errors[0] and f"of {run} was not written" in errors[0]
    assert "No space left on device" in errors[0] and "resume from step_00000010 with --resume" in errors[0]
    kept = ckpt.checkpoint_dirs(run)
    assert [p.name for p in kept] == ["step_00000005", "step_00000010"]
    for path in kept:
        ckpt.read_manifest(path, verify=True)  # complete and uncorrupted
    assert _temporaries(run) == []


# ------------------------------------------------------------------------------------------- kill -9


def _kill_after(cmd: list[str], seconds: float, env=None) -> int:
    process = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        process.wait()
    return process.returncode


def test_prepare_killed_at_random_points_then_rerun_is_byte_identical(reference_cache, tmp_path):
    corpus, reference = reference_cache
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "jaxbert.cli", "prepare", *_prepare_args(corpus, cache)]
    times = []
    for _ in range(2):  # how long a whole run takes: the faster of two (a loaded machine varies)
        started = time.perf_counter()
        assert subprocess.run(cmd, capture_output=True, timeout=300).returncode == 0
        times.append(time.perf_counter() - started)
        for folder in sorted(cache.iterdir()):
            subprocess.run(["rm", "-rf", str(folder)], check=True)
    whole = min(times)
    rng = random.Random(19)
    codes = [_kill_after(cmd, rng.uniform(0.2 * whole, 0.8 * whole)) for _ in range(4)]
    assert -signal.SIGKILL in codes  # at least one run really was killed
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert _temporaries(cache) == []
    assert _snapshot(cache) == _snapshot(reference)


def test_pretrain_killed_at_random_points_then_resumed_is_byte_identical(pretrain_root):
    run = pretrain_root / "runs" / "killed"
    rng = random.Random(19)
    killed_at = []  # the newest checkpoint's step after each kill
    for _ in range(3):
        resume = ["--resume", "--run-dir", str(run)] if ckpt.checkpoint_dirs(run) else []
        process = _pretrain(pretrain_root, [*_pretrain_args(pretrain_root, "killed"), *resume])
        target = rng.randrange(5, STEPS - 10, 5)  # kill soon after some checkpoint is complete, at a random moment
        _wait_for(lambda: any(int(p.name[5:]) >= target for p in ckpt.checkpoint_dirs(run)), process)
        time.sleep(rng.uniform(0.0, 0.2))
        process.send_signal(signal.SIGKILL)
        process.communicate()
        saved = ckpt.checkpoint_dirs(run)
        killed_at.append(int(saved[-1].name[len("step_"):]) if saved else 0)
    assert any(0 < step < STEPS for step in killed_at), killed_at  # at least one kill fell mid-training
    resume = ["--resume", "--run-dir", str(run)] if ckpt.checkpoint_dirs(run) else []
    _finish(_pretrain(pretrain_root, [*_pretrain_args(pretrain_root, "killed"), *resume]))
    assert ckpt.read_manifest(ckpt.checkpoint_dirs(run)[-1])["step"] == STEPS
    assert _final_files(run) == _final_files(pretrain_root / "runs" / "reference")
    assert _temporaries(run / "checkpoints") == []


# ------------------------------------------------------------------------------------------------ finetune


def _finetune_cmd(root: Path, name: str) -> list[str]:
    from test_finetune import WORDS as FT_WORDS, write_vocab

    vocab = write_vocab(root / "v.txt", FT_WORDS)
    return [sys.executable, "-m", "jaxbert.cli", "finetune", "--task", "rte", "--glue-dir", str(root / "glue"),
            "--config", "tiny", "--no-progress", "model.hidden=32", "model.heads=2", "model.ffn=64",
            "model.layers=1", "model.max_positions=64", "data.seq_len=64", "finetune.max_len=32",
            f"tokenizer.path={vocab}", "finetune.epochs=4", "finetune.batch_size=4", "finetune.dropout=0.0",
            "finetune.attention_dropout=0.0", f"finetune.out_dir={root / 'runs'}", f"finetune.run_name={name}"]


def _finetune_outputs(run: Path) -> dict[str, object]:
    """What a finished finetune run produced, without its timings."""
    results = json.loads((run / "results.json").read_text())
    results.pop("predictions")  # paths inside the run dir: compared as files below
    for record in results["history"]:
        record.pop("epoch_seconds")
    return {"model": (run / "best" / "model.safetensors").read_bytes(), "results": results,
            "predictions": {p.name: p.read_bytes() for p in sorted((run / "predictions").iterdir())}}


def test_finetune_killed_at_random_points_then_rerun_is_byte_identical_and_never_overwrites(tmp_path):
    """kill -9 anywhere in a finetune run, then the same command again: it clears what the killed run left and
    ends with the outputs of an uninterrupted run, byte for byte. The same run name once more is refused in one
    line (a finished run is never overwritten, issue 19 defect 5)."""
    import numpy as np
    from test_finetune import write_fixture_glue

    write_fixture_glue(tmp_path / "glue", np.random.default_rng(3))
    reference = subprocess.run(_finetune_cmd(tmp_path, "reference"), capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr
    killed, rng = tmp_path / "runs" / "killed", random.Random(15)
    # kill at random moments after the run reached a point: started, first metrics written, an epoch's best model
    landed = 0
    for marker in ("config.yaml", "metrics.jsonl", "best"):
        process = subprocess.Popen(_finetune_cmd(tmp_path, "killed"), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        _wait_for(lambda: (killed / marker).exists(), process)
        time.sleep(rng.uniform(0.0, 0.05))
        process.send_signal(signal.SIGKILL)
        code = process.wait()
        if (killed / "results.json").exists():  # the tiny run finished its work inside the delay: no kill to test
            assert code in (0, -signal.SIGKILL)
            shutil.rmtree(killed)
            continue
        assert code == -signal.SIGKILL
        landed += 1
    assert landed >= 2, "the runs finished before their kills"
    rerun = subprocess.run(_finetune_cmd(tmp_path, "killed"), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    runs = tmp_path / "runs"
    assert _finetune_outputs(runs / "killed") == _finetune_outputs(runs / "reference")
    assert not [p for p in runs.rglob("*") if ".tmp" in p.name or p.name.startswith(".old")]
    before = _finetune_outputs(runs / "killed")
    again = subprocess.run(_finetune_cmd(tmp_path, "killed"), capture_output=True, text=True, timeout=300)
    assert again.returncode == 1 and _one_error_line(again.stderr, "finetune").endswith(
        "holds a finished finetune run (results.json); choose another finetune.run_name, or remove it to run again")
    assert _finetune_outputs(runs / "killed") == before
