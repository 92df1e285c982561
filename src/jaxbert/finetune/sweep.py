"""``jaxbert finetune --sweep``: the hyperparameter grid of Turc et al. (2019), several seeds per point.

Default grid: batch sizes 8, 16, 32, 64, 128 x learning rates 3e-4, 1e-4, 5e-5, 3e-5, 4 epochs (unless
``finetune.epochs=`` is given), ``--seeds 1``. Each run keeps its best epoch by the task's dev score; a grid point
is summarised by the median and the best over its seeds, and the sweep reports the point with the best median
and the best single run. Data is read and encoded once; the compiled steps are shared by all runs. Only the
overall best model is saved (``<sweep dir>/best``); every run keeps its metrics and test predictions.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .. import config as config_lib
from .. import io
from .model_dir import Start, prepare_start, save_classifier
from ..config import Config
from ..data.task_data import TaskData, load_task_data, resolve_task
from .trainer import FinetuneResult, run

BATCH_SIZES = (8, 16, 32, 64, 128)
LEARNING_RATES = (3e-4, 1e-4, 5e-5, 3e-5)
EPOCHS = 4


@dataclass(frozen=True)
class Point:
    batch_size: int
    lr: float
    seed: int
    score: float
    best_epoch: int
    run_dir: str


def parse_list(text: Optional[str], kind: Callable[[str], Any], default: Sequence[Any], flag: str) -> tuple:
    """``"32,64"`` -> ``(32, 64)``; None -> ``default``; a clear error naming the flag otherwise."""
    if text is None:
        return tuple(default)
    try:
        values = tuple(kind(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise ValueError(f"{flag} '{text}': expected comma-separated numbers, e.g. {flag} "
                         f"{','.join(map(str, default[:2]))}") from None
    if not values or any(v <= 0 for v in values):
        raise ValueError(f"{flag} '{text}': expected positive values")
    return values


def summarise(points: Sequence[Point]) -> dict[str, Any]:
    """Median and best score per (batch size, lr); the point with the best median; the best single run."""
    grid: dict[tuple[int, float], list[Point]] = {}
    for p in points:
        grid.setdefault((p.batch_size, p.lr), []).append(p)
    rows = [{"batch_size": b, "lr": lr, "median": statistics.median(p.score for p in ps),
             "best": max(p.score for p in ps), "scores": [p.score for p in ps]} for (b, lr), ps in grid.items()]
    best_point = max(rows, key=lambda r: r["median"])
    best_run = max(points, key=lambda p: p.score)
    return {"grid": rows, "best_median": best_point, "best_run": asdict(best_run)}


def format_summary(task: str, summary: dict[str, Any]) -> str:
    lines = [f"{task} sweep (dev score x100; median and best over seeds)",
             f"{'batch':>6} {'lr':>8} {'median':>7} {'best':>7}  seeds"]
    for r in sorted(summary["grid"], key=lambda r: (r["batch_size"], -r["lr"])):
        seeds = " ".join(f"{100 * s:.2f}" for s in r["scores"])
        lines.append(f"{r['batch_size']:>6} {r['lr']:>8.0e} {100 * r['median']:>7.2f} {100 * r['best']:>7.2f}  {seeds}")
    b, run_ = summary["best_median"], summary["best_run"]
    lines.append(f"best median: batch {b['batch_size']}, lr {b['lr']:g}: {100 * b['median']:.2f}")
    lines.append(f"best run: batch {run_['batch_size']}, lr {run_['lr']:g}, seed {run_['seed']}, epoch "
                 f"{run_['best_epoch']}: {100 * run_['score']:.2f} ({run_['run_dir']})")
    return "\n".join(lines)


def sweep(cfg: Config, start: Start, data: TaskData, batch_sizes: Sequence[int], lrs: Sequence[float], seeds: int,
          *, sweep_dir: Path, progress: bool = True, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every (batch size, lr, seed); write ``summary.json`` and the overall best model into ``sweep_dir``."""
    points: list[Point] = []
    best: Optional[tuple[FinetuneResult, Config]] = None
    for batch_size in batch_sizes:
        for lr in lrs:
            for offset in range(seeds):
                seed = cfg.finetune.seed + offset
                name = f"{sweep_dir.name}/bs{batch_size}-lr{lr:g}-seed{seed}"
                run_cfg = config_lib.replace(cfg, finetune={"batch_size": batch_size, "lr": lr, "seed": seed,
                                                            "run_name": name, "out_dir": str(sweep_dir.parent)})
                result = run(run_cfg, start, data, progress=progress, save=False, echo=echo)
                points.append(Point(batch_size, lr, seed, result.score, result.best_epoch, str(result.run_dir)))
                if best is None or result.score > best[0].score:
                    best = (result, run_cfg)
    assert best is not None
    summary = summarise(points)
    summary["points"] = [asdict(p) for p in points]
    result, run_cfg = best
    save_classifier(sweep_dir / "best", run_cfg, result.model, start.tokenizer,
                    {"task": data.task.name, "labels": list(data.task.labels), "epoch": result.best_epoch,
                     "score": result.score, "dev": result.dev, "init": start.source, "run": str(result.run_dir)})
    io.write_json(sweep_dir / "summary.json", summary)
    return summary


def sweep_main(cfg: Config, args: argparse.Namespace) -> int:
    """The ``--sweep`` branch of ``jaxbert finetune``."""
    batch_sizes = parse_list(args.batch_sizes, int, BATCH_SIZES, "--batch-sizes")
    lrs = parse_list(args.lrs, float, LEARNING_RATES, "--lrs")
    seeds = args.seeds or 1
    if seeds < 1:
        raise ValueError(f"--seeds {seeds}: expected at least 1")
    if not any(o.startswith("finetune.epochs=") for o in args.overrides):
        cfg = config_lib.replace(cfg, finetune={"epochs": EPOCHS})
    cfg, task = resolve_task(cfg)
    start = prepare_start(cfg, args.init, task)
    data = load_task_data(start.cfg, task, start.tokenizer)
    name = cfg.finetune.run_name or f"{task.name}-sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    sweep_dir = Path(cfg.finetune.out_dir) / name
    sweep_dir.mkdir(parents=True, exist_ok=True)
    print(f"{task.name} sweep: batch sizes {list(batch_sizes)} x lrs {list(lrs)} x {seeds} seed(s), "
          f"{start.cfg.finetune.epochs} epochs; {sweep_dir}")
    summary = sweep(start.cfg, start, data, batch_sizes, lrs, seeds, sweep_dir=sweep_dir,
                    progress=not args.no_progress)
    print(format_summary(task.name, summary))
    print(f"summary: {sweep_dir / 'summary.json'}; best model: {sweep_dir / 'best'}")
    return 0
