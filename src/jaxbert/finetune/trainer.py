"""Finetuning one task (``jaxbert finetune``): a classifier on one GLUE task, evaluated on dev every epoch; the
best epoch is kept.

Recipe: AdamW (betas ``finetune.beta1/beta2``, eps ``finetune.eps``, weight decay on weight matrices and
embeddings only, global-norm clipping), learning rate warmed up linearly then decayed linearly to zero, dropout
``finetune.dropout`` (hidden) and ``finetune.attention_dropout``. A run directory ``<finetune.out_dir>/<run_name>``
receives::

    config.yaml        the resolved config
    metrics.jsonl      one line per log interval and per dev evaluation
    best/              the best model by the task's score on dev (a finetuned-model dir, see jaxbert.finetune.model_dir)
    predictions/       <GLUE name>.tsv for every test split found (index, prediction), from the best model
    results.json       best epoch, dev metrics, task score

The training core is pretraining's (:mod:`jaxbert.train`): the same :class:`TrainState`, optimizer and update
(:func:`jaxbert.train.fused_step`); only the loss (:class:`ClassificationLoss`) and the data differ. Shapes are
few and fixed, so a run compiles once: training batches are padded to a multiple of ``impl.pad_multiple``
(capped at ``finetune.max_len``), evaluation batches to ``finetune.max_len``. Batches are built and sent to the
device in a background thread, the learning rate is a step input (no recompile between runs of a sweep), and the
loss is fetched from the device only every ``impl.log_every`` steps. ``--sweep`` runs a grid of batch sizes x
learning rates x seeds (see jaxbert.finetune.sweep).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from .. import config as config_lib
from .. import distributed, io
from .model_dir import Start, build_classifier, prepare_start, save_classifier
from ..config import Config, Kernels
from ..data.glue import Task
from ..data.loader import Prefetcher
from ..data.pairs import Batch, Encoded, eval_batches, steps_per_epoch, train_batches
from ..data.task_data import TaskData, load_task_data, resolve_task
from .metrics import compute, task_score
from ..model import BertForClassification
from ..optim import AdamWSettings, one_cycle
from ..precision import LossScale, Policy
from ..tracking import JsonlTracker, TensorBoardTracker, Trackers, WandbTracker
from ..train import TrainingDiverged, TrainState, fused_step, new_state

Log = Callable[[str], None]


# ------------------------------------------------------------------------------------------------- steps


def _device_batch(batch: Batch) -> tuple[np.ndarray, ...]:
    return batch.input_ids, batch.segment_ids, batch.mask, batch.labels, batch.weights


def batch_loss(model: BertForClassification, batch: tuple, key: Optional[jax.Array], policy: Policy,
               attention: str) -> jax.Array:
    """Mean cross-entropy (or squared error for a 1-output regression head) over rows of weight 1."""
    ids, segments, mask, labels, weights = batch
    out = model(ids, segments, mask, key=key, policy=policy, attention=attention)
    if model.num_labels == 1:
        per_row = jnp.square(out[:, 0] - labels.astype(jnp.float32))
    else:
        per_row = optax.softmax_cross_entropy_with_integer_labels(out, labels)
    per_row = jnp.where(weights > 0, per_row, 0.0)
    return per_row.sum() / jnp.maximum(weights.sum(), 1.0)


@dataclass(frozen=True)
class ClassificationLoss:
    """The finetuning objective of :func:`jaxbert.train.fused_step` (static: hashable settings only)."""

    policy: Policy
    attention: str | Kernels  # the model's kernels (impl.attention, impl.norm)

    def loss(self, model: BertForClassification, batch: tuple,
             key: Optional[jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
        return batch_loss(model, batch, key, self.policy, self.attention), {}


@functools.partial(jax.jit, static_argnames=("policy", "attention"))
def predict_step(model: BertForClassification, ids: jax.Array, segments: jax.Array, mask: jax.Array, *,
                 policy: Policy, attention: str) -> jax.Array:
    return model(ids, segments, mask, policy=policy, attention=attention)


def predict(model: BertForClassification, enc: Encoded, batch_size: int, pad_multiple: int, policy: Policy,
            attention: str) -> np.ndarray:
    """float32 head outputs ``(n, num_labels)`` in example order; one transfer from the device at the end.

    Batches are padded to a multiple of ``pad_multiple`` (``finetune.max_len``: one compiled shape)."""
    rows, outputs = [], []
    for batch in eval_batches(enc, batch_size, pad_multiple):
        ids, segments, mask = distributed.on_mesh_of(model, (batch.input_ids, batch.segment_ids, batch.mask))
        outputs.append(predict_step(model, ids, segments, mask, policy=policy, attention=attention))
        rows.append(batch.rows)
    result = np.zeros((len(enc), model.num_labels), np.float32)
    for r, out in zip(rows, jax.device_get(outputs)):
        real = r >= 0
        result[r[real]] = out[real]
    return result


def decide(task: Task, outputs: np.ndarray) -> np.ndarray:
    """Class ids (argmax) or regression scores from head outputs."""
    return outputs[:, 0] if task.regression else outputs.argmax(-1)


def dev_metrics(model: BertForClassification, task: Task, dev: dict[str, Encoded], cfg: Config,
             policy: Policy) -> dict[str, dict[str, float]]:
    """``{dev split: {metric: value}}``; every batch padded to ``finetune.max_len`` (one compiled step)."""
    results = {}
    for split, enc in dev.items():
        outputs = predict(model, enc, cfg.finetune.eval_batch_size, cfg.finetune.max_len, policy, cfg.impl.kernels)
        results[split] = compute(task.metrics, decide(task, outputs), enc.labels)
    return results


def prediction_strings(task: Task, outputs: np.ndarray) -> list[str]:
    """Predictions as the GLUE server expects them: label strings, or STS-B scores clipped to [0, 5]."""
    if task.regression:
        return [f"{v:.3f}" for v in np.clip(outputs[:, 0], 0.0, 5.0)]
    return [task.labels[i] for i in outputs.argmax(-1)]


def write_glue_tsv(path: Path, index: Sequence[str], predictions: Sequence[str]) -> Path:
    """``index<TAB>prediction`` rows under a header, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return io.write_atomic(path, "index\tprediction\n" + "".join(f"{i}\t{p}\n" for i, p in zip(index, predictions)))


