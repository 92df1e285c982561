"""jaxbert: a small, clean and fast BERT stack in JAX + Equinox + Optax.

``jaxbert.load(path)`` returns a :class:`jaxbert.api.Model` (``predict``, ``fill_mask``, ``encode``,
``tokenizer``); JAX is imported on first use, not by ``import jaxbert``.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["load", "Model", "__version__"]


def load(path: Any) -> Any:
    """Load a model directory (finetuned, pretraining run, checkpoint or model dir): see :mod:`jaxbert.api`."""
    from .api import load as _load

    return _load(path)


def __getattr__(name: str) -> Any:
    if name == "Model":
        from .api import Model

        return Model
    raise AttributeError(f"module 'jaxbert' has no attribute {name!r}")
