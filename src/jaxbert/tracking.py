"""Experiment tracking behind one small interface: console progress bar, JSONL file, PNG plots, Weights & Biases,
TensorBoard.

A tracker receives ``log(step, metrics, split)`` calls (``split`` is "train" or "eval") with plain floats,
already fetched from the device by the training loop, and ``close()`` at the end. :func:`make_trackers`
builds the set a run's config asks for. Weights & Biases and TensorBoard are imported only when enabled, so
jaxbert works without them; W&B runs offline unless ``WANDB_API_KEY`` is set (or ``WANDB_MODE`` says otherwise).
"""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path
from typing import Any, Protocol, Sequence

from . import config as config_lib
from .config import Config
from .io import atomic_file


class Tracker(Protocol):
    def log(self, step: int, metrics: dict[str, float], split: str = "train") -> None: ...

    def close(self) -> None: ...


class Trackers:
    """Fan-out to several trackers."""

    def __init__(self, trackers: Sequence[Tracker] = ()):
        self.trackers = list(trackers)

    def log(self, step: int, metrics: dict[str, float], split: str = "train") -> None:
        for tracker in self.trackers:
            tracker.log(step, metrics, split)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()


def _short(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.2e}"


class ConsoleTracker:
    """A tqdm bar over steps (or over the time budget, in seconds) showing loss, accuracy, lr, batch and tok/s."""

    def __init__(self, total: int, initial: int = 0, unit: str = "step", by_time: bool = False):
        from tqdm.auto import tqdm

        self.by_time = by_time
        self.bar = tqdm(total=total, initial=initial, unit=unit, dynamic_ncols=True, smoothing=0.1)

    def log(self, step: int, metrics: dict[str, float], split: str = "train") -> None:
        if split != "train":
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                              if k in ("loss", "accuracy", "masked_accuracy"))
            self.bar.write(f"step {step}: {split} {shown}")
            return
        position = round(metrics.get("progress", 0.0) * self.bar.total) if self.by_time else step
        self.bar.update(max(position - self.bar.n, 0))
        self.bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['accuracy']:.3f}",
                             lr=f"{metrics['lr']:.2e}", bs=int(metrics["batch_size"]),
                             tok_s=f"{metrics['tokens_per_second']:.0f}", refresh=False)
        if metrics.get("skipped", 0) > 0:
            self.bar.write(f"step {step}: skipped non-finite steps (loss scale {_short(metrics['loss_scale'])})")

    def close(self) -> None:
        self.bar.close()


