"""``jaxbert finetune``: finetune a classifier on one GLUE task, evaluate on dev every epoch, keep the best.

Recipe: AdamW (betas 0.9/0.999, eps 1e-6, weight decay on weight matrices and embeddings only, global-norm
clipping), learning rate warmed up linearly then decayed linearly to zero, dropout ``finetune.dropout`` (hidden)
and ``finetune.attention_dropout``. A run directory ``<finetune.out_dir>/<run_name>`` receives::

    config.yaml        the resolved config
    metrics.jsonl      one line per log interval and per dev evaluation
    best/              the best model by the task's score on dev (a finetuned-model dir, see jaxbert.classifier)
    predictions/       <GLUE name>.tsv for every test split found (index, prediction), from the best model
    results.json       best epoch, dev metrics, task score

Speed: one compiled step per padded batch length (a few lengths, see ``impl.pad_multiple``), the learning
rate is a step input (no recompile between runs of a sweep), and the loss is fetched from the device only every
``impl.log_every`` steps. ``--sweep`` runs a grid of batch sizes x learning rates x seeds (see jaxbert.sweep).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from . import config as config_lib
from . import distributed
from .classifier import Start, build_classifier, prepare_start, save_classifier
from .config import Config
from .data.glue import Task
from .data.pairs import Batch, Encoded, eval_batches, steps_per_epoch, train_batches
from .data.task_data import TaskData, load_task_data, resolve_task
from .metrics import compute, task_score
from .model import BertForClassification
from .optim import one_cycle, set_learning_rate
from .precision import LossScale, Policy, all_finite
from .tracking import JsonlTracker, TensorBoardTracker, Trackers, WandbTracker

Log = Callable[[str], None]


# ------------------------------------------------------------------------------------------------- steps


def _decay_mask(params: Any) -> Any:
    """Weight decay on dense weights and embedding tables; not on biases or LayerNorm scales."""
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].name not in ("bias", "scale"), params)


@functools.lru_cache(maxsize=None)
def make_optimizer(weight_decay: float, clip_norm: float) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW with an injectable learning rate. Cached: equal settings give the same
    object, so the compiled step is shared by every run of a sweep."""
    adamw = optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
        learning_rate=0.0, b1=0.9, b2=0.999, eps=1e-6, weight_decay=weight_decay, mask=_decay_mask)
    return optax.chain(optax.clip_by_global_norm(clip_norm) if clip_norm > 0 else optax.identity(), adamw)


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


@eqx.filter_jit
def train_step(model: BertForClassification, opt_state: Any, scale: LossScale, batch: tuple, lr: jax.Array,
               step: jax.Array, key: jax.Array, *, optimizer: optax.GradientTransformation, policy: Policy,
               attention: str) -> tuple[BertForClassification, Any, LossScale, jax.Array]:
    """One optimizer step; pure: ``(model, opt_state, scale, batch, lr, step, key) -> (model, opt_state, scale,
    loss)``. Dropout uses ``fold_in(key, step)``. With fp16 a non-finite step is skipped (dynamic loss scale)."""
    params, static = eqx.partition(model, eqx.is_inexact_array)
    dropout = model.config.dropout > 0 or model.config.attention_dropout > 0
    step_key = jax.random.fold_in(key, step) if dropout else None  # no random bits when nothing is dropped

    def scaled(p: Any) -> tuple[jax.Array, jax.Array]:
        loss = batch_loss(eqx.combine(p, static), batch, step_key, policy, attention)
        return scale.scale_loss(loss), loss

    (_, loss), grads = jax.value_and_grad(scaled, has_aux=True)(params)
    grads = scale.unscale(grads)
    updates, new_opt = optimizer.update(grads, set_learning_rate(opt_state, lr), params)
    new_params = optax.apply_updates(params, updates)
    if scale.dynamic:
        finite = all_finite(grads)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        new_params, new_opt, scale = keep(new_params, params), keep(new_opt, opt_state), scale.update(finite)
    return eqx.combine(new_params, static), new_opt, scale, loss


@eqx.filter_jit
def predict_step(model: BertForClassification, ids: jax.Array, segments: jax.Array, mask: jax.Array, *,
                 policy: Policy, attention: str) -> jax.Array:
    return model(ids, segments, mask, policy=policy, attention=attention)


def predict(model: BertForClassification, enc: Encoded, batch_size: int, pad_multiple: int, policy: Policy,
            attention: str) -> np.ndarray:
    """float32 head outputs ``(n, num_labels)`` in example order; one transfer from the device at the end."""
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


