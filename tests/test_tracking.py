"""Trackers: JSONL, plots, console, and Weights & Biases (absent, and offline with a stand-in module)."""

from __future__ import annotations

import sys
import types

import pytest

from jaxbert import config
from jaxbert.tracking import (ConsoleTracker, JsonlTracker, PlotTracker, import_wandb, make_trackers,
                              read_jsonl)

TRAIN = {"loss": 4.0, "accuracy": 0.1, "lr": 1e-3, "batch_size": 8.0, "tokens_per_second": 1000.0,
         "progress": 0.5, "skipped": 0.0, "loss_scale": 1.0}


def test_jsonl_appends_and_survives_a_torn_last_line(tmp_path):
    path = tmp_path / "m.jsonl"
    tracker = JsonlTracker(path)
    tracker.log(1, TRAIN)
    tracker.log(2, {"loss": 3.0, "accuracy": 0.2}, "eval")
    tracker.close()
    with open(path, "a") as handle:
        handle.write('{"step": 3, "spl')  # a run killed mid-write
    records = read_jsonl(path)
    assert [(r["step"], r["split"]) for r in records] == [(1, "train"), (2, "eval")]
    assert records[1]["loss"] == 3.0


def test_plots_are_png_files(tmp_path):
    tracker = PlotTracker(tmp_path / "plots")
    for step in (1, 2, 3):
        tracker.log(step, dict(TRAIN, loss=4.0 - step))
    tracker.log(3, {"loss": 1.5, "accuracy": 0.3}, "eval")
    tracker.close()
    for name in ("loss", "accuracy", "lr"):
        assert (tmp_path / "plots" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_console_progress_counts_steps(capsys):
    tracker = ConsoleTracker(total=10)
    tracker.log(4, TRAIN)
    tracker.log(4, {"loss": 2.0, "accuracy": 0.5}, "eval")
    assert tracker.bar.n == 4
    tracker.close()
    captured = capsys.readouterr()
    assert "eval loss 2.0000" in captured.out + captured.err


def test_missing_wandb_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(ImportError, match="pip install wandb"):
        import_wandb()
    cfg = config.load("tiny", ["tracking.wandb=true"])
    with pytest.raises(ImportError, match="tracking.wandb=true needs the wandb package"):
        make_trackers(cfg, tmp_path, "run", console=False)


def test_wandb_runs_offline_without_an_api_key(tmp_path, monkeypatch):
    calls = {}

    class Run:
        def log(self, data, step):
            calls.setdefault("log", []).append((step, data))

        def finish(self):
            calls["finished"] = True

    def init(**kwargs):
        calls["init"] = kwargs
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = config.load("tiny", ["tracking.wandb=true", "tracking.project=proj", "tracking.plots=false"])
    trackers = make_trackers(cfg, tmp_path, "my-run", console=False)
    trackers.log(5, {"loss": 2.5}, "eval")
    trackers.close()
    assert calls["init"]["mode"] == "offline" and calls["init"]["project"] == "proj"
    assert calls["init"]["name"] == "my-run" and calls["init"]["config"]["preset"] == "tiny"
    assert calls["log"] == [(5, {"eval/loss": 2.5})] and calls["finished"]
    run_id = (tmp_path / "wandb_id").read_text()
    make_trackers(cfg, tmp_path, "my-run", console=False).close()  # a resumed run keeps its W&B id
    assert calls["init"]["id"] == run_id
    monkeypatch.setenv("WANDB_API_KEY", "x")
    make_trackers(cfg, tmp_path, "my-run", console=False).close()
    assert calls["init"]["mode"] == "online"
    assert read_jsonl(tmp_path / "metrics.jsonl")[0]["loss"] == 2.5


def test_jaxbert_imports_without_wandb():
    import subprocess

    code = ("import sys; sys.modules['wandb'] = None\n"
            "import jaxbert.pretrain, jaxbert.tracking, jaxbert.quickstart\nprint('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr


def test_tensorboard_event_file_reads_back(tmp_path):
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    cfg = config.load("tiny", ["tracking.tensorboard=true", "tracking.plots=false"])
    trackers = make_trackers(cfg, tmp_path, "tb-run", console=False)
    trackers.log(10, {"loss": 2.5, "lr": 1e-3}, "train")
    trackers.log(20, {"loss": 2.0, "lr": 5e-4}, "train")
    trackers.log(20, {"loss": 2.25, "accuracy": 0.125}, "eval")
    trackers.close()
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 1
    events = accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["eval/accuracy", "eval/loss", "train/loss", "train/lr"]
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(10, 2.5), (20, 2.0)]
    assert [(e.step, e.value) for e in events.Scalars("eval/accuracy")] == [(20, 0.125)]
    assert read_jsonl(tmp_path / "metrics.jsonl")[2] == {"step": 20, "split": "eval", "loss": 2.25, "accuracy": 0.125}


def test_missing_tensorboard_is_one_clear_error(tmp_path, monkeypatch):
    for name in [n for n in sys.modules if n.startswith("tensorboard.")] + ["tensorboard"]:
        monkeypatch.setitem(sys.modules, name, None)  # import tensorboard... -> ImportError
    cfg = config.load("tiny", ["tracking.tensorboard=true"])
    with pytest.raises(ValueError, match=r"tracking.tensorboard=true needs the tensorboard package: pip install"):
        make_trackers(cfg, tmp_path, "tb-run", console=False)


def test_jaxbert_imports_and_runs_without_tensorboard():
    import subprocess

    code = ("import sys; sys.modules['tensorboard'] = None\n"
            "import jaxbert, jaxbert.pretrain, jaxbert.finetune.trainer, jaxbert.inference.api, jaxbert.inference.cli\n"
            "from jaxbert import config, tracking\n"
            "tracking.make_trackers(config.load('tiny', ['tracking.plots=false', 'tracking.jsonl=false']), '.', 'r',"
            " console=False).close()\nprint('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr
