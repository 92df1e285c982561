"""Several devices and several processes: start-up, the device mesh, and where every array lives.

One program runs on every process (JAX's multi-controller model). The devices of all processes form a 2-D
:class:`~jax.sharding.Mesh` with axes ``("data", "fsdp")``:

* batches are split by rows over both axes (every device holds ``rows / devices`` sequences);
* parameters and optimizer state are replicated over ``data`` and, when ``distributed.fsdp > 1``, split over
  ``fsdp`` along their largest dimension that the fsdp size divides (arrays with no such dimension, integer
  leaves and scalars are replicated).

XLA inserts the collectives (gradient all-reduce, parameter all-gather), so the train step is the same function
on 1 device, N devices or N processes: the same global batch, the same masks (drawn from the state's key over
global row indices), the same result up to the order of float reductions.

Devices are ordered process by process, so process ``p`` holds the ``p``-th contiguous slice of every global
batch, exactly the rows ``loader.get_samples(..., process_index=p, process_count=P)`` reads. Host copies for
checkpoints come from :func:`to_host` (a collective: every process calls it), and only the main process writes.

Start-up (:func:`initialize`): ``distributed.coordinator`` / ``num_processes`` / ``process_id`` (or the
environment variables ``JAXBERT_COORDINATOR``, ``JAXBERT_NUM_PROCESSES``, ``JAXBERT_PROCESS_ID``) start a run
explicitly; a SLURM or Open MPI job with more than one task (read from its environment variables by
:func:`detected_cluster`) is joined without flags through ``jax.distributed.initialize()``, and the number of
processes JAX started is checked against the job's: a mismatch or a failed start-up is an error, never N
single-process runs. ``JAXBERT_DISTRIBUTED=1`` hands start-up to JAX's own detection (Cloud TPU, Kubernetes,
mpi4py). Otherwise the run is one process.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, TypeVar

import equinox as eqx
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .config import Config, DistributedConfig

DATA, FSDP = "data", "fsdp"
BATCH_AXES = (DATA, FSDP)
T = TypeVar("T")
ENV_FLAG = "JAXBERT_DISTRIBUTED"
ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID = ("JAXBERT_COORDINATOR", "JAXBERT_NUM_PROCESSES",
                                                      "JAXBERT_PROCESS_ID")


class DistributedError(ValueError):
    """A multi-device or multi-process setting that cannot work (reported as one line)."""


# ------------------------------------------------------------------------------------------------ start-up


@dataclass(frozen=True)
class Launch:
    """How this process joins a run: ``mode`` is "single", "explicit" or "auto" (JAX's cluster detection)."""

    mode: str
    coordinator: Optional[str] = None
    num_processes: Optional[int] = None
    process_id: Optional[int] = None


def _env_int(name: str) -> Optional[int]:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"environment variable {name}={value!r}: expected an integer") from None


@dataclass(frozen=True)
class Cluster:
    """A multi-task job seen in the environment: its launcher, task count and this task's rank."""

    name: str
    count: int
    rank: int
    source: str  # the variable the count was read from (named in errors)


# launcher -> (variable telling it is present, task-count variables, rank variable); read by jaxbert itself (JAX's
# detectors are private API), and jax.distributed.initialize's result is checked against them
CLUSTER_VARIABLES = {
    "SLURM": ("SLURM_JOB_ID", ("SLURM_NTASKS", "SLURM_NPROCS"), "SLURM_PROCID"),
    "Open MPI": ("OMPI_COMM_WORLD_SIZE", ("OMPI_COMM_WORLD_SIZE",), "OMPI_COMM_WORLD_RANK"),
}


