"""``jaxbert pretrain``: config -> tokenizer + prepared data -> model -> training loop (eval, checkpoints, tracking).

Run directory (``<train.out_dir>/<run name>/``)::

    config.yaml        the resolved config (model.vocab_size set from the tokenizer)
    metrics.jsonl      train metrics every impl.log_every steps, eval metrics every train.eval_every steps
    plots/             loss.png, accuracy.png, lr.png (redrawn at every evaluation)
    checkpoints/       step_XXXXXXXX/ (the last train.keep_checkpoints), see jaxbert.checkpoint

``--resume`` continues the newest valid checkpoint of ``--run-dir`` (default: ``out_dir/run_name`` when a run
name is set, else the newest run under ``out_dir``). SIGTERM and Ctrl-C save a checkpoint before exiting.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import equinox as eqx
import jax
import numpy as np

from . import checkpoint as ckpt
from . import config as config_lib
from . import distributed
from .checkpoint import Progress
from .config import Config
from .data.loader import Prefetcher, get_samples
from .data.prepare import _STREAM_FIELDS, PreparedData, check_compatible, open_dataset, prepare, split_problem
from .tokenizer import load_tokenizer
from .tracking import Trackers, import_wandb, make_trackers
from .train import Periodic, TrainState, evaluate, init_state, make_spec, micro_batch_stream, run_loop


class CheckpointWriteError(OSError):
    """The run's last checkpoint could not be written (e.g. a full disk)."""

    def __str__(self) -> str:
        return str(self.strerror)


@dataclass
class PretrainResult:
    run_dir: Path
    cfg: Config
    state: TrainState
    progress: Progress
    reason: str  # "done" | "stopped" (a signal)
    checkpoint: Optional[Path]
    signal: Optional[int] = None  # the signal that stopped the run
    evals: list[tuple[int, dict[str, float]]] = field(default_factory=list)  # (step, held-out metrics)


def root_keys(cfg: Config) -> tuple[jax.Array, jax.Array]:
    """(state key, eval masking key), split once from train.seed by purpose."""
    k_state, k_eval = jax.random.split(jax.random.PRNGKey(cfg.train.seed))
    return k_state, k_eval


def load_data(cfg: Config, tokenizer: Any = None, echo: Callable[[str], None] = print) -> PreparedData:
    """The prepared dataset: ``data.source`` may name a prepared directory; otherwise prepare (or reuse) one."""
    source = Path(cfg.data.source)
    if (source / "meta.json").is_file():
        if tokenizer is None and cfg.tokenizer.path is not None:
            tokenizer = load_tokenizer(cfg.tokenizer.path, lowercase=cfg.tokenizer.lowercase)
        data = open_dataset(source, tokenizer, echo=echo)
    else:
        data = open_dataset(prepare(cfg, tokenizer), tokenizer, echo=echo)
    problem = split_problem(cfg, data.meta["splits"])
    if problem is not None:
        raise ValueError(f"{problem} ({data.path})")
    return data