# --------------------------------------------------------------------------------------------------- loop


@dataclass
class FinetuneResult:
    task: str
    run_dir: Path
    best_epoch: int  # 1-based
    score: float  # the task score (mean of metrics over dev splits) of the best epoch
    dev: dict[str, dict[str, float]]  # metrics of the best epoch
    model: Any = field(repr=False)  # the best model
    predictions: dict[str, Path] = field(default_factory=dict)  # GLUE submission name -> tsv
    history: list[dict[str, Any]] = field(default_factory=list, repr=False)
    dev_sizes: dict[str, int] = field(default_factory=dict)  # examples per dev split
    cfg: Optional[Config] = field(default=None, repr=False)  # the run's config
    tokenizer: Any = field(default=None, repr=False)


def make_tracker(cfg: Config, run_dir: Path) -> Trackers:
    """metrics.jsonl in the run dir (unless tracking.jsonl=false), Weights & Biases (tracking.wandb=true) and
    TensorBoard (tracking.tensorboard=true)."""
    trackers: list = [JsonlTracker(run_dir / "metrics.jsonl")] if cfg.tracking.jsonl else []
    if cfg.tracking.wandb:
        trackers.append(WandbTracker(cfg, run_dir, f"{run_dir.parent.name}-{run_dir.name}"))
    if cfg.tracking.tensorboard:
        trackers.append(TensorBoardTracker(run_dir / "tensorboard"))
    return Trackers(trackers)


def load_result(run_dir: Path) -> FinetuneResult:
    """The FinetuneResult of a finished run (from its ``results.json``); ``model`` is left None."""
    summary = json.loads((run_dir / "results.json").read_text())
    return FinetuneResult(summary["task"], run_dir, summary["best_epoch"], summary["score"], summary["dev"], None,
                          {k: Path(v) for k, v in summary["predictions"].items()}, summary["history"],
                          summary.get("dev_sizes", {}))


def _run_dir(cfg: Config, task: Task) -> Path:
    name = cfg.finetune.run_name or f"{task.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(cfg.finetune.out_dir) / name


_RUN_FILES = {"config.yaml", "metrics.jsonl", "best", "predictions", "tensorboard", "results.json"}


def fresh_run_dir(run_dir: Path, echo: Log) -> None:
    """Make ``run_dir`` ready for a new run. A finished run (``results.json``) is never overwritten; what an
    interrupted run left (its config, metrics, best model, predictions) is cleared, so the rerun starts clean;
    a directory holding anything else is refused."""
    if not run_dir.exists():
        return
    if (run_dir / "results.json").is_file():
        raise ValueError(f"'{run_dir}' holds a finished finetune run (results.json); choose another "
                         f"finetune.run_name, or remove it to run again")
    if not run_dir.is_dir():
        raise ValueError(f"finetune run dir '{run_dir}' exists and is not a directory")
    entries = list(run_dir.iterdir())
    foreign = sorted(e.name for e in entries if e.name not in _RUN_FILES and not e.name.startswith("."))
    if foreign:
        raise ValueError(f"finetune run dir '{run_dir}' exists and holds files a finetune run does not write "
                         f"({', '.join(foreign[:3])}); choose another finetune.run_name")
    if entries:
        echo(f"{run_dir}: clearing what an interrupted run left ({', '.join(sorted(e.name for e in entries))})")
    for entry in entries:
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


