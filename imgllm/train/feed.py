"""Training batches for the step: gathered on the devices from data kept there, or on the host each step.

    "device"  the training arrays are copied once to every device (CIFAR-10: 150 MB as uint8). Each epoch's order
              goes over once as int32 [steps, batch]; the jitted step picks its row from the state's step and
              gathers the batch on device, each device its own shard. The host touches no pixels after loading.
    "host"    the host gathers this process's rows of every batch (numpy) and sends them; for data larger than
              the devices can hold. Dispatch is asynchronous, so the next batch is built while the step runs.
    "auto"    "device" when the arrays take at most `DEVICE_DATA_FRACTION` of a device's memory (on CPU, where
              the "device" is host memory, at most `CPU_DEVICE_DATA_BYTES`), else "host".

Both give each step the same examples in the same order (`imgllm.data.epoch_batch_indices`), so the placement may
change between a run and its resumption.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import Mesh

from imgllm import parallel
from imgllm.data import epoch_batch_indices

PLACEMENTS = ("auto", "device", "host")
DEVICE_DATA_FRACTION = 0.25
CPU_DEVICE_DATA_BYTES = 4 << 30


def data_bytes(arrays: Mapping[str, np.ndarray]) -> int:
    """Bytes of all `arrays` together."""
    return sum(int(np.asarray(a).nbytes) for a in arrays.values())


def device_memory_bytes(device: jax.Device) -> int | None:
    """The memory one device may use (its allocator's limit), or None when the platform does not say (CPU)."""
    stats = device.memory_stats() if device.platform != "cpu" else None
    return (stats or {}).get("bytes_limit")


def resolve_placement(placement: str, arrays: Mapping[str, np.ndarray], device: jax.Device) -> str:
    """ "device" or "host" for a config's data_placement ("auto" decides from the arrays' size and the device's)."""
    if placement not in PLACEMENTS:
        raise ValueError(f"config.data_placement={placement!r}: expected one of {PLACEMENTS}")
    if placement != "auto":
        return placement
    limit = device_memory_bytes(device)
    budget = CPU_DEVICE_DATA_BYTES if limit is None else DEVICE_DATA_FRACTION * limit
    return "device" if data_bytes(arrays) <= budget else "host"


def gather_rows(
    data: Mapping[str, jax.Array], order: jax.Array, step: jax.Array, steps_per_epoch: int, mesh: Mesh
) -> dict[str, jax.Array]:
    """The batch of global `step` from device-resident `data`: rows order[step % steps_per_epoch] (traced).

    The row indices are sharded on 'data' before the gather, so each device gathers only its own examples.
    """
    rows = jax.lax.with_sharding_constraint(order[step % steps_per_epoch], parallel.data_sharding(mesh))
    return {name: array[rows] for name, array in data.items()}


class DeviceFeed:
    """Training arrays replicated on every device of `mesh`; `epoch` sends an epoch's order, `args` are the step's
    data arguments (the same arrays every step: nothing is transferred per step)."""

    placement = "device"

    def __init__(self, arrays: Mapping[str, np.ndarray], mesh: Mesh, *, seed: int, global_batch_size: int):
        self.mesh, self.seed, self.global_batch_size = mesh, seed, global_batch_size
        self.num_examples = len(next(iter(arrays.values())))
        self.data = {name: replicate(np.asarray(array), mesh) for name, array in arrays.items()}
        self.order = None

    def epoch(self, epoch: int) -> None:
        """Sends `epoch`'s global order, int32 [steps, global batch], once."""
        order = epoch_batch_indices(self.num_examples, self.global_batch_size, seed=self.seed, epoch=epoch)
        self.order = replicate(order.astype(np.int32), self.mesh)

    def args(self, index: int) -> tuple:
        return self.data, self.order


class HostFeed:
    """Training arrays in host memory; `args` gathers this process's rows of the step's batch and sends them."""

    placement = "host"

    def __init__(self, arrays: Mapping[str, np.ndarray], mesh: Mesh, *, seed: int, global_batch_size: int):
        self.arrays, self.mesh, self.seed, self.global_batch_size = arrays, mesh, seed, global_batch_size
        self.num_examples = len(next(iter(arrays.values())))
        self.order = None

    def epoch(self, epoch: int) -> None:
        self.order = epoch_batch_indices(
            self.num_examples,
            self.global_batch_size,
            seed=self.seed,
            epoch=epoch,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )

    def args(self, index: int) -> tuple:
        batch = {name: np.asarray(array[self.order[index]]) for name, array in self.arrays.items()}
        return (parallel.host_to_global(batch, self.mesh),)


def replicate(array: np.ndarray, mesh: Mesh) -> jax.Array:
    """A full copy of a host array on every device of `mesh` (each process passes the same array)."""
    return jax.make_array_from_callback(array.shape, parallel.replicated_sharding(mesh), lambda index: array[index])


def make_feed(
    placement: str, arrays: Mapping[str, np.ndarray], mesh: Mesh, *, seed: int, global_batch_size: int
) -> DeviceFeed | HostFeed:
    """The feed for a config's data_placement ("auto", "device" or "host")."""
    kind = DeviceFeed if resolve_placement(placement, arrays, mesh.devices.flat[0]) == "device" else HostFeed
    return kind(arrays, mesh, seed=seed, global_batch_size=global_batch_size)