def detected_cluster() -> Optional[Cluster]:
    """The multi-task job this process belongs to, from SLURM or Open MPI variables, or None.

    A present launcher with unreadable counts is an error, never "no cluster": a misread would silently turn
    one N-task job into N single-process runs writing one run directory."""
    for name, (marker, count_names, rank_name) in CLUSTER_VARIABLES.items():
        if os.environ.get(marker) in (None, ""):
            continue
        source = next((n for n in count_names if os.environ.get(n) not in (None, "")), None)
        if source is None:
            continue  # e.g. an allocation (salloc) outside any job step: no tasks to join
        count, rank = _env_int(source), _env_int(rank_name)
        if count is None or count < 1:
            raise DistributedError(f"environment variable {source}={os.environ.get(source)!r}: expected a task "
                                   "count of at least 1")
        if count > 1 and (rank is None or not 0 <= rank < count):
            raise DistributedError(f"environment variable {rank_name}={os.environ.get(rank_name)!r}: expected this "
                                   f"task's rank in [0, {source}={count})")
        return Cluster(name, count, rank or 0, source)
    return None


def plan_launch(dist: DistributedConfig) -> Launch:
    """Decide how to start from the config and the environment (no side effects)."""
    coordinator = dist.coordinator or os.environ.get(ENV_COORDINATOR) or None
    num = dist.num_processes if dist.num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    pid = dist.process_id if dist.process_id is not None else _env_int(ENV_PROCESS_ID)
    if coordinator is not None:
        if num is None or pid is None:
            cluster = detected_cluster()
            if cluster is None:
                raise DistributedError(f"distributed.coordinator={coordinator} is set: also set "
                                       "distributed.num_processes and distributed.process_id")
            num = cluster.count if num is None else num
            pid = cluster.rank if pid is None else pid
        if num is not None and num < 1:
            raise DistributedError(f"distributed.num_processes must be at least 1, got {num}")
        if num is not None and pid is not None and not 0 <= pid < num:
            raise DistributedError(f"distributed.process_id={pid} is not in [0, num_processes={num})")
        return Launch("explicit", coordinator, num, pid)
    if num not in (None, 1) or pid not in (None, 0):
        raise DistributedError("distributed.num_processes/process_id are set but distributed.coordinator "
                               "(host:port of process 0) is not")
    if os.environ.get(ENV_FLAG, "") not in ("", "0"):
        return Launch("auto")
    cluster = detected_cluster()
    if cluster is not None and cluster.count > 1:
        return Launch("auto", num_processes=cluster.count, process_id=cluster.rank)
    return Launch("single")


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise DistributedError(f"distributed.coordinator={address!r}: expected host:port, e.g. 10.0.0.1:8476")
    return host.strip("[]"), int(port)


def wait_for_coordinator(address: str, timeout_s: float, process_id: Optional[int] = None) -> float:
    """Retry a TCP connection to ``address`` until it is accepted; the seconds it took. JAX aborts the whole
    process (no Python exception) when the coordinator does not answer, so this check comes first."""
    host, port = _split_address(address)
    start = time.monotonic()
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return time.monotonic() - start
        except OSError:
            if time.monotonic() - start >= timeout_s:
                who = "" if process_id is None else f"process {process_id}: "
                raise DistributedError(f"{who}the coordinator {address} did not answer within {timeout_s:g} s "
                                       "(distributed.init_timeout_s); is process 0 running and the port "
                                       "reachable from this host?") from None
            time.sleep(0.2)