@dataclass(frozen=True)
class Plan:
    """The fixed parts of a run: schedule, step settings, mesh."""

    cfg: Config
    lrs: np.ndarray  # float32 learning rate of every step
    objective: ClassificationLoss
    optimizer: AdamWSettings
    policy: Policy
    mesh: Any

    @property
    def steps(self) -> int:
        return len(self.lrs)


def plan_run(cfg: Config, data: TaskData) -> Plan:
    f = cfg.finetune
    policy = Policy.from_name(f.precision)
    total = steps_per_epoch(len(data.train), f.batch_size) * f.epochs
    lrs = np.asarray(one_cycle(f.lr, f.warmup_fraction, 0.0)(np.arange(total) / total), np.float32)
    return Plan(cfg, lrs, ClassificationLoss(policy, cfg.impl.kernels), AdamWSettings.of(f), policy,
                distributed.finetuning_mesh(cfg))  # every local device, data parallel


def initial_state(plan: Plan, start: Start, task: Task) -> TrainState:
    """The model (the start's, with a new head drawn from the seed) in a fresh training state on the mesh."""
    k_head, k_train = jax.random.split(jax.random.PRNGKey(plan.cfg.finetune.seed))
    model = build_classifier(dataclasses.replace(start, cfg=plan.cfg), task, k_head)
    scale = LossScale.create(dynamic=plan.policy.needs_loss_scaling)
    return distributed.shard_state(_new_state(model, plan.optimizer, scale, k_train), plan.mesh)


@functools.partial(jax.jit, static_argnames="settings")
def _new_state(model: BertForClassification, settings: AdamWSettings, scale: LossScale, key: jax.Array) -> TrainState:
    """One dispatch instead of one per optimizer-state leaf. The model is copied: the state is donated to the
    steps, and the start's encoder must survive for the next run of a sweep."""
    return new_state(jax.tree.map(jnp.copy, model), settings, scale, key)


def _device_batches(plan: Plan, data: TaskData, epoch: int) -> Iterator[tuple]:
    f = plan.cfg.finetune
    for batch in train_batches(data.train, f.batch_size, plan.cfg.impl.pad_multiple, f.seed, epoch):
        yield distributed.distribute(_device_batch(batch), plan.mesh)  # rows split over the devices