def evaluate(model: BertForClassification, task: Task, dev: dict[str, Encoded], cfg: Config,
             policy: Policy) -> dict[str, dict[str, float]]:
    """``{dev split: {metric: value}}``."""
    results = {}
    for split, enc in dev.items():
        outputs = predict(model, enc, cfg.finetune.eval_batch_size, cfg.impl.pad_multiple, policy, cfg.impl.attention)
        results[split] = compute(task.metrics, decide(task, outputs), enc.labels)
    return results


def prediction_strings(task: Task, outputs: np.ndarray) -> list[str]:
    """Predictions as the GLUE server expects them: label strings, or STS-B scores clipped to [0, 5]."""
    if task.regression:
        return [f"{v:.3f}" for v in np.clip(outputs[:, 0], 0.0, 5.0)]
    return [task.labels[i] for i in outputs.argmax(-1)]


def write_predictions(path: Path, index: Sequence[str], predictions: Sequence[str]) -> Path:
    """``index<TAB>prediction`` rows under a header, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("index\tprediction\n" + "".join(f"{i}\t{p}\n" for i, p in zip(index, predictions)))
    tmp.replace(path)
    return path


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


def _train_epoch(state: dict[str, Any], data: TaskData, epoch: int, bar: Any, log: Trackers,
                 env: dict[str, Any]) -> None:
    """One pass over the training set; ``state`` holds model, opt_state, scale, step (updated in place)."""
    cfg, pending = env["cfg"], []
    for batch in train_batches(data.train, cfg.finetune.batch_size, cfg.impl.pad_multiple, cfg.finetune.seed,
                               epoch):
        lr = env["lrs"][min(state["step"], len(env["lrs"]) - 1)]
        arrays = distributed.distribute(_device_batch(batch), env["mesh"])  # rows split over the devices
        state["model"], state["opt_state"], state["scale"], loss = train_step(
            state["model"], state["opt_state"], state["scale"], arrays, lr,
            np.int32(state["step"]), env["key"], optimizer=env["optimizer"], policy=env["policy"],
            attention=cfg.impl.attention)
        state["step"] += 1
        pending.append(loss)
        bar.update(1)
        if len(pending) >= cfg.impl.log_every:
            _log_losses(pending, state["step"], float(lr), epoch, bar, log)
            pending = []
    if pending:
        _log_losses(pending, state["step"], float(lr), epoch, bar, log)


def _log_losses(pending: list, step: int, lr: float, epoch: int, bar: Any, log: Trackers) -> None:
    """Fetch the mean of the losses since the last log (the only device sync of the training loop)."""
    mean = float(np.mean(jax.device_get(pending)))
    bar.set_postfix(loss=f"{mean:.4f}", lr=f"{lr:.2e}")
    log.log(step, {"loss": mean, "lr": lr, "epoch": float(epoch + 1)}, "train")


def _initial_state(cfg: Config, start: Start, data: TaskData) -> tuple[dict[str, Any], dict[str, Any]]:
    """The mutable loop state (model, optimizer state, loss scale, step) and the fixed environment of a run."""
    f = cfg.finetune
    k_head, k_train = jax.random.split(jax.random.PRNGKey(f.seed))
    policy = Policy.from_name(f.precision)
    model = build_classifier(dataclasses.replace(start, cfg=cfg), data.task, k_head)
    optimizer = make_optimizer(f.weight_decay, f.clip_norm)
    total = steps_per_epoch(len(data.train), f.batch_size) * f.epochs
    lrs = np.asarray(one_cycle(f.lr, f.warmup_fraction, 0.0)(np.arange(total) / total), np.float32)
    mesh = distributed.finetuning_mesh(cfg)  # every local device, data parallel
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    state = {"model": distributed.shard_state(model, mesh), "opt_state": distributed.shard_state(opt_state, mesh),
             "step": 0, "scale": LossScale.create(dynamic=policy.needs_loss_scaling)}
    return state, {"cfg": cfg, "lrs": lrs, "key": k_train, "optimizer": optimizer, "policy": policy, "mesh": mesh}


def _epochs(state: dict[str, Any], env: dict[str, Any], start: Start, data: TaskData, run_dir: Path,
            log: Trackers, progress: bool, save: bool) -> FinetuneResult:
    """Train and evaluate every epoch; the best epoch's model (saved under ``run_dir/best`` when ``save``)."""
    cfg, task = env["cfg"], data.task
    best: Optional[FinetuneResult] = None
    history = []
    with tqdm(total=len(env["lrs"]), desc=task.name, disable=not progress, dynamic_ncols=True) as bar:
        for epoch in range(cfg.finetune.epochs):
            started = time.time()
            _train_epoch(state, data, epoch, bar, log, env)
            dev = evaluate(state["model"], task, data.dev, cfg, env["policy"])
            score = task_score(dev)
            record = {"epoch": float(epoch + 1), "score": score, "epoch_seconds": time.time() - started,
                      **{f"{split}/{m}": v for split, ms in dev.items() for m, v in ms.items()}}
            log.log(state["step"], record, "eval")
            history.append({"step": state["step"], **record})
            bar.write(f"{task.name} epoch {epoch + 1}: " + _describe(dev) + f"  score {100 * score:.2f}")
            if best is None or score > best.score:
                best = FinetuneResult(task.name, run_dir, epoch + 1, score, dev, state["model"])
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
    config_lib.save(cfg, run_dir)
    state, env = _initial_state(cfg, start, data)
    echo(f"{task.name}: {len(data.train)} train examples, {f.epochs} epoch(s) of "
         f"{len(env['lrs']) // f.epochs} steps, batch {f.batch_size}, lr {f.lr:g}, {f.precision}; run dir {run_dir}")
    log = make_tracker(cfg, run_dir)
    try:
        best = _epochs(state, env, start, data, run_dir, log, progress, save)
    finally:
        log.close()
    best.cfg, best.tokenizer = cfg, start.tokenizer
    best.dev_sizes = {split: len(enc) for split, enc in data.dev.items()}
    best.predictions = predict_tests(best.model, task, data, cfg, run_dir / "predictions", echo)
    _write_results(run_dir, best)
    return best