def initialize(dist: DistributedConfig, log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> bool:
    """Join a multi-process run when the config or environment asks for one; True when several processes run.

    Call once, before anything touches a JAX device. Calling again is a no-op.
    """
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    launch = plan_launch(dist)
    if launch.mode == "single":
        return False
    timeout = float(dist.init_timeout_s)
    if launch.mode == "auto":
        try:
            jax.distributed.initialize(initialization_timeout=int(timeout))
        except Exception as err:  # JAX could not join the job the environment describes: never run alone
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise DistributedError(f"{_described(launch)}, but jax.distributed.initialize failed ({first}); set "
                                   "distributed.coordinator/num_processes/process_id to start explicitly") from None
        check_joined(launch)
        return jax.process_count() > 1
    assert launch.coordinator is not None
    _split_address(launch.coordinator)
    if launch.process_id == 0:
        log(f"jaxbert: process 0 of {launch.num_processes}: coordinator at {launch.coordinator}, waiting up to "
            f"{timeout:g} s for the other processes")
    elif launch.process_id is not None:  # (a rank taken from the cluster environment may be 0: no probe)
        timeout -= wait_for_coordinator(launch.coordinator, timeout, launch.process_id)
    jax.distributed.initialize(launch.coordinator, launch.num_processes, launch.process_id,
                               initialization_timeout=max(int(timeout), 1))
    check_joined(launch)
    return jax.process_count() > 1


def _described(launch: Launch) -> str:
    cluster = detected_cluster()
    if cluster is not None:
        return f"the {cluster.name} job has {cluster.count} tasks ({cluster.source})"
    return f"{ENV_FLAG}=1 asks for a multi-process run"


def check_joined(launch: Launch) -> None:
    """After start-up: this process must be one of the expected number, at the expected rank."""
    count, index = jax.process_count(), jax.process_index()
    if launch.num_processes is not None and count != launch.num_processes:
        expected = (_described(launch) if launch.mode == "auto" else
                    f"distributed.num_processes is {launch.num_processes}")
        raise DistributedError(f"{expected}, but JAX started {count} process(es); refusing to run as independent "
                               "processes writing one run directory")
    if launch.process_id is not None and index != launch.process_id:
        raise DistributedError(f"this process has rank {launch.process_id} but JAX gave it process index {index}; "
                               "set distributed.process_id to match")


def setup(cfg: Config, log: Callable[[str], None] = print) -> Mesh:
    """:func:`initialize` then :func:`make_mesh`; says which mesh it built when there is more than one device."""
    initialize(cfg.distributed)
    mesh = make_mesh(cfg)
    if mesh.size > 1 and is_main_process():
        log(f"distributed: {describe(mesh)}")
    return mesh


def pretraining_mesh(cfg: Config, log: Callable[[str], None] = print) -> Mesh:
    """:func:`setup` plus the checks pretraining needs: micro-batches split over the devices, and no time budget
    with several processes (each would read its own clock and they would disagree on the schedule)."""
    mesh = setup(cfg, log)
    check_batch(cfg.train.micro_batch, mesh, "train.micro_batch")
    if jax.process_count() > 1 and cfg.train.budget_minutes is not None:
        raise DistributedError("train.budget_minutes cannot be used with several processes (their clocks "
                               "would disagree on the schedule); set train.steps instead")
    return mesh


def finetuning_mesh(cfg: Config) -> Mesh:
    """The mesh of a finetuning run: every device of this one process, data parallel (``distributed.fsdp`` is
    for pretraining); its batch sizes must split over the devices."""
    if jax.process_count() > 1:
        raise DistributedError("finetuning runs in one process (on all of its devices); start it without "
                               "distributed.coordinator")
    mesh = make_mesh(dataclasses.replace(cfg.distributed, fsdp=1))
    check_batch(cfg.finetune.batch_size, mesh, "finetune.batch_size")
    check_batch(cfg.finetune.eval_batch_size, mesh, "finetune.eval_batch_size")
    return mesh


def is_main_process() -> bool:
    """True on the one process that logs, plots and writes files (process 0)."""
    return jax.process_index() == 0


def process_split() -> tuple[int, int]:
    """(process index, process count): the arguments of the loader's process split."""
    return jax.process_index(), jax.process_count()


def main_first(fn: Callable[[], T]) -> T:
    """``fn()`` on the main process first, then on the others: for work that fills a shared cache (data
    preparation), which the other processes then only open."""
    if jax.process_count() == 1:
        return fn()
    if is_main_process():
        result = fn()
        barrier("jaxbert-main-first")
        return result
    barrier("jaxbert-main-first")
    return fn()


def barrier(name: str) -> None:
    """Wait until every process reaches this point (no-op with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def agreed_stop(flag: Callable[[], bool], every: int = 1) -> Callable[[], bool]:
    """A ``should_stop`` for the training loop that every process answers alike: with several processes, the
    local flags (e.g. a SIGTERM seen by one process) are combined every ``every`` calls, and True when any is set.
    Every process must call it once per step."""
    if jax.process_count() == 1:
        return flag
    calls = [0]

    def should_stop() -> bool:
        calls[0] += 1
        if calls[0] % max(every, 1):
            return False
        flags = multihost_utils.process_allgather(np.asarray([bool(flag())], np.int32))
        return bool(np.asarray(flags).any())

    return should_stop


def check_same(value: int, what: str) -> None:
    """Raise on every process when the processes disagree about an integer (e.g. the step they resume from)."""
    if jax.process_count() == 1:
        return
    values = np.asarray(multihost_utils.process_allgather(np.asarray([value], np.int64))).ravel()
    if len(set(values.tolist())) > 1:
        raise DistributedError(f"processes disagree about {what}: {values.tolist()} (process 0, 1, ...); every "
                               "process must see the same files (a shared run directory)")


# ---------------------------------------------------------------------------------------------------- mesh


def make_mesh(cfg: Config | DistributedConfig, devices: Optional[Sequence[Any]] = None) -> Mesh:
    """A ``("data", "fsdp")`` mesh over all devices of all processes (or ``devices``), process-major."""
    dist = cfg.distributed if isinstance(cfg, Config) else cfg
    devices = sorted(jax.devices() if devices is None else devices, key=lambda d: (d.process_index, d.id))
    n, fsdp = len(devices), dist.fsdp
    per_process = collections.Counter(d.process_index for d in devices)
    if len(set(per_process.values())) > 1:
        raise DistributedError(f"processes have different numbers of devices ({dict(sorted(per_process.items()))}"
                               "); give every process the same number")
    if fsdp < 1 or n % fsdp:
        raise DistributedError(f"distributed.fsdp={fsdp} does not divide the {n} devices of this run")
    grid = np.asarray(devices, dtype=object).reshape(n // fsdp, fsdp)
    return Mesh(grid, BATCH_AXES, axis_types=(AxisType.Auto, AxisType.Auto))


def describe(mesh: Mesh) -> str:
    """One line: devices, processes and the mesh shape."""
    kinds = sorted({d.platform for d in mesh.devices.flat})
    return (f"{mesh.size} {'/'.join(kinds)} device(s) in {jax.process_count()} process(es), mesh "
            f"data={mesh.shape[DATA]} x fsdp={mesh.shape[FSDP]}")


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows over every device; the other dimensions whole."""
    return NamedSharding(mesh, P(BATCH_AXES))


def param_spec(shape: Sequence[int], dtype: Any, fsdp: int) -> P:
    """Split the largest dimension that ``fsdp`` divides (the last of equals) over "fsdp"; replicate the rest.

    Integer arrays (PRNG keys, counters) and scalars stay replicated.
    """
    if fsdp == 1 or len(shape) == 0 or not np.issubdtype(np.dtype(dtype), np.floating):
        return P()
    candidates = [(size, axis) for axis, size in enumerate(shape) if size % fsdp == 0 and size >= fsdp]
    if not candidates:
        return P()
    _, axis = max(candidates)
    return P(*([None] * axis + [FSDP]))


def state_shardings(tree: Any, mesh: Mesh) -> Any:
    """A NamedSharding for every array leaf of ``tree`` (None elsewhere): parameters, optimizer state, ..."""
    fsdp = mesh.shape[FSDP]

    def one(x: Any) -> NamedSharding:
        return NamedSharding(mesh, param_spec(np.shape(x), x.dtype, fsdp))

    return jax.tree.map(one, eqx.filter(tree, eqx.is_array))


def _place(x: Any, sharding: NamedSharding) -> jax.Array:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.device_put(x, sharding)  # already global: a reshard
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    host = np.asarray(x)  # the same value on every process (seeded init or a restored checkpoint)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard_state(tree: Any, mesh: Mesh) -> Any:
    """``tree`` with every array placed by :func:`state_shardings`. With several processes each must pass the
    same values (a state initialised from the same seed, or restored from the same checkpoint)."""
    arrays, static = eqx.partition(tree, eqx.is_array)
    placed = jax.tree.map(_place, arrays, state_shardings(arrays, mesh))
    return eqx.combine(placed, static)


def to_host(tree: Any) -> Any:
    """``tree`` with every array as a whole host numpy array. A collective with several processes: every
    process must call it (then only the main one writes)."""
    arrays, static = eqx.partition(tree, eqx.is_array)
    leaves, treedef = jax.tree.flatten(arrays)
    remote = [i for i, x in enumerate(leaves) if isinstance(x, jax.Array) and not x.is_fully_addressable]
    gathered = multihost_utils.process_allgather([leaves[i] for i in remote], tiled=True) if remote else []
    host = [np.asarray(jax.device_get(x)) for x in leaves]
    for i, value in zip(remote, gathered):
        host[i] = np.asarray(value)
    return eqx.combine(jax.tree.unflatten(treedef, host), static)


# --------------------------------------------------------------------------------------------------- batches


def check_batch(rows: int, mesh: Mesh, source: str = "") -> None:
    """A clear error when ``rows`` global sequences cannot be split evenly over the mesh's devices."""
    if rows % mesh.size:
        named = f" ({source})" if source else ""
        raise DistributedError(f"a global batch of {rows} sequences{named} does not split evenly over {mesh.size} "
                               f"devices (mesh data={mesh.shape[DATA]} x fsdp={mesh.shape[FSDP]}); use a multiple "
                               f"of {mesh.size}")


def global_batch(local_rows: Any, mesh: Mesh) -> jax.Array:
    """The global array of a batch from this process's contiguous slice of its rows (all of them with one
    process); rows are split over every device."""
    local_rows = np.asarray(local_rows)
    shape = (local_rows.shape[0] * jax.process_count(), *local_rows.shape[1:])
    check_batch(shape[0], mesh)
    return jax.make_array_from_process_local_data(batch_sharding(mesh), local_rows, shape)


def distribute(rows: Any, mesh: Mesh) -> Any:
    """The global array(s) of a batch that every process holds whole (held-out batches, GLUE batches): each
    device takes its rows. ``rows`` may be one array or a pytree of arrays with the same number of rows."""

    def one(x: Any) -> jax.Array:
        x = np.asarray(x)
        check_batch(x.shape[0], mesh)
        sharding = batch_sharding(mesh)
        if sharding.is_fully_addressable:
            return jax.device_put(x, sharding)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(one, rows)


def mesh_of(tree: Any) -> Optional[Mesh]:
    """The mesh the arrays of ``tree`` were placed on by :func:`shard_state` (None: not on a mesh)."""
    for leaf in jax.tree.leaves(eqx.filter(tree, eqx.is_array)):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and isinstance(sharding.mesh, Mesh):
            return sharding.mesh
    return None


def on_mesh_of(model: Any, rows: Any) -> Any:
    """``rows`` (a batch every process holds whole) distributed over the mesh ``model`` lives on; unchanged
    when the model is not on a mesh with more than one device."""
    mesh = mesh_of(model)
    return rows if mesh is None or mesh.size == 1 else distribute(rows, mesh)


def constrain(tree: Any, mesh: Optional[Mesh]) -> Any:
    """Inside a jitted step: pin every array leaf of ``tree`` to its :func:`state_shardings` sharding, so
    states and accumulators keep one layout from step to step (no recompilation, fsdp memory kept). Identity
    when ``mesh`` is None."""
    if mesh is None:
        return tree
    fsdp = mesh.shape[FSDP]

    def one(x: Any) -> Any:
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, param_spec(x.shape, x.dtype, fsdp)))

    arrays, static = eqx.partition(tree, eqx.is_array)
    return eqx.combine(jax.tree.map(one, arrays), static)
