"""Config loading: presets, overrides, one-line errors naming the key, round trip through the saved YAML."""

from __future__ import annotations

import dataclasses
import os

import pytest

from jaxbert import config
from jaxbert.config import ConfigError

SIZES = {"tiny": (2, 128), "mini": (4, 256), "small": (4, 512), "medium": (8, 512), "base": (12, 768)}


@pytest.mark.parametrize("name", config.list_presets())
def test_every_shipped_preset_loads_and_is_frozen(name):
    cfg = config.load(name)
    assert cfg.preset == name
    assert cfg.model.hidden % cfg.model.heads == 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.hidden = 1  # type: ignore[misc]


@pytest.mark.parametrize("name, shape", SIZES.items())
def test_standard_sizes(name, shape):
    m = config.load(name).model
    assert (m.layers, m.hidden) == shape
    assert m.heads == m.hidden // 64 and m.ffn == 4 * m.hidden
    assert config.load(name).data.seq_len == 128


def test_overrides_apply_with_types():
    cfg = config.load("small", ["train.peak_lr=1e-3", "model.post_ln=true", "train.budget_minutes=2.5"])
    assert cfg.train.peak_lr == 1e-3 and cfg.model.post_ln is True and cfg.train.budget_minutes == 2.5


@pytest.mark.parametrize("override, key", [
    (["model.heads=5"], "model.heads"),  # does not divide 768
    (["data.seq_len=1024"], "data.seq_len"),  # above max positions
    (["model.nope=1"], "model.nope"),  # unknown key
    (["nope.x=1"], "nope"),  # unknown section
    (["model.hidden=abc"], "model.hidden"),  # wrong type
    (["train.precision=fp4"], "train.precision"),
    (["train.batch_end=100"], "train.batch_end"),  # not a multiple of micro_batch
    (["impl.attention=flash"], "impl.attention"),
    (["impl.norm=pallas_interpret"], "impl.norm"),  # the interpreter is for tests, not a config value
    (["impl.embedding_grad=atomic"], "impl.embedding_grad"),
    (["impl.ffn=triton"], "impl.ffn"),
    (["impl.ffn=pallas", "model.ffn_type=glu", "model.ffn=2048"], "impl.ffn"),  # MLP only
    (["impl.ffn=pallas", "train.precision=fp8"], "impl.ffn"),
    (["impl.ffn=pallas", "model.ffn=3000"], "impl.ffn"),  # not a multiple of the tile
    (["model.ffn_type=swiglu"], "model.ffn_type"),
    (["impl.attention=pallas", "finetune.max_len=512", "model.max_positions=512"], "impl.attention"),  # seq > 256
    (["data.max_predictions=0"], "data.max_predictions"),
    (["data.seq_len=64", "data.max_predictions=9"], "data.max_predictions"),  # 15% of 64 is 10
])
def test_bad_values_fail_at_load_naming_the_key(override, key):
    with pytest.raises(ConfigError) as info:
        config.load("base", override)
    message = str(info.value)
    assert f"'{key}'" in message and "\n" not in message


def test_override_without_equals_and_unknown_preset():
    with pytest.raises(ConfigError, match="expected key=value"):
        config.load("base", ["train.peak_lr"])
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        config.load("huge")


def test_yaml_file_with_bad_key(tmp_path):
    path = tmp_path / "my.yaml"
    path.write_text("model:\n  hidden: 64\n  heads: 3\n")
    with pytest.raises(ConfigError, match="'model.heads'"):
        config.load(str(path))
    path.write_text("model:\n  hiddn: 64\n")
    with pytest.raises(ConfigError, match="hiddn"):
        config.load(str(path))


def test_saved_config_round_trips(tmp_path):
    cfg = config.load("mini", ["train.peak_lr=3e-4", "tokenizer.path=/x/vocab.txt"])
    written = config.save(cfg, tmp_path / "run")
    assert written.read_text().startswith("preset: mini")
    assert config.load_saved(tmp_path / "run") == cfg
    assert not list((tmp_path / "run").glob("*.tmp"))


def test_default_encoder_linear_layers_have_no_bias():
    assert config.ModelConfig().bias is False
    for name in config.list_presets():  # no shipped preset asks for biases
        assert config.load(name).model.bias is False, name
    assert config.load("tiny", ["model.bias=true"]).model.bias is True


def _without_bias_key(text: str) -> str:
    """A saved config.yaml as written before ``model.bias`` had its current default (no ``bias`` key)."""
    lines = text.splitlines(keepends=True)
    kept = [line for line in lines if line.strip() not in ("bias: true", "bias: false")]
    assert len(kept) == len(lines) - 1
    return "".join(kept)


