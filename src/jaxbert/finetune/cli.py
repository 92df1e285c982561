"""The finetuning commands: ``jaxbert finetune`` (one task, see :mod:`jaxbert.finetune.trainer`) and
``jaxbert glue``: finetune on every GLUE task found, print a dev table and the GLUE average, write a submission.

Tasks without training data or dev labels in ``--glue-dir`` are skipped with the reason (here: QNLI has no
train split, QQP is absent). AX (the diagnostic set) is predicted by the MNLI model. The submission zip holds
``<TASK>.tsv`` (``index``, ``prediction``; label strings as the GLUE server expects them) for every task whose
test split was found: CoLA, SST-2, MRPC, STS-B, QQP, MNLI-m, MNLI-mm, QNLI, RTE, WNLI, AX.

GLUE average (the GLUE paper's convention): the unweighted mean of task scores, where a task's score is the
mean of its metrics (MRPC/QQP: F1 and accuracy; STS-B: Pearson and Spearman) and MNLI's the mean of its matched
and mismatched accuracies. It is over the tasks that ran (listed with it); the average without WNLI (as in the
BERT paper) is printed too.

Per-task overrides: ``rte:finetune.epochs=10`` applies to RTE only; plain ``key=value`` to every task. A task
whose data turns out unusable (bad columns, unknown labels) is reported, its run folder removed, the others still
run, and the command exits 1. ``--resume`` with the same ``finetune.run_name`` reuses the tasks already finished.

``--jobs N`` finetunes N tasks at once, each in its own process with 0.9/N of the GPU memory (a BERT-base
finetune needs a few GB; the small tasks leave a GPU mostly idle), largest tasks first. The default, 0, runs
``min(4, tasks)`` at once on a GPU and one at a time on a CPU. Parallel processes share compiled steps through
the persistent compilation cache (``impl.compilation_cache``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import shutil
import time
import zipfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from .. import config as config_lib
from .. import io
from .model_dir import load_classifier, prepare_start
from ..data.glue import TASKS, Task, get_task, has_split, missing_reason, read_split
from ..data.pairs import encode_split
from ..data.task_data import load_task_data
from .sweep import sweep_main
from .trainer import (FinetuneResult, format_dev, finetune, load_result, predict, prediction_strings, run,
                      write_glue_tsv)
from .metrics import DISPLAY, glue_average
from ..precision import Policy

FINETUNE_HELP = ("Finetune a classifier on one GLUE task (or a custom task), evaluate on dev every epoch, "
                 "keep the best.")
GLUE_HELP = "Finetune on every GLUE task found, print a dev table and the GLUE average, write a submission."
GLUE_TASKS = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli")
Echo = Callable[[str], None]


@dataclass
class GlueReport:
    out_dir: Path
    results: dict[str, FinetuneResult] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # task -> reason (no data for it)
    failed: dict[str, str] = field(default_factory=dict)  # task -> error
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


def predict_ax(mnli: FinetuneResult, echo: Echo) -> Optional[Path]:
    """AX predictions of the MNLI model, next to its own (None when the data has no AX test split)."""
    ax, cfg = TASKS["ax"], mnli.cfg
    assert cfg is not None and mnli.model is not None
    if not has_split(ax, "test", cfg.finetune.glue_dir):
        echo(f"AX: {missing_reason(ax, 'test', cfg.finetune.glue_dir)}; no AX predictions")
        return None
    data = read_split(ax, "test", cfg.finetune.glue_dir)
    enc = encode_split(data, mnli.tokenizer, cfg.finetune.max_len)
    outputs = predict(mnli.model, enc, cfg.finetune.eval_batch_size, cfg.finetune.max_len,
                      Policy.from_name(cfg.finetune.precision), cfg.impl.kernels)
    path = write_glue_tsv(mnli.run_dir / "predictions" / "AX.tsv", data.index, prediction_strings(ax, outputs))
    echo(f"AX: wrote {len(data)} predictions of the MNLI model to {path}")
    return path


@dataclass(frozen=True)
class TaskJob:
    """What one task's finetune needs: picklable, for a worker process."""

    task: str
    config: str  # --config
    common: tuple[str, ...]  # overrides for every task
    own: tuple[str, ...]  # this task's overrides (after the common ones)
    init: Optional[str]
    out_dir: Path
    resume: bool
    progress: bool


