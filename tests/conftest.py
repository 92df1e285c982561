"""Shared fixtures: tiny configs, the path of the shared real data (tests using it skip when it is absent)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import jax
import pytest

jax.config.update("jax_enable_x64", False)
# CLI entry points turn on JAX's persistent compilation cache under $XDG_CACHE_HOME/jaxbert: keep the tests' own
os.environ.setdefault("XDG_CACHE_HOME", tempfile.mkdtemp(prefix="jaxbert-tests-cache-"))

# ../shared/data beside the checkout (CI lays it out the same way); JAXBERT_SHARED_DATA overrides.
SHARED_DATA = Path(os.environ.get("JAXBERT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def tiny_config():
    """A very small model config (2 layers, hidden 32) for fast tests."""
    from jaxbert import config

    return config.load("tiny", ["model.hidden=32", "model.heads=2", "model.ffn=64", "model.vocab_size=128",
                                "model.max_positions=64", "data.seq_len=32", "data.max_predictions=6",
                                "finetune.max_len=64"])
