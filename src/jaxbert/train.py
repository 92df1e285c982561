"""The training core: :class:`TrainState`, the one optimizer update, pure jitted steps, and the MLM loop.

Pretraining and finetuning share everything but the loss and the data: the state (:class:`TrainState`), the
optimizer (:func:`jaxbert.optim.make_optimizer`), and the update (:func:`update`: clip, finite check and skip,
AdamW, loss-scale bookkeeping, step and key advance). Every step is a ``jax.jit`` function of the state with its
buffers donated; nothing waits for the device between steps.

* :func:`fused_step`: forward/backward of an :class:`Objective` on one batch, then the update (finetuning).
* MLM pretraining accumulates: one optimizer step is ``k`` calls of :func:`micro_step` (forward/backward on one
  micro-batch, gradients of the *summed* loss added into a carried float32 :class:`Accumulator`) followed by one
  :func:`apply_step` (divide by the number of predictions, then the update). ``k`` may change from step to step
  (the batch-size ramp) without recompiling anything. A step of one micro-batch takes :func:`single_step` (the
  same numbers in one program, no gradient buffer); compilation in the middle of a run is not counted as
  training time (:class:`CompileClock`).

Masking happens inside the step: the state's key is split once per optimizer step, and each row's mask is drawn
from ``fold_in(mask_key, row index within the step)``, so a step's masks do not depend on how its batch is cut
into micro-batches (dropout, off by default for pretraining, is drawn per micro-batch). Non-finite gradients
skip the update (parameters and optimizer state are kept bitwise), halve the fp16 loss scale and are counted
in the metrics. With ``train.precision=fp8_delayed`` the state also carries the amax histories of the encoder's
FP8 matmuls (``TrainState.fp8``): each micro-step records its amaxes, and :func:`apply_step` rolls their max in.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Protocol, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from .checkpoint import Progress
from .config import Config, Kernels
from .data.mlm import MLMBatch, continuation_table, mask_tokens
from .distributed import constrain
from .model import BertForMLM, mlm_of, pretraining_model
from .model.electra import electra_sums
from .model.fp8_delayed import Fp8History
from .optim import AdamWSettings, make_optimizer, micro_batches_at, progress_at, schedule_for, set_learning_rate
from .precision import LossScale, Policy, all_finite


@dataclass(frozen=True)
class StepSpec:
    """Static (hashable) settings of the jitted steps."""

    policy: Policy
    special_ids: tuple[int, ...]
    mask_id: int
    vocab_size: int
    mlm_probability: float
    max_predictions: int
    optimizer: AdamWSettings
    attention: str | Kernels = "auto"  # the model's kernels (impl.attention, impl.norm)
    remat: bool = False
    mesh: Any = None  # a jax.sharding.Mesh: the steps pin state/accumulator shardings to it (jaxbert.distributed)
    objective: str = "mlm"  # "mlm" or "electra" (train.objective)
    electra_weight: float = 50.0
    # whole-word masking (data.whole_word_masking): jaxbert.data.mlm.continuation_table of the vocabulary
    # (bytes: hashable, and hashed once); None masks single tokens
    continuation: Optional[bytes] = None
    fp8_margin: float = 0.0  # precision fp8_delayed: headroom of the scales (train.fp8_margin)
    mlm_logits: str = "float32"  # the MLM logits' dtype: float32 or the compute dtype (train.mlm_logits)


def make_spec(cfg: Config, special_ids: Sequence[int], mask_id: int, mesh: Any = None,
              vocab: Optional[Sequence[str]] = None) -> StepSpec:
    """The step settings of a run: precision, masking (ids and, for whole-word masking, the vocabulary from the
    tokenizer), kernel implementations."""
    continuation = None
    if cfg.data.whole_word_masking:
        if vocab is None:
            raise ValueError("data.whole_word_masking: the tokenizer's vocabulary is needed to find word pieces")
        continuation = continuation_table(vocab)
    return StepSpec(Policy.from_name(cfg.train.precision), tuple(int(i) for i in special_ids), int(mask_id),
                    cfg.model.vocab_size, cfg.data.mlm_probability, cfg.data.max_predictions,
                    AdamWSettings.of(cfg.train), cfg.impl.kernels, cfg.impl.remat, mesh,
                    objective=cfg.train.objective, electra_weight=cfg.train.electra_weight,
                    continuation=continuation, fp8_margin=cfg.train.fp8_margin, mlm_logits=cfg.train.mlm_logits)


class TrainState(eqx.Module):
    model: Any  # float32 master parameters: BertForMLM (pretraining) or BertForClassification (finetuning)
    opt_state: Any
    loss_scale: LossScale
    step: jax.Array  # int32: optimizer steps taken (skipped ones included)
    key: jax.Array  # uint32[2]: split once per step
    skipped: jax.Array  # int32: steps skipped for non-finite gradients, in total
    consecutive_skipped: jax.Array  # int32: ... in a row, up to now
    # precision fp8_delayed: the amax histories of the encoder's FP8 matmuls (not trained: the optimizer never
    # sees them; apply_step rolls each step's amaxes in). None for every other precision.
    fp8: Optional[Fp8History] = None


def new_state(model: Any, settings: AdamWSettings, loss_scale: LossScale, key: jax.Array,
              fp8: Optional[Fp8History] = None) -> TrainState:
    """The state of a run that starts training ``model``; ``key`` is its training randomness."""
    def zero() -> jax.Array:  # distinct buffers: donated arguments must not alias
        return jnp.zeros((), jnp.int32)

    return TrainState(model, make_optimizer(settings, model).init(model), loss_scale, zero(), key, zero(), zero(),
                      fp8)


def init_state(cfg: Config, *, key: jax.Array) -> TrainState:
    """A fresh pretraining state: the key is split by purpose (model init, training randomness)."""
    k_init, k_train = jax.random.split(key)
    policy = Policy.from_name(cfg.train.precision)
    scale = LossScale.create(cfg.train.loss_scale_init, cfg.train.loss_scale_period, policy.needs_loss_scaling)
    model = pretraining_model(cfg.model, cfg.train.objective, cfg.train.electra_generator, key=k_init)
    fp8 = Fp8History.create(cfg.model.layers, cfg.train.fp8_history) if policy.fp8_delayed else None
    return new_state(model, AdamWSettings.of(cfg.train), scale, k_train, fp8)


class Accumulator(eqx.Module):
    grads: Any  # float32, shaped like the model: gradient of the summed loss
    loss_sum: jax.Array
    weight_sum: jax.Array  # number of real predictions
    correct_sum: jax.Array
    amax: Optional[jax.Array] = None  # precision fp8_delayed: (layers, 6, 3) max of the micro-batches' amaxes


# The hot steps use jax.jit, not eqx.filter_jit: filter_jit blocks the host until every call has finished
# (to surface eqx.error_if messages), so Python could never run ahead of the GPU and each call's dispatch left
# the device idle (measured in benchmarks/RESULTS.md). All their array arguments are pytrees of arrays; the step
# settings are static.
@functools.partial(jax.jit, static_argnames="mesh")  # one dispatch instead of ~180 eager zeros
def zero_accumulator(model: BertForMLM, mesh: Any = None, fp8: Optional[Fp8History] = None) -> Accumulator:
    """A zero accumulator for ``model`` (and, with ``fp8``, for the amaxes of its delayed-scaling matmuls)."""
    grads = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), model)
    amax = None if fp8 is None else jnp.zeros(fp8.amax.shape[:-1], jnp.float32)
    return constrain(Accumulator(grads, *(jnp.zeros((), jnp.float32) for _ in range(3)), amax), mesh)


def _step_keys(key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(next state key, mask key, dropout key) of the step that starts from ``key``."""
    next_key, step_key = jax.random.split(key)
    mask_key, dropout_key = jax.random.split(step_key)
    return next_key, mask_key, dropout_key


