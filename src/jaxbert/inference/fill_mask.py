"""``jaxbert fill-mask``: the most likely tokens for every ``[MASK]`` of a text, from a model with its MLM head
(a pretraining run, a checkpoint, an exported or imported model).

Each ``[MASK]`` is predicted independently (the others stay masked), from one forward pass.

Example::

    jaxbert fill-mask runs/mini-20261129-101500 "Paris is the [MASK] of France." --top-k 5
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..data.pairs import padded_length
from ..model import BertForMLM
from ..precision import Policy

PAD_MULTIPLE = 32  # texts are padded to a multiple of this length: few compiled shapes over many calls


@dataclass(frozen=True)
class Candidate:
    token: str  # the vocabulary entry ("capital", "##s")
    token_id: int
    probability: float
    text: str  # the input with this token in place of its [MASK] (other masks kept), decoded


@eqx.filter_jit
def _mask_probabilities(model: BertForMLM, ids: jax.Array, mask: jax.Array, positions: jax.Array, *,
                        policy: Policy, attention: str) -> jax.Array:
    logits = model(ids, jnp.zeros_like(ids), mask, positions, policy=policy, attention=attention)
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


def fill_mask(model: BertForMLM, tokenizer: Any, text: str, top_k: int = 5, *, policy: Policy = Policy(),
              attention: str = "auto") -> list[list[Candidate]]:
    """For every ``[MASK]`` in ``text`` (in order), its ``top_k`` most probable tokens, most probable first."""
    if not isinstance(model, BertForMLM):
        raise ValueError("fill-mask needs a model with its MLM head (a pretraining run, checkpoint or model dir); "
                         "a finetuned classifier has none")
    if top_k < 1:
        raise ValueError(f"--top-k {top_k}: expected at least 1")
    ids = tokenizer.encode_pair(text).input_ids
    mask_id = tokenizer.special.mask
    where = [i for i, t in enumerate(ids) if t == mask_id]
    if not where:
        raise ValueError(f"no {tokenizer.id_to_token(mask_id)} token in the text {text!r}")
    limit = model.config.max_positions
    if len(ids) > limit:
        raise ValueError(f"the text has {len(ids)} tokens, the model reads at most {limit}")
    width = padded_length(len(ids), PAD_MULTIPLE, limit)
    row = np.full((1, width), tokenizer.special.pad, np.int32)
    row[0, :len(ids)] = ids
    probs = np.asarray(_mask_probabilities(model, row, np.arange(width)[None] < len(ids),
                                           np.asarray([where], np.int32), policy=policy, attention=attention))[0]
    result = []
    for slot, position in enumerate(where):
        best = np.argsort(-probs[slot], kind="stable")[:top_k]
        candidates = []
        for token_id in best:
            filled = list(ids)
            filled[position] = int(token_id)
            shown = tokenizer.decode([t for t in filled[1:-1]], skip_special_tokens=False)
            candidates.append(Candidate(str(tokenizer.id_to_token(int(token_id))), int(token_id),
                                        float(probs[slot, token_id]), shown))
        result.append(candidates)
    return result
