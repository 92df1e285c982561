"""Import a HuggingFace BERT directory as a jaxbert checkpoint directory.

Reads ``config.json``, the weights (``model.safetensors``, a sharded ``model.safetensors.index.json``, or
``pytorch_model.bin`` when torch is installed) and the tokenizer (``tokenizer.json`` or ``vocab.txt``), and
writes a jaxbert model directory:

* a BertModel / BertForMaskedLM checkpoint becomes a pretrained-model directory
  (:func:`jaxbert.checkpoint.save_model`; a missing MLM head or pooler is freshly initialised, with a warning);
* a BertForSequenceClassification checkpoint becomes a finetuned-model directory
  (:func:`jaxbert.finetune.model_dir.save_classifier`): encoder and classifier kept, ``finetuned.json`` recording
  ``num_labels`` and the label names, so ``jaxbert finetune --init`` can reuse the head.

Both also hold ``hf_source.json`` (the original config.json and where it came from).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import numpy as np
from jaxtyping import PRNGKeyArray
from safetensors import SafetensorError, deserialize, safe_open

from .. import config as config_lib
from .. import io
from ..checkpoint import write_model_files
from ..config import Config, ModelConfig
from ..finetune.model_dir import write_finetuned
from ..modelcard import pretraining_card
from .convert import hf_state_to_model, model_config_from_hf
from ..model import BertForClassification
from ..tokenizer import Tokenizer, load_tokenizer

SOURCE_FILE = "hf_source.json"  # the imported config.json, kept for reference (labels, provenance)
_SAFETENSORS, _INDEX, _TORCH = "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"
_NUMPY_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
                 "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


# --- reading an HF directory ------------------------------------------------------------------------------------


def read_hf_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"HF model directory '{directory}': no config.json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file as numpy arrays (bfloat16 is widened to float32)."""
    try:
        with safe_open(str(path), framework="np") as handle:
            names = list(handle.keys())
            if all(handle.get_slice(n).get_dtype() in _NUMPY_DTYPES for n in names):
                return {n: handle.get_tensor(n) for n in names}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from None
    out = {}
    for name, info in deserialize(path.read_bytes()):  # a dtype numpy lacks (bfloat16): decode it ourselves
        if info["dtype"] == "BF16":
            bits = np.frombuffer(info["data"], dtype=np.uint16).astype(np.uint32) << 16
            out[name] = bits.view(np.float32).reshape(info["shape"])
        elif info["dtype"] in _NUMPY_DTYPES:
            out[name] = np.frombuffer(info["data"], dtype=_NUMPY_DTYPES[info["dtype"]]).reshape(info["shape"])
        else:
            raise ValueError(f"{path}: tensor '{name}' has unsupported dtype {info['dtype']}")
    return out


def _read_torch(path: Path) -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        raise ValueError(f"{path}: reading pytorch_model.bin needs torch (pip install torch), "
                         "or convert the weights to model.safetensors") from None
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # pickle/zip errors come in many types
        raise ValueError(f"{path}: not a readable PyTorch state dict ({str(err).splitlines()[0]})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict (name -> tensor)")
    return state


