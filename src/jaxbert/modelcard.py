"""Model cards: the ``README.md`` (HuggingFace model-card format: YAML metadata, then Markdown) written into every
pretraining checkpoint and model dir, every finetuned model and every HF export.

A card states what the model is and how it came to be: the data, the tokens seen and the held-out MLM metrics
of pretraining (from the checkpoint's manifest and the run's ``metrics.jsonl``), the GLUE dev results of a
finetuned model (with its pretraining traced through ``--init``), the config and the command that wrote it.
Cards are rendered from plain values by pure functions; :func:`write_card` writes one atomically.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any, Optional

import yaml

from . import config as config_lib
from .config import Config
from .io import write_atomic

CARD = "README.md"
_MLM_KEYS = (("loss", "held-out MLM loss"), ("accuracy", "MLM accuracy (all targets)"),
             ("masked_accuracy", "MLM accuracy ([MASK]ed positions)"))


def current_command() -> str:
    """The command line of this process, as a user would type it (``jaxbert ...`` for the console script)."""
    path = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path("python")
    if path.name == "jaxbert" or path.name == "cli.py":
        return shlex.join(["jaxbert", *sys.argv[1:]])
    if path.name == "__main__.py":  # python -m <package>
        return shlex.join(["python", "-m", path.parent.name, *sys.argv[1:]])
    return shlex.join([path.name, *sys.argv[1:]])


# ------------------------------------------------------------------------------------------------- facts


def last_eval(metrics_file: Path, step: int) -> Optional[dict[str, float]]:
    """The last ``eval`` record at or before ``step`` in a run's metrics.jsonl (None when there is none)."""
    from .tracking import read_jsonl

    if not metrics_file.is_file():
        return None
    evals = [r for r in read_jsonl(metrics_file) if r.get("split") == "eval" and r.get("step", 0) <= step]
    return evals[-1] if evals else None


# ------------------------------------------------------------------------------------------------ render


def _front_matter(pipeline: str, results: list[dict[str, Any]], name: str) -> str:
    meta: dict[str, Any] = {"library_name": "jaxbert", "pipeline_tag": pipeline,
                            "tags": ["bert", "jax", "equinox", "jaxbert", pipeline]}
    if results:
        meta["model-index"] = [{"name": name, "results": results}]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def _architecture(cfg: Config) -> str:
    m = cfg.model
    layout = "post-LayerNorm (original BERT)" if m.post_ln else "pre-LayerNorm"
    return (f"A BERT encoder, {m.layers} layers, hidden {m.hidden}, {m.heads} heads, feed-forward {m.ffn}, "
            f"{layout}, {m.activation}, vocabulary {m.vocab_size}, up to {m.max_positions} tokens.")


def _pretraining_lines(facts: dict[str, Any]) -> list[str]:
    if "step" not in facts:
        return ["- Tokens seen, MLM accuracy: not recorded (not a jaxbert pretraining checkpoint)."]
    lines = [f"- Steps: {facts['step']:,}; tokens seen: {facts['tokens_seen']:,}"]
    mlm = facts.get("mlm") or {}
    shown = [f"{label} {mlm[key]:.4f}" for key, label in _MLM_KEYS if key in mlm]
    lines.append(f"- At step {mlm.get('step', '?')}: " + ", ".join(shown) if shown else
                 "- Held-out MLM metrics: none recorded")
    return lines


def _config_block(cfg: Config, sections: tuple[str, ...]) -> list[str]:
    data = config_lib.to_dict(cfg)
    text = yaml.safe_dump({k: data[k] for k in sections}, sort_keys=False)
    return ["## Config", "", "```yaml", text.rstrip(), "```", ""]


def _footer(command: str, directory_hint: str) -> list[str]:
    return ["## Command", "", "```bash", command, "```", "", "## Use", "", "```python", "import jaxbert", "",
            f"m = jaxbert.load({directory_hint!r})", "```", ""]


