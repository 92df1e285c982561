"""The ``jaxbert`` command. Thin on purpose: each subcommand is ``main(argv) -> int`` in the module that owns
the stage, so all logic stays importable and testable without a shell."""

from __future__ import annotations

import importlib
import sys
from typing import Callable, Optional, Sequence

from .config import ConfigError

# subcommand -> (module, function, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "quickstart": ("jaxbert.quickstart", "main", "tokenizer + data + a short pretraining run on the embedded corpus"),
    "tokenizer": ("jaxbert.tokenizer", "main", "train / inspect a WordPiece tokenizer (`jaxbert tokenizer train`)"),
    "prepare": ("jaxbert.data.prepare", "main", "tokenize a corpus into a memmap token stream"),
    "pretrain": ("jaxbert.pretrain", "main", "MLM pretraining"),
    "finetune": ("jaxbert.finetune", "main", "finetune and evaluate on one GLUE task"),
    "glue": ("jaxbert.glue_cli", "main", "finetune on every GLUE task found; table and submission zip"),
    "predict": ("jaxbert.inference", "predict_main", "labels and probabilities of a finetuned model for a file's rows"),
    "evaluate": ("jaxbert.inference", "evaluate_main", "dev metrics of a finetuned model (no training)"),
    "fill-mask": ("jaxbert.fill_mask", "main", "the most likely tokens for each [MASK] of a text"),
    "embed": ("jaxbert.embed", "main", "sentence embeddings (mean or [CLS] pooling) as a .npy array"),
    "import-hf": ("jaxbert.hf", "import_main", "convert a HuggingFace BERT directory into a jaxbert checkpoint"),
    "export": ("jaxbert.hf", "export_main", "export a jaxbert model as a HuggingFace directory"),
    "bench": ("jaxbert.bench", "main", "time the pretraining step (throughput, MFU)"),
    "info": ("jaxbert.info", "main", "versions, devices and the parameter count of every preset"),
}


def _resolve(name: str) -> Optional[Callable[[list[str]], int]]:
    module_name, function, _ = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name == module_name:  # the stage's module does not exist yet
            return None
        raise
    return getattr(module, function, None)


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: jaxbert <command> [options]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "`jaxbert <command> --help` describes each command's options."]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"jaxbert: unknown command '{name}'\n\n{usage()}", file=sys.stderr)
        return 2
    entry = _resolve(name)
    if entry is None:
        print(f"jaxbert {name}: not implemented yet", file=sys.stderr)
        return 2
    try:
        return int(entry(rest) or 0)
    except (ConfigError, OSError, ValueError) as err:
        # Bad input and failed reads/writes (a missing file, a full disk) are reported in one line; programming
        # errors keep their traceback.
        print(f"jaxbert {name}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"jaxbert {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