def read_weights(directory: Path) -> dict[str, Any]:
    """The state dict of an HF directory: model.safetensors, a sharded safetensors index, or pytorch_model.bin."""
    if (directory / _SAFETENSORS).is_file():
        return read_safetensors(directory / _SAFETENSORS)
    if (directory / _INDEX).is_file():
        try:
            shards = sorted(set(json.loads((directory / _INDEX).read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError):
            raise ValueError(f"{directory / _INDEX}: expected a JSON object with a 'weight_map'") from None
        state: dict[str, Any] = {}
        for shard in shards:
            if not (directory / shard).is_file():
                raise FileNotFoundError(f"{directory / _INDEX}: shard '{shard}' is missing")
            state.update(read_safetensors(directory / shard))
        return state
    if (directory / _TORCH).is_file():
        return _read_torch(directory / _TORCH)
    raise FileNotFoundError(f"HF model directory '{directory}': no weights "
                            f"(expected {_SAFETENSORS}, {_INDEX} or {_TORCH})")


def read_hf_tokenizer(directory: Path) -> Tokenizer:
    """The tokenizer of an HF directory (tokenizer.json preferred; vocab.txt honours do_lower_case)."""
    if not any((directory / n).is_file() for n in ("tokenizer.json", "vocab.txt")):
        raise FileNotFoundError(f"HF model directory '{directory}': no tokenizer (expected tokenizer.json "
                                "or vocab.txt)")
    lowercase = True
    settings = directory / "tokenizer_config.json"
    if settings.is_file():
        try:
            lowercase = bool(json.loads(settings.read_text(encoding="utf-8")).get("do_lower_case", True))
        except ValueError:
            raise ValueError(f"{settings}: not valid JSON") from None
    return load_tokenizer(directory, lowercase=lowercase)


def run_config(model_cfg: ModelConfig, tokenizer: Tokenizer) -> Config:
    """A full jaxbert Config around an imported model (base preset; lengths capped by max_positions)."""
    base = config_lib.load("base")
    seq_len = min(base.data.seq_len, model_cfg.max_positions)
    return config_lib.replace(
        base, model=model_cfg,
        tokenizer={"vocab_size": tokenizer.vocab_size, "lowercase": _lowercase(tokenizer)},
        data={"seq_len": seq_len, "max_predictions": min(base.data.max_predictions, seq_len)},
        finetune={"max_len": min(base.finetune.max_len, model_cfg.max_positions)})


def _lowercase(tokenizer: Tokenizer) -> bool:
    return bool(getattr(tokenizer.inner.normalizer, "lowercase", True))


def classifier_meta(hf_config: dict[str, Any], num_labels: int, source: Path) -> dict[str, Any]:
    """``finetuned.json`` fields for an imported classifier: label names from HF's ``id2label``."""
    id2label = hf_config.get("id2label") or {}
    names = [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(num_labels)]
    regression = num_labels == 1 or hf_config.get("problem_type") == "regression"
    return {"task": "unknown (imported from HuggingFace)", "labels": [] if regression else names,
            "id2label": {str(i): n for i, n in enumerate(names)}, "problem_type": hf_config.get("problem_type"),
            "init": str(source.resolve())}


def import_hf(source: str | Path, out: str | Path, *, key: Optional[PRNGKeyArray] = None) -> Path:
    """Convert the HF BERT directory ``source`` into a jaxbert model directory ``out`` (written atomically).

    Returns ``out``. Raises FileNotFoundError / ValueError naming the file or tensor on bad input.
    """
    source, out = Path(source), Path(out)
    if not source.is_dir():
        raise FileNotFoundError(f"HF model directory '{source}' does not exist")
    io.check_empty(out)
    hf_config = read_hf_config(source)
    model_config_from_hf(hf_config, str(source / "config.json"))  # fail on the config before reading weights
    tokenizer = read_hf_tokenizer(source)
    state = read_weights(source)
    cfg, model = hf_state_to_model(state, hf_config, key=key)
    if tokenizer.vocab_size != cfg.vocab_size:
        raise ValueError(f"tokenizer {tokenizer.source}: {tokenizer.vocab_size} tokens, but the word embedding "
                         f"matrix has {cfg.vocab_size} rows")
    config = run_config(cfg, tokenizer)

    def write(tmp: Path) -> dict[str, Any]:
        if isinstance(model, BertForClassification):  # the finetuned-model format: encoder + head
            meta = classifier_meta(hf_config, model.num_labels, source)
            fields = write_finetuned(tmp, config, model, tokenizer, meta)
        else:
            card = pretraining_card(config, {"imported_from": str(source.resolve())})
            fields = write_model_files(tmp, config, model, tokenizer, card)
        io.write_json(tmp / SOURCE_FILE, {"source": str(source.resolve()), "config": hf_config})
        return fields

    io.atomic_dir(out, write, exists="refuse")
    return out
