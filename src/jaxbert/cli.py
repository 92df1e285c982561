"""The ``jaxbert`` command. Thin on purpose: each subcommand is an entry point ``(argv) -> int`` in the
command-line module of the stage that owns it (``jaxbert.finetune.cli``, ``jaxbert.inference.cli``,
``jaxbert.hf.cli``) or, for the single-module stages (``tokenizer``, ``prepare``, ``pretrain``, ``info``), here;
library modules parse no arguments, so all logic stays importable and testable without a shell. The quick-start
demo and the step benchmark are command-line tools of their own (``jaxbert.quickstart``, ``jaxbert.bench``)."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import platform
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from . import config as config_lib
from .config import ConfigError

# subcommand -> (module, function, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "quickstart": ("jaxbert.quickstart", "main", "tokenizer + data + a short pretraining run on the embedded corpus"),
    "tokenizer": ("jaxbert.cli", "tokenizer_main", "train / inspect a WordPiece tokenizer (`jaxbert tokenizer train`)"),
    "prepare": ("jaxbert.cli", "prepare_main", "tokenize a corpus into a memmap token stream"),
    "pretrain": ("jaxbert.cli", "pretrain_main", "MLM pretraining"),
    "finetune": ("jaxbert.finetune.cli", "finetune_main", "finetune and evaluate on one GLUE task"),
    "glue": ("jaxbert.finetune.cli", "glue_main", "finetune on every GLUE task found; table and submission zip"),
    "predict": ("jaxbert.inference.cli", "predict_main", "a finetuned model's labels and probabilities per row"),
    "evaluate": ("jaxbert.inference.cli", "evaluate_main", "dev metrics of a finetuned model (no training)"),
    "fill-mask": ("jaxbert.inference.cli", "fill_mask_main", "the most likely tokens for each [MASK] of a text"),
    "embed": ("jaxbert.inference.cli", "embed_main", "sentence embeddings (mean or [CLS] pooling) as a .npy array"),
    "import-hf": ("jaxbert.hf.cli", "import_main", "convert a HuggingFace BERT directory into a jaxbert checkpoint"),
    "export": ("jaxbert.hf.cli", "export_main", "export a jaxbert model as a HuggingFace directory"),
    "bench": ("jaxbert.bench", "main", "time the pretraining step (throughput, MFU)"),
    "info": ("jaxbert.cli", "info_main", "versions, devices and the parameter count of every preset"),
}


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


def preset_parameters(name: str, overrides: Sequence[str] = ()) -> tuple[config_lib.Config, int, int]:
    """(config, encoder+pooler parameters, with MLM head) of a preset, counted without allocating weights."""
    import equinox as eqx
    import jax

    from .model import BertForMLM, count_parameters

    cfg = config_lib.load(name, list(overrides))
    model = eqx.filter_eval_shape(BertForMLM, cfg.model, key=jax.random.PRNGKey(0))
    return cfg, count_parameters(model.bert), count_parameters(model)


def info_main(argv: Sequence[str]) -> int:
    """``jaxbert info``: library versions, devices, and the parameter count of every shipped preset."""
    import jax

    argparse.ArgumentParser(prog="jaxbert info", description=info_main.__doc__).parse_args(argv)
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()))
    print(f"backend: {jax.default_backend()}; devices: {', '.join(str(d) for d in jax.devices())}")
    print(f"\n{'preset':<8} {'layers':>6} {'hidden':>6} {'heads':>5} {'ffn':>5} {'vocab':>6} "
          f"{'encoder':>12} {'with MLM head':>14}")
    for name in config_lib.list_presets():
        cfg, encoder, total = preset_parameters(name)
        m = cfg.model
        print(f"{name:<8} {m.layers:>6} {m.hidden:>6} {m.heads:>5} {m.ffn:>5} {m.vocab_size:>6} "
              f"{encoder:>12,} {total:>14,}")
    _, encoder, total = preset_parameters("base", ["model.vocab_size=30522", "model.bias=true"])
    print(f"\nbase with BERT's 30522-token vocabulary and linear biases: {encoder:,} encoder parameters "
          f"(pooler included), {total:,} with the MLM head")
    return 0


# ------------------------------------------------------------------------------------------- stage commands


def _tokenizer_train(args: argparse.Namespace) -> int:
    from .data.corpus import iter_documents
    from .tokenizer import check_out_dir, round_vocab_size, save_new, train_tokenizer

    cfg = config_lib.from_args(args)
    out = Path(args.out)
    check_out_dir(out)  # before the training, not after
    iter_documents(cfg.data)  # a missing source fails here
    print(f"training a WordPiece tokenizer (vocab {round_vocab_size(cfg.tokenizer.vocab_size)}) "
          f"on {cfg.data.source}")
    tok = train_tokenizer(lambda: iter_documents(cfg.data, workers=cfg.impl.workers or None), cfg.tokenizer,
                          progress=not args.quiet)
    save_new(tok, out)
    print(f"saved {tok.vocab_size} tokens (vocab hash {tok.vocab_hash()}) to {out}/tokenizer.json and vocab.txt")
    return 0


def _tokenizer_encode(args: argparse.Namespace) -> int:
    from .tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer, lowercase=not args.cased)
    ids = tok.encode(args.text)
    print(json.dumps({"ids": ids, "tokens": [tok.id_to_token(i) for i in ids], "decoded": tok.decode(ids)},
                     ensure_ascii=False))
    return 0


def tokenizer_main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxbert tokenizer", description="Train or inspect a WordPiece tokenizer.")
    sub = parser.add_subparsers(dest="action", required=True)
    train = sub.add_parser("train", help="train a WordPiece tokenizer on the configured corpus (data.source)")
    config_lib.add_config_arguments(train, default_preset="base")
    train.add_argument("--out", required=True, help="directory to write tokenizer.json and vocab.txt into")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    encode = sub.add_parser("encode", help="show the tokens of a text")
    encode.add_argument("tokenizer", help="tokenizer.json, vocab.txt or a directory holding one")
    encode.add_argument("text")
    encode.add_argument("--cased", action="store_true", help="no lowercasing (only for a bare vocab.txt)")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in sub.choices:  # options and key=value overrides in any order
        args = config_lib.parse_args(sub.choices[argv[0]], argv[1:])
        args.action = argv[0]
    else:
        args = parser.parse_args(argv)
    return _tokenizer_train(args) if args.action == "train" else _tokenizer_encode(args)


def prepare_main(argv: Optional[Sequence[str]] = None) -> int:
    from .data.prepare import open_dataset, prepare

    parser = argparse.ArgumentParser(prog="jaxbert prepare", description="Tokenize a corpus into a memmap token "
                                     "stream (train.bin, validation.bin, meta.json) under data.cache_dir.")
    config_lib.add_config_arguments(parser, default_preset="base")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = config_lib.parse_args(parser, argv)
    cfg = config_lib.from_args(args)
    path = prepare(cfg, progress=not args.quiet)
    open_dataset(path)
    print(path)
    return 0


def pretrain_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxbert pretrain", description="MLM pretraining of a BERT encoder.")
    config_lib.add_config_arguments(parser, default_preset="base")
    parser.set_defaults(config=None)  # None: the preset default, or the resumed run's own config
    parser.add_argument("--resume", action="store_true",
                        help="continue the newest valid checkpoint of --run-dir (or of the newest run in out_dir)")
    parser.add_argument("--run-dir", type=Path, default=None, help="run directory (default: out_dir/<run name>)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def pretrain_main(argv: Optional[Sequence[str]] = None) -> int:
    import signal

    from . import distributed
    from .pretrain import pretrain, resolve_config, summary

    args = config_lib.parse_args(pretrain_parser(), argv)
    cfg, run_dir = resolve_config(args)
    config_lib.apply_runtime(cfg.impl)  # XLA flags, compilation cache: before anything starts the JAX backend
    result = pretrain(cfg, run_dir=run_dir, resume=args.resume, console=not args.quiet)
    if not distributed.is_main_process():
        return 0 if result.reason == "done" else 128 + (result.signal or signal.SIGINT)
    print(summary(result))
    if result.reason == "stopped":
        print(f"stopped at step {result.progress.step}; continue with: jaxbert pretrain --resume "
              f"--run-dir {result.run_dir}", file=sys.stderr)
        return 128 + (result.signal or signal.SIGINT)
    return 0


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
