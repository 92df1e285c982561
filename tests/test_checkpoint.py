"""Checkpoints: exact round trip, keep-N, corruption, fallback, incompatible configs, full disk, exported models."""

from __future__ import annotations

import errno
import warnings

import equinox as eqx
import jax
import numpy as np
import pytest

from jaxbert import checkpoint as ckpt
from conftest import tiny
from jaxbert import config
from jaxbert import io as jio
from jaxbert.checkpoint import CheckpointError, Progress
from jaxbert.train import init_state


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    return tiny()


@pytest.fixture(scope="module")
def state(cfg):
    return init_state(cfg, key=jax.random.PRNGKey(0))


def _template(cfg):
    return eqx.filter_eval_shape(init_state, cfg, key=jax.random.PRNGKey(0))


def _equal(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(la, lb))


def _save(run, cfg, state, step, tokenizer_dir, keep=3):
    return ckpt.save_checkpoint(run, cfg, state, Progress(step, 8 * step, 1.5 * step), tokenizer_dir, keep)


def test_round_trip_is_exact_and_keeps_the_last_n(tmp_path, cfg, state, tokenizer_dir):
    run = tmp_path / "run"
    for step in (1, 2, 3, 4):
        _save(run, cfg, state, step, tokenizer_dir, keep=2)
    assert [p.name for p in ckpt.checkpoint_dirs(run)] == ["step_00000003", "step_00000004"]
    restored, progress, path = ckpt.restore_latest(run, cfg, _template(cfg))
    assert progress == Progress(4, 32, 6.0) and path.name == "step_00000004"
    assert _equal(restored, state)
    assert (path / "tokenizer" / "tokenizer.json").read_text() == '{"stand-in": true}'
    assert not list((run / "checkpoints").glob(".tmp-*"))


def test_truncated_checkpoint_is_a_clear_error_and_resume_falls_back(tmp_path, cfg, state, tokenizer_dir):
    run = tmp_path / "run"
    _save(run, cfg, state, 1, tokenizer_dir)
    newest = _save(run, cfg, state, 2, tokenizer_dir)
    weights = newest / ckpt.MODEL_FILE
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        ckpt.restore_checkpoint(newest, cfg, _template(cfg))
    with pytest.warns(UserWarning, match="trying the previous one"):
        restored, progress, path = ckpt.restore_latest(run, cfg, _template(cfg))
    assert progress.step == 1 and _equal(restored, state)
    with pytest.warns(UserWarning, match="skipping checkpoint"):
        assert ckpt.latest_checkpoint(run).name == "step_00000001"
    (newest / ckpt.MANIFEST).write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        ckpt.read_manifest(newest)


def test_incompatible_config_is_one_clear_error(tmp_path, cfg, state, tokenizer_dir):
    run = tmp_path / "run"
    _save(run, cfg, state, 1, tokenizer_dir)
    other = config.replace(cfg, model={"ffn": 128})
    with pytest.raises(CheckpointError, match=r"incompatible config: model.ffn: checkpoint 64, config 128"):
        ckpt.restore_latest(run, other, _template(other))
    fp16 = config.replace(cfg, train={"precision": "fp16"})
    with pytest.raises(CheckpointError, match="train.precision"):
        ckpt.restore_latest(run, fp16, _template(fp16))
    longer = config.replace(cfg, train={"steps": 5000})  # schedule length may change on resume
    assert ckpt.restore_latest(run, longer, _template(longer))[1].step == 1


