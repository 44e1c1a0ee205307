"""Learning rates follow the batch size at run time (configs store them for a reference batch size).

The cifar10 and cifar10_muon configs used to compute their learning rates from global_batch_size inside
get_config(), so `--config.global_batch_size=512` kept batch-1024 rates. Now the trainer scales them: at the
default batch sizes every group's rates are what those configs gave, and another batch size scales the SGD
learning rates linearly, keeps the decay coefficients and keeps Muon's learning rate.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from imgllm.configs import cifar10, cifar10_muon, cnn_tiny
from imgllm.configs.common import airbench_param_groups
from imgllm.train import evaluation, loop, optim

REL = 1e-12


def former_cifar10_optimizer() -> ml_collections.ConfigDict:
    """config.optimizer as configs/cifar10.py computed it before, for its batch of 1024."""
    c = cifar10.get_config().optimizer
    kilostep_scale = 1024 * (1 + 1 / (1 - 0.85))
    c.reference_batch_size = None
    c.learning_rate = 11.5 * 1024 / kilostep_scale
    c.weight_decay = 0.0153 / 11.5
    c.groups = airbench_param_groups(whiten_bias_epochs=3.0, norm_bias_lr_scale=64.0)
    return c


def former_cifar10_muon_optimizer() -> ml_collections.ConfigDict:
    """config.optimizer as configs/cifar10_muon.py computed it before, for its batch of 2000 (Muon's lr as a
    multiple of the head's)."""
    c = cifar10_muon.get_config().optimizer
    batch, decay_per_step = 2000, 2e-6 * 2000
    head_lr = 0.67 / (256 / 9) ** 2 * batch
    bias_lr = 0.053 * batch
    c.reference_batch_size = None
    c.learning_rate = head_lr
    c.weight_decay = decay_per_step / head_lr
    groups = airbench_param_groups(whiten_bias_epochs=3.0, norm_bias_lr_scale=bias_lr / head_lr)
    groups.whiten_bias.update(
        lr_scale=groups.norm_bias.lr_scale, weight_decay_scale=groups.norm_bias.weight_decay_scale
    )
    groups.conv = dict(
        pattern=r"(^|/)conv\d*/kernel$",
        optimizer="muon",
        momentum=0.6,
        lr_scale=0.24 / head_lr,
        weight_decay_scale=0.0,
        train_epochs=None,
    )
    c.groups = groups
    return c


def airbench_like_params():
    """Small random parameters named as the airbench CNN's (nonzero: Muon divides by the kernels' norms)."""
    rng = np.random.default_rng(0)
    normal = lambda *shape: jnp.asarray(rng.normal(0.0, 0.1, shape), jnp.float32)
    return {
        "whiten_kernel": normal(2, 2, 3, 6),
        "whiten_bias": normal(6),
        "block1": {"conv1": {"kernel": normal(3, 3, 6, 8)}, "norm1": {"bias": normal(8), "scale": normal(8)}},
        "head": {"kernel": normal(8, 10)},
    }


def assert_same_rates(got: dict, want: dict):
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].peak_learning_rate == pytest.approx(want[name].peak_learning_rate, rel=REL, abs=0), name
        assert got[name].weight_decay == pytest.approx(want[name].weight_decay, rel=REL, abs=0), name


def run_updates(cfg, params, batch_size, steps=6):
    """The optimizer's updates over `steps` steps of fixed random gradients (the whole triangle schedule)."""
    tx = optim.make_optimizer(cfg, params, total_steps=steps, steps_per_epoch=2, batch_size=batch_size)
    state, out = tx.init(params), []
    for step in range(steps):
        leaves, treedef = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.PRNGKey(step), len(leaves))
        grads = treedef.unflatten([jax.random.normal(k, p.shape) for k, p in zip(keys, leaves)])
        updates, state = tx.update(grads, state, params)  # eager: no compile for these few steps
        params = optax.apply_updates(params, updates)
        out.append(updates)
    return out


