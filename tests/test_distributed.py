"""jaxbert.distributed: the same training on 1 device, 8 devices (data parallel and fsdp) and 2 processes.

JAX fixes its device count and process group at start-up, so the multi-device and multi-process runs happen in
child processes (tests/dist_worker.py) and this suite keeps its single CPU device. Tolerances (float32, 3 AdamW
steps at lr 1e-2 on a tiny model): per-step losses within 1e-5, parameters and optimizer state within 5e-5 (half a
percent of one step's update; Adam turns reduction-order noise in near-zero gradients into visible updates).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxbert import cli, distributed
from jaxbert.config import DistributedConfig
from jaxbert.distributed import DistributedError

WORKER = Path(__file__).with_name("dist_worker.py")
LOSS_TOL, PARAM_TOL = 1e-5, 5e-5
_SLURM = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("JAXBERT_", "SLURM_", "XLA_FLAGS"))}


def _worker(*args: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WORKER), *map(str, args)], env=_child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(processes: list[subprocess.Popen], timeout: float = 600) -> list[str]:
    """Wait for every child; on a failure or a timeout stop the others (by their own pids) and report."""
    deadline, outputs = time.monotonic() + timeout, []
    try:
        for process in processes:
            out, _ = process.communicate(timeout=max(deadline - time.monotonic(), 1))
            outputs.append(out)
            if process.returncode != 0:
                raise AssertionError(f"worker failed ({process.returncode}):\n{out[-3000:]}")
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return outputs


def _worker_module():
    sys.path.insert(0, str(WORKER.parent))
    try:
        import dist_worker
    finally:
        sys.path.remove(str(WORKER.parent))
    return dist_worker


@pytest.fixture(scope="module")
def stream(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dist") / "tokens.bin"
    _worker_module().make_stream(path)
    return path


@pytest.fixture(scope="module")
def devices_run(stream: Path) -> tuple[dict, Path]:
    """One child with 8 CPU devices: reference (1 device), data parallel 8, fsdp 4x2, masks, resume."""
    out = stream.parent / "devices"
    _finish([_worker("devices", "--devices", 8, "--out", out, "--stream", stream)])
    return json.loads((out / "result.json").read_text()), out


# ------------------------------------------------------------------------------ 8 devices in one process


def test_data_parallel_step_matches_one_device(devices_run):
    result, _ = devices_run
    assert result["devices"] == 8 and result["mesh_dp"] == {"data": 8, "fsdp": 1}
    assert result["dp"]["loss_diff"] <= LOSS_TOL and result["dp"]["eval_diff"] <= LOSS_TOL
    assert result["dp"]["param_diff"] <= PARAM_TOL
    assert result["dp"]["param_specs"] == ["P()"]  # replicated parameters


def test_fsdp_step_matches_one_device_and_keeps_parameters_sharded(devices_run):
    result, _ = devices_run
    assert result["mesh_fsdp"] == {"data": 4, "fsdp": 2}
    assert result["fsdp"]["loss_diff"] <= LOSS_TOL and result["fsdp"]["eval_diff"] <= LOSS_TOL
    assert result["fsdp"]["param_diff"] <= PARAM_TOL
    assert any("fsdp" in spec for spec in result["fsdp"]["param_specs"])  # still sharded after the steps


def test_losses_move_so_the_comparison_means_something(devices_run):
    losses = devices_run[0]["reference_losses"]
    assert len(losses) == 3 and losses[-1] < losses[0] - 10 * LOSS_TOL


def test_masks_are_the_same_whatever_the_row_sharding(devices_run):
    result, _ = devices_run
    assert result["masks_equal"] and "data" in result["masks_sharding"]


def test_batch_not_divisible_by_the_devices_is_one_clear_error(devices_run):
    result, _ = devices_run
    assert result["indivisible_batch_error"] == ("a global batch of 6 sequences does not split evenly over 8 "
                                                 "devices (mesh data=8 x fsdp=1); use a multiple of 8")
    assert result["bad_fsdp_error"] == "distributed.fsdp=3 does not divide the 8 devices of this run"


def test_fsdp_checkpoint_resumes_on_one_device(devices_run):
    resume = devices_run[0]["resume"]
    assert resume["from_step"] == 2 and resume["resumed_device_count"] == 1
    assert resume["loss_diff"] <= LOSS_TOL and resume["param_diff"] <= PARAM_TOL


def test_data_parallel_finetuning_matches_one_device(stream):
    out = stream.parent / "finetune"
    _finish([_worker("finetune", "--devices", 8, "--out", out, "--stream", stream)])
    result = json.loads((out / "finetune.json").read_text())
    assert result["devices"] == 8 and result["param_specs"] == ["P()"]
    assert result["loss_diff"] <= LOSS_TOL and result["output_diff"] <= LOSS_TOL
    assert result["param_diff"] <= PARAM_TOL
    assert result["losses"][1] != result["losses"][0]  # the second step saw updated parameters
    assert result["batch_size_error"] == ("a global batch of 12 sequences (finetune.batch_size) does not split "
                                          "evenly over 8 devices (mesh data=8 x fsdp=1); use a multiple of 8")


# ------------------------------------------------------------------------------------------- 2 processes


def test_two_processes_match_one_device(stream, devices_run):
    out, port = stream.parent / "multi", _free_port()
    workers = [_worker("multi", "--devices", 2, "--num-processes", 2, "--process-id", pid, "--port", port,
                       "--fsdp", 2, "--timeout", 120, "--out", out, "--stream", stream) for pid in (0, 1)]
    _finish(workers)
    info = json.loads((out / "multi.json").read_text())
    assert info["process_count"] == 2 and info["devices"] == 4 and info["local_devices"] == 2
    assert info["mesh"] == {"data": 2, "fsdp": 2}
    assert info["disagreement_error"].startswith("processes disagree about a value that differs: [0, 1]")
    multi, reference = np.load(out / "multi.npz"), np.load(devices_run[1] / "reference.npz")
    np.testing.assert_allclose(multi["losses"], reference["losses"], rtol=0, atol=LOSS_TOL)
    np.testing.assert_allclose(multi["eval"], reference["eval"], rtol=0, atol=LOSS_TOL)
    params = [k for k in reference.files if k.startswith("leaf")]
    assert params and all(float(np.max(np.abs(multi[k] - reference[k]))) <= PARAM_TOL for k in params)
    written = sorted(p.name for p in (out / "run" / "checkpoints").iterdir())
    assert written == ["step_00000003"]  # one checkpoint, written once, by process 0


def test_two_process_fsdp_checkpoint_restores_in_a_one_device_process(stream, devices_run):
    from jaxbert import checkpoint
    from jaxbert.train import init_state

    run = stream.parent / "multi" / "run"
    if not run.is_dir():
        pytest.skip("the 2-process run did not complete")
    dist_worker = _worker_module()
    cfg = dist_worker.tiny_config()
    template = eqx.filter_eval_shape(init_state, cfg, key=jax.random.PRNGKey(0))
    state, progress, _ = checkpoint.restore_latest(run, cfg, template)
    assert progress.step == 3 and len(jax.devices()) == 1
    restored, reference = dist_worker.flat_params(state), np.load(devices_run[1] / "reference.npz")
    assert all(float(np.max(np.abs(restored[k] - reference[k]))) <= PARAM_TOL for k in restored)


# ------------------------------------------------------------------------------ start-up and bad input


def test_coordinator_that_never_answers_is_one_clear_error():
    port = _free_port()
    dist = DistributedConfig(coordinator=f"127.0.0.1:{port}", num_processes=2, process_id=1, init_timeout_s=1)
    with pytest.raises(DistributedError, match=rf"process 1: the coordinator 127.0.0.1:{port} did not answer "
                                               r"within 1 s \(distributed.init_timeout_s\)"):
        distributed.initialize(dist)
    assert not jax.distributed.is_initialized()


def test_pretrain_cli_reports_an_unreachable_coordinator_in_one_line(capsys):
    port = _free_port()
    code = cli.main(["pretrain", "--config", "tiny", f"distributed.coordinator=127.0.0.1:{port}",
                     "distributed.num_processes=2", "distributed.process_id=1", "distributed.init_timeout_s=1"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1
    assert err.startswith("jaxbert pretrain: error: process 1: the coordinator") and "did not answer" in err


@pytest.fixture
def clean_env(monkeypatch):
    for name in (*_SLURM, distributed.ENV_FLAG, distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES,
                 distributed.ENV_PROCESS_ID):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_launch_plan_from_config_environment_and_cluster(clean_env):
    plan = distributed.plan_launch
    assert plan(DistributedConfig()).mode == "single"
    explicit = plan(DistributedConfig(coordinator="10.0.0.1:1234", num_processes=4, process_id=3))
    assert (explicit.mode, explicit.coordinator, explicit.num_processes, explicit.process_id) == \
        ("explicit", "10.0.0.1:1234", 4, 3)
    clean_env.setenv(distributed.ENV_COORDINATOR, "127.0.0.1:99")
    clean_env.setenv(distributed.ENV_NUM_PROCESSES, "2")
    clean_env.setenv(distributed.ENV_PROCESS_ID, "1")
    assert plan(DistributedConfig()) == distributed.Launch("explicit", "127.0.0.1:99", 2, 1)
    assert plan(DistributedConfig(process_id=0)).process_id == 0  # the config wins over the environment
    for name in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID):
        clean_env.delenv(name)
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
    for name, value in slurm.items():
        clean_env.setenv(name, value)
    clean_env.setenv("SLURM_NTASKS", "1")
    assert plan(DistributedConfig()).mode == "single"  # one task: all local devices, no coordinator
    clean_env.setenv("SLURM_NTASKS", "4")
    assert plan(DistributedConfig()).mode == "auto"  # JAX reads SLURM's variables itself
    clean_env.setenv("SLURM_NTASKS", "1")
    clean_env.setenv(distributed.ENV_FLAG, "1")
    assert plan(DistributedConfig()).mode == "auto"


@pytest.mark.parametrize("dist, message", [
    (DistributedConfig(coordinator="127.0.0.1:5"), "also set distributed.num_processes and distributed.process_id"),
    (DistributedConfig(coordinator="h:5", num_processes=2, process_id=2), "process_id=2 is not in [0, num_processes=2)"),
    (DistributedConfig(num_processes=2, process_id=1), "distributed.coordinator (host:port of process 0) is not"),
])
def test_inconsistent_launch_settings_are_clear_errors(clean_env, dist, message):
    with pytest.raises(DistributedError) as err:
        distributed.plan_launch(dist)
    assert message in str(err.value)


def test_malformed_coordinator_address_and_environment(clean_env):
    with pytest.raises(DistributedError, match="expected host:port"):
        distributed.wait_for_coordinator("localhost", 1.0)
    clean_env.setenv(distributed.ENV_NUM_PROCESSES, "two")
    with pytest.raises(DistributedError, match="JAXBERT_NUM_PROCESSES='two': expected an integer"):
        distributed.plan_launch(DistributedConfig())


# ---------------------------------------------------------------------------------- layout on one device


@pytest.mark.parametrize("shape, dtype, fsdp, expected", [
    ((128, 32), jnp.float32, 2, P("fsdp")),  # the larger dim
    ((2, 32, 96), jnp.float32, 4, P(None, None, "fsdp")),
    ((2, 32, 32), jnp.float32, 2, P(None, None, "fsdp")),  # ties go to the last dim
    ((30, 7), jnp.float32, 4, P()),  # nothing divisible: replicated
    ((2,), jnp.uint32, 2, P()),  # PRNG keys and counters: replicated
    ((), jnp.float32, 2, P()),
    ((128, 32), jnp.float32, 1, P()),  # pure data parallel
])
def test_param_spec(shape, dtype, fsdp, expected):
    assert distributed.param_spec(shape, dtype, fsdp) == expected


def test_single_device_helpers_are_identities():
    cfg = DistributedConfig()
    mesh = distributed.make_mesh(cfg)
    tree = {"w": jnp.arange(6.0).reshape(3, 2), "step": jnp.int32(4), "name": "static"}
    placed = distributed.shard_state(tree, mesh)
    host = distributed.to_host(placed)
    assert isinstance(host["w"], np.ndarray) and host["name"] == "static"
    np.testing.assert_array_equal(host["w"], np.arange(6.0).reshape(3, 2))
    rows = np.arange(12, dtype=np.int32).reshape(4, 3)
    np.testing.assert_array_equal(np.asarray(distributed.global_batch(rows, mesh)), rows)
    np.testing.assert_array_equal(np.asarray(distributed.distribute([rows], mesh)[0]), rows)
    flag = lambda: True
    assert distributed.agreed_stop(flag, every=5) is flag and distributed.main_first(lambda: 3) == 3
    distributed.check_same(7, "anything")  # nothing to disagree with
    assert distributed.is_main_process() and distributed.process_split() == (0, 1)


def test_cluster_detection_uses_no_private_jax_api_and_fails_loudly(clean_env):  # issue 19, defect 12
    import inspect

    assert "jax._src" not in inspect.getsource(distributed)
    for name, value in {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_PROCID": "2"}.items():
        clean_env.setenv(name, value)
    assert distributed.detected_cluster() == distributed.Cluster("SLURM", 4, 2, "SLURM_NTASKS")
    assert distributed.plan_launch(DistributedConfig()) == distributed.Launch("auto", None, 4, 2)
    # JAX's start-up "succeeds" but leaves one process (e.g. its detection changed): an error, not 4 lone runs
    clean_env.setattr(jax.distributed, "is_initialized", lambda: False)
    clean_env.setattr(jax.distributed, "initialize", lambda **kwargs: None)
    with pytest.raises(DistributedError, match=r"SLURM job has 4 tasks \(SLURM_NTASKS\), but JAX started 1 "
                                               r"process\(es\); refusing"):
        distributed.initialize(DistributedConfig())

    def broken(**kwargs):
        raise RuntimeError("no cluster detected\nmore detail")

    clean_env.setattr(jax.distributed, "initialize", broken)
    with pytest.raises(DistributedError, match=r"4 tasks .*jax.distributed.initialize failed \(no cluster detected\)"):
        distributed.initialize(DistributedConfig())
    clean_env.setenv("SLURM_NTASKS", "four")
    with pytest.raises(DistributedError, match="SLURM_NTASKS='four': expected an integer"):
        distributed.plan_launch(DistributedConfig())
    clean_env.setenv("SLURM_NTASKS", "4")
    clean_env.delenv("SLURM_PROCID")
    with pytest.raises(DistributedError, match=r"SLURM_PROCID=None: expected this task's rank in \[0, SLURM_NTASKS=4\)"):
        distributed.plan_launch(DistributedConfig())