def test_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, cfg, state, tokenizer_dir, monkeypatch):
    run = tmp_path / "run"
    _save(run, cfg, state, 1, tokenizer_dir)
    real_write, calls = jio.write_bytes, []

    def failing_write(path, data):
        calls.append(path.name)
        if len(calls) == 2:  # the second payload of the save: the disk fills up mid-checkpoint
            real_write(path, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(jio, "write_bytes", failing_write)
    with pytest.raises(OSError, match="No space left on device.*previous checkpoint is left"):
        _save(run, cfg, state, 2, tokenizer_dir)
    monkeypatch.setattr(jio, "write_bytes", real_write)
    assert [p.name for p in ckpt.checkpoint_dirs(run)] == ["step_00000001"]
    assert not list((run / "checkpoints").glob(".tmp-*"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        restored, progress, _ = ckpt.restore_latest(run, cfg, _template(cfg))
    assert progress.step == 1 and _equal(restored, state)


def test_killed_mid_save_leaves_only_an_ignored_temp_dir(tmp_path, cfg, state, tokenizer_dir):
    run = tmp_path / "run"
    _save(run, cfg, state, 1, tokenizer_dir)
    stale = run / "checkpoints" / ".tmp-step_00000002-999999"
    stale.mkdir()
    (stale / ckpt.MODEL_FILE).write_bytes(b"partial")
    assert ckpt.latest_checkpoint(run).name == "step_00000001"
    _save(run, cfg, state, 3, tokenizer_dir)  # the next save clears leftovers of dead writers
    assert not stale.exists()


def test_save_model_and_load_pretrained_accept_model_checkpoint_and_run_dirs(tmp_path, cfg, state,
                                                                               tokenizer_dir):
    exported = ckpt.save_model(tmp_path / "export", cfg, state.model, tokenizer_dir)
    run = tmp_path / "run"
    checkpoint = _save(run, cfg, state, 5, tokenizer_dir)
    for path in (exported, checkpoint, run):
        loaded_cfg, model, tokenizer_path = ckpt.load_pretrained(path)
        assert loaded_cfg.model == cfg.model and _equal(model, state.model)
        assert (tokenizer_path / "tokenizer.json").is_file()
    with pytest.raises(CheckpointError, match="exported model, not a training checkpoint"):
        ckpt.restore_checkpoint(exported, cfg, _template(cfg))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ckpt.load_pretrained(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
        ckpt.load_pretrained(tmp_path / "empty")


def test_model_tensors_are_checked_by_name_and_shape(cfg, state):
    tensors = jio.named_arrays(state.model)
    assert "bert.layers.qkv.weight" in tensors and tensors["bert.layers.qkv.weight"].shape == (2, 32, 96)
    missing = dict(tensors)
    missing.pop("mlm.bias")
    with pytest.raises(CheckpointError, match="'mlm.bias' is missing"):
        ckpt.model_from_tensors(cfg, missing)
    wrong = dict(tensors, **{"mlm.bias": np.zeros(7, np.float32)})
    with pytest.raises(CheckpointError, match=r"shape \(7,\)"):
        ckpt.model_from_tensors(cfg, wrong)
    extra = dict(tensors, unused=np.zeros(1, np.float32))
    with pytest.raises(CheckpointError, match="unexpected tensors"):
        ckpt.model_from_tensors(cfg, extra)



def test_bias_free_glu_checkpoint_restores_bitwise_and_needs_the_same_options(tmp_path, tokenizer_dir):
    from jaxbert.train import make_spec, train_step

    cfg = tiny("model.bias=false", "model.ffn_type=glu", "train.micro_batch=4", "train.batch_start=4",
               "train.batch_end=4")
    rows = np.random.default_rng(0).integers(5, 128, (4, 32)).astype(np.int32)
    state = init_state(cfg, key=jax.random.PRNGKey(0))
    state, _ = train_step(state, [rows], 1e-2, make_spec(cfg, (0, 1, 2, 3, 4), 4))  # non-zero optimizer moments
    assert state.model.bert.layers.ffn_out.bias is None
    _save(tmp_path / "run", cfg, state, 1, tokenizer_dir)
    restored, progress, _ = ckpt.restore_latest(tmp_path / "run", cfg, _template(cfg))
    assert progress.step == 1 and _equal(restored, state)
    for key, value in (("bias", True), ("ffn_type", "mlp")):
        other = config.replace(cfg, model={key: value})
        with pytest.raises(CheckpointError, match=f"model.{key}"):
            ckpt.restore_latest(tmp_path / "run", other, _template(other))


def _drop_bias_key(directory):
    """Make a checkpoint look like one written before bias-free layers became the default: no ``model.bias`` in
    its config.yaml (the manifest's checksum of the file updated to match)."""
    import json

    path = directory / ckpt.CONFIG_FILE
    text = path.read_text()
    assert text.count("  bias: true\n") == 1
    path.write_text(text.replace("  bias: true\n", ""))
    manifest = json.loads((directory / ckpt.MANIFEST).read_text())
    manifest["files"][ckpt.CONFIG_FILE] = {"bytes": path.stat().st_size, "sha256": jio.sha256(path)}
    (directory / ckpt.MANIFEST).write_text(json.dumps(manifest))


def test_old_checkpoint_without_the_bias_key_loads_and_resumes_with_biases(tmp_path, tokenizer_dir):
    old = tiny("model.bias=true")
    state = init_state(old, key=jax.random.PRNGKey(0))
    assert state.model.bert.layers.qkv.bias is not None
    path = _save(tmp_path / "run", old, state, 1, tokenizer_dir)
    _drop_bias_key(path)
    assert "bias:" not in (path / ckpt.CONFIG_FILE).read_text().split("tokenizer:")[0]
    saved, model, _ = ckpt.load_pretrained(tmp_path / "run")
    assert saved == old and model.bert.layers.qkv.bias is not None
    assert _equal(model, state.model)
    resumed = config.load(str(path / ckpt.CONFIG_FILE), stored=True)  # as `jaxbert pretrain --resume` reads it
    restored, progress, _ = ckpt.restore_latest(tmp_path / "run", resumed, _template(resumed))
    assert progress.step == 1 and _equal(restored, state)
    new = tiny()  # today's default cannot continue it: one clear error, not a shape mismatch
    with pytest.raises(CheckpointError, match="model.bias: checkpoint True, config False"):
        ckpt.restore_latest(tmp_path / "run", new, _template(new))