@pytest.mark.parametrize(
    "config_module, former",
    [(cifar10, former_cifar10_optimizer), (cifar10_muon, former_cifar10_muon_optimizer)],
    ids=["cifar10", "cifar10_muon"],
)
def test_default_batch_size_gives_the_former_rates_and_updates(config_module, former):
    config = config_module.get_config()
    batch = config.global_batch_size
    assert batch == {cifar10: 1024, cifar10_muon: 2000}[config_module]
    assert_same_rates(optim.group_rates(config.optimizer, batch), optim.group_rates(former()))

    params = airbench_like_params()
    labels = optim.param_labels(params, config.optimizer.groups)
    assert set(jax.tree.leaves(labels)) == set(optim.group_rates(former()))  # every group is compared
    got, want = run_updates(config.optimizer, params, batch), run_updates(former(), params, None)
    for step, (g, w) in enumerate(zip(got, want)):
        for (path, a), b, label in zip(
            jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(w), jax.tree.leaves(labels)
        ):
            where = f"step {step} {jax.tree_util.keystr(path)} ({label})"
            if label == "conv":  # Muon: lr 0.24 itself, formerly 0.24 / head_lr x head_lr: an ulp of the lr
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7, err_msg=where)
            else:
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=where)


def test_cifar10_batch_512_halves_the_learning_rates_and_keeps_the_decay():
    config = cifar10.get_config()
    at_1024 = optim.group_rates(config.optimizer, 1024)
    config.global_batch_size = 512
    at_512 = optim.group_rates(config.optimizer, config.global_batch_size)
    lr, wd = cifar10.airbench_sgd_values(512)  # airbench's own rule at batch 512
    assert at_512["default"].peak_learning_rate == pytest.approx(lr, rel=REL)
    assert at_512["default"].weight_decay == pytest.approx(wd, rel=REL)
    for name in ("default", "whiten_bias", "norm_bias", "frozen"):
        assert at_512[name].peak_learning_rate == pytest.approx(at_1024[name].peak_learning_rate / 2, rel=REL)
        assert at_512[name].weight_decay == at_1024[name].weight_decay


def test_cifar10_muon_other_batch_scales_sgd_but_not_muon():
    config = cifar10_muon.get_config()
    at_2000 = optim.group_rates(config.optimizer, 2000)
    at_512 = optim.group_rates(config.optimizer, 512)
    for name in ("default", "whiten_bias", "norm_bias"):
        assert at_512[name].peak_learning_rate == pytest.approx(
            at_2000[name].peak_learning_rate * 512 / 2000, rel=REL
        ), name
        assert at_512[name].weight_decay == at_2000[name].weight_decay, name
    assert at_512["conv"].peak_learning_rate == at_2000["conv"].peak_learning_rate == 0.24
    assert at_512["conv"].weight_decay == 0.0

    params = airbench_like_params()
    labels = optim.param_labels(params, config.optimizer.groups)
    (small,), (large,) = (
        run_updates(config.optimizer, params, 512, steps=1),
        run_updates(config.optimizer, params, 2000, steps=1),
    )
    for a, b, label in zip(jax.tree.leaves(small), jax.tree.leaves(large), jax.tree.leaves(labels)):
        if label == "conv":
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        elif label == "default":  # the head: params are not zero, so decay contributes too; both scale with lr
            np.testing.assert_allclose(np.asarray(a), np.asarray(b) * 512 / 2000, rtol=1e-5, atol=1e-9)


def test_a_reference_batch_size_needs_the_run_batch_size_and_one_lr_per_group():
    cfg = ml_collections.ConfigDict(
        dict(
            name="sgd",
            learning_rate=0.1,
            reference_batch_size=256,
            weight_decay=0.0,
            groups=dict(a=dict(pattern="x", lr_scale=2.0, learning_rate=0.3)),
        )
    )
    with pytest.raises(ValueError, match="needs the run's batch size"):
        optim.group_rates(cfg)
    with pytest.raises(ValueError, match="groups.a gives both learning_rate and lr_scale"):
        optim.group_rates(cfg, 256)


def test_the_training_loop_gives_the_optimizer_its_batch_size(tmp_path):
    """A run whose learning rate is given for another batch size trains and restores (the optimizer is built
    with config.global_batch_size both times: without it, make_optimizer refuses a reference batch size)."""
    config = cnn_tiny.get_config()
    config.num_epochs = 0.25  # 2 steps of 32 examples
    config.eval_split = ""
    config.optimizer.update(learning_rate=0.2, reference_batch_size=16)
    result = loop.train_and_evaluate(config, str(tmp_path))
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(result.state.params))
    restored_config, _, _, variables = evaluation.restore_for_eval(str(tmp_path))
    assert restored_config.optimizer.reference_batch_size == 16
    for a, b in zip(jax.tree.leaves(variables["params"]), jax.tree.leaves(result.state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
