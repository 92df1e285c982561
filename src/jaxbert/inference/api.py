"""The Python API: load any jaxbert model directory and use it.

    import jaxbert

    m = jaxbert.load("runs/finetune/rte-20261201-101500")      # a finetuned model: predict
    preds = m.predict([("A man is sleeping.", "Nobody sleeps."), ("It rains.", "It is wet.")])
    preds.predictions, preds.probabilities                     # label strings, (n, classes) float32

    m = jaxbert.load("runs/mini-20261129-101500")              # a pretraining run: fill_mask, encode
    m.fill_mask("Paris is the [MASK] of France.")[0][0].token
    m.encode(["first sentence", "second one"], pooling="mean")  # (2, hidden) float32
    m.tokenizer.encode("some text")

``load`` takes what the commands take: a finetune run dir or its ``best/`` (or an imported HF classifier), a
pretraining run dir (its newest valid checkpoint), a checkpoint dir, or a model dir (export, ``import-hf``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from ..config import Config
from ..data.glue import SplitData, Task
from ..model import BertForClassification, BertForMLM, encoder_of, mlm_of
from ..precision import Policy
from ..tokenizer import Tokenizer


class Model:
    """A loaded model with its tokenizer and config; ``task`` is set for finetuned classifiers."""

    def __init__(self, model: BertForMLM | BertForClassification, tokenizer: Tokenizer, config: Config,
                 directory: Path, meta: Optional[dict[str, Any]] = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.directory = directory
        self.meta = meta
        self.task: Optional[Task] = None
        if isinstance(model, BertForClassification):
            from .predict import model_task

            self.task = model_task(config, meta or {}, model.num_labels)

    def __repr__(self) -> str:
        m = self.config.model
        kind = f"classifier of {self.task.name}" if self.task is not None else "MLM"
        return f"jaxbert.Model({kind}, {m.layers} layers, hidden {m.hidden}, from {str(self.directory)!r})"

    @property
    def labels(self) -> tuple[str, ...]:
        """Class names in class-id order (``()`` for a regression or a model without a classifier)."""
        return () if self.task is None else self.task.labels

    def _policy(self, precision: Optional[str]) -> Policy:
        return Policy.from_name(precision or self.config.finetune.precision)

    def predict_split(self, data: SplitData, *, batch_size: Optional[int] = None, precision: Optional[str] = None,
                      progress: bool = False) -> Any:
        """:class:`jaxbert.inference.predict.Predictions` for every row of ``data``, in row order."""
        from .predict import Predictions, predict_split

        if self.task is None:
            raise ValueError(f"'{self.directory}' has no classifier head (not a finetuned model): nothing to predict")
        cfg = self.config
        outputs = predict_split(self.model, data, self.tokenizer, max_len=cfg.finetune.max_len,
                                batch_size=batch_size or cfg.finetune.eval_batch_size,
                                pad_multiple=cfg.impl.pad_multiple, policy=self._policy(precision),
                                attention=cfg.impl.kernels, progress=progress)
        return Predictions(outputs, self.task.labels)

    def predict(self, inputs: Sequence[str | tuple[str, str]], **options: Any) -> Any:
        """Predictions for texts, or for ``(a, b)`` pairs (sentence-pair models); options as
        :meth:`predict_split` (``batch_size``, ``precision``, ``progress``)."""
        inputs = list(inputs)
        pairs = [isinstance(x, (tuple, list)) for x in inputs]
        if any(pairs) and not all(pairs):
            raise ValueError("predict: give either texts or (a, b) pairs, not a mix")
        a = [x[0] if p else x for x, p in zip(inputs, pairs)]
        b = [x[1] for x in inputs] if inputs and all(pairs) else None
        data = SplitData(self.task.name if self.task else "", "predict", "<memory>", [str(t) for t in a],
                         None if b is None else [str(t) for t in b], None, [str(i) for i in range(len(a))])
        return self.predict_split(data, **options)

    def fill_mask(self, text: str, top_k: int = 5, precision: Optional[str] = None) -> list:
        """For every ``[MASK]`` of ``text``, its ``top_k`` :class:`jaxbert.inference.fill_mask.Candidate` s."""
        from .fill_mask import fill_mask

        return fill_mask(mlm_of(self.model), self.tokenizer, text, top_k,
                         policy=Policy.from_name(precision or "fp32"), attention=self.config.impl.kernels)

    def encode(self, texts: Sequence[str], *, pooling: str = "mean", normalize: bool = False,
               max_len: Optional[int] = None, batch_size: int = 128, precision: Optional[str] = None,
               progress: bool = False) -> Any:
        """float32 ``(len(texts), hidden)`` sentence embeddings (see :mod:`jaxbert.inference.embed`)."""
        from .embed import embed

        return embed(encoder_of(self.model), self.tokenizer, texts, pooling=pooling, normalize=normalize,
                     max_len=max_len, batch_size=batch_size, pad_multiple=self.config.impl.pad_multiple,
                     policy=Policy.from_name(precision or "fp32"), attention=self.config.impl.kernels,
                     progress=progress)


def load(path: str | Path) -> Model:
    """A :class:`Model` from any jaxbert model directory (see the module docstring)."""
    from ..checkpoint import load_pretrained
    from ..finetune.model_dir import load_classifier
    from ..hf.export import finetuned_dir
    from ..tokenizer import load_tokenizer

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model '{path}' does not exist (expected a run, checkpoint, model or finetuned "
                                "model directory)")
    finetuned = finetuned_dir(path)
    if finetuned is not None:
        cfg, model, tokenizer, meta = load_classifier(finetuned)
        return Model(model, tokenizer, cfg, finetuned, meta)
    cfg, mlm, tokenizer_path = load_pretrained(path)
    return Model(mlm, load_tokenizer(tokenizer_path), cfg, Path(tokenizer_path).parent)