def train_epoch(state: TrainState, plan: Plan, data: TaskData, epoch: int, bar: Any, tracker: Trackers) -> TrainState:
    """One pass over the training set; the state is donated to each step (use the returned one)."""
    cfg, pending = plan.cfg, []
    step = epoch * (plan.steps // cfg.finetune.epochs)
    with Prefetcher(_device_batches(plan, data, epoch), depth=max(cfg.impl.prefetch, 1)) as batches:
        for batch in batches:
            state, metrics = fused_step(state, batch, plan.lrs[step], plan.objective, plan.optimizer, plan.mesh)
            step += 1
            pending.append(metrics)
            if len(pending) >= cfg.impl.log_every:
                _log_losses(pending, step, epoch, bar, tracker, cfg.train.max_skipped_steps, data.task.name)
                pending = []
    if pending:
        _log_losses(pending, step, epoch, bar, tracker, cfg.train.max_skipped_steps, data.task.name)
    return state


def _log_losses(pending: list, step: int, epoch: int, bar: Any, tracker: Trackers, max_skipped: int, task: str) -> None:
    """Fetch the metrics since the last log (the only device sync of the training loop); stop on a run of
    non-finite steps."""
    fetched = jax.device_get(pending)
    bar.update(len(pending))
    mean, lr = float(np.mean([m["loss"] for m in fetched])), float(fetched[-1]["lr"])
    bar.set_postfix(loss=f"{mean:.4f}", lr=f"{lr:.2e}")
    tracker.log(step, {"loss": mean, "lr": lr, "epoch": float(epoch + 1),
                   "skipped_total": float(fetched[-1]["skipped_total"])}, "train")
    run = int(fetched[-1]["consecutive_skipped"])
    if run >= max_skipped:
        raise TrainingDiverged(f"{task}: {run} consecutive steps had a non-finite loss or gradients "
                               f"(train.max_skipped_steps={max_skipped}); check the labels and finetune.lr")


def _epochs(state: TrainState, plan: Plan, start: Start, data: TaskData, run_dir: Path,
            tracker: Trackers, progress: bool, save: bool) -> FinetuneResult:
    """Train and evaluate every epoch; the best epoch's model (saved under ``run_dir/best`` when ``save``)."""
    cfg, task = plan.cfg, data.task
    best: Optional[FinetuneResult] = None
    history = []
    with tqdm(total=plan.steps, desc=task.name, disable=not progress, dynamic_ncols=True) as bar:
        for epoch in range(cfg.finetune.epochs):
            started = time.time()
            state = train_epoch(state, plan, data, epoch, bar, tracker)
            dev = dev_metrics(state.model, task, data.dev, cfg, plan.policy)
            score = task_score(dev)
            record = {"epoch": float(epoch + 1), "score": score, "epoch_seconds": time.time() - started,
                      **{f"{split}/{m}": v for split, ms in dev.items() for m, v in ms.items()}}
            step = (epoch + 1) * (plan.steps // cfg.finetune.epochs)
            tracker.log(step, record, "eval")
            history.append({"step": step, **record})
            bar.write(f"{task.name} epoch {epoch + 1}: " + format_dev(dev) + f"  score {100 * score:.2f}  "
                      f"({record['epoch_seconds']:.1f} s)")
            if best is None or score > best.score:
                # a host copy: the state's buffers are donated to the next step
                best = FinetuneResult(task.name, run_dir, epoch + 1, score, dev, jax.device_get(state.model))
                if save:
                    save_classifier(run_dir / "best", cfg, best.model, start.tokenizer,
                                    {"task": task.name, "labels": list(task.labels), "epoch": epoch + 1,
                                     "score": score, "dev": dev, "init": start.source})
    assert best is not None
    best.history = history
    return best


def run(cfg: Config, start: Start, data: TaskData, *, progress: bool = True, save: bool = True,
        echo: Log = print) -> FinetuneResult:
    """Finetune ``start`` on ``data`` with ``cfg`` (a config as returned in ``start.cfg``); evaluate on dev every
    epoch, keep the best epoch's model, write test predictions and ``results.json``."""
    task, f = data.task, cfg.finetune
    if data.train is None or not data.dev:
        raise ValueError(f"task {task.name}: finetuning needs a train split and at least one dev split")
    run_dir = _run_dir(cfg, task)
    fresh_run_dir(run_dir, echo)
    config_lib.save(cfg, run_dir)
    plan = plan_run(cfg, data)
    state = initial_state(plan, start, task)
    echo(f"{task.name}: {len(data.train)} train examples, {f.epochs} epoch(s) of {plan.steps // f.epochs} steps, "
         f"batch {f.batch_size}, lr {f.lr:g}, {f.precision}; run dir {run_dir}")
    tracker = make_tracker(cfg, run_dir)
    try:
        best = _epochs(state, plan, start, data, run_dir, tracker, progress, save)
    finally:
        tracker.close()
    best.model = distributed.shard_state(best.model, plan.mesh)  # back on the devices, for predictions
    best.cfg, best.tokenizer = cfg, start.tokenizer
    best.dev_sizes = {split: len(enc) for split, enc in data.dev.items()}
    best.predictions = predict_tests(best.model, task, data, cfg, run_dir / "predictions", echo)
    _write_results(run_dir, best)
    return best


def format_dev(dev: dict[str, dict[str, float]]) -> str:
    return "  ".join(f"{split} " + " ".join(f"{m} {100 * v:.2f}" for m, v in ms.items()) for split, ms in dev.items())


def predict_tests(model: BertForClassification, task: Task, data: TaskData, cfg: Config, folder: Path,
                  echo: Log) -> dict[str, Path]:
    """Write ``<GLUE name>.tsv`` for every test split of ``data``; returns name -> path."""
    written = {}
    policy = Policy.from_name(cfg.finetune.precision)
    for split, (index, enc) in data.test.items():
        outputs = predict(model, enc, cfg.finetune.eval_batch_size, cfg.finetune.max_len, policy, cfg.impl.kernels)
        name = task.submission_name(split)
        written[name] = write_glue_tsv(folder / f"{name}.tsv", index, prediction_strings(task, outputs))
        echo(f"{task.name}: wrote {len(index)} {split} predictions to {written[name]}")
    return written


def _write_results(run_dir: Path, result: FinetuneResult) -> None:
    summary = {"task": result.task, "best_epoch": result.best_epoch, "score": result.score, "dev": result.dev,
               "dev_sizes": result.dev_sizes, "predictions": {k: str(v) for k, v in result.predictions.items()},
               "history": result.history}
    io.write_json(run_dir / "results.json", summary)


def finetune(cfg: Config, init: Optional[str] = None, *, progress: bool = True, echo: Log = print) -> FinetuneResult:
    """Load the init and the task's data, then :func:`run`."""
    cfg, task = resolve_task(cfg)  # a GLUE task, or finetune.task=custom described by its files
    if task.predicted_by is not None:
        raise ValueError(f"task {task.name} has no training data; it is predicted by the {task.predicted_by} "
                         f"model (jaxbert glue does this)")
    start = prepare_start(cfg, init, task)
    data = load_task_data(start.cfg, task, start.tokenizer, echo=echo)
    return run(start.cfg, start, data, progress=progress, echo=echo)
