"""Which examples go into which batch on which host: deterministic from (seed, epoch), no state.

Every host computes the same global order and keeps only its own columns of each global batch, so
host processes never exchange indices and together cover every global batch exactly once.
"""

from __future__ import annotations

import numpy as np

PADDING_INDEX = -1  # marks padding slots of a final partial batch (drop_remainder=False)


def epoch_permutation(num_examples: int, *, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The order of all examples in `epoch`: a permutation drawn from (seed, epoch), or 0..N-1."""
    if not shuffle:
        return np.arange(num_examples, dtype=np.int64)
    return np.random.default_rng((int(seed), int(epoch))).permutation(num_examples)


def epoch_batch_indices(
    num_examples: int,
    global_batch_size: int,
    *,
    seed: int,
    epoch: int,
    process_index: int = 0,
    process_count: int = 1,
    shuffle: bool = True,
    drop_remainder: bool = True,
) -> np.ndarray:
    """Example indices for this host for every step of one epoch: int64 [steps, per_host_batch].

    Global batch `s` is positions ``[s * B, (s + 1) * B)`` of `epoch_permutation`; host `p` of `P`
    takes its ``p``-th contiguous block of ``B / P`` of them. With ``drop_remainder=False`` a final
    partial batch is padded with `PADDING_INDEX` (-1), which `gather_batch` turns into a mask.
    Raises ValueError before any work when the sizes do not fit together.
    """
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size ({global_batch_size}) must be a positive multiple of process_count ({process_count})"
        )
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index ({process_index}) must be in [0, process_count={process_count})")
    if drop_remainder and num_examples < global_batch_size:
        raise ValueError(
            f"global_batch_size ({global_batch_size}) exceeds the {num_examples} examples: an epoch would have no "
            "full batch (use a smaller batch, or drop_remainder=False)"
        )
    order = epoch_permutation(num_examples, seed=seed, epoch=epoch, shuffle=shuffle)
    steps = num_examples // global_batch_size if drop_remainder else -(-num_examples // global_batch_size)
    padded = np.full(steps * global_batch_size, PADDING_INDEX, dtype=np.int64)
    used = min(len(padded), num_examples)
    padded[:used] = order[:used]
    per_host = global_batch_size // process_count
    return padded.reshape(steps, process_count, per_host)[:, process_index, :]


def gather_batch(dataset, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Host-side batch for one row of `epoch_batch_indices`: uint8 images, int32 labels, bool mask.

    Padding slots (index -1) get a zero image, label 0 and mask False, so metrics can ignore them.
    """
    indices = np.asarray(indices)
    mask = indices != PADDING_INDEX
    safe = np.where(mask, indices, 0)
    images = dataset.images[safe]
    images[~mask] = 0
    return {"images": images, "labels": np.where(mask, dataset.labels[safe], 0).astype(np.int32), "mask": mask}


def padded_batch_outputs(fn, images: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
    """fn(uint8 images [batch_size, ...]) -> dict of [batch_size, ...] arrays, run over all `images` in whole
    batches (the last one padded with zeros, its padding dropped): one compiled shape. Host numpy results."""
    outputs = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        padded = np.concatenate([batch, np.zeros((batch_size - len(batch), *batch.shape[1:]), batch.dtype)])
        outputs.append({key: np.asarray(value)[: len(batch)] for key, value in fn(padded).items()})
    return {key: np.concatenate([out[key] for out in outputs]) for key in outputs[0]}