class JsonlTracker:
    """One JSON object per line: ``{"step", "split", <metrics>}``; appended, so resumed runs continue it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(self.path, "a", encoding="utf-8")

    def log(self, step: int, metrics: dict[str, float], split: str = "train") -> None:
        self.handle.write(json.dumps({"step": step, "split": split, **metrics}) + "\n")
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics file (a torn last line, from a killed run, is ignored)."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


class PlotTracker:
    """PNG plots of loss, accuracy and learning rate (train and eval) in ``directory``; redrawn at every eval."""

    PLOTS = (("loss", "MLM loss"), ("accuracy", "MLM accuracy"), ("lr", "learning rate"))

    def __init__(self, directory: str | Path, history: Sequence[dict[str, Any]] = ()):
        self.directory = Path(directory)
        self.history: list[dict[str, Any]] = list(history)

    def log(self, step: int, metrics: dict[str, float], split: str = "train") -> None:
        self.history.append({"step": step, "split": split, **metrics})
        if split == "eval":
            self.draw()

    def draw(self) -> list[Path]:
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no global backend state
        from matplotlib.figure import Figure

        self.directory.mkdir(parents=True, exist_ok=True)
        written = []
        for name, title in self.PLOTS:
            figure = Figure(figsize=(6, 4), tight_layout=True)
            FigureCanvasAgg(figure)
            axes = figure.add_subplot()
            curves = [("train", name, "train"), ("eval", name, "eval")]
            if name == "accuracy":
                curves.append(("eval", "masked_accuracy", "eval, [MASK]ed positions"))
            for split, key, label in curves:
                points = [(r["step"], r[key]) for r in self.history if r["split"] == split and key in r]
                if points:
                    xs, ys = zip(*points)
                    axes.plot(xs, ys, marker="o" if split == "eval" else None, markersize=3, label=label)
            axes.set(xlabel="step", title=title)
            if axes.lines:
                axes.legend()
            target = self.directory / f"{name}.png"
            with atomic_file(target) as tmp:
                figure.savefig(tmp, format="png", dpi=100)
            written.append(target)
        return written

    def close(self) -> None:
        if self.history:
            self.draw()


class WandbTracker:
    """Weights & Biases; offline unless an API key is set. The run id is kept in the run dir for resuming."""

    def __init__(self, cfg: Config, run_dir: Path, run_name: str):
        wandb = import_wandb()
        id_file = Path(run_dir) / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else f"{run_name}-{secrets.token_hex(3)}"
        id_file.write_text(run_id)
        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        self.run = wandb.init(project=cfg.tracking.project, name=run_name, id=run_id, resume="allow",
                              dir=str(run_dir), mode=mode, config=config_lib.to_dict(cfg))

    def log(self, step: int, metrics: dict[str, float], split: str = "train") -> None:
        self.run.log({f"{split}/{k}": v for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        self.run.finish()


class TensorBoardTracker:
    """Scalars as a TensorBoard event file in ``directory``, tagged ``<split>/<metric>``; written with the
    tensorboard package's own event writer (imported only when enabled)."""

    def __init__(self, directory: str | Path):
        writer_class, self._summary, self._event = import_tensorboard()
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.writer = writer_class(str(directory))

    def log(self, step: int, metrics: dict[str, float], split: str = "train") -> None:
        values = [self._summary.Summary.Value(tag=f"{split}/{k}", simple_value=float(v)) for k, v in metrics.items()]
        self.writer.add_event(self._event.Event(wall_time=time.time(), step=int(step),
                                                summary=self._summary.Summary(value=values)))

    def close(self) -> None:
        self.writer.close()


class MissingDependency(ImportError, ValueError):
    """An optional package is needed but not installed (a ValueError too, so the CLI prints one line)."""


def import_wandb() -> Any:
    try:
        import wandb
    except ImportError:
        raise MissingDependency("tracking.wandb=true needs the wandb package: pip install wandb "
                          "(or pip install -e \".[wandb]\")") from None
    return wandb


def import_tensorboard() -> tuple[Any, Any, Any]:
    """(EventFileWriter, summary_pb2, event_pb2) from the tensorboard package (no TensorFlow needed)."""
    try:
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
    except ImportError:
        raise MissingDependency("tracking.tensorboard=true needs the tensorboard package: pip install tensorboard "
                                "(or pip install -e \".[tensorboard]\")") from None
    return EventFileWriter, summary_pb2, event_pb2


def make_trackers(cfg: Config, run_dir: str | Path, run_name: str, *, start_step: int = 0,
                  start_elapsed: float = 0.0, console: bool = True) -> Trackers:
    """The trackers the config asks for; plots and JSONL live in the run dir (continued when resuming)."""
    run_dir = Path(run_dir)
    trackers: list[Tracker] = []
    if cfg.tracking.wandb:
        trackers.append(WandbTracker(cfg, run_dir, run_name))  # first: a missing package fails before output
    if cfg.tracking.tensorboard:
        trackers.append(TensorBoardTracker(run_dir / "tensorboard"))
    if console:
        trackers.append(console_for(cfg, start_step, start_elapsed))
    metrics_file = run_dir / "metrics.jsonl"
    if cfg.tracking.jsonl:
        trackers.append(JsonlTracker(metrics_file))
    if cfg.tracking.plots:
        history = [r for r in read_jsonl(metrics_file) if r.get("step", 0) <= start_step] \
            if metrics_file.is_file() else []
        trackers.append(PlotTracker(run_dir / "plots", history))
    return Trackers(trackers)


def console_for(cfg: Config, start_step: int = 0, start_elapsed: float = 0.0) -> ConsoleTracker:
    """A bar over train.steps, or over the budget's seconds in time-budget mode."""
    budget = cfg.train.budget_minutes
    if budget is None:
        return ConsoleTracker(cfg.train.steps, initial=start_step)
    return ConsoleTracker(round(budget * 60), initial=min(round(start_elapsed), round(budget * 60)), unit="s",
                          by_time=True)