def _describe(dev: dict[str, dict[str, float]]) -> str:
    return "  ".join(f"{split} " + " ".join(f"{m} {100 * v:.2f}" for m, v in ms.items()) for split, ms in dev.items())


def predict_tests(model: BertForClassification, task: Task, data: TaskData, cfg: Config, folder: Path,
                  echo: Log) -> dict[str, Path]:
    """Write ``<GLUE name>.tsv`` for every test split of ``data``; returns name -> path."""
    written = {}
    policy = Policy.from_name(cfg.finetune.precision)
    for split, (index, enc) in data.test.items():
        outputs = predict(model, enc, cfg.finetune.eval_batch_size, cfg.impl.pad_multiple, policy, cfg.impl.attention)
        name = task.submission_name(split)
        written[name] = write_predictions(folder / f"{name}.tsv", index, prediction_strings(task, outputs))
        echo(f"{task.name}: wrote {len(index)} {split} predictions to {written[name]}")
    return written


def _write_results(run_dir: Path, result: FinetuneResult) -> None:
    summary = {"task": result.task, "best_epoch": result.best_epoch, "score": result.score, "dev": result.dev,
               "dev_sizes": result.dev_sizes, "predictions": {k: str(v) for k, v in result.predictions.items()},
               "history": result.history}
    tmp = run_dir / ".results.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    tmp.replace(run_dir / "results.json")


def finetune(cfg: Config, init: Optional[str] = None, *, progress: bool = True, echo: Log = print) -> FinetuneResult:
    """Load the init and the task's data, then :func:`run`."""
    cfg, task = resolve_task(cfg)  # a GLUE task, or finetune.task=custom described by its files
    if task.predicted_by is not None:
        raise ValueError(f"task {task.name} has no training data; it is predicted by the {task.predicted_by} "
                         f"model (jaxbert glue does this)")
    start = prepare_start(cfg, init, task)
    data = load_task_data(start.cfg, task, start.tokenizer, echo=echo)
    return run(start.cfg, start, data, progress=progress, echo=echo)


# ---------------------------------------------------------------------------------------------------- CLI


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


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxbert finetune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default=None, help="GLUE task (cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, "
                        "wnli), or custom with finetune.train_file= and finetune.dev_file=")
    add_common_arguments(parser)
    parser.add_argument("--sweep", action="store_true", help="grid of batch sizes x lrs x seeds (Turc et al.)")
    parser.add_argument("--batch-sizes", default=None, help="sweep batch sizes, comma-separated (8,16,32,64,128)")
    parser.add_argument("--lrs", default=None, help="sweep learning rates, comma-separated (3e-4,1e-4,5e-5,3e-5)")
    parser.add_argument("--seeds", type=int, default=None, help="sweep seeds per grid point (default 1)")
    args = parser.parse_args(argv)
    cfg = config_lib.load(args.config, overrides_from(args, task=args.task))
    if args.sweep:
        from .sweep import sweep_main

        return sweep_main(cfg, args)
    if args.batch_sizes or args.lrs or args.seeds:
        parser.error("--batch-sizes, --lrs and --seeds need --sweep")
    result = finetune(cfg, args.init, progress=not args.no_progress)
    print(f"{result.task}: best epoch {result.best_epoch}, score {100 * result.score:.2f} ({_describe(result.dev)});"
          f" model in {result.run_dir / 'best'}")
    return 0
