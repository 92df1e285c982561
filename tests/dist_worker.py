"""Child processes for tests/test_distributed.py (not collected by pytest: no ``test_`` prefix).

JAX fixes its device count and its process group when it starts, so each scenario runs in a fresh process:

* ``devices --devices 8``: one process with 8 CPU devices trains the same tiny model on a 1-device mesh (the
  reference), a data-parallel 8-device mesh and an fsdp 4x2 mesh; checks masks and batch errors under
  sharding; saves an fsdp checkpoint and resumes it on 1 device. Writes ``result.json`` and ``reference.npz``.
* ``finetune --devices 8``: finetuning steps (dropout on) and predictions, data parallel on 8 devices against 1.
* ``multi --process-id I --num-processes N --port P --devices D``: one of N processes (D CPU devices each)
  joined through a loopback coordinator; trains the same run; process 0 writes ``multi.json``/``multi.npz`` and
  a checkpoint.

Every run reads its rows through the loader's process split and ``distributed.global_batch``, exactly as
``jaxbert pretrain`` does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from conftest import TINY


def _set_devices(count: int) -> None:
    """Before JAX starts: ``count`` CPU devices, and a cheap compile (this is about equality, not speed)."""
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={count} "
                               "--xla_backend_optimization_level=0")


SPECIAL, MASK_ID, VOCAB, SEQ = (0, 1, 2, 3, 4), 4, 128, 32
OVERRIDES = TINY + ["model.layers=2", "train.micro_batch=8", "train.batch_start=16", "train.batch_end=16",
             "train.peak_lr=1e-2", "train.warmup_fraction=0.0", "train.steps=3", "impl.log_every=1",
             "train.seed=0"]


def make_stream(path: Path) -> None:
    """A random token file (ids 5..127) of 64 chunks, written once by the test."""
    import numpy as np

    np.random.default_rng(7).integers(5, VOCAB, 64 * SEQ).astype(np.uint16).tofile(path)


def tiny_config(*extra: str):
    from jaxbert import config

    return config.load("tiny", OVERRIDES + list(extra))


def train(cfg, mesh, stream, state=None, progress=None, stop_after=None):
    """Run the loop as ``jaxbert pretrain`` does until ``train.steps`` (or ``stop_after`` steps), then evaluate
    on two fixed held-out micro-batches; (per-step losses, held-out loss, final state, final progress)."""
    import jax

    from jaxbert import distributed
    from jaxbert.checkpoint import Progress
    from jaxbert.data.loader import Prefetcher, get_samples
    from jaxbert.train import (
        evaluate,
        init_state,
        make_spec,
        micro_batch_stream,
        run_loop,
    )

    spec = make_spec(cfg, SPECIAL, MASK_ID, mesh)
    if state is None:
        state, progress = init_state(cfg, key=jax.random.PRNGKey(cfg.train.seed)), Progress()
    state = distributed.shard_state(state, mesh)
    split = distributed.process_split()

    def sample(start: int, rows: int):
        local = get_samples(stream, cfg.train.seed, start, rows, cfg.data.seq_len, *split)
        return distributed.global_batch(local, mesh)

    losses: list[float] = []
    calls = iter(range(10**9))
    stop = (lambda: False) if stop_after is None else (lambda: next(calls) >= stop_after)
    stream_of = micro_batch_stream(sample, progress.data_position, cfg.train.micro_batch)
    with Prefetcher(stream_of, depth=2) as batches:  # as jaxbert pretrain does
        state, progress, _ = run_loop(cfg, state, progress, spec, batches, should_stop=stop,
                                      on_log=lambda step, metrics: losses.append(metrics["loss"]))
    held_out = distributed.distribute([stream.chunks(range(i, i + 8), SEQ) for i in (40, 48)], mesh)
    held_out_loss = evaluate(state.model, held_out, spec, jax.random.PRNGKey(9))["loss"]
    return losses, held_out_loss, state, progress


def flat_params(state) -> dict:
    """Parameters and optimizer state of a host state, by leaf number, for numpy comparisons."""
    import equinox as eqx
    import jax
    import numpy as np

    leaves = jax.tree.leaves(eqx.filter((state.model, state.opt_state), eqx.is_inexact_array))
    return {f"leaf{i}": np.asarray(x) for i, x in enumerate(leaves)}


def max_diff(a: dict, b: dict) -> float:
    import numpy as np

    return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in a)


def _error_of(fn) -> str:
    try:
        fn()
    except ValueError as err:
        return str(err)
    return ""


def _finetune(cfg, mesh, batch, steps: int = 2):
    """``steps`` finetuning steps (dropout on) of a tiny classifier on ``mesh`` through the training core
    (:func:`jaxbert.train.fused_step`); (losses, host params, outputs of
    :func:`jaxbert.finetune.trainer.predict_step` on
    the batch through ``on_mesh_of``, parameter shardings)."""
    import equinox as eqx
    import jax
    import numpy as np

    from jaxbert import distributed
    from jaxbert.finetune import trainer as finetune
    from jaxbert.model import BertForClassification
    from jaxbert.optim import AdamWSettings
    from jaxbert.precision import LossScale, Policy
    from jaxbert.train import fused_step, new_state

    model = BertForClassification(cfg.model, 3, key=jax.random.PRNGKey(1))
    settings = AdamWSettings.of(cfg.finetune)
    state = new_state(model, settings, LossScale.create(dynamic=False), jax.random.PRNGKey(2))
    state, losses = distributed.shard_state(state, mesh), []
    objective = finetune.ClassificationLoss(Policy(), "xla")
    for _ in range(steps):
        state, metrics = fused_step(state, distributed.distribute(batch, mesh), np.float32(1e-3), objective,
                                    settings, mesh)
        losses.append(float(metrics["loss"]))
    model = state.model
    outputs = finetune.predict_step(model, *distributed.on_mesh_of(model, batch[:3]), policy=Policy(),
                                    attention="xla")
    specs = sorted({str(x.sharding.spec) for x in jax.tree.leaves(eqx.filter(model, eqx.is_array))})
    return losses, flat_params_of(distributed.to_host(model)), np.asarray(outputs), specs


def flat_params_of(tree) -> dict:
    import equinox as eqx
    import jax
    import numpy as np

    return {f"leaf{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(eqx.filter(tree, eqx.is_inexact_array)))}


def _finetune_comparison(cfg, one, dp, stream) -> dict:
    """Data-parallel finetuning (8 devices) against 1 device, on a padded batch of 16 rows."""
    import numpy as np

    ids = np.asarray(stream.chunks(np.arange(16), SEQ))
    mask = np.arange(SEQ)[None, :] < np.repeat([SEQ, SEQ - 9], 8)[:, None]  # bool, some rows padded
    batch = (ids, np.zeros_like(ids), mask, np.arange(16, dtype=np.int32) % 3, np.ones(16, np.float32))
    ft_cfg = tiny_config("model.dropout=0.1", "model.attention_dropout=0.1")
    ref_losses, ref_params, ref_out, _ = _finetune(ft_cfg, one, batch)
    losses, params, outputs, specs = _finetune(ft_cfg, dp, batch)
    return {"loss_diff": float(np.max(np.abs(np.subtract(losses, ref_losses)))),
            "param_diff": max_diff(params, ref_params), "output_diff": float(np.max(np.abs(outputs - ref_out))),
            "losses": ref_losses, "param_specs": specs}


def _devices_scenario(out: Path, stream_path: Path) -> None:
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxbert import checkpoint, distributed
    from jaxbert.data.loader import TokenStream
    from jaxbert.train import init_state, make_spec, mask_rows

    stream = TokenStream(stream_path, "uint16")
    cfg = tiny_config()
    fsdp_cfg = tiny_config("distributed.fsdp=2")
    one = distributed.make_mesh(cfg, jax.devices()[:1])
    dp, fsdp = distributed.make_mesh(cfg), distributed.make_mesh(fsdp_cfg)
    result: dict = {"devices": len(jax.devices()), "mesh_dp": dict(dp.shape), "mesh_fsdp": dict(fsdp.shape)}

    ref_losses, ref_eval, ref_state, _ = train(cfg, one, stream)
    reference = flat_params(distributed.to_host(ref_state))
    np.savez(out / "reference.npz", losses=np.asarray(ref_losses), eval=np.asarray(ref_eval), **reference)
    result["reference_losses"] = ref_losses
    for name, mesh, run_cfg in (("dp", dp, cfg), ("fsdp", fsdp, fsdp_cfg)):
        losses, held_out_loss, state, _ = train(run_cfg, mesh, stream)
        specs = {str(x.sharding.spec) for x in jax.tree.leaves(eqx.filter(state.model, eqx.is_array))}
        result[name] = {"loss_diff": float(np.max(np.abs(np.subtract(losses, ref_losses)))),
                        "eval_diff": abs(held_out_loss - ref_eval),
                        "param_diff": max_diff(flat_params(distributed.to_host(state)), reference),
                        "param_specs": sorted(specs)}

    # masks drawn inside the step: the same whatever the sharding of the rows
    spec = make_spec(cfg, SPECIAL, MASK_ID)
    ids = np.asarray(stream.chunks(np.arange(16), SEQ))
    key, offset = jax.random.PRNGKey(5), jnp.int32(8)
    mask = eqx.filter_jit(mask_rows)
    plain = mask(jnp.asarray(ids), key, offset, spec)
    sharded = mask(distributed.global_batch(ids, dp), key, offset, spec)
    result["masks_equal"] = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(plain, sharded))
    result["masks_sharding"] = str(sharded.input_ids.sharding.spec)


    # bad input on 8 devices
    result["indivisible_batch_error"] = _error_of(lambda: distributed.global_batch(ids[:6], dp))
    result["bad_fsdp_error"] = _error_of(lambda: distributed.make_mesh(tiny_config("distributed.fsdp=3")))

    # an fsdp checkpoint after 2 of 3 steps, resumed on 1 device for the 3rd step
    _, _, state, progress = train(fsdp_cfg, fsdp, stream, stop_after=2)
    path = checkpoint.save_checkpoint(out / "run", fsdp_cfg, distributed.to_host(state), progress, None, keep=1)
    template = init_state(cfg, key=jax.random.PRNGKey(0))
    restored, progress = checkpoint.restore_checkpoint(path, cfg, template)
    losses, _, resumed, _ = train(cfg, one, stream, restored, progress)
    result["resume"] = {"from_step": progress.step, "loss_diff": abs(losses[-1] - ref_losses[-1]),
                        "param_diff": max_diff(flat_params(distributed.to_host(resumed)), reference),
                        "resumed_device_count": len(jax.tree.leaves(resumed.model)[0].devices())}
    (out / "result.json").write_text(json.dumps(result, indent=1))


def _finetune_scenario(out: Path, stream_path: Path) -> None:
    import jax

    from jaxbert import distributed
    from jaxbert.data.loader import TokenStream

    cfg = tiny_config()
    one, dp = distributed.make_mesh(cfg, jax.devices()[:1]), distributed.finetuning_mesh(cfg)
    result = _finetune_comparison(cfg, one, dp, TokenStream(stream_path, "uint16"))
    result["devices"] = dp.size
    result["batch_size_error"] = _error_of(lambda: distributed.finetuning_mesh(tiny_config("finetune.batch_size=12")))
    (out / "finetune.json").write_text(json.dumps(result, indent=1))


def _multi_scenario(out: Path, stream_path: Path, args: argparse.Namespace) -> None:
    import jax
    import numpy as np

    from jaxbert import checkpoint, distributed
    from jaxbert.config import DistributedConfig
    from jaxbert.data.loader import TokenStream

    dist = DistributedConfig(coordinator=f"127.0.0.1:{args.port}", num_processes=args.num_processes,
                             process_id=args.process_id, fsdp=args.fsdp, init_timeout_s=args.timeout)
    distributed.initialize(dist)
    cfg = tiny_config(f"distributed.fsdp={args.fsdp}")
    mesh = distributed.make_mesh(cfg)
    losses, held_out_loss, state, progress = train(cfg, mesh, TokenStream(stream_path, "uint16"))
    host = distributed.to_host(state)  # a collective: every process
    disagreement = _error_of(lambda: distributed.check_same(jax.process_index(), "a value that differs"))
    distributed.check_same(progress.step, "the step")
    if distributed.is_main_process():
        checkpoint.save_checkpoint(out / "run", cfg, host, progress, None, keep=1)
        np.savez(out / "multi.npz", losses=np.asarray(losses), eval=np.asarray(held_out_loss), **flat_params(host))
        info = {"process_count": jax.process_count(), "devices": len(jax.devices()),
                "local_devices": len(jax.local_devices()), "mesh": dict(mesh.shape),
                "disagreement_error": disagreement, "describe": distributed.describe(mesh)}
        (out / "multi.json").write_text(json.dumps(info, indent=1))
    distributed.barrier("done")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=("devices", "finetune", "multi"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--stream", type=Path, required=True)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--fsdp", type=int, default=1)
    parser.add_argument("--timeout", type=int, default=60)
    args = parser.parse_args(argv)
    _set_devices(args.devices)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.scenario == "devices":
        _devices_scenario(args.out, args.stream)
    elif args.scenario == "finetune":
        _finetune_scenario(args.out, args.stream)
    else:
        _multi_scenario(args.out, args.stream, args)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
