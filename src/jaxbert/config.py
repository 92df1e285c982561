"""Typed, validated, frozen run configuration.

A run is described by one :class:`Config`: nested dataclasses whose fields are documented where they are
declared. It is built in three layers, each overriding the last:

1. the dataclass defaults below;
2. a YAML preset shipped in ``jaxbert/configs`` (``--config small``) or any YAML file (``--config my.yaml``);
3. command-line overrides in OmegaConf dotlist form (``train.peak_lr=1e-3``).

OmegaConf checks keys and types against the schema; :func:`validate` then checks values that depend on one
another. Every failure raises :class:`ConfigError` with one line naming the key. The result is a tree of
frozen dataclasses: nothing mutates a config mid-run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.resources
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

PRESETS = ("tiny", "mini", "small", "medium", "base")
TEXT_FORMATS = ("auto", "blank-line", "line")


POOLINGS = ("cls", "mean")  # what a classifier's pooler reads (model.pooling, finetune.pooling)


class ConfigError(ValueError):
    """A configuration key is unknown, has the wrong type, or an impossible value."""


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 32768  # rows of the token embedding; replaced by the tokenizer's size when one is used
    hidden: int = 768  # width of the residual stream
    layers: int = 12  # encoder layers
    heads: int = 12  # attention heads; must divide hidden
    ffn: int = 3072  # feed-forward inner width
    max_positions: int = 512  # rows of the learned absolute position embedding
    type_vocab_size: int = 2  # segment (token-type) ids
    post_ln: bool = False  # False: pre-LayerNorm with a final LayerNorm; True: original BERT (post-LN)
    dropout: float = 0.0  # hidden dropout (embeddings, attention output, feed-forward output)
    attention_dropout: float = 0.0  # dropout on attention probabilities
    layer_norm_eps: float = 1e-12
    init_std: float = 0.02  # std of the truncated-normal weight initialisation
    # "gelu_tanh" (the tanh approximation: BERT-base steps 4.5% faster on an H200; held-out MLM loss 3.599 vs
    # 3.584 after 3,000 budget-shape steps; benchmarks/RESULTS.md, throughput II) or "gelu" (exact, erf; what HF
    # BERT checkpoints use)
    activation: str = "gelu_tanh"
    # False (default, as in Cramming): the encoder layers' linear layers (qkv, attention out, ffn_in, ffn_out) have
    # no bias; equal quality at an equal pretraining budget, faster steps. LayerNorms, the embeddings, the pooler
    # and the task heads keep theirs. True: biases, as in HF BERT (import-hf always sets it). A stored config
    # without this key was written when True was the default and loads as True (OLD_DEFAULTS)
    bias: bool = False
    # "mlp": ffn_out(act(ffn_in(x))); "glu": gated (GEGLU with gelu): ffn_in has 2 * ffn columns [a | b] and
    # ffn_out(act(a) * b). ffn stays the inner width, so glu has 1.5x the FFN parameters of mlp at equal ffn;
    # ffn = 2/3 * 4 * hidden (e.g. 2048 at hidden 768) matches the parameters of mlp with ffn = 4 * hidden
    ffn_type: str = "mlp"
    # what the pooler of a classifier reads: "cls" (the [CLS] position, as BERT) or "mean" (the mean over real
    # tokens). Set for finetuning by finetune.pooling; pretraining does not use the pooler
    pooling: str = "cls"

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


@dataclass(frozen=True)
class TokenizerConfig:
    path: Optional[str] = None  # an existing tokenizer.json / vocab.txt / directory; None trains one
    vocab_size: int = 32768  # size of a trained vocabulary (kept a multiple of 64)
    lowercase: bool = True
    min_frequency: int = 2  # a pair must occur this often to be merged
    alphabet: int = 1000  # keep the N most frequent characters; rarer ones become [UNK] (as BERT's 1000)
    max_documents: Optional[int] = None  # train on the first N documents only (None: all)


@dataclass(frozen=True)
class DataConfig:
    source: str = "demo"  # "demo" (embedded Wikipedia summaries), a path, or "hf:<name>" for the HF hub
    format: str = "auto"  # auto | wikiextractor | wikidump | text | jsonl | csv | parquet | json | hf
    text_column: str = "text"  # column holding the text for table-like sources
    # plain-text (.txt) layout: "blank-line" (documents separated by blank lines, BERT's layout), "line" (one
    # document per line), or "auto" (detected from the first file: "line" when it has no blank line between
    # text lines); the choice is logged
    text_format: str = "auto"
    hf_config: Optional[str] = None  # HF dataset config, e.g. "20231101.en"
    hf_split: str = "train"
    min_doc_chars: int = 50  # documents shorter than this (after cleaning) are dropped
    max_documents: Optional[int] = None  # read at most N documents (None: all)
    val_fraction: float = 0.01  # fraction of documents held out for validation (pretraining evaluates on them)
    seq_len: int = 128  # tokens per training sequence
    mlm_probability: float = 0.15
    max_predictions: int = 20  # masked positions predicted per sequence (fixed, for static shapes)
    # mask whole words: a chosen token brings every WordPiece piece of its word ("##" continuations) with it
    # (jaxbert.data.mlm); the number of masked tokens stays the same, made of whole words only
    whole_word_masking: bool = False
    # cut each pass over the training stream after the first at a fresh offset in [0, seq_len) (from the seed and
    # the pass), so repeated passes see the text in other windows (jaxbert.data.loader); the token stream and
    # held-out evaluation do not change
    shift_windows: bool = False
    cache_dir: str = "cache"  # prepared datasets live in <cache_dir>/<hash>/


@dataclass(frozen=True)
class OptimizerFields:
    """The optimizer section shared by pretraining (``train.*``) and finetuning (``finetune.*``): AdamW with
    global-norm clipping and a linear warm-up. Both sections hold these fields under the same names (defaults
    differ: finetuning uses BERT's beta2=0.999, clip_norm=1.0); :class:`jaxbert.optim.AdamWSettings` is built
    from either by one function, and :meth:`problems` validates them."""

    warmup_fraction: float = 0.1  # fraction of training spent warming up linearly to the peak learning rate
    weight_decay: float = 0.01  # decoupled weight decay (weight matrices and embeddings only)
    beta1: float = 0.9  # AdamW first-moment decay, in [0, 1)
    beta2: float = 0.98  # AdamW second-moment decay, in [0, 1)
    eps: float = 1e-6  # AdamW epsilon, positive
    clip_norm: float = 0.5  # global gradient-norm clipping (0 disables)

    def problems(self, section: str) -> list[tuple[str, str]]:
        """(key, problem) for every invalid optimizer field of ``section`` ("train" or "finetune")."""
        checks = [("warmup_fraction", 0.0 <= self.warmup_fraction <= 1.0, "must be in [0, 1]"),
                  ("weight_decay", self.weight_decay >= 0, f"must not be negative, got {self.weight_decay}"),
                  ("beta1", 0.0 <= self.beta1 < 1.0, f"must be in [0, 1), got {self.beta1}"),
                  ("beta2", 0.0 <= self.beta2 < 1.0, f"must be in [0, 1), got {self.beta2}"),
                  ("eps", self.eps > 0, f"must be positive, got {self.eps}"),
                  ("clip_norm", self.clip_norm >= 0, f"must not be negative, got {self.clip_norm}")]
        return [(f"{section}.{name}", message) for name, ok, message in checks if not ok]


@dataclass(frozen=True)
class TrainConfig(OptimizerFields):
    seed: int = 0
    steps: int = 1000  # optimizer steps (ignored for the schedule when budget_minutes is set)
    budget_minutes: Optional[float] = None  # time-budget mode: schedules run on elapsed time, stop at budget
    micro_batch: int = 64  # sequences per forward/backward pass (memory)
    batch_start: int = 64  # effective batch (sequences) at the start of the ramp
    batch_end: int = 256  # effective batch at the end of the ramp; multiples of micro_batch
    batch_ramp_fraction: float = 0.0  # fraction of training over which the batch grows linearly
    peak_lr: float = 1e-3  # one-cycle: up to peak_lr over warmup_fraction, then down to final_lr_fraction
    final_lr_fraction: float = 0.0  # lr at the end as a fraction of peak_lr
    # fp32 | bf16 | fp16 | fp8 (bf16 + FP8 encoder matmuls, current scaling) | fp8_delayed (the same, delayed
    # scaling from amax histories); parameters stay fp32
    precision: str = "fp32"
    # the MLM logits' dtype in training: "compute" (the default: the precision's compute dtype, bf16 under
    # bf16/fp8: half the memory traffic of the decoder and its loss, +4% tokens/s at the budget shape; the
    # softmax statistics stay float32; 3,000-step loss within run-to-run noise of float32, benchmarks/RESULTS.md)
    # or "float32". A stored config without this key loads as float32 (OLD_DEFAULTS)
    mlm_logits: str = "compute"
    fp8_history: int = 16  # fp8_delayed: optimizer steps of amax history per operand
    fp8_margin: float = 0.0  # fp8_delayed: scales leave 2**margin of headroom above the history's amax
    # "mlm", or "electra": a generator (electra_generator x the width) fills the masked positions, the encoder
    # (the discriminator) predicts for every token whether it was replaced (jaxbert.model.electra)
    objective: str = "mlm"
    electra_generator: float = 0.25  # generator width as a fraction of model.hidden (multiple of 64)
    electra_weight: float = 50.0  # weight of the discriminator's loss against the generator's MLM loss
    loss_scale_init: float = 32768.0  # initial dynamic loss scale (fp16 only)
    loss_scale_period: int = 2000  # finite steps before the scale doubles
    max_skipped_steps: int = 20  # stop after this many consecutive non-finite steps
    eval_every: int = 200  # steps between evaluations (0: only at the end)
    eval_batches: int = 20  # micro-batches per evaluation
    checkpoint_every: int = 500  # steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 2
    out_dir: str = "runs"
    run_name: Optional[str] = None  # default: <preset>-<timestamp>


@dataclass(frozen=True)
class FinetuneConfig(OptimizerFields):
    task: str = "mnli"
    glue_dir: str = "glue"  # directory in the official GLUE layout
    epochs: int = 3
    lr: float = 5e-5  # peak learning rate: warm-up over warmup_fraction, then linear decay to 0
    # layer-wise learning-rate decay in (0, 1]: encoder layer i of L learns at lr * layer_decay ** (L - i), the
    # embeddings at lr * layer_decay ** (L + 1), the pooler and task head at lr (1: off; jaxbert.optim)
    layer_decay: float = 1.0
    batch_size: int = 32
    beta2: float = 0.999  # BERT's finetuning recipe (the other optimizer fields: see OptimizerFields)
    dropout: float = 0.1
    # the classifier's pooler reads the [CLS] position ("cls", BERT's; the only one HF export takes) or the mean of
    # the real tokens' states ("mean": pretraining never shows [CLS] to a jaxbert model, every token it trains)
    pooling: str = "cls"
    max_len: int = 128
    seed: int = 0
    precision: str = "fp32"
    out_dir: str = "runs/finetune"
    attention_dropout: float = 0.1  # dropout on attention probabilities while finetuning (BERT's recipe)
    clip_norm: float = 1.0  # global gradient-norm clipping (0 disables)
    eval_batch_size: int = 128  # rows per evaluation batch
    max_train_examples: Optional[int] = None  # finetune on a seeded random subset of N training rows
    max_eval_examples: Optional[int] = None  # evaluate on the first N rows of each dev split
    run_name: Optional[str] = None  # default: <task>-<timestamp>
    train_file: Optional[str] = None  # local tsv/csv/jsonl/parquet file replacing the task's train split
    dev_file: Optional[str] = None  # ... replacing its (first) dev split
    test_file: Optional[str] = None  # ... replacing its (first) test split
    text_a: Optional[str] = None  # column mapping for local files: first text
    text_b: Optional[str] = None  # second text (pair tasks)
    label_column: Optional[str] = None  # label / score column
    index_column: Optional[str] = None  # example id column of test files (default: row number)


@dataclass(frozen=True)
class TrackingConfig:
    wandb: bool = False  # log to Weights & Biases (offline when no API key is set)
    project: str = "jaxbert"
    jsonl: bool = True
    plots: bool = True
    tensorboard: bool = False  # TensorBoard event files in <run dir>/tensorboard (needs: pip install tensorboard)


@dataclass(frozen=True)
class Kernels:
    """The kernel choices of the model, one static (hashable) value: ``impl.attention``, ``impl.norm``,
    ``impl.embedding_grad`` and ``impl.ffn``. Model functions take it where they take an attention implementation
    name; a plain name stands for ``Kernels(attention=name)``."""

    attention: str = "auto"
    norm: str = "xla"
    embedding_grad: str = "scatter"
    ffn: str = "xla"

    @staticmethod
    def of(value: "str | Kernels") -> "Kernels":
        return value if isinstance(value, Kernels) else Kernels(attention=value)


@dataclass(frozen=True)
class ImplConfig:
    """Settings that change speed, never results."""

    # auto | xla | cudnn | pallas (short-sequence Pallas kernel, GPU, seq <= 256) | pallas_interpret (the same
    # kernel interpreted: any backend, slow; for tests). auto, for 16-bit compute on a GPU: pallas on one GPU
    # for unpadded bf16 batches (pretraining) with seq <= 256 and head_dim <= 128, else cudnn; xla otherwise
    attention: str = "auto"
    # LayerNorm (with the residual add before it, pre-LN): auto (the Pallas kernel on one GPU for 16-bit
    # compute, else XLA; +13% BERT-base tokens/s on an H200, benchmarks/RESULTS.md) | xla | pallas
    # (jaxbert.model.norm_kernels)
    norm: str = "auto"
    # how the backward pass adds up the token-embedding gradient: auto (sorted on one GPU, else scatter) |
    # scatter (autodiff of the lookup: atomic adds, slow for ids repeated thousands of times a batch) | sorted
    # (block-wise sums of equal ids first; jaxbert.model.embedding_grad)
    embedding_grad: str = "auto"
    # the feed-forward's GELU backward: xla (a GEMM, then a pass that multiplies in gelu') | pallas (one Pallas
    # GEMM with gelu' in its epilogue, GPU; jaxbert.model.ffn_kernels; MLP feed-forward without FP8 only, and
    # 16-bit compute: float32 steps keep the XLA path; on an H200 it is slower than xla: benchmarks/RESULTS.md)
    ffn: str = "xla"
    remat: bool = False  # recompute layer activations in the backward pass (saves memory)
    prefetch: int = 2  # batches prepared ahead by the loader thread
    workers: int = 0  # tokenizer threads for preparation (0: all cores)
    encode_batch: int = 1000  # documents per encode batch during preparation
    log_every: int = 10  # steps between console/JSONL metric fetches
    # GLUE training batches are padded to a multiple of this length, capped at finetune.max_len: it sets the
    # number of compiled training steps (128 with max_len 128: one); evaluation batches always pad to max_len.
    # (why 128: benchmarks/RESULTS.md)
    pad_multiple: int = 128
    # JAX's persistent compilation cache: "auto" ($JAX_COMPILATION_CACHE_DIR if set, else <$XDG_CACHE_HOME or
    # ~/.cache>/jaxbert/xla), a directory, or "off". A second run, or parallel processes of `jaxbert glue`,
    # reuse compiled steps instead of compiling them
    compilation_cache: str = "auto"
    # XLA flags put ahead of $XLA_FLAGS (which wins) by apply_xla_flags before JAX starts its backend (the
    # default prefers cuBLAS to Triton matmuls: benchmarks/RESULTS.md)
    xla_flags: str = "--xla_gpu_enable_triton_gemm=false"

    @property
    def kernels(self) -> Kernels:
        """What the model functions take as their ``attention`` argument."""
        return Kernels(self.attention, self.norm, self.embedding_grad, self.ffn)


def apply_xla_flags(impl: ImplConfig) -> None:
    """Put ``impl.xla_flags`` ahead of ``$XLA_FLAGS``; takes effect only before JAX first uses a device."""
    current = os.environ.get("XLA_FLAGS", "")
    if impl.xla_flags and not current.startswith(impl.xla_flags):
        os.environ["XLA_FLAGS"] = f"{impl.xla_flags} {current}".strip()


def compilation_cache_dir(impl: ImplConfig) -> Optional[Path]:
    """Where ``impl.compilation_cache`` puts compiled executables (None: off)."""
    value = impl.compilation_cache.strip()
    if value.lower() in ("off", "none", "false", "no", ""):
        return None
    if value.lower() == "auto":  # JAX's own variable, when set, wins
        if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
            return Path(os.environ["JAX_COMPILATION_CACHE_DIR"])
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "jaxbert" / "xla"
    return Path(value).expanduser()


@contextlib.contextmanager
def environment(set_: Optional[dict[str, str]] = None, defaults: Optional[dict[str, str]] = None) -> Iterator[None]:
    """Set environment variables (``set_``; ``defaults`` only where unset) for the ``with`` block, then restore
    every one of them to its previous value or absence."""
    changes = {**(defaults or {}), **(set_ or {})}
    saved = {k: os.environ.get(k) for k in changes}
    for key, value in (defaults or {}).items():
        os.environ.setdefault(key, value)
    os.environ.update(set_ or {})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def apply_runtime(impl: ImplConfig) -> Optional[Path]:
    """Process settings of a run, before JAX starts its backend: the XLA flags and JAX's persistent compilation
    cache (so a second run, or a parallel process, loads a compiled step instead of compiling it). Returns the
    cache directory, None when off or not writable."""
    apply_xla_flags(impl)
    folder = compilation_cache_dir(impl)
    if folder is None:
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None  # e.g. a read-only home: compile as usual
    import jax

    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)  # the steps, not every small helper
    return folder


@dataclass(frozen=True)
class DistributedConfig:
    """Several devices or processes (see jaxbert.distributed); the defaults run on every local device."""

    coordinator: Optional[str] = None  # "host:port" of process 0; None: auto-detected (SLURM, ...) or 1 process
    num_processes: Optional[int] = None  # processes in the run (None: from the cluster environment)
    process_id: Optional[int] = None  # this process's rank in [0, num_processes) (None: from the environment)
    fsdp: int = 1  # size of the mesh axis that shards parameters and optimizer state (1: pure data parallel)
    init_timeout_s: int = 300  # seconds to wait for every process to reach the coordinator


@dataclass(frozen=True)
class Config:
    preset: str = "base"  # name of the preset this config started from
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    impl: ImplConfig = field(default_factory=ImplConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': {message}")


_PRECISIONS = ("fp32", "bf16", "fp16", "fp8")
_TRAIN_PRECISIONS = _PRECISIONS + ("fp8_delayed",)  # delayed scaling needs the pretraining state's histories
# impl.ffn=pallas: model.ffn and model.hidden must be multiples of these (the default tiles of
# jaxbert.model.ffn_kernels, which takes them from here: the model imports this module, never the reverse)
FFN_KERNEL_MULTIPLES = (128, 64)
_ATTENTIONS = ("auto", "xla", "cudnn", "pallas", "pallas_interpret")


def validate(cfg: Config) -> Config:
    """Check values that depend on each other; raise ConfigError naming the first bad key."""
    m, d, t, f, i = cfg.model, cfg.data, cfg.train, cfg.finetune, cfg.impl
    for name in ("vocab_size", "hidden", "layers", "heads", "ffn", "max_positions", "type_vocab_size"):
        _check(getattr(m, name) > 0, f"model.{name}", f"must be positive, got {getattr(m, name)}")
    _check(m.hidden % m.heads == 0, "model.heads", f"{m.heads} heads do not divide hidden={m.hidden}")
    _check(0.0 <= m.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {m.dropout}")
    _check(0.0 <= m.attention_dropout < 1.0, "model.attention_dropout", "must be in [0, 1)")
    _check(m.activation in ("gelu", "gelu_tanh"), "model.activation", f"expected gelu|gelu_tanh, got {m.activation!r}")
    _check(m.ffn_type in ("mlp", "glu"), "model.ffn_type", f"expected mlp|glu, got {m.ffn_type!r}")
    _check(m.pooling in POOLINGS, "model.pooling", f"expected {'|'.join(POOLINGS)}, got {m.pooling!r}")
    _check(cfg.tokenizer.vocab_size >= 64, "tokenizer.vocab_size", "must be at least 64")
    _check(d.seq_len >= 8, "data.seq_len", f"must be at least 8, got {d.seq_len}")
    _check(d.seq_len <= m.max_positions, "data.seq_len",
           f"{d.seq_len} exceeds model.max_positions={m.max_positions}")
    _check(0.0 < d.mlm_probability < 1.0, "data.mlm_probability", "must be in (0, 1)")
    _check(0 < d.max_predictions <= d.seq_len, "data.max_predictions", f"must be in [1, seq_len={d.seq_len}]")
    masked = math.floor(d.mlm_probability * d.seq_len + 0.5)  # positions the masking picks in a full sequence
    _check(d.max_predictions >= masked, "data.max_predictions",
           f"{d.max_predictions} would cap the {masked} positions masked per sequence "
           f"(mlm_probability {d.mlm_probability:g} x seq_len {d.seq_len}); set it to at least {masked}")
    _check(0.0 < d.val_fraction < 0.5, "data.val_fraction",
           f"must be in (0, 0.5), got {d.val_fraction} (pretraining evaluates on the held-out documents)")
    _check(d.text_format in TEXT_FORMATS, "data.text_format",
           f"expected one of {'|'.join(TEXT_FORMATS)}, got {d.text_format!r}")
    _check(d.format in ("auto", "wikiextractor", "wikidump", "text", "jsonl", "csv", "parquet", "json", "hf"),
           "data.format", f"unknown format {d.format!r}")
    _check(t.steps > 0, "train.steps", "must be positive")
    _check(t.budget_minutes is None or t.budget_minutes > 0, "train.budget_minutes", "must be positive")
    _check(t.micro_batch > 0, "train.micro_batch", "must be positive")
    for name in ("batch_start", "batch_end"):
        value = getattr(t, name)
        _check(value > 0 and value % t.micro_batch == 0, f"train.{name}",
               f"{value} is not a positive multiple of train.micro_batch={t.micro_batch}")
    _check(t.batch_start <= t.batch_end, "train.batch_start", "must not exceed train.batch_end")
    for key, problem in t.problems("train") + f.problems("finetune"):
        _check(False, key, problem)
    for name in ("batch_ramp_fraction", "final_lr_fraction"):
        _check(0.0 <= getattr(t, name) <= 1.0, f"train.{name}", "must be in [0, 1]")
    _check(t.peak_lr > 0, "train.peak_lr", "must be positive")
    _check(t.objective in ("mlm", "electra"), "train.objective", f"expected mlm|electra, got {t.objective!r}")
    _check(0.0 < t.electra_generator <= 1.0, "train.electra_generator", "must be in (0, 1]")
    _check(t.electra_weight > 0, "train.electra_weight", "must be positive")
    _check(t.precision in _TRAIN_PRECISIONS, "train.precision",
           f"expected one of {_TRAIN_PRECISIONS}, got {t.precision!r}")
    _check(t.precision != "fp8_delayed" or t.objective == "mlm", "train.precision",
           "fp8_delayed supports train.objective=mlm only")
    _check(t.precision != "fp8_delayed" or cfg.model.activation == "gelu", "train.precision",
           "fp8_delayed needs model.activation=gelu: with gelu_tanh XLA's GPU compiler fuses the GELU into an FP8 "
           "GEMM epilogue it cannot compile (jax 0.11.2, H200; benchmarks/RESULTS.md)")
    _check(t.precision != "fp8_delayed" or cfg.model.ffn_type == "mlp", "train.precision",
           "fp8_delayed keeps one amax history per linear layer; model.ffn_type=glu splits ffn_in in two")
    _check(t.mlm_logits in ("float32", "compute"), "train.mlm_logits",
           f"expected float32|compute, got {t.mlm_logits!r}")
    _check(t.fp8_history >= 1, "train.fp8_history", f"must be at least 1, got {t.fp8_history}")
    _check(t.fp8_margin >= 0, "train.fp8_margin", f"must be non-negative, got {t.fp8_margin}")
    _check(f.precision in _PRECISIONS, "finetune.precision", f"expected one of {_PRECISIONS}, got {f.precision!r}")
    _check(t.keep_checkpoints >= 1, "train.keep_checkpoints", "must be at least 1")
    _check(f.max_len <= m.max_positions, "finetune.max_len", f"exceeds model.max_positions={m.max_positions}")
    _check(0.0 <= f.dropout < 1.0, "finetune.dropout", "must be in [0, 1)")
    _check(f.pooling in POOLINGS, "finetune.pooling", f"expected {'|'.join(POOLINGS)}, got {f.pooling!r}")
    _check(0.0 <= f.attention_dropout < 1.0, "finetune.attention_dropout", "must be in [0, 1)")
    for name in ("epochs", "batch_size", "eval_batch_size", "max_len"):
        _check(getattr(f, name) > 0, f"finetune.{name}", f"must be positive, got {getattr(f, name)}")
    _check(f.lr > 0, "finetune.lr", "must be positive")
    _check(0.0 < f.layer_decay <= 1.0, "finetune.layer_decay", f"must be in (0, 1], got {f.layer_decay}")
    _check(i.pad_multiple > 0, "impl.pad_multiple", "must be positive")
    _check(i.attention in _ATTENTIONS, "impl.attention", f"expected one of {_ATTENTIONS}, got {i.attention!r}")
    _check(not i.attention.startswith("pallas") or (max(d.seq_len, f.max_len) <= 256 and m.head_dim <= 128),
           "impl.attention", f"{i.attention} needs data.seq_len and finetune.max_len <= 256 and head_dim <= 128")
    _check(i.norm in ("auto", "xla", "pallas"), "impl.norm", f"expected auto|xla|pallas, got {i.norm!r}")
    _check(i.embedding_grad in ("auto", "scatter", "sorted"), "impl.embedding_grad",
           f"expected auto|scatter|sorted, got {i.embedding_grad!r}")
    _check(i.ffn in ("xla", "pallas"), "impl.ffn", f"expected xla|pallas, got {i.ffn!r}")
    ffn_multiple, hidden_multiple = FFN_KERNEL_MULTIPLES
    _check(i.ffn == "xla" or (m.ffn_type == "mlp" and not t.precision.startswith("fp8")
                              and not f.precision.startswith("fp8") and m.ffn % ffn_multiple == 0
                              and m.hidden % hidden_multiple == 0), "impl.ffn",
           f"pallas needs model.ffn_type=mlp, no fp8 precision, model.ffn a multiple of {ffn_multiple} and "
           f"model.hidden of {hidden_multiple}")
    _check(cfg.distributed.fsdp >= 1, "distributed.fsdp", f"must be at least 1, got {cfg.distributed.fsdp}")
    _check(cfg.distributed.init_timeout_s >= 1, "distributed.init_timeout_s", "must be at least 1 second")
    return cfg


def preset_path(name: str) -> Path:
    """The YAML file of a shipped preset, or the given path when it names a file."""
    candidate = Path(name)
    if candidate.suffix in (".yaml", ".yml"):
        if not candidate.is_file():
            raise ConfigError(f"config file '{name}' does not exist")
        return candidate
    resource = importlib.resources.files("jaxbert") / "configs" / f"{name}.yaml"
    if not resource.is_file():
        raise ConfigError(f"unknown preset '{name}': expected one of {', '.join(list_presets())} or a .yaml file")
    return Path(str(resource))


def list_presets() -> list[str]:
    folder = importlib.resources.files("jaxbert") / "configs"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _friendly(err: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(err, "full_key", None) or "?"
    first = str(err).splitlines()[0]
    return ConfigError(f"config key '{key}' ({source}): {first}")


def read_yaml(path: Path) -> DictConfig:
    """A YAML mapping from ``path``; a syntax error is one ConfigError naming the file, line and column."""
    try:
        loaded = OmegaConf.load(path)
    except OSError as err:
        raise ConfigError(f"config file '{path}': cannot be read ({err.strerror or err})") from None
    except Exception as err:  # a YAML syntax error (yaml.MarkedYAMLError carries the position)
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"config file '{path}{where}': not valid YAML ({problem})") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"config file '{path}': expected a mapping of config keys at the top level")
    return loaded


# Keys whose default has changed, with the default they had before. A stored config (the config.yaml of a run,
# checkpoint or model directory) that lacks one of them was written under the old default, and its weights were
# made with it: it loads with the old value, not the new default.
OLD_DEFAULTS: dict[str, dict[str, Any]] = {
    "model": {"bias": True},  # the default until bias-free encoder linear layers became the default
    "train": {"mlm_logits": "float32"},  # the default until bf16 MLM logits became the default
}


def load(preset: str = "base", overrides: Sequence[str] = (), *, stored: bool = False) -> Config:
    """Build a validated, frozen Config from a preset (name or YAML path) and dotlist overrides.

    ``stored``: the YAML file is a config written by :func:`save` (a run's own config.yaml); keys it lacks whose
    default has changed take their old value (:data:`OLD_DEFAULTS`) rather than the current default."""
    schema = OmegaConf.structured(Config)
    path = preset_path(preset)
    from_file = read_yaml(path)
    try:
        merged = OmegaConf.merge(schema, {"preset": path.stem}, OLD_DEFAULTS if stored else {}, from_file)
    except OmegaConfBaseException as err:
        raise _friendly(err, str(path)) from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key=value, e.g. train.peak_lr=1e-3")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as err:
            raise _friendly(err, f"override '{item}'") from None
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, Config)
    return validate(cfg)


def from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from its dict form (as written next to a run); validated. Keys it lacks whose default
    has changed take their old value (:data:`OLD_DEFAULTS`)."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), OLD_DEFAULTS, OmegaConf.create(data))
    except OmegaConfBaseException as err:
        raise _friendly(err, "saved config") from None
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, Config)
    return validate(cfg)


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save(cfg: Config, directory: str | Path, name: str = "config.yaml") -> Path:
    """Write the resolved config next to a run's outputs (atomically)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    from .io import write_atomic

    return write_atomic(directory / name, to_yaml(cfg))


def load_saved(path: str | Path) -> Config:
    """Read a config written by :func:`save` (a file or a run directory holding config.yaml)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    data = OmegaConf.to_container(read_yaml(path))
    assert isinstance(data, dict)
    return from_dict(data)


def replace(cfg: Config, **sections: Any) -> Config:
    """A copy of cfg with whole sections or nested fields replaced: replace(cfg, model={'vocab_size': 512})."""
    changes = {}
    for name, value in sections.items():
        current = getattr(cfg, name)
        changes[name] = dataclasses.replace(current, **value) if isinstance(value, dict) else value
    return validate(dataclasses.replace(cfg, **changes))


def add_config_arguments(parser: Any, default_preset: str = "base") -> None:
    """Add ``--config NAME`` and positional ``key=value`` overrides to an argparse parser."""
    parser.add_argument("--config", default=default_preset,
                        help=f"preset name ({', '.join(PRESETS)}, ...) or a YAML file (default: {default_preset})")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides in dotted form, e.g. train.peak_lr=1e-3")


def parse_args(parser: Any, argv: Optional[Sequence[str]] = None) -> Any:
    """``parser``'s arguments with options and ``key=value`` overrides in any order (``train.steps=5 --resume``
    and ``--resume train.steps=5`` alike)."""
    return parser.parse_intermixed_args(list(argv) if argv is not None else None)


def from_args(args: Any) -> Config:
    return load(args.config, args.overrides)
