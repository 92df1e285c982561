"""The peer for ``jaxbert bench``: one HF transformers ``BertForMaskedLM`` pretraining step in PyTorch.

Same shapes as the jaxbert side (layers, hidden, heads, FFN, vocabulary, sequence length, batch), dropout as
in the jaxbert config, bf16 autocast, SDPA attention, fused AdamW, gradient clipping. The MLM head is HF's:
logits at every position, loss on the ~15% masked ones (labels -100 elsewhere). Masking is done on the GPU
ahead of time (a few batches, cycled): it is not part of the timed step here, and costs well under 1% anyway.

Prints one JSON line (the last line of stdout) for the orchestrator in :mod:`jaxbert.bench`::

    python benchmarks/hf_peer.py --mode compile --layers 12 --hidden 768 --heads 12 --ffn 3072 \\
        --vocab 32768 --seq 128 --batch 256
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=("eager", "compile"), default="eager")
    for name, default in (("layers", 12), ("hidden", 768), ("heads", 12), ("ffn", 3072), ("vocab", 32768),
                          ("seq", 128), ("batch", 256), ("warmup", 10), ("steps", 30)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke test of this script")
    p.add_argument("--mlm-probability", type=float, default=0.15)
    p.add_argument("--ceiling", action="store_true", help="also time an 8192^3 bf16 matmul (TFLOP/s)")
    return p.parse_args(argv)


def matmul_ceiling(torch, n: int = 8192, reps: int = 10) -> float:
    """bf16 matmul TFLOP/s on random data (mean of ``reps`` products after three warm-ups)."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def make_batches(torch, args: argparse.Namespace, count: int = 4) -> list:
    """(input_ids, labels) pairs with 80/10/10 masking at ``mlm_probability`` of the positions."""
    gen = torch.Generator(device=args.device).manual_seed(0)
    batches = []
    for _ in range(count):
        ids = torch.randint(5, args.vocab, (args.batch, args.seq), device=args.device, generator=gen)
        picked = torch.rand(ids.shape, device=args.device, generator=gen) < args.mlm_probability
        labels = torch.where(picked, ids, torch.full_like(ids, -100))
        roll = torch.rand(ids.shape, device=args.device, generator=gen)
        random_ids = torch.randint(5, args.vocab, ids.shape, device=args.device, generator=gen)
        inputs = torch.where(picked & (roll < 0.8), torch.full_like(ids, 4), ids)  # 4: a [MASK] id
        inputs = torch.where(picked & (roll >= 0.8) & (roll < 0.9), random_ids, inputs)
        batches.append((inputs, labels))
    return batches


def build(torch, args: argparse.Namespace):
    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                     num_attention_heads=args.heads, intermediate_size=args.ffn,
                     max_position_embeddings=max(512, args.seq), hidden_dropout_prob=args.dropout,
                     attention_probs_dropout_prob=args.dropout, attn_implementation="sdpa")
    model = BertForMaskedLM(cfg).to(args.device).train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.98), eps=1e-6, fused=args.device == "cuda")
    return model, opt


def run(args: argparse.Namespace) -> dict:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = True
    result = {"side": f"hf-{args.mode}", "torch": torch.__version__}
    if args.ceiling and args.device == "cuda":
        result["ceiling_tflops"] = matmul_ceiling(torch)
    model, opt = build(torch, args)
    forward = torch.compile(model) if args.mode == "compile" else model

    def step(inputs, labels):
        with torch.autocast(args.device, dtype=torch.bfloat16):
            loss = forward(input_ids=inputs, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    batches = make_batches(torch, args)
    start = time.perf_counter()
    step(*batches[0]).item()  # the first step holds the compilation
    result["compile_s"] = time.perf_counter() - start
    for i in range(args.warmup):
        step(*batches[i % len(batches)])
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for i in range(args.steps):
        loss = step(*batches[i % len(batches)])
    loss_value = loss.item()
    elapsed = time.perf_counter() - start
    result.update(step_ms=1e3 * elapsed / args.steps, tokens_per_s=args.batch * args.seq * args.steps / elapsed,
                  peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None, loss=loss_value,
                  params=sum(p.numel() for p in model.parameters()))
    return result


def main(argv: list[str]) -> int:
    args = parse(argv)
    print(json.dumps(run(args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