def mask_rows(ids: jax.Array, key: jax.Array, offset: jax.Array, spec: StepSpec) -> MLMBatch:
    """MLM-mask each row with its own key ``fold_in(key, offset + row)``."""
    rows = offset + jnp.arange(ids.shape[0], dtype=jnp.int32)
    keys = jax.vmap(lambda r: jax.random.fold_in(key, r))(rows)
    table = None if spec.continuation is None else np.frombuffer(spec.continuation, np.uint8) > 0

    def one(row: jax.Array, k: jax.Array) -> MLMBatch:
        out = mask_tokens(row[None], k, special_ids=spec.special_ids, mask_id=spec.mask_id,
                          vocab_size=spec.vocab_size, probability=spec.mlm_probability,
                          max_predictions=spec.max_predictions, continuation=table)
        return jax.tree.map(lambda x: x[0], out)

    return jax.vmap(one)(ids, keys)


def _predictions(model: BertForMLM, batch: MLMBatch, spec: StepSpec, key: Optional[jax.Array],
                 fp8_scales: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
    """Per-slot float32 cross-entropy and correctness ``(b, m)``, from logits at the masked positions only (kept
    in ``spec.mlm_logits``: float32 or the compute dtype)."""
    return model.mlm_predictions(batch.input_ids, batch.positions, batch.targets, key=key, policy=spec.policy,
                                 attention=spec.attention, remat=spec.remat, fp8_scales=fp8_scales,
                                 logits=spec.mlm_logits)


def mlm_sums(model: BertForMLM, batch: MLMBatch, spec: StepSpec, key: Optional[jax.Array],
             fp8_scales: Optional[jax.Array] = None) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """(summed weighted cross-entropy, (number of predictions, number correct)), float32, sparse logits."""
    nll, correct = _predictions(model, batch, spec, key, fp8_scales)
    return jnp.sum(nll * batch.weights), (jnp.sum(batch.weights), jnp.sum(correct * batch.weights))


_SAMPLE_STREAM = 0x7FFFFFFF  # ELECTRA's sampling keys: fold_in(mask key, this), then the row index


def pretraining_sums(model: Any, ids: jax.Array, batch: MLMBatch, spec: StepSpec, dropout_key: Optional[jax.Array],
                     mask_key: jax.Array, offset: jax.Array,
                     fp8_scales: Optional[jax.Array] = None) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """(summed loss, (number of predictions, number correct)) of the pretraining objective on one micro-batch.

    ``mlm``: the MLM cross-entropy. ``electra``: the generator's MLM loss plus ``electra_weight`` times the
    discriminator's per-token loss (scaled to the predictions, see :func:`jaxbert.model.electra.electra_sums`);
    accuracy is the generator's. Each row samples its replacements from ``fold_in(mask_key, ...)`` and its row
    index, so a step does not depend on how its batch is cut into micro-batches. ``fp8_scales``: the delayed
    scaling of the encoder's FP8 matmuls (mlm only)."""
    if spec.objective != "electra":
        return mlm_sums(model, batch, spec, dropout_key, fp8_scales)
    rows = offset + jnp.arange(ids.shape[0], dtype=jnp.int32)
    stream = jax.random.fold_in(mask_key, _SAMPLE_STREAM)
    keys = jax.vmap(lambda r: jax.random.fold_in(stream, r))(rows)
    total, sums = electra_sums(model, ids, batch, sample_keys=keys, dropout_key=dropout_key, policy=spec.policy,
                               attention=spec.attention, discriminator_weight=spec.electra_weight)
    return total, (sums["predictions"], sums["mlm_correct"])


def _micro_grads(state: TrainState, ids: jax.Array, offset: jax.Array,
                 spec: StepSpec) -> tuple[Any, jax.Array, jax.Array, jax.Array, Optional[jax.Array]]:
    """(float32 gradients of the summed loss, summed loss, predictions, correct, FP8 amaxes) of one micro-batch.

    With FP8 delayed scaling the matmuls use the scales of ``state.fp8``; the "gradient" of those scales is the
    micro-batch's amaxes (:mod:`jaxbert.model.fp8_delayed`); None for every other precision.
    """
    _, mask_key, dropout_key = _step_keys(state.key)
    batch = mask_rows(ids, mask_key, offset, spec)
    slots = float(ids.shape[0] * spec.max_predictions)  # keeps the backward pass at mean-loss magnitude
    scales = None if state.fp8 is None else state.fp8.scales(spec.fp8_margin)

    def scaled_loss(diff: tuple) -> tuple[jax.Array, tuple]:
        model, fp8_scales = diff
        total, aux = pretraining_sums(model, ids, batch, spec, jax.random.fold_in(dropout_key, offset), mask_key,
                                      offset, fp8_scales)
        return state.loss_scale.scale_loss(total / slots), (total, aux)

    (grads, amax), (total, (weight, correct)) = eqx.filter_grad(scaled_loss, has_aux=True)((state.model, scales))
    grads = jax.tree.map(lambda g: g.astype(jnp.float32) * slots, state.loss_scale.unscale(grads))
    return grads, total, weight, correct, amax


@functools.partial(jax.jit, static_argnames="spec", donate_argnums=1)
def micro_step(state: TrainState, accum: Accumulator, ids: jax.Array, offset: jax.Array,
               spec: StepSpec) -> Accumulator:
    """Add one micro-batch's gradients (rows ``offset ...`` of the current step) into ``accum``.

    ``accum``, ``ids`` and ``offset`` are donated: pass fresh arrays and use the returned accumulator. FP8
    delayed scaling: the micro-batch's amaxes are max-ed into ``accum.amax``.
    """
    grads, total, weight, correct, amax = _micro_grads(state, ids, offset, spec)
    summed = jax.tree.map(jnp.add, accum.grads, grads)
    amax = None if amax is None else jnp.maximum(accum.amax, amax)
    return constrain(Accumulator(summed, accum.loss_sum + total, accum.weight_sum + weight,
                                 accum.correct_sum + correct, amax), spec.mesh)


def _select(pred: jax.Array, new: Any, old: Any) -> Any:
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), new, old)


