"""Training throughput of the airbench94 CNN on this machine: imgllm (JAX/Flax) next to PyTorch.

One training step = forward + backward + Nesterov-SGD update, BatchNorm in train mode, fp32,
batch 1024 (airbench's). Prints images/s (median over --steps timed steps after warm-up) for
each JAX conv implementation (all in one process, their steps interleaved, so that the shared
machine's slow spells hit them alike) and for the same network in PyTorch (channels_last, 2 threads,
its own process), plus JAX compile time.

    python benchmarks/bench_cnn_train.py                      # full size, the reference figures
    python benchmarks/bench_cnn_train.py --preset tiny --batch 64 --steps 3   # smoke run

XLA flags are applied before jax is imported (--xla_flags). The default is XLA's own settings: on
this machine --xla_cpu_experimental_{onednn,xnn,ynn}_fusion_type=dot gave no measurable gain
(XLA:CPU already routes these dots to YNNPACK), so none is set.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time

DEFAULT_CPU_XLA_FLAGS = ""


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="airbench94")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--impls", default="hybrid,im2col", help="comma-separated JAX conv_impl values to time")
    parser.add_argument("--torch", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--threads", type=int, default=2, help="PyTorch intra-op threads")
    parser.add_argument("--xla_flags", default=None, help="XLA_FLAGS for the JAX runs (default: none)")
    return parser.parse_args()


def median_rates(steps_by_name, batch, warmup, steps):
    """Times the callables of {name: step} in interleaved rounds (each round runs every step once, so a slow
    spell of the shared machine hits all alike); returns {name: (median images/s, step times)}."""
    for step in steps_by_name.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in steps_by_name}
    for _ in range(steps):
        for name, step in steps_by_name.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: (batch / statistics.median(t), t) for name, t in times.items()}


def jax_train_step(args, impl):
    """(step callable, compile seconds) of imgllm's CNN training step with conv_impl=impl."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from imgllm.vision.cnn import cnn_preset

    model = cnn_preset(args.preset, conv_impl=impl)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.standard_normal((args.batch, 32, 32, 3), np.float32))
    labels = jnp.asarray(rng.integers(0, 10, args.batch), jnp.int32)
    variables = model.init(jax.random.key(0), images[:2], train=False)
    params, batch_stats = variables["params"], variables["batch_stats"]
    tx = optax.sgd(0.01, momentum=0.85, nesterov=True)
    opt_state = tx.init(params)

    def loss_fn(params, batch_stats, images, labels):
        (logits, _), updates = model.apply(
            {"params": params, "batch_stats": batch_stats}, images, train=True, mutable=["batch_stats"]
        )
        targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), 0.2)
        return optax.softmax_cross_entropy(logits, targets).sum(), updates["batch_stats"]

    def train_step(params, batch_stats, opt_state, images, labels):
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats, images, labels)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    start = time.perf_counter()
    compiled = (
        jax.jit(train_step, donate_argnums=(0, 1, 2)).lower(params, batch_stats, opt_state, images, labels).compile()
    )
    compile_s = time.perf_counter() - start
    state = [params, batch_stats, opt_state]

    def step():
        state[0], state[1], state[2], loss = compiled(*state, images, labels)
        loss.block_until_ready()

    return step, compile_s


def bench_torch(args):
    """images/s of the same training step in PyTorch (channels_last, args.threads threads)."""
    import torch
    from reference_airbench94_torch import make_net  # the same network as the full PyTorch reference run

    from imgllm.vision.cnn import PRESETS

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = make_net(PRESETS[args.preset]["widths"]).to(memory_format=torch.channels_last)
    images = torch.randn(args.batch, 3, 32, 32).to(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (args.batch,))
    optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.01, momentum=0.85, nesterov=True)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.2, reduction="sum")

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(net(images), labels)
        loss.backward()
        optimizer.step()

    return median_rates({"torch": step}, args.batch, args.warmup, args.steps)["torch"]


def main():
    args = parse_args()
    if os.environ.get("_BENCH_CNN_CHILD") == "torch":
        rate, times = bench_torch(args)
        print(f"RESULT torch {rate:.1f} {' '.join(f'{t:.3f}' for t in times)}")
        return
    if os.environ.get("_BENCH_CNN_CHILD") == "jax":
        impls = list(filter(None, args.impls.split(",")))
        steps, compile_s = zip(*(jax_train_step(args, impl) for impl in impls))
        rates = median_rates(dict(zip(impls, steps)), args.batch, args.warmup, args.steps)
        for impl, seconds in zip(impls, compile_s):
            rate, times = rates[impl]
            print(f"RESULT {impl} {rate:.1f} {seconds:.1f} {' '.join(f'{t:.3f}' for t in times)}")
        return
    # Each measurement runs in a fresh process: XLA_FLAGS must be set before jax is imported, and
    # PyTorch's and XLA's thread pools must not compete for the 2 cores.
    xla_flags = DEFAULT_CPU_XLA_FLAGS if args.xla_flags is None else args.xla_flags
    print(
        f"airbench94 CNN training step, preset={args.preset}, batch={args.batch}, fp32, "
        f"median of {args.steps} steps after {args.warmup} warm-up; load: {os.getloadavg()}"
    )
    print(f"XLA_FLAGS={xla_flags!r}")
    rows = []
    if args.impls:  # all JAX impls in one process, their steps interleaved
        child_env = {**os.environ, "_BENCH_CNN_CHILD": "jax", "XLA_FLAGS": xla_flags}
        for impl, rate, compile_s, *times in run_child(child_env):
            rows.append((f"imgllm JAX conv_impl={impl}", rate, f"compile {compile_s:.1f} s, steps {times}"))
            print(f"  {rows[-1][0]:<32} {rate:8.1f} images/s   ({rows[-1][2]})", flush=True)
    if args.torch:
        ((_, rate, *times),) = run_child({**os.environ, "_BENCH_CNN_CHILD": "torch"})
        rows.append((f"PyTorch channels_last {args.threads} thr", rate, f"steps {times}"))
        print(f"  {rows[-1][0]:<32} {rate:8.1f} images/s   ({rows[-1][2]})", flush=True)
    print(f"load after: {os.getloadavg()}")


def run_child(env):
    """Runs this script as a child with `env`; returns its RESULT lines as [name, float, float, ...] each."""
    proc = subprocess.run([sys.executable, *sys.argv], env=env, capture_output=True, text=True)
    lines = [line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"benchmark child failed (rc={proc.returncode}):\n{proc.stderr[-3000:]}")
    return [[name, *map(float, values)] for name, *values in lines]


if __name__ == "__main__":
    main()
