"""The training loop's overhead: images/s of `train_and_evaluate` beside the bare jitted step, in one run.

Both train the `cifar10` recipe's network on demo images with the same data feed (`config.data_placement`).
The bare step is the jitted train step called back to back, timed in windows of --window steps that end by
waiting for the state. The loop's figure is the `examples_per_second` it logs itself every --window steps
(its first window, which holds compilation, is left out). Both are medians; rounds alternate bare and loop so
that a slow spell of the shared machine hits both alike. Target: loop >= 0.95 x bare.

    python benchmarks/bench_train_loop.py                               # airbench94, batch 256
    python benchmarks/bench_train_loop.py --preset tiny --batch 64      # seconds
"""

import argparse
import json
import os
import statistics
import tempfile
import time

import jax

from imgllm import parallel
from imgllm.configs import cifar10
from imgllm.train import evaluation, loop, metrics_log, optim, steps
from imgllm.train import feed as feed_lib
from imgllm.train.registry import build_task


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="airbench94")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--window", type=int, default=5, help="steps per timed window (the loop's log interval)")
    parser.add_argument("--windows", type=int, default=3, help="timed windows per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--placement", default="auto", choices=feed_lib.PLACEMENTS)
    return parser.parse_args()


def bench_config(args):
    """The cifar10 recipe on demo images: one epoch of (windows + 1) windows, no evaluation, no mid-run saves."""
    config = cifar10.get_config()
    steps_per_run = args.window * (args.windows + 1)
    config.dataset = "demo"
    config.num_train_examples = args.batch * steps_per_run
    config.global_batch_size = args.batch
    config.whiten_init_examples = min(config.whiten_init_examples, args.batch)
    config.num_epochs = 1.0
    config.eval_split = ""
    config.model.preset = args.preset
    config.log_every_steps = args.window
    config.checkpoint_every_steps = 10**9
    config.progress_bar = False
    config.data_placement = args.placement
    return config


def bare_step_rates(config, args):
    """Images/s of each window of the jitted train step called back to back (compiled and warmed up first)."""
    mesh = parallel.make_mesh()
    task = build_task(config)
    arrays = task.train_arrays()
    steps_per_epoch, total_steps = loop.schedule_lengths(evaluation.num_examples(arrays), config)
    state, tx = loop.initial_state(
        task, config, arrays, mesh, loop.run_plan(config, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
    )
    batches = feed_lib.make_feed(
        config.data_placement, arrays, mesh, seed=config.seed, global_batch_size=config.global_batch_size
    )
    lookahead = optim.lookahead_fn(config.get("lookahead"), steps_per_epoch=steps_per_epoch, total_steps=total_steps)
    step_fn = steps.jit_train_step(
        task, tx, mesh, steps_per_epoch=steps_per_epoch, placement=batches.placement, lookahead=lookahead
    )
    batches.epoch(0)
    state, _ = step_fn(state, *batches.args(0))
    jax.block_until_ready(state)
    times = []
    for window in range(args.windows):
        start = time.perf_counter()
        for index in range(args.window):
            state, _ = step_fn(state, *batches.args((window * args.window + index + 1) % steps_per_epoch))
        jax.block_until_ready(state)
        times.append(args.batch * args.window / (time.perf_counter() - start))
    return times, batches.placement


def loop_rates(config, args):
    """Images/s of each window as train_and_evaluate logs them (examples_per_second); its first line (step 1,
    compilation included) left out."""
    with tempfile.TemporaryDirectory() as workdir:
        loop.train_and_evaluate(config, workdir)
        with open(os.path.join(workdir, metrics_log.METRICS_FILE)) as f:
            records = [json.loads(line) for line in f]
    return [r["examples_per_second"] for r in records if r["split"] == "train"][1:]


def main():
    args = parse_args()
    config = bench_config(args)
    bare, looped, placement = [], [], None
    for _ in range(args.rounds):
        rates, placement = bare_step_rates(config, args)
        bare += rates
        looped += loop_rates(config, args)
    bare_rate, loop_rate = statistics.median(bare), statistics.median(looped)
    print(
        f"{jax.default_backend()} {len(jax.devices())} device(s), preset {args.preset}, batch {args.batch}, "
        f"data on {placement}; medians of {len(bare)} / {len(looped)} windows of {args.window} steps"
    )
    print(f"{'':24s}{'images/s':>10s}")
    print(f"{'bare jitted step':24s}{bare_rate:10.1f}")
    print(f"{'train_and_evaluate':24s}{loop_rate:10.1f}")
    print(f"loop / bare = {loop_rate / bare_rate:.3f} (target >= 0.95)")


if __name__ == "__main__":
    main()