def pretraining_card(cfg: Config, facts: Optional[dict[str, Any]] = None, command: Optional[str] = None) -> str:
    """The card of a pretrained (MLM) model: data, tokens seen, MLM metrics, config, command."""
    facts = facts or {}
    d = cfg.data
    data = [f"- Corpus: `{d.source}` (format {d.format}); sequences of {d.seq_len} tokens, "
            f"{d.mlm_probability:.0%} masked (80/10/10)"]
    if facts.get("imported_from"):
        data = [f"- Imported from the HuggingFace model `{facts['imported_from']}` (its data: see its own card)"]
    lines = [_front_matter("fill-mask", [], "jaxbert-mlm"), "# jaxbert BERT (masked-language model)", "",
             _architecture(cfg), "", "## Data", "", *data,
             f"- Tokenizer: WordPiece, {cfg.model.vocab_size} tokens"
             + (f" (`{cfg.tokenizer.path}`)" if cfg.tokenizer.path else ""), "", "## Pretraining", ""]
    lines += _pretraining_lines(facts) + [f"- Precision {cfg.train.precision}, peak learning rate "
                                          f"{cfg.train.peak_lr:g}, batch {cfg.train.batch_end}", "",
                                          "## GLUE dev", "",
                                          "Not evaluated here: `jaxbert glue --all --init <this directory>`.", ""]
    return "\n".join(lines + _config_block(cfg, ("model", "data", "train")) +
                     _footer(command or current_command(), "<this directory>"))


def _glue_results(task: str, dev: dict[str, dict[str, float]], hf_config: str) -> list[dict[str, Any]]:
    return [{"task": {"type": "text-classification"},
             "dataset": {"name": f"{task} ({split})", "type": "glue" if hf_config else "custom",
                         **({"config": hf_config} if hf_config else {}), "split": split},
             "metrics": [{"type": m, "value": round(float(v), 6)} for m, v in metrics.items()]}
            for split, metrics in dev.items()]


def finetuned_card(cfg: Config, meta: dict[str, Any], num_labels: int, command: Optional[str] = None,
                   init_facts: Optional[dict[str, Any]] = None) -> str:
    """The card of a finetuned classifier: task and labels, its data, dev results, the pretraining it started
    from (tokens seen and MLM accuracy from ``init_facts``, see :func:`jaxbert.checkpoint.pretraining_facts`), config,
    command."""
    from .data.glue import TASKS

    task = str(meta.get("task") or "unknown")
    known = TASKS.get(task)
    dev = meta.get("dev") or {}
    labels = meta.get("labels") or []
    f = cfg.finetune
    data = ([f"- Train: `{f.train_file}`"] if f.train_file else [f"- Train: GLUE {task} from `{f.glue_dir}`"]) + \
           ([f"- Dev: `{f.dev_file}`"] if f.dev_file else [])
    if f.max_train_examples:
        data.append(f"- A seeded random subset of {f.max_train_examples} training rows")
    rows = [f"| {task} | {split} | {m} | {100 * v:.2f} |" for split, ms in dev.items() for m, v in ms.items()]
    init = str(meta.get("init") or "random")
    lines = [_front_matter("text-classification", _glue_results(task, dev, known.hf_config if known else ""),
                           f"jaxbert-{task}"),
             f"# jaxbert BERT finetuned on {task}", "", _architecture(cfg), "",
             f"Outputs: {', '.join(map(str, labels)) if labels else 'a regression score'} ({num_labels} "
             f"output{'s' if num_labels > 1 else ''}).", "", "## Data", "", *data, "", "## Pretraining", "",
             f"- Started from: `{init}`", *(_pretraining_lines(init_facts or {}) if init != "random" else []),
             "", "## GLUE dev", ""]
    lines += (["| task | split | metric | value |", "|---|---|---|---|", *rows] if rows else ["No dev results."])
    epoch = meta.get("epoch")
    lines += ["", f"Best epoch {epoch} of {f.epochs}; lr {f.lr:g}, batch {f.batch_size}, precision {f.precision}."
              if epoch else "", ""]
    return "\n".join(lines + _config_block(cfg, ("model", "finetune")) +
                     _footer(command or current_command(), "<this directory>"))


def exported_card(source_card: Optional[str], fallback: str, command: Optional[str] = None) -> str:
    """An export's card: the source directory's own card (or ``fallback``), with the export command added."""
    text = source_card if source_card else fallback
    return text.rstrip("\n") + f"\n\n## Export\n\n```bash\n{command or current_command()}\n```\n"


def write_card(directory: str | Path, text: str) -> Path:
    """``directory/README.md``, written atomically."""
    return write_atomic(Path(directory) / CARD, text)