def held_out_batches(cfg: Config, data: PreparedData) -> list[np.ndarray]:
    """The fixed held-out micro-batches: the first ``eval_batches`` micro-batches of the validation stream
    (fewer when it is short), so every evaluation of a run sees the same sequences."""
    mb, seq = cfg.train.micro_batch, cfg.data.seq_len
    count = max(1, min(cfg.train.eval_batches, data.validation.n_chunks(seq) // mb))
    rows = get_samples(data.validation, cfg.train.seed, 0, count * mb, seq)
    return [rows[i * mb:(i + 1) * mb] for i in range(count)]


def new_run_dir(cfg: Config, path: Optional[Path] = None) -> Path:
    """A run directory for a fresh run: ``path``, or ``out_dir/<run_name or preset-timestamp>``."""
    if path is None:
        name = cfg.train.run_name or f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
        path = Path(cfg.train.out_dir) / name
    if ckpt.checkpoint_dirs(path):
        raise ValueError(f"run directory '{path}' already has checkpoints: add --resume to continue it, "
                         "or choose another train.run_name")
    path.mkdir(parents=True, exist_ok=True)
    return path


def find_run_dir(out_dir: str | Path, run_name: Optional[str]) -> Path:
    """The run to resume: ``out_dir/run_name``, or the run under ``out_dir`` with the newest checkpoint."""
    if run_name:
        return Path(out_dir) / run_name
    runs = [p for p in Path(out_dir).glob("*") if ckpt.checkpoint_dirs(p)]
    if not runs:
        raise FileNotFoundError(f"no run with checkpoints under '{out_dir}' to resume (pass --run-dir)")
    return max(runs, key=lambda p: ckpt.checkpoint_dirs(p)[-1].stat().st_mtime)


@contextlib.contextmanager
def stop_requests() -> Iterator[Callable[[], Optional[int]]]:
    """While active, SIGTERM and the first Ctrl-C only set a flag (checked between steps); a second Ctrl-C
    interrupts at once. Yields a function returning the signal received, if any."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return

    def handler(signum: int, frame: Any) -> None:
        if received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        received.append(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: received[0] if received else None
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _start(cfg: Config, run_dir: Optional[Path], resume: bool,
           data: Optional[PreparedData]) -> tuple[Config, Path, PreparedData, TrainState, Progress]:
    """Resolve the run dir, data, tokenizer-sized config and the (fresh or restored) state."""
    if not resume:
        data = data or distributed.main_first(lambda: load_data(cfg))
        cfg = config_lib.replace(cfg, model={"vocab_size": data.tokenizer.vocab_size})
        run_dir = new_run_dir(cfg, run_dir)
        return cfg, run_dir, data, init_state(cfg, key=root_keys(cfg)[0]), Progress()
    run_dir = run_dir or find_run_dir(cfg.train.out_dir, cfg.train.run_name)
    latest = ckpt.checkpoint_dirs(run_dir)
    if not latest:
        raise FileNotFoundError(f"run '{run_dir}' has no checkpoint to resume from")
    tokenizer = load_tokenizer(latest[-1] / ckpt.TOKENIZER_DIR)  # the run's own tokenizer
    data = distributed.main_first(lambda: load_data(cfg, tokenizer))
    check_compatible(data.meta, tokenizer, where=f"data for run {run_dir}")
    cfg = config_lib.replace(cfg, model={"vocab_size": tokenizer.vocab_size})
    template = eqx.filter_eval_shape(init_state, cfg, key=root_keys(cfg)[0])
    state, progress, path = ckpt.restore_latest(run_dir, cfg, template)
    print(f"resuming {run_dir} from {path.name} (step {progress.step}, sample {progress.data_position})")
    return cfg, run_dir, data, state, progress


def pretrain(cfg: Config, *, run_dir: Optional[Path] = None, resume: bool = False, console: bool = True,
             data: Optional[PreparedData] = None) -> PretrainResult:
    """Train (or continue) a run; returns where it ended. Raises TrainingDiverged when the loss stays non-finite.

    ``data``: an already opened dataset for a fresh run (default: :func:`load_data`).
    """
    if cfg.tracking.wandb:
        import_wandb()  # fail before preparing data, not after
    mesh = distributed.pretraining_mesh(cfg)  # joins a multi-process run first, when one is configured
    cfg, run_dir, data, state, progress = _start(cfg, run_dir, resume, data)
    state, main = distributed.shard_state(state, mesh), distributed.is_main_process()
    distributed.check_same(progress.step, "the step to start from (is the run directory shared?)")
    if main:
        config_lib.save(cfg, run_dir)
    tok = data.tokenizer
    spec = make_spec(cfg, tok.special.as_tuple(), tok.special.mask, mesh, tok.vocab())
    trackers = make_trackers(cfg, run_dir, run_dir.name, start_step=progress.step,
                             start_elapsed=progress.elapsed_seconds, console=console) if main else Trackers([])
    result = PretrainResult(run_dir, cfg, state, progress, "done", None)
    failed: list[tuple[int, OSError]] = []  # the last checkpoint attempt, when it could not be written
    held_out, eval_key = distributed.distribute(held_out_batches(cfg, data), mesh), root_keys(cfg)[1]

    def run_eval(s: TrainState, p: Progress) -> None:
        metrics = evaluate(s.model, held_out, spec, eval_key)
        result.evals.append((p.step, metrics))
        trackers.log(p.step, metrics, "eval")

    def save(s: TrainState, p: Progress) -> None:
        host = distributed.to_host(s)  # a collective with several processes; the main one writes
        if not main:
            return
        failed.clear()
        try:
            result.checkpoint = ckpt.save_checkpoint(run_dir, cfg, host, p, data.tokenizer,
                                                     cfg.train.keep_checkpoints)
        except OSError as err:  # e.g. a full disk: the previous checkpoint stays valid, training goes on
            failed.append((p.step, err))
            if p.step < cfg.train.steps:  # a failure at the end is reported once, as the run's error
                print(f"warning: checkpoint at step {p.step} not written: {err}", file=sys.stderr)

    if progress.step == 0:
        run_eval(state, progress)
    split = distributed.process_split()  # each process reads only its slice of every global batch
    samples = lambda start, count: distributed.global_batch(get_samples(  # noqa: E731
        data.train, cfg.train.seed, start, count, cfg.data.seq_len, *split, shift=cfg.data.shift_windows), mesh)
    stream = micro_batch_stream(samples, progress.data_position, cfg.train.micro_batch)
    try:
        with stop_requests() as received, _prefetch(stream, cfg.impl.prefetch) as batches:
            hooks = [Periodic(cfg.train.eval_every, run_eval), Periodic(cfg.train.checkpoint_every, save,
                                                                       on_stop=True)]
            state, progress, reason = run_loop(cfg, state, progress, spec, batches, hooks=hooks,
                                               on_log=trackers.log, should_stop=distributed.agreed_stop(
                                                   lambda: received() is not None, cfg.impl.log_every))
            result.signal = received()
    finally:
        trackers.close()
    result.state, result.progress, result.reason = state, progress, reason
    if failed:  # the run's end is not on disk: say so and exit non-zero instead of reporting success
        step, err = failed[0]
        kept = ckpt.checkpoint_dirs(run_dir)
        resume = f"resume from {kept[-1].name} with --resume" if kept else "no checkpoint of this run is on disk"
        raise CheckpointWriteError(err.errno, f"the final checkpoint (step {step}) of {run_dir} was not written: "
                                              f"{err}; {resume}")
    return result


@contextlib.contextmanager
def _prefetch(stream: Iterator[np.ndarray], depth: int) -> Iterator[Iterator[Any]]:
    if depth < 1:
        yield stream
        return
    with Prefetcher(stream, depth=depth) as prefetched:  # the stream yields device arrays (global_batch)
        yield prefetched


def summary(result: PretrainResult) -> str:
    lines = [f"run directory: {result.run_dir}"]
    if result.evals:
        step, metrics = result.evals[-1]
        lines.append(f"held-out MLM at step {step}: loss {metrics['loss']:.4f}, accuracy {metrics['accuracy']:.4f}")
    if result.checkpoint is not None:
        lines.append(f"checkpoint: {result.checkpoint}")
    if result.cfg.tracking.plots:
        lines.append(f"plots: {result.run_dir / 'plots'}")
    return "\n".join(lines)


# keys that say what a run is trained on and what it trains: a resumed run keeps them
_RUN_SECTIONS = ("data", "tokenizer", "model")
_FREE_KEYS = ("model.vocab_size", "train.run_name", "train.out_dir", "data.cache_dir")  # derived or locations
_CORPUS_KEYS = tuple(f"data.{name}" for name in _STREAM_FIELDS) + tuple(
    f"tokenizer.{f.name}" for f in dataclasses.fields(config_lib.TokenizerConfig))


def _flat(cfg: Config) -> dict[str, Any]:
    return {f"{section}.{key}": value for section, values in config_lib.to_dict(cfg).items()
            if isinstance(values, dict) for key, value in values.items()}


def _override_value(overrides: Sequence[str], key: str, default: Any) -> Any:
    """The value ``key=...`` sets among ``overrides`` (the last one), without validating anything else."""
    for item in reversed(overrides):
        name, sep, value = item.partition("=")
        if sep and name.strip() == key:
            return value.strip() or default
    return default


def resume_config(run_dir: Path, overrides: Sequence[str], preset: Optional[str] = None) -> Config:
    """The config of a resumed run: the run's own config.yaml plus ``overrides`` (checked against the run, not a
    preset). Overrides may not switch the corpus or tokenizer; ``preset`` (``--config``) may only repeat the
    run's data, tokenizer and model settings (its other values are not used: the run's are kept, and said)."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise FileNotFoundError(f"run '{run_dir}' has no config.yaml to resume")
    base = config_lib.load(str(saved), stored=True)
    cfg = config_lib.load(str(saved), overrides, stored=True)
    before, after = _flat(base), _flat(cfg)
    switched = [k for k in _CORPUS_KEYS
                if before[k] != after[k] and not (k == "data.source" and _same_path(before[k], after[k]))]
    if switched:
        key = switched[0]
        raise ValueError(f"config key '{key}': the run {run_dir} was trained with {before[key]!r}, the override "
                         f"gives {after[key]!r}; a resumed run keeps its corpus and tokenizer (start a new run "
                         "to change them)")
    if preset is not None:
        other = _flat(config_lib.load(preset, overrides))
        differ = [k for k in after if k.split(".")[0] in _RUN_SECTIONS and k not in _FREE_KEYS
                  and other[k] != after[k] and not (k == "data.source" and _same_path(other[k], after[k]))]
        if differ:
            key = min(differ, key=lambda k: (k != "data.source", k not in _CORPUS_KEYS))  # a switched corpus first
            raise ValueError(f"incompatible config: --config {preset} gives {key}={other[key]!r}, the run "
                             f"{run_dir} has {after[key]!r} (in its config.yaml){' and more' if len(differ) > 1 else ''}"
                             f"; a resumed run continues its own config: drop --config, or override single keys "
                             f"with key=value")
        kept = [k for k in after if k not in _FREE_KEYS and other[k] != after[k]]
        if kept:
            print(f"note: --config {preset} differs from the run's config.yaml in {', '.join(kept[:3])}"
                  f"{', ...' if len(kept) > 3 else ''}; the run's values are kept (override them with key=value)")
    return cfg


def _same_path(a: Any, b: Any) -> bool:
    return Path(str(a)).expanduser().resolve() == Path(str(b)).expanduser().resolve()


def resolve_config(args: argparse.Namespace) -> tuple[Config, Optional[Path]]:
    """The config: preset + overrides; when resuming, the run's saved config + overrides (:func:`resume_config`)."""
    run_dir = args.run_dir
    if args.resume:
        defaults = config_lib.TrainConfig()
        run_dir = run_dir or find_run_dir(_override_value(args.overrides, "train.out_dir", defaults.out_dir),
                                          _override_value(args.overrides, "train.run_name", defaults.run_name))
        return resume_config(Path(run_dir), args.overrides, args.config), run_dir
    return config_lib.load(args.config or "base", args.overrides), run_dir
