"""``jaxbert info``: library versions, devices, and the parameter count of every shipped preset."""

from __future__ import annotations

import argparse
import importlib.metadata
import platform

import equinox as eqx
import jax

from . import config as config_lib
from .model import BertForMLM, count_parameters

_PACKAGES = ("jax", "jaxlib", "equinox", "optax", "numpy", "omegaconf", "tokenizers", "datasets", "safetensors",
             "wandb", "transformers", "torch")


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "-"
    return found


def preset_parameters(name: str) -> tuple[config_lib.Config, int, int]:
    """(config, encoder+pooler parameters, with MLM head) of a preset, counted without allocating weights."""
    cfg = config_lib.load(name)
    model = eqx.filter_eval_shape(BertForMLM, cfg.model, key=jax.random.PRNGKey(0))
    return cfg, count_parameters(model.bert), count_parameters(model)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="jaxbert info", description=__doc__)
    parser.parse_args(argv)
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()))
    print(f"backend: {jax.default_backend()}; devices: {', '.join(str(d) for d in jax.devices())}")
    print(f"\n{'preset':<8} {'layers':>6} {'hidden':>6} {'heads':>5} {'ffn':>5} {'vocab':>6} "
          f"{'encoder':>12} {'with MLM head':>14}")
    for name in config_lib.list_presets():
        cfg, encoder, total = preset_parameters(name)
        m = cfg.model
        print(f"{name:<8} {m.layers:>6} {m.hidden:>6} {m.heads:>5} {m.ffn:>5} {m.vocab_size:>6} "
              f"{encoder:>12,} {total:>14,}")
    cfg = config_lib.load("base", ["model.vocab_size=30522"])
    bert = eqx.filter_eval_shape(BertForMLM, cfg.model, key=jax.random.PRNGKey(0))
    print(f"\nbase with BERT's 30522-token vocabulary: {count_parameters(bert.bert):,} encoder parameters "
          f"(pooler included), {count_parameters(bert):,} with the MLM head")
    return 0
