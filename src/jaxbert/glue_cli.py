"""``jaxbert glue``: finetune on every GLUE task found, print a dev table and the GLUE average, write a submission.

Tasks without training data or dev labels in ``--glue-dir`` are skipped with the reason (here: QNLI has no
train split, QQP is absent). AX (the diagnostic set) is predicted by the MNLI model. The submission zip holds
``<TASK>.tsv`` (``index``, ``prediction``; label strings as the GLUE server expects them) for every task whose
test split was found: CoLA, SST-2, MRPC, STS-B, QQP, MNLI-m, MNLI-mm, QNLI, RTE, WNLI, AX.

GLUE average (the GLUE paper's convention): the unweighted mean of task scores, where a task's score is the
mean of its metrics (MRPC/QQP: F1 and accuracy; STS-B: Pearson and Spearman) and MNLI's the mean of its matched
and mismatched accuracies. It is over the tasks that ran (listed with it); the average without WNLI (as in the
BERT paper) is printed too.

Per-task overrides: ``rte:finetune.epochs=10`` applies to RTE only; plain ``key=value`` to every task. A task
whose data turns out unusable (bad columns, unknown labels) is reported and the others still run.
``--resume`` with the same ``finetune.run_name`` reuses the tasks already finished.
"""

from __future__ import annotations

import argparse
import json
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from . import config as config_lib
from .classifier import load_classifier, prepare_start
from .config import Config
from .data.glue import TASKS, Task, get_task, has_split, missing_reason, read_split
from .data.pairs import encode_split
from .data.task_data import load_task_data
from .finetune import (FinetuneResult, add_common_arguments, load_result, overrides_from, predict,
                       prediction_strings, run, write_predictions)
from .metrics import DISPLAY, glue_average
from .precision import Policy

GLUE_TASKS = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli")
Echo = Callable[[str], None]


@dataclass
class GlueReport:
    out_dir: Path
    results: dict[str, FinetuneResult] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # task -> reason
    predictions: dict[str, Path] = field(default_factory=dict)  # submission name -> tsv
    zip_path: Optional[Path] = None


def skip_reason(task: Task, glue_dir: str) -> Optional[str]:
    """Why ``task`` cannot be finetuned from ``glue_dir`` (None when it can)."""
    if not has_split(task, "train", glue_dir):
        return missing_reason(task, "train", glue_dir)
    if not any(has_split(task, s, glue_dir) for s in task.dev_splits):
        return missing_reason(task, task.dev_splits[0], glue_dir)
    return None


def split_overrides(overrides: Sequence[str]) -> tuple[list[str], dict[str, list[str]]]:
    """``task:key=value`` items apart from plain ``key=value`` ones."""
    common, per_task = [], {}
    for item in overrides:
        head, sep, rest = item.partition(":")
        if sep and "=" not in head:
            per_task.setdefault(get_task(head).name, []).append(rest)
        else:
            common.append(item)
    return common, per_task


def predict_ax(report: GlueReport, cfg: Config, echo: Echo) -> None:
    """AX predictions from the MNLI model (when both exist)."""
    ax, mnli = TASKS["ax"], report.results.get("mnli")
    if mnli is None:
        echo("AX: skipped (predicted by the MNLI model, which did not run)")
        return
    if not has_split(ax, "test", cfg.finetune.glue_dir):
        echo(f"AX: {missing_reason(ax, 'test', cfg.finetune.glue_dir)}; no AX predictions")
        return
    run_cfg = mnli.cfg or cfg
    data = read_split(ax, "test", run_cfg.finetune.glue_dir)
    enc = encode_split(data, mnli.tokenizer, run_cfg.finetune.max_len)
    outputs = predict(mnli.model, enc, run_cfg.finetune.eval_batch_size, run_cfg.impl.pad_multiple,
                      Policy.from_name(run_cfg.finetune.precision), run_cfg.impl.attention)
    path = write_predictions(mnli.run_dir / "predictions" / "AX.tsv", data.index, prediction_strings(ax, outputs))
    report.predictions["AX"] = path
    echo(f"AX: wrote {len(data)} predictions of the MNLI model to {path}")


def run_task(base: list[str], extra: list[str], args: argparse.Namespace, task: Task, out_dir: Path,
             echo: Echo) -> FinetuneResult:
    """Finetune one task into ``out_dir/<task>``; with ``--resume``, a finished run there is reused."""
    if args.resume and (out_dir / task.name / "results.json").is_file():
        echo(f"{task.name}: reusing the finished run in {out_dir / task.name}")
        result = load_result(out_dir / task.name)
        if task.name == "mnli":  # AX needs the model
            result.cfg, result.model, result.tokenizer, _ = load_classifier(out_dir / task.name / "best")
        return result
    cfg = config_lib.load(args.config, base + [f"finetune.task={task.name}", f"finetune.out_dir={out_dir}",
                                               f"finetune.run_name={task.name}"] + extra)
    start = prepare_start(cfg, args.init, task)
    data = load_task_data(start.cfg, task, start.tokenizer, echo=echo)
    result = run(start.cfg, start, data, progress=not args.no_progress, echo=echo)
    if task.name != "mnli":
        result.model = None  # only the MNLI model is needed later (AX): free the device memory
    return result