def update(state: TrainState, grads: Any, lr: jax.Array, settings: AdamWSettings,
           loss_finite: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
    """The one optimizer update of every objective (traced inside the jitted steps).

    ``grads`` are unscaled float gradients of the mean loss. When they (or the loss) are not finite the step is
    skipped: parameters and optimizer state are kept bitwise, the loss scale halves, the skip is counted.
    """
    finite = jnp.logical_and(all_finite(grads), loss_finite)
    opt_state = set_learning_rate(state.opt_state, lr)
    updates, new_opt = make_optimizer(settings, state.model).update(grads, opt_state, state.model)
    model = _select(finite, eqx.apply_updates(state.model, updates), state.model)
    opt_state = _select(finite, new_opt, state.opt_state)
    skipped = (~finite).astype(jnp.int32)
    next_key, _, _ = _step_keys(state.key)
    new = TrainState(model, opt_state, state.loss_scale.update(finite), state.step + 1, next_key,
                     state.skipped + skipped, (state.consecutive_skipped + skipped) * skipped, state.fp8)
    metrics = {"grad_norm": optax.tree.norm(grads), "lr": jnp.asarray(lr, jnp.float32),
               "loss_scale": state.loss_scale.scale, "skipped": skipped, "skipped_total": new.skipped,
               "consecutive_skipped": new.consecutive_skipped}
    return new, metrics


@functools.partial(jax.jit, static_argnames="spec", donate_argnums=(1, 2))
def apply_step(lr: jax.Array, state: TrainState, accum: Accumulator,
               spec: StepSpec) -> tuple[TrainState, Accumulator, dict[str, jax.Array]]:
    """Average the accumulated gradients and update (or skip, when they are not finite); reset ``accum``."""
    new_state, metrics = _finish(lr, state, accum, spec)
    return constrain(new_state, spec.mesh), constrain(jax.tree.map(jnp.zeros_like, accum), spec.mesh), metrics


def _finish(lr: jax.Array, state: TrainState, accum: Accumulator,
            spec: StepSpec) -> tuple[TrainState, dict[str, jax.Array]]:
    """The update of :func:`apply_step` from summed gradients (shared with :func:`single_step`).

    FP8 delayed scaling: the step's amaxes (the max over its micro-batches) become the newest history entry,
    unless the step was skipped or an amax is not finite (then the history is kept as it was).
    """
    count = jnp.maximum(accum.weight_sum, 1.0)
    grads = jax.tree.map(lambda g: g / count, accum.grads)
    new_state, metrics = update(state, grads, lr, spec.optimizer, jnp.isfinite(accum.loss_sum))
    if state.fp8 is not None:
        keep = jnp.logical_and(metrics["skipped"] == 0, jnp.all(jnp.isfinite(accum.amax)))
        history = _select(keep, state.fp8.record(accum.amax), state.fp8)
        new_state = eqx.tree_at(lambda s: s.fp8, new_state, history)
    return new_state, {"loss": accum.loss_sum / count, "accuracy": accum.correct_sum / count, **metrics}


@functools.partial(jax.jit, static_argnames="spec", donate_argnums=1)
def single_step(lr: jax.Array, state: TrainState, ids: jax.Array,
                spec: StepSpec) -> tuple[TrainState, dict[str, jax.Array]]:
    """A whole optimizer step on one micro-batch (``k = 1``): :func:`micro_step` then :func:`apply_step` in one
    program, with no float32 gradient buffer to zero, add into and clear (the same numbers: adding into zeros
    is exact). ``state`` is donated."""
    grads, total, weight, correct, amax = _micro_grads(state, ids, jnp.int32(0), spec)
    new_state, metrics = _finish(lr, state, Accumulator(grads, total, weight, correct, amax), spec)
    return constrain(new_state, spec.mesh), metrics


class Objective(Protocol):
    """A loss for :func:`fused_step`: hashable (a frozen dataclass), since it is a static argument."""

    def loss(self, model: Any, batch: Any, key: Optional[jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(mean loss, extra metrics) of ``model`` on ``batch``; ``key`` draws dropout."""
        ...


@functools.partial(jax.jit, static_argnames=("objective", "settings", "mesh"), donate_argnums=0)
def fused_step(state: TrainState, batch: Any, lr: jax.Array, objective: Objective, settings: AdamWSettings,
               mesh: Any = None) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on one batch, no accumulation: ``(state, batch, lr) -> (state, metrics)``.

    ``state`` is donated: use the returned one. Dropout draws from the step's dropout key (None when the model
    has no dropout, so the inference code path is taken).
    """
    _, _, dropout_key = _step_keys(state.key)
    cfg = state.model.config
    key = dropout_key if cfg.dropout > 0 or cfg.attention_dropout > 0 else None

    def scaled_loss(model: Any) -> tuple[jax.Array, tuple]:
        loss, aux = objective.loss(model, batch, key)
        return state.loss_scale.scale_loss(loss), (loss, aux)

    grads, (loss, aux) = eqx.filter_grad(scaled_loss, has_aux=True)(state.model)
    new_state, metrics = update(state, state.loss_scale.unscale(grads), lr, settings, jnp.isfinite(loss))
    return constrain(new_state, mesh), {"loss": loss, **aux, **metrics}


def train_step(state: TrainState, micro_batches: Sequence[jax.Array], lr: float,
               spec: StepSpec) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step over the given micro-batches (all of one size); a convenience for tests and tools.
    One micro-batch takes :func:`single_step`, as the training loop does."""
    if len(micro_batches) == 1:
        return single_step(jnp.float32(lr), state, jnp.asarray(micro_batches[0]), spec)
    accum = zero_accumulator(state.model, spec.mesh, state.fp8)
    for i, ids in enumerate(micro_batches):
        accum = micro_step(state, accum, jnp.asarray(ids), jnp.int32(i * len(ids)), spec)
    state, _, metrics = apply_step(jnp.float32(lr), state, accum, spec)
    return state, metrics


@eqx.filter_jit
def eval_sums(model: BertForMLM, ids: jax.Array, key: jax.Array, offset: jax.Array,
              spec: StepSpec) -> jax.Array:
    """[loss sum, predictions, correct, [MASK]ed predictions, correct among them] of one held-out micro-batch,
    masked with a fixed key. The last two leave out the 20% of targets shown as themselves or a random token
    (the former can be copied from the input). FP8 delayed scaling evaluates with current scaling (no history
    is passed: evaluation leaves the training state alone)."""
    batch = mask_rows(ids, key, offset, spec)
    nll, correct = _predictions(mlm_of(model), batch, spec, None)  # ELECTRA: the generator's MLM
    hidden = batch.weights * (jnp.take_along_axis(batch.input_ids, batch.positions, axis=1) == spec.mask_id)
    sums = [nll * batch.weights, batch.weights, correct * batch.weights, hidden, correct * hidden]
    return jnp.stack([jnp.sum(x) for x in sums])


def evaluate(model: BertForMLM, batches: Sequence[np.ndarray], spec: StepSpec, key: jax.Array) -> dict[str, float]:
    """Held-out MLM loss and accuracy (all predictions, and ``masked_accuracy`` on [MASK]ed positions only);
    the same key and batches give comparable numbers across a run."""
    sums = jnp.zeros(5, jnp.float32)
    offset = 0
    for ids in batches:
        sums = sums + eval_sums(model, jnp.asarray(ids), key, jnp.int32(offset), spec)
        offset += len(ids)
    total, weight, correct, hidden, hidden_correct = (float(x) for x in jax.device_get(sums))
    weight = max(weight, 1.0)
    return {"loss": total / weight, "accuracy": correct / weight, "masked_accuracy": hidden_correct / max(hidden, 1.0),
            "predictions": weight}


# --------------------------------------------------------------------------------------------------- the loop


@dataclass
class Periodic:
    """A hook ``fn(state, progress)`` run every ``every`` steps (0: never during training); with ``at_end``,
    once more after the last step unless it just ran; with ``on_stop``, also when the loop is stopped early."""

    every: int
    fn: Callable[[TrainState, Progress], None]
    at_end: bool = True
    on_stop: bool = False


class TrainingDiverged(ValueError):
    """Too many consecutive steps had non-finite gradients."""


def run_loop(cfg: Config, state: TrainState, progress: Progress, spec: StepSpec,
             micro_batches: Iterator[jax.Array], *, hooks: Sequence[Periodic] = (),
             on_log: Callable[[int, dict[str, float]], None] = lambda step, m: None,
             should_stop: Callable[[], bool] = lambda: False) -> tuple[TrainState, Progress, str]:
    """Train until ``train.steps`` (or the time budget) is reached or ``should_stop()``; returns the reason.

    ``micro_batches`` yields consecutive micro-batches of training samples starting at ``progress.data_position``.
    Metrics stay on the device and are fetched (averaged) every ``impl.log_every`` steps only.
    """
    with CompileClock() as compiling:
        return _run_loop(cfg, state, progress, spec, micro_batches, hooks, on_log, should_stop, compiling)


class CompileClock:
    """Seconds JAX spent tracing, lowering and compiling while the context is open (``jax.monitoring`` events):
    a step that compiles mid-run (the first accumulating step after ``k = 1`` steps) is not training time."""

    EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
              "/jax/core/compile/backend_compile_duration")

    def __init__(self) -> None:
        self._seconds = 0.0

    def _listen(self, event: str, duration: float, **_: Any) -> None:
        if event in self.EVENTS:
            self._seconds += duration

    def take(self) -> float:
        """The seconds spent compiling since the last call."""
        seconds, self._seconds = self._seconds, 0.0
        return seconds

    def __enter__(self) -> "CompileClock":
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc: Any) -> None:
        jax.monitoring.unregister_event_duration_listener(self._listen)


def _run_loop(cfg: Config, state: TrainState, progress: Progress, spec: StepSpec,
              micro_batches: Iterator[jax.Array], hooks: Sequence[Periodic],
              on_log: Callable[[int, dict[str, float]], None], should_stop: Callable[[], bool],
              compiling: CompileClock) -> tuple[TrainState, Progress, str]:
    t, mb = cfg.train, cfg.train.micro_batch
    # excluded: seconds that are not training time: the first step, compiling later on, hooks
    schedule, pending, excluded = schedule_for(t), [], 0.0
    start, base_elapsed, last_log = time.perf_counter(), progress.elapsed_seconds, time.perf_counter()
    start_step = progress.step
    accum: Optional[Accumulator] = None
    reason = "done"
    while True:
        elapsed = base_elapsed + time.perf_counter() - start - excluded
        fraction = progress_at(t, progress.step, elapsed)
        if t.budget_minutes is not None and fraction >= 1:  # the clock at the stop (logging ran since the step)
            progress = Progress(progress.step, progress.data_position, max(elapsed, progress.elapsed_seconds))
            break
        if t.budget_minutes is None and progress.step >= t.steps:
            break
        if should_stop():
            reason = "stopped"
            break
        k = micro_batches_at(t, fraction)
        lr = jnp.float32(schedule(fraction))
        if k == 1:
            state, metrics = single_step(lr, state, jnp.asarray(next(micro_batches)), spec)
        else:
            if accum is None:  # the float32 gradient buffer exists only once a step accumulates
                accum = zero_accumulator(state.model, spec.mesh, state.fp8)
            for i in range(k):
                accum = micro_step(state, accum, jnp.asarray(next(micro_batches)), jnp.int32(i * mb), spec)
            state, accum, metrics = apply_step(lr, state, accum, spec)
        timed = k * mb  # samples counted for throughput
        compiled = compiling.take()  # a step compiles as it is dispatched
        if progress.step == start_step:  # the first step compiles: neither training time nor throughput
            jax.block_until_ready(metrics)
            excluded, last_log, timed = time.perf_counter() - start, time.perf_counter(), 0
        else:
            excluded, last_log = excluded + compiled, last_log + compiled
        elapsed = base_elapsed + time.perf_counter() - start - excluded
        progress = Progress(progress.step + 1, progress.data_position + k * mb, elapsed)
        pending.append((metrics, k * mb, timed))
        if len(pending) >= max(cfg.impl.log_every, 1):
            now = time.perf_counter()
            on_log(progress.step, _summarise(pending, now - last_log, cfg.data.seq_len, fraction))
            last_log, pending = now, []
            _check_skipped(state, t.max_skipped_steps)
        hook_start = time.perf_counter()
        for hook in hooks:
            if hook.every > 0 and progress.step % hook.every == 0:
                hook.fn(state, progress)
        excluded += time.perf_counter() - hook_start
        compiling.take()  # a hook's compilation is inside its excluded time already
        last_log += time.perf_counter() - hook_start  # throughput is of training alone
    if pending:
        on_log(progress.step, _summarise(pending, time.perf_counter() - last_log, cfg.data.seq_len,
                                         progress_at(t, progress.step, progress.elapsed_seconds)))
        _check_skipped(state, t.max_skipped_steps)
    for hook in hooks:
        wanted = hook.on_stop if reason == "stopped" else hook.at_end
        if wanted and not (hook.every > 0 and progress.step % hook.every == 0):
            hook.fn(state, progress)
    return state, progress, reason


def _summarise(pending: list, seconds: float, seq_len: int, fraction: float) -> dict[str, float]:
    """Average the pending device metrics (one transfer) and add throughput figures."""
    fetched = jax.device_get([m for m, _, _ in pending])
    out = {name: float(np.mean([m[name] for m in fetched])) for name in fetched[0]}
    for name in ("lr", "loss_scale", "skipped_total", "consecutive_skipped"):
        out[name] = float(fetched[-1][name])
    samples = sum(timed for _, _, timed in pending)
    out["batch_size"] = float(pending[-1][1])
    out["tokens_per_second"] = samples * seq_len / max(seconds, 1e-9)
    out["progress"] = fraction
    return out


def _check_skipped(state: TrainState, limit: int) -> None:
    run = int(state.consecutive_skipped)
    if run >= limit:
        raise TrainingDiverged(f"{run} consecutive steps had non-finite gradients (train.max_skipped_steps="
                               f"{limit}); stopped without saving, the last checkpoint is kept")


def micro_batch_stream(sample: Callable[[int, int], np.ndarray], start: int, micro_batch: int) -> Iterator[np.ndarray]:
    """Consecutive micro-batches ``sample(position, micro_batch)`` from sample index ``start`` on."""
    position = start
    while True:
        yield sample(position, micro_batch)
        position += micro_batch