def run_task(job: TaskJob, echo: Echo = print) -> FinetuneResult:
    """Finetune one task into ``out_dir/<task>`` (a finished run there is reused with ``resume``); the MNLI run
    also predicts AX. The result keeps no model (device memory is freed)."""
    task, run_dir = get_task(job.task), job.out_dir / job.task
    if job.resume and (run_dir / "results.json").is_file():
        echo(f"{task.name}: reusing the finished run in {run_dir}")
        result = load_result(run_dir)
        if task.name == "mnli":  # AX is predicted again from the saved model
            result.cfg, result.model, result.tokenizer, _ = load_classifier(run_dir / "best")
    else:
        cfg = config_lib.load(job.config, [*job.common, f"finetune.task={task.name}", f"finetune.out_dir={job.out_dir}",
                                           f"finetune.run_name={task.name}", *job.own])
        start = prepare_start(cfg, job.init, task)
        data = load_task_data(start.cfg, task, start.tokenizer, echo=echo)
        result = run(start.cfg, start, data, progress=job.progress, echo=echo)
    if task.name == "mnli":
        path = predict_ax(result, echo)
        if path is not None:
            result.predictions["AX"] = path
    result.model = None
    return result


def _worker(job: TaskJob) -> FinetuneResult:
    """A task in a worker process of ``--jobs``: one line per message, no progress bar."""
    cfg = config_lib.load(job.config, list(job.common))
    config_lib.apply_runtime(cfg.impl)
    return run_task(job, echo=lambda line: print(line, flush=True))


def default_jobs(tasks: int) -> int:
    """``min(4, tasks)`` on a GPU, 1 elsewhere. Asks JAX for its backend without taking GPU memory."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax

    return min(4, tasks) if jax.default_backend() == "gpu" else 1


def _run_parallel(jobs: list[TaskJob], workers: int, report: GlueReport, echo: Echo) -> None:
    """Run ``jobs`` in ``workers`` processes (spawned: each starts its own JAX with its share of the GPU)."""
    memory = {"XLA_PYTHON_CLIENT_MEM_FRACTION": f"{0.9 / workers:.3f}"}
    preallocate = {"XLA_PYTHON_CLIENT_PREALLOCATE": "true"}  # each worker takes its share at once
    with config_lib.environment(preallocate, defaults=memory):
        echo(f"glue: {len(jobs)} task(s), {workers} at a time, each with "
             f"{float(os.environ['XLA_PYTHON_CLIENT_MEM_FRACTION']):.0%} of the GPU memory")
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_worker, job): job for job in jobs}
            for future in as_completed(futures):
                _record(report, futures[future], future.exception() or future.result(), echo)


def _record(report: GlueReport, job: TaskJob, outcome: FinetuneResult | BaseException, echo: Echo) -> None:
    """Keep a task's result, or report its failure and remove the run folder it left half-written."""
    if isinstance(outcome, FinetuneResult):
        report.results[job.task] = outcome
        report.predictions.update(outcome.predictions)
        return
    bad_input = isinstance(outcome, (ValueError, FileNotFoundError))
    report.failed[job.task] = str(outcome) if bad_input else f"{type(outcome).__name__}: {outcome}"
    if not (job.out_dir / job.task / "results.json").is_file():
        shutil.rmtree(job.out_dir / job.task, ignore_errors=True)
    echo(f"{job.task}: failed ({report.failed[job.task]})")


def run_glue(args: argparse.Namespace, tasks: Sequence[str], echo: Echo = print) -> GlueReport:
    """Finetune every task of ``tasks`` that has data; a task that fails is reported, the others still run."""
    common, per_task = split_overrides(args.overrides)
    base = overrides_from(args, common)
    cfg = config_lib.load(args.config, base)
    if args.resume and cfg.finetune.run_name is None:
        raise ValueError("--resume needs finetune.run_name=<name of the glue run to continue>")
    out_dir = Path(cfg.finetune.out_dir) / (cfg.finetune.run_name or f"glue-{time.strftime('%Y%m%d-%H%M%S')}")
    report = GlueReport(out_dir)
    jobs = []
    for name in tasks:
        task = get_task(name)
        reason = skip_reason(task, cfg.finetune.glue_dir)
        if reason is not None:
            report.skipped[task.name] = reason
            echo(f"{task.name}: skipped ({reason})")
            continue
        jobs.append(TaskJob(task.name, args.config, tuple(base), tuple(per_task.get(task.name, [])), args.init,
                            out_dir, args.resume, not args.no_progress))
    jobs.sort(key=lambda job: -_train_bytes(job.task, cfg.finetune.glue_dir))  # the longest first
    workers = min(args.jobs or default_jobs(len(jobs)), max(len(jobs), 1))
    if workers > 1:
        _run_parallel([dataclasses.replace(j, progress=False) for j in jobs], workers, report, echo)
    else:
        config_lib.apply_runtime(cfg.impl)
        for job in jobs:
            try:
                outcome: FinetuneResult | BaseException = run_task(job, echo)
            except (ValueError, FileNotFoundError) as err:  # bad data or settings for this task only
                outcome = err
            _record(report, job, outcome, echo)
    report.results = {t: report.results[t] for t in tasks if t in report.results}  # in the order asked
    return report


