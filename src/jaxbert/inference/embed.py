"""Sentence embeddings: ``jaxbert embed`` and the sentence-transformers files written beside an HF export.

A text is encoded as ``[CLS] text [SEP]`` (truncated to ``max_len`` tokens) and its embedding pooled from the
encoder's last hidden states: ``mean`` over its real tokens (specials included, as sentence-transformers does)
or ``cls`` (the hidden state at ``[CLS]``, not BERT's tanh pooler); ``normalize`` scales it to unit length.
Computed in float32 whatever the compute precision. Batches are sorted by length (few shapes, little padding)
and the rows put back in input order.

Example::

    jaxbert embed models/minilm --input sentences.txt --pooling mean --normalize --out emb.npy
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from ..config import POOLINGS
from ..data.glue import SplitData
from ..data.pairs import eval_batches, encode_split
from ..io import atomic_file
from ..model import BertModel
from ..model.bert import pool_tokens
from ..precision import Policy


@eqx.filter_jit
def embed_step(bert: BertModel, ids: jax.Array, segments: jax.Array, mask: jax.Array, *, pooling: str,
               normalize: bool, policy: Policy, attention: str) -> jax.Array:
    pooled = pool_tokens(bert(ids, segments, mask, policy=policy, attention=attention), mask, pooling)
    if normalize:
        pooled = pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
    return pooled


def embed(bert: BertModel, tokenizer: Any, texts: Sequence[str], *, pooling: str = "mean", normalize: bool = False,
          max_len: Optional[int] = None, batch_size: int = 128, pad_multiple: int = 32, policy: Policy = Policy(),
          attention: str = "auto", progress: bool = False) -> np.ndarray:
    """float32 ``(len(texts), hidden)`` embeddings in input order."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling '{pooling}': expected one of {', '.join(POOLINGS)}")
    max_len = min(max_len or bert.config.max_positions, bert.config.max_positions)
    texts = list(texts)
    data = SplitData("embed", "embed", "<texts>", texts, None, None, [str(i) for i in range(len(texts))])
    enc = encode_split(data, tokenizer, max_len)
    result = np.zeros((len(texts), bert.config.hidden), np.float32)
    with tqdm(total=len(texts), unit="text", desc="embed", disable=not progress, dynamic_ncols=True) as bar:
        for batch in eval_batches(enc, batch_size, pad_multiple):
            out = embed_step(bert, batch.input_ids, batch.segment_ids, batch.mask, pooling=pooling,
                             normalize=normalize, policy=policy, attention=attention)
            real = batch.rows >= 0
            result[batch.rows[real]] = np.asarray(out)[real]
            bar.update(int(real.sum()))
    return result


def read_texts(path: str | Path, column: Optional[str] = None) -> list[str]:
    """Texts from a .txt file (one per non-empty line) or a table file's ``column`` (default ``text``)."""
    from ..data.glue import read_table

    path = Path(path)
    if path.suffix.lower() == ".txt":
        if not path.is_file():
            raise FileNotFoundError(f"input file '{path}' does not exist")
        return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    table = read_table(path)
    name = column or "text"
    if name not in table:
        raise ValueError(f"{path}: no column '{name}' (columns are {list(table)}); name one with --column")
    return ["" if v is None else str(v) for v in table[name]]


def save_array(path: str | Path, array: np.ndarray) -> Path:
    """``np.save`` to ``path`` through a temporary file, renamed into place."""
    path = Path(path)
    if path.suffix != ".npy":
        raise ValueError(f"--out {path}: expected a .npy file")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array)
    return path


# ------------------------------------------------------------------------------ sentence-transformers files


def sentence_transformers_files(hidden: int, max_len: int, pooling: str = "mean",
                                normalize: bool = False) -> dict[str, Any]:
    """Relative path -> JSON content of the files ``SentenceTransformer(dir)`` reads: the module list
    (Transformer -> Pooling [-> Normalize]), the pooling config and the maximal sequence length. Lower-casing is
    left to the tokenizer's own normalizer."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling '{pooling}': expected one of {', '.join(POOLINGS)}")
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    pooling_config = {"word_embedding_dimension": hidden, "pooling_mode_cls_token": pooling == "cls",
                      "pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_max_tokens": False,
                      "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False,
                      "pooling_mode_lasttoken": False, "include_prompt": True}
    return {"modules.json": modules, "1_Pooling/config.json": pooling_config,
            "sentence_bert_config.json": {"max_seq_length": max_len, "do_lower_case": False},
            "config_sentence_transformers.json": {"prompts": {}, "default_prompt_name": None,
                                                  "similarity_fn_name": "cosine"}}
