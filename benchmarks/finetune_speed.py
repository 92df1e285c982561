"""Finetuning speed: jaxbert against HF transformers on the same task, checkpoint, recipe and GPU.

Each side runs in a fresh process (its wall time includes imports, tokenization, compilation and evaluation
every epoch) and prints one JSON line; the orchestrator appends a row per side to a JSONL file with the keys
``date, device, commit, task, model, side, epochs, wall_s, compile_s, steps_per_s`` and the dev metrics of every
epoch::

    python benchmarks/finetune_speed.py --task mnli --glue-dir /tmp/glue --hf-model /tmp/minilm \\
        --jaxbert-init /tmp/minilm-jaxbert --sides jaxbert,hf-eager,hf-compile --out benchmarks/finetune/results.jsonl

Recipe (HF's usual one, both sides): AdamW lr ``--lr``, betas 0.9/0.999, eps 1e-6, weight decay 0.01 (not on
biases and LayerNorm), linear warm-up over 10% then linear decay, batch ``--batch``, ``--epochs`` epochs, dropout
0.1, bf16 autocast with fp32 master weights, gradient clipping 1.0, sequences truncated to 128 tokens.

* ``jaxbert``: ``jaxbert.finetune.trainer.run`` with ``--config`` and overrides; ``compile_s`` is the sum of XLA
  compilation times reported by ``jax.monitoring`` (persistent-cache hits compile nothing).
* ``hf-eager`` / ``hf-compile``: ``BertForSequenceClassification`` (SDPA attention), batches padded to their
  longest row (HF's ``DataCollatorWithPadding`` convention), fused torch AdamW; ``hf-compile`` wraps the model
  in ``torch.compile(dynamic=True)``; ``compile_s`` there is the first epoch's time minus a later epoch's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sides", default="jaxbert,hf-eager", help="comma-separated: jaxbert, hf-eager, hf-compile")
    p.add_argument("--side", default=None, help=argparse.SUPPRESS)  # one side, in its own process
    p.add_argument("--task", default="mnli")
    p.add_argument("--glue-dir", required=True)
    p.add_argument("--hf-model", default=None, help="HF model directory (the HF sides)")
    p.add_argument("--jaxbert-init", default=None, help="--init of the jaxbert side (a jaxbert model/run dir)")
    p.add_argument("--model-name", default=None, help="the model column of the rows (default: init's name)")
    p.add_argument("--config", default="base", help="jaxbert preset of the jaxbert side")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--label", default="", help="a free-form note stored in the rows (e.g. pad_multiple=128)")
    p.add_argument("--out", default=None, help="JSONL file the rows are appended to")
    p.add_argument("--timeout", type=int, default=590, help="seconds per side")
    p.add_argument("--device", default="cuda", help="HF sides: cuda, or cpu for a smoke test of this script")
    p.add_argument("--max-examples", type=int, default=None, help="first N rows of every split (smoke tests)")
    p.add_argument("overrides", nargs="*", help="jaxbert config overrides for the jaxbert side")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------- jaxbert


def run_jaxbert(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    import jax
    from jax._src import dispatch  # the event's name; the listener API itself is public

    from jaxbert import config as config_lib
    from jaxbert.finetune.model_dir import prepare_start
    from jaxbert.data.glue import get_task
    from jaxbert.data.task_data import load_task_data
    from jaxbert.finetune.trainer import run

    compiles: list[float] = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **_: compiles.append(duration) if event == dispatch.BACKEND_COMPILE_EVENT else None)
    cfg = config_lib.load(args.config, [f"finetune.task={args.task}", f"finetune.glue_dir={args.glue_dir}",
                                        f"finetune.epochs={args.epochs}", f"finetune.batch_size={args.batch}",
                                        f"finetune.lr={args.lr}", f"finetune.seed={args.seed}",
                                        f"finetune.max_len={args.max_len}", "finetune.precision=bf16",
                                        "finetune.out_dir=/tmp/finetune-speed", *args.overrides,
                                        *([f"finetune.max_train_examples={args.max_examples}",
                                           f"finetune.max_eval_examples={args.max_examples}"]
                                          if args.max_examples else [])])
    config_lib.apply_runtime(cfg.impl)
    task = get_task(args.task)
    start = prepare_start(cfg, args.jaxbert_init, task)
    data = load_task_data(start.cfg, task, start.tokenizer, echo=lambda line: print(line, file=sys.stderr))
    loaded = time.perf_counter()
    result = run(start.cfg, start, data, progress=False, save=False, echo=lambda line: print(line, file=sys.stderr))
    wall = time.perf_counter() - started
    epochs = result.history
    steps = epochs[0]["step"]
    later = [e["epoch_seconds"] for e in epochs[1:]]
    return {"wall_s": wall, "load_s": loaded - started, "compile_s": sum(compiles), "compiles": len(compiles),
            "steps_per_s": steps / min(later) if later else None,
            "epoch_seconds": [e["epoch_seconds"] for e in epochs],
            "dev": [{k: v for k, v in e.items() if "/" in k} for e in epochs], "best_epoch": result.best_epoch}


# ------------------------------------------------------------------------------------------------------ HF


def run_hf(args: argparse.Namespace, compiled: bool) -> dict:
    started = time.perf_counter()
    import numpy as np
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification, get_linear_schedule_with_warmup

    from jaxbert.data.glue import get_task, read_split
    from jaxbert.finetune.metrics import compute

    torch.manual_seed(args.seed)
    task = get_task(args.task)
    tokenizer = AutoTokenizer.from_pretrained(args.hf_model)
    model = BertForSequenceClassification.from_pretrained(
        args.hf_model, num_labels=task.num_labels, torch_dtype=torch.float32, attn_implementation="sdpa").to(args.device)

    def encode(split: str) -> tuple[list, np.ndarray]:
        data = read_split(task, split, args.glue_dir)
        if args.max_examples:
            data = data.take(np.arange(min(args.max_examples, len(data))))
        enc = tokenizer(data.text_a, data.text_b, truncation=True, max_length=args.max_len)
        return enc["input_ids"], enc["token_type_ids"], data.labels

    train_ids, train_types, train_labels = encode("train")
    dev = {split: encode(split) for split in task.dev_splits}

    def batch(ids: list, types: list, rows: np.ndarray) -> tuple:
        width = max(len(ids[r]) for r in rows)
        x = np.zeros((len(rows), width), np.int64)
        t, m = np.zeros_like(x), np.zeros_like(x)
        for i, r in enumerate(rows):
            n = len(ids[r])
            x[i, :n], t[i, :n], m[i, :n] = ids[r], types[r], 1
        return tuple(torch.from_numpy(a).to(args.device, non_blocking=True) for a in (x, t, m))

    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias") or "LayerNorm" in n]
    decay = [p for n, p in model.named_parameters() if not (n.endswith("bias") or "LayerNorm" in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.999), eps=1e-6, fused=True)
    per_epoch = -(-len(train_ids) // args.batch)
    sched = get_linear_schedule_with_warmup(opt, int(0.1 * per_epoch * args.epochs), per_epoch * args.epochs)
    forward = torch.compile(model, dynamic=True) if compiled else model
    labels_dtype = torch.float32 if task.regression else torch.int64
    rng = np.random.default_rng(args.seed)
    epoch_seconds, dev_history = [], []
    for epoch in range(args.epochs):
        t0 = time.perf_counter()
        model.train()
        order = rng.permutation(len(train_ids))
        for start in range(0, len(order), args.batch):
            rows = order[start:start + args.batch]
            x, t, m = batch(train_ids, train_types, rows)
            y = torch.from_numpy(np.asarray(train_labels[rows])).to(args.device, labels_dtype)
            with torch.autocast(args.device, dtype=torch.bfloat16):
                loss = forward(input_ids=x, token_type_ids=t, attention_mask=m, labels=y).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        model.eval()
        metrics = {}
        with torch.no_grad(), torch.autocast(args.device, dtype=torch.bfloat16):
            for split, (ids, types, labels) in dev.items():
                order = np.argsort([len(i) for i in ids], kind="stable")
                outs = np.zeros((len(ids), task.num_labels), np.float32)
                for start in range(0, len(order), 128):
                    rows = order[start:start + 128]
                    x, t, m = batch(ids, types, rows)
                    outs[rows] = forward(input_ids=x, token_type_ids=t, attention_mask=m).logits.float().cpu().numpy()
                pred = outs[:, 0] if task.regression else outs.argmax(-1)
                metrics.update({f"{split}/{k}": v for k, v in compute(task.metrics, pred, labels).items()})
        if args.device == "cuda":
            torch.cuda.synchronize()
        epoch_seconds.append(time.perf_counter() - t0)
        dev_history.append(metrics)
        print(f"hf epoch {epoch + 1}: {metrics} ({epoch_seconds[-1]:.1f} s)", file=sys.stderr)
    wall = time.perf_counter() - started
    steady = min(epoch_seconds[1:]) if len(epoch_seconds) > 1 else None
    return {"wall_s": wall, "compile_s": (epoch_seconds[0] - steady) if compiled and steady else 0.0,
            "steps_per_s": per_epoch / steady if steady else None, "epoch_seconds": epoch_seconds,
            "dev": dev_history}


# -------------------------------------------------------------------------------------------- orchestrator


def device_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
        return out.stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "cpu"


def commit() -> str:
    """$COMMIT when set (a copied work tree may carry stale git metadata), else the checkout's HEAD."""
    if os.environ.get("COMMIT"):
        return os.environ["COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=ROOT).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def main(argv: list[str]) -> int:
    args = parse(argv)
    if args.side:
        out = run_jaxbert(args) if args.side == "jaxbert" else run_hf(args, args.side == "hf-compile")
        print(json.dumps(out))
        return 0
    base = {"date": time.strftime("%Y-%m-%d"), "device": device_name(), "commit": commit(), "task": args.task,
            "model": args.model_name or Path(args.jaxbert_init or args.hf_model or "random").name,
            "epochs": args.epochs, "batch": args.batch, "lr": args.lr, "label": args.label}
    rows = []
    for side in args.sides.split(","):
        started = time.perf_counter()
        cmd = [sys.executable, __file__, "--side", side, *argv]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        sys.stderr.write(proc.stderr[-4000:])
        if proc.returncode != 0:
            print(f"{side}: failed with exit code {proc.returncode}", file=sys.stderr)
            continue
        row = {**base, "side": side, "process_wall_s": time.perf_counter() - started,
               **json.loads(proc.stdout.strip().splitlines()[-1])}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            with open(args.out, "a") as handle:
                handle.write(json.dumps(row) + "\n")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