def test_stored_config_without_the_bias_key_loads_with_biases(tmp_path):
    cfg = config.load("mini", ["model.bias=true"])
    written = config.save(cfg, tmp_path / "run")
    written.write_text(_without_bias_key(written.read_text()))
    assert config.OLD_DEFAULTS["model"] == {"bias": True}
    assert config.load_saved(tmp_path / "run") == cfg  # old runs were trained with biases
    assert config.load(str(written), stored=True) == cfg  # a run's own config.yaml (resume, evaluate)
    assert config.load(str(written), ["train.steps=7"], stored=True).model.bias is True
    assert config.load(str(written)).model.bias is False  # the same file as a preset: the current default
    # a stored config that says bias: false keeps it
    free = config.load("mini")
    config.save(free, tmp_path / "free")
    assert config.load_saved(tmp_path / "free").model.bias is False
    assert config.load(str(tmp_path / "free" / "config.yaml"), stored=True).model.bias is False


def test_stored_config_without_the_mlm_logits_key_loads_float32_logits(tmp_path):
    assert config.load("mini").train.mlm_logits == "compute"  # today's default
    cfg = config.load("mini", ["train.mlm_logits=float32"])
    written = config.save(cfg, tmp_path / "run")
    lines = written.read_text().splitlines(keepends=True)
    kept = [line for line in lines if not line.strip().startswith("mlm_logits:")]
    assert len(kept) == len(lines) - 1
    written.write_text("".join(kept))
    assert config.load_saved(tmp_path / "run") == cfg  # written before the key existed: float32 logits
    assert config.load(str(written), stored=True) == cfg
    assert config.load(str(written)).train.mlm_logits == "compute"  # as a preset: the current default


def test_replace_validates():
    cfg = config.load("tiny")
    assert config.replace(cfg, model={"layers": 3}).model.layers == 3
    with pytest.raises(ConfigError, match="model.heads"):
        config.replace(cfg, model={"heads": 3})


def test_compilation_cache_setting(tmp_path):
    """impl.compilation_cache: 'auto' under $XDG_CACHE_HOME/jaxbert, a directory as given, 'off' disabled; applied
    in a fresh process, where it turns on JAX's persistent cache (compiled executables are written there)."""
    import subprocess
    import sys

    from jaxbert.config import compilation_cache_dir

    impl = config.load("tiny").impl
    assert impl.compilation_cache == "auto"
    assert compilation_cache_dir(dataclasses.replace(impl, compilation_cache="off")) is None
    assert compilation_cache_dir(dataclasses.replace(impl, compilation_cache=str(tmp_path))) == tmp_path
    script = ("import jax, jax.numpy as jnp\nfrom jaxbert import config\n"
              "folder = config.apply_runtime(config.load('tiny').impl)\n"
              "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)\n"
              "jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((8, 8))).block_until_ready()\nprint(folder)")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    folder = tmp_path / "xdg" / "jaxbert" / "xla"
    assert out.stdout.strip() == str(folder) and any(folder.iterdir())


def test_val_fraction_zero_and_text_format_are_checked():  # issue 19, defect 1
    with pytest.raises(ConfigError, match="'data.val_fraction'"):
        config.load("tiny", ["data.val_fraction=0"])
    with pytest.raises(ConfigError, match="'data.text_format'"):
        config.load("tiny", ["data.text_format=paragraphs"])
    assert config.load("tiny", ["data.text_format=line"]).data.text_format == "line"


def test_yaml_syntax_error_names_the_line(tmp_path):  # issue 19, defect 11
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  hidden: 64\n  heads: [2\ntrain:\n  steps: 3\n")
    with pytest.raises(ConfigError) as info:
        config.load(str(path))
    message = str(info.value)
    assert "\n" not in message and f"'{path}:" in message and "not valid YAML" in message
    line = int(message.split(f"'{path}:")[1].split(":")[0])
    assert 3 <= line <= 4
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+:\d+"):
        config.load_saved(path)


def test_overrides_may_follow_options():  # issue 19, defect 11
    from jaxbert.cli import pretrain_parser as build_parser

    for argv in (["train.steps=5", "--resume"], ["--resume", "train.steps=5"],
                 ["--config", "tiny", "--resume", "train.steps=5", "--quiet", "train.seed=2"]):
        args = config.parse_args(build_parser(), argv)
        assert args.resume and "train.steps=5" in args.overrides