def _train_bytes(task: str, glue_dir: str) -> int:
    """A cheap size of a task's training data: bytes of its train files (0 when unknown)."""
    folder = Path(glue_dir) / get_task(task).folder
    return sum(f.stat().st_size for f in folder.glob("train*")) if folder.is_dir() else 0


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
    for name, reason in report.failed.items():
        lines.append(f"failed {name}: {reason}")
    return "\n".join(lines)


def write_submission(predictions: dict[str, Path], zip_path: Path) -> Path:
    """A GLUE-server zip: ``<name>.tsv`` files at the top level (written atomically)."""
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    with io.atomic_file(zip_path) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name in sorted(predictions):
            archive.write(predictions[name], arcname=f"{name}.tsv")
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
    (report.out_dir / "results.json").write_text(json.dumps({"tasks": summary, "skipped": report.skipped,
                                                              "failed": report.failed}, indent=1))
    missing = [n for n in _all_names() if n not in report.predictions]
    if missing:
        echo(f"submission: no predictions for {', '.join(missing)} (task skipped or test split missing)")
    if report.predictions:
        report.zip_path = write_submission(report.predictions, report.out_dir / "submission.zip")
        echo(f"submission: {report.zip_path} ({', '.join(f'{n}.tsv' for n in sorted(report.predictions))})")


def glue_main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxbert glue", description=GLUE_HELP)
    parser.add_argument("--all", action="store_true", help="every GLUE task found in the data")
    parser.add_argument("--tasks", default=None, help="comma-separated tasks instead of --all (e.g. rte,mrpc)")
    parser.add_argument("--resume", action="store_true", help="reuse tasks already finished in the glue run named "
                        "by finetune.run_name (after a crash or an interruption)")
    parser.add_argument("--jobs", type=int, default=0, help="tasks finetuned at once, each in its own process "
                        "(default 0: min(4, tasks) on a GPU, 1 on a CPU)")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    if args.all == bool(args.tasks):
        parser.error("give exactly one of --all or --tasks")
    tasks = list(GLUE_TASKS) if args.all else [get_task(t).name for t in args.tasks.split(",") if t]
    if args.jobs < 0:
        parser.error(f"--jobs {args.jobs}: expected 0 (automatic) or a positive number of processes")
    report = run_glue(args, tasks)
    finish(report)
    return 0 if report.results and not report.failed else 1



def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--init", default=None, help="pretrained run/checkpoint/model dir, a finetuned model dir, "
                        "or 'random' (needs tokenizer.path=); default random")
    parser.add_argument("--glue-dir", default=None, help="GLUE data: a directory in the GLUE layout, or 'hf' "
                        "(HuggingFace hub); sets finetune.glue_dir")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    config_lib.add_config_arguments(parser, default_preset="base")


def overrides_from(args: argparse.Namespace, overrides: Optional[Sequence[str]] = None,
                   **extra: Optional[str]) -> list[str]:
    """Dotlist overrides from the flags (``--glue-dir``, ``extra``) followed by ``overrides`` (default: the
    positional ones)."""
    out = [f"finetune.glue_dir={args.glue_dir}"] if args.glue_dir else []
    out += [f"finetune.{k}={v}" for k, v in extra.items() if v is not None]
    return out + list(args.overrides if overrides is None else overrides)


def finetune_main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxbert finetune", description=FINETUNE_HELP)
    parser.add_argument("--task", default=None, help="GLUE task (cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, "
                        "wnli), or custom with finetune.train_file= and finetune.dev_file=")
    add_common_arguments(parser)
    parser.add_argument("--sweep", action="store_true", help="grid of batch sizes x lrs x seeds (Turc et al.)")
    parser.add_argument("--batch-sizes", default=None, help="sweep batch sizes, comma-separated (8,16,32,64,128)")
    parser.add_argument("--lrs", default=None, help="sweep learning rates, comma-separated (3e-4,1e-4,5e-5,3e-5)")
    parser.add_argument("--seeds", type=int, default=None, help="sweep seeds per grid point (default 1)")
    args = parser.parse_args(argv)
    cfg = config_lib.load(args.config, overrides_from(args, task=args.task))
    config_lib.apply_runtime(cfg.impl)  # XLA flags, compilation cache: before anything starts the JAX backend
    if args.sweep:
        return sweep_main(cfg, args)
    if args.batch_sizes or args.lrs or args.seeds:
        parser.error("--batch-sizes, --lrs and --seeds need --sweep")
    result = finetune(cfg, args.init, progress=not args.no_progress)
    print(f"{result.task}: best epoch {result.best_epoch}, score {100 * result.score:.2f} ({format_dev(result.dev)});"
          f" model in {result.run_dir / 'best'}")
    return 0
