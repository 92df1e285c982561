"""jaxbert: a small, clean and fast BERT stack in JAX + Equinox + Optax.

The public Python API (JAX is imported on first use, not by ``import jaxbert``):

* ``jaxbert.load(path)`` -> :class:`jaxbert.inference.api.Model` (``predict``, ``fill_mask``, ``encode``,
  ``tokenizer``) from a finetuned model, a pretraining run, a checkpoint or a model directory;
* ``jaxbert.load_config(preset, overrides)`` -> a validated, frozen :class:`jaxbert.config.Config`;
* ``jaxbert.run_pretraining(cfg)`` (:func:`jaxbert.pretrain.pretrain`) and ``jaxbert.run_finetuning(cfg, init)``
  (:func:`jaxbert.finetune.trainer.finetune`);
* ``jaxbert.import_hf(source, out)`` and ``jaxbert.export(path, out)``: HuggingFace directories in and out.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

__version__ = "0.1.0"
__all__ = ["load", "Model", "load_config", "run_pretraining", "run_finetuning", "import_hf", "export", "__version__"]

# public name -> (module, attribute), imported on first access
_LAZY = {"Model": ("jaxbert.inference.api", "Model"), "load_config": ("jaxbert.config", "load"),
         "run_pretraining": ("jaxbert.pretrain", "pretrain"),
         "run_finetuning": ("jaxbert.finetune.trainer", "finetune"), "import_hf": ("jaxbert.hf.importer", "import_hf")}


def load(path: Any) -> Any:
    """Load a model directory (finetuned, pretraining run, checkpoint or model dir): see
    :func:`jaxbert.inference.api.load`."""
    from .inference.api import load as _load

    return _load(path)


def export(path: str | Path, out: str | Path, *, pooling: str = "mean", normalize: bool = False) -> Path:
    """Export a jaxbert directory (run, checkpoint, model or finetuned model) as a HuggingFace directory ``out``
    (:func:`jaxbert.hf.export.export_directory`); returns ``out``."""
    from .hf.export import export_directory

    return export_directory(path, out, pooling=pooling, normalize=normalize)[0]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attribute = _LAZY[name]
        return getattr(importlib.import_module(module), attribute)
    raise AttributeError(f"module 'jaxbert' has no attribute {name!r}")