def run_glue(args: argparse.Namespace, tasks: Sequence[str], echo: Echo = print) -> GlueReport:
    """Finetune every task of ``tasks`` that has data; a task whose data is unusable is reported, not fatal."""
    common, per_task = split_overrides(args.overrides)
    base = overrides_from(args, common)
    cfg = config_lib.load(args.config, base)
    if args.resume and cfg.finetune.run_name is None:
        raise ValueError("--resume needs finetune.run_name=<name of the glue run to continue>")
    out_dir = Path(cfg.finetune.out_dir) / (cfg.finetune.run_name or f"glue-{time.strftime('%Y%m%d-%H%M%S')}")
    report = GlueReport(out_dir)
    for name in tasks:
        task = get_task(name)
        reason = skip_reason(task, cfg.finetune.glue_dir)
        if reason is None:
            try:
                result = run_task(base, per_task.get(task.name, []), args, task, out_dir, echo)
                report.results[task.name] = result
                report.predictions.update(result.predictions)
                continue
            except (ValueError, FileNotFoundError) as err:  # bad data or settings for this task only
                reason = f"failed: {err}"
        report.skipped[task.name] = reason
        echo(f"{task.name}: skipped ({reason})")
    if "mnli" in tasks:
        predict_ax(report, cfg, echo)
    return report


def format_table(report: GlueReport) -> str:
    """The dev table (x100), the GLUE average and its convention."""
    lines = [f"{'task':<6} {'split':<15} {'n':>6}  {'metrics':<32} {'score':>6}  epoch"]
    scores = {}
    for name, result in report.results.items():
        scores[name] = result.score
        for position, (split, metrics) in enumerate(result.dev.items()):
            shown = ", ".join(f"{DISPLAY[m]} {100 * v:.2f}" for m, v in metrics.items())
            score = f"{100 * result.score:6.2f}" if position == 0 else ""
            size = result.dev_sizes.get(split, 0)
            lines.append(f"{name:<6} {split:<15} {size:>6}  {shown:<32} {score:>6}  "
                         f"{result.best_epoch if position == 0 else ''}")
    if scores:
        lines.append(f"GLUE average over {len(scores)} task(s) ({', '.join(scores)}): "
                     f"{100 * glue_average(scores):.2f}")
        lines.append("  (mean of task scores; MRPC/QQP mean of F1 and acc, STS-B mean of Pearson and Spearman, "
                     "MNLI mean of matched and mismatched acc)")
        if "wnli" in scores and len(scores) > 1:
            rest = {k: v for k, v in scores.items() if k != "wnli"}
            lines.append(f"GLUE average without WNLI over {len(rest)} task(s): {100 * glue_average(rest):.2f}")
    for name, reason in report.skipped.items():
        lines.append(f"skipped {name}: {reason}")
    return "\n".join(lines)


def write_submission(predictions: dict[str, Path], zip_path: Path) -> Path:
    """A GLUE-server zip: ``<name>.tsv`` files at the top level (written atomically)."""
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = zip_path.with_name(f".{zip_path.name}.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name in sorted(predictions):
            archive.write(predictions[name], arcname=f"{name}.tsv")
    tmp.replace(zip_path)
    return zip_path


def _all_names() -> list[str]:
    return [t.submission_name(s) for n in GLUE_TASKS + ("ax",) for t in [TASKS[n]] for s in t.test_splits]


def finish(report: GlueReport, echo: Echo = print) -> None:
    """Print the table, write results.json / results.txt and the submission zip."""
    table = format_table(report)
    echo(table)
    report.out_dir.mkdir(parents=True, exist_ok=True)
    (report.out_dir / "results.txt").write_text(table + "\n")
    summary = {name: {"score": r.score, "best_epoch": r.best_epoch, "dev": r.dev, "run_dir": str(r.run_dir)}
               for name, r in report.results.items()}
    (report.out_dir / "results.json").write_text(json.dumps({"tasks": summary, "skipped": report.skipped}, indent=1))
    missing = [n for n in _all_names() if n not in report.predictions]
    if missing:
        echo(f"submission: no predictions for {', '.join(missing)} (task skipped or test split missing)")
    if report.predictions:
        report.zip_path = write_submission(report.predictions, report.out_dir / "submission.zip")
        echo(f"submission: {report.zip_path} ({', '.join(f'{n}.tsv' for n in sorted(report.predictions))})")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxbert glue", description=__doc__.split("\n\n")[0])
    parser.add_argument("--all", action="store_true", help="every GLUE task found in the data")
    parser.add_argument("--tasks", default=None, help="comma-separated tasks instead of --all (e.g. rte,mrpc)")
    parser.add_argument("--resume", action="store_true", help="reuse tasks already finished in the glue run named "
                        "by finetune.run_name (after a crash or an interruption)")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    if args.all == bool(args.tasks):
        parser.error("give exactly one of --all or --tasks")
    tasks = list(GLUE_TASKS) if args.all else [get_task(t).name for t in args.tasks.split(",") if t]
    report = run_glue(args, tasks)
    finish(report)
    return 0 if report.results else 1
