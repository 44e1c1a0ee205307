"""Device mesh, shardings and multi-host start-up for data-parallel training.

Data parallelism is written the current JAX way: one `Mesh` with a single 'data' axis over every device of
every host, `jax.jit` with `NamedSharding`s (batch split on 'data', train state replicated). XLA then inserts
the all-reduces, so gradients and BatchNorm statistics are computed over the *global* batch.
"""

from __future__ import annotations

import collections
import math
import os
from typing import Any

import jax
import numpy as np
from jax._src import distributed  # the client of jax.distributed.initialize: its barrier takes a timeout
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"

# Environment variables read by `maybe_initialize_distributed` when no explicit arguments are given.
ENV_COORDINATOR = "IMGLLM_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "IMGLLM_NUM_PROCESSES"
ENV_PROCESS_ID = "IMGLLM_PROCESS_ID"


def maybe_initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto: bool = False,
) -> bool:
    """Joins a multi-process JAX job when asked; returns whether `jax.distributed.initialize` was called.

    Asked means: a coordinator address given here or in $IMGLLM_COORDINATOR_ADDRESS (then the process count
    and id come from the arguments or $IMGLLM_NUM_PROCESSES / $IMGLLM_PROCESS_ID), or `auto=True`, which
    lets JAX detect the cluster (SLURM, TPU pods, ...). On CPU the cross-process collectives use gloo.
    Must run before anything touches a JAX backend.
    """
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR)
    if coordinator_address is None and not auto:
        return False
    if num_processes is None and ENV_NUM_PROCESSES in os.environ:
        num_processes = int(os.environ[ENV_NUM_PROCESSES])
    if process_id is None and ENV_PROCESS_ID in os.environ:
        process_id = int(os.environ[ENV_PROCESS_ID])
    if coordinator_address is not None and (num_processes is None or process_id is None):
        raise ValueError(
            f"coordinator_address={coordinator_address!r} needs num_processes and process_id "
            f"(got {num_processes!r}, {process_id!r}); set them or ${ENV_NUM_PROCESSES}/${ENV_PROCESS_ID}"
        )
    # CPU devices of different processes talk through gloo; harmless on GPU/TPU where it is unused.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )
    return True


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh with axis 'data' over `devices` (default: all devices of all processes)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def make_local_mesh() -> Mesh:
    """A 1-D 'data' mesh over this process's own devices only: what a jitted function needs to run with no
    cross-host collectives in a multi-process job (each process then works on its own data, as inference does)."""
    return make_mesh(jax.local_devices())


def process_device_counts() -> list[int]:
    """The number of devices of each process, in process order (read from `jax.devices()`: no communication)."""
    counts = collections.Counter(device.process_index for device in jax.devices())
    return [counts[index] for index in range(jax.process_count())]


def local_batch_multiple() -> int:
    """What a batch run on each process's local mesh (`make_local_mesh`) must be a multiple of, the same on every
    process: the least common multiple of the processes' device counts (this process's count when alone)."""
    return math.lcm(*process_device_counts())


# How long a process waits at `wait_for_processes` for the others (they may still be working: a day).
BARRIER_TIMEOUT_S = 24 * 3600


def wait_for_processes(name: str, timeout_s: float = BARRIER_TIMEOUT_S) -> None:
    """A barrier of every process of a multi-process job (`maybe_initialize_distributed`): returns once all have
    called it with the same `name` (use a name once); at once in a single-process run. It goes through the
    distributed runtime's coordination service (no device computation); a process that died or did not come within
    `timeout_s` makes it raise."""
    if jax.process_count() == 1:
        return
    client = distributed.global_state.client
    if client is None:  # a job joined some other way: a collective over every device is a barrier too
        multihost_utils.sync_global_devices(name)
        return
    client.wait_at_barrier(name, int(timeout_s * 1000))


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over the 'data' axis; the other dimensions whole."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """The same full copy on every device (train state, scalars)."""
    return NamedSharding(mesh, PartitionSpec())


def global_batch_divisor(mesh: Mesh) -> int:
    """A global batch must be a multiple of this (the number of devices on the 'data' axis)."""
    return mesh.shape[DATA_AXIS]


def host_to_global(batch: Any, mesh: Mesh) -> Any:
    """Turns this process's slice of a batch (a tree of numpy arrays) into global arrays sharded on 'data'.

    Every process passes its own, equally sized, consecutive slice of the global batch (see
    `imgllm.data.epoch_batch_indices`); the global batch is their concatenation in process order.
    """
    sharding = data_sharding(mesh)

    def to_global(local: np.ndarray) -> jax.Array:
        local = np.asarray(local)
        global_shape = (local.shape[0] * jax.process_count(),) + local.shape[1:]
        return jax.make_array_from_process_local_data(sharding, local, global_shape)

    return jax.tree.map(to_global, batch)
