"""Training loop, optimizer, lookahead and classifier task on the tiny CNN and demo data (CPU, 1 device)."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from imgllm import calibration, parallel
from imgllm import data as data_lib
from imgllm.configs import cifar10, cifar10_muon, cnn_tiny
from imgllm.configs.common import airbench_param_groups, resolve_config_arg
from imgllm.train import evaluation, feed, loop, metrics_log, optim, plot, steps
from imgllm.train.classifier import ClassifierTask, folder_split
from imgllm.train.registry import build_task
from imgllm.train.task_protocol import metric
from imgllm.vision import cnn as cnn_lib


def read_metrics(workdir, split):
    with open(os.path.join(workdir, metrics_log.METRICS_FILE)) as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny training run shared by the tests below: (config, workdir, result)."""
    workdir = str(tmp_path_factory.mktemp("tiny"))
    config = cnn_tiny.get_config()
    return config, workdir, loop.train_and_evaluate(config, workdir)


def test_training_reduces_loss(trained):
    config, workdir, result = trained
    train = read_metrics(workdir, "train")
    first, last = train[0], train[-1]
    assert first["step"] == 1 and last["step"] == result.total_steps == int(result.state.step) == 16
    assert last["loss"] < first["loss"] - 0.05, (first, last)


def test_metrics_file_has_train_eval_and_tta_final(trained):
    config, workdir, result = trained
    train = read_metrics(workdir, "train")
    assert [r["step"] for r in train] == [1, 4, 8, 12, 16]
    for key in ("loss", "accuracy", "l2_grads", "l2_params", "steps_per_second", "examples_per_second"):
        assert all(np.isfinite(r[key]) for r in train), key
    assert [r["step"] for r in read_metrics(workdir, "eval")] == [8]
    (final,) = read_metrics(workdir, "final_eval")
    assert final["tta"] is True and final["accuracy"] == pytest.approx(result.final_eval["accuracy"])


def test_learning_rate_compile_time_tensorboard_and_curves_are_written(trained):
    config, workdir, result = trained
    train = read_metrics(workdir, "train")
    assert train[0]["compile_seconds"] > 0 and all("compile_seconds" not in r for r in train[1:])
    schedule = optim.default_learning_rate(
        config.optimizer, total_steps=16, steps_per_epoch=8, batch_size=config.global_batch_size
    )
    expected = [float(schedule(np.int32(r["step"] - 1))) for r in train]
    assert [r["learning_rate"] for r in train] == pytest.approx(expected)
    assert len({r["learning_rate"] for r in train}) > 1  # the triangle schedule moves
    for split in ("train", "eval", "final_eval"):
        events = os.listdir(os.path.join(workdir, metrics_log.TENSORBOARD_DIR, split))
        assert any(name.startswith("events.out.tfevents") for name in events), (split, events)
    with Image.open(os.path.join(workdir, plot.CURVES_FILE)) as curves:
        assert curves.size[0] > 1000 and curves.size[1] > 300


def test_final_eval_says_whether_it_used_test_time_augmentation():
    assert evaluation.uses_tta({"tta": "flip"}) and evaluation.uses_tta({"tta": "flip_translate"})
    assert not any(evaluation.uses_tta(config) for config in ({"tta": "none"}, {"tta": ""}, {}))


def test_checkpoints_keep_last_n_with_metadata(trained):
    config, workdir, result = trained
    steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    assert steps == [8, 12, 16]  # every 4 steps, max 3 kept
    _, meta, _, variables = evaluation.restore_for_eval(workdir)
    assert meta["step"] == 16 and meta["epoch"] == 2 and meta["steps_per_epoch"] == 8
    assert tuple(meta["task"]["class_names"]) == data_lib.load_dataset("demo", "validation", num_examples=1).class_names
    restored = jax.tree.leaves(variables)
    for a, b in zip(restored, jax.tree.leaves(result.state.variables)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_eval_checkpoint_on_image_folder(trained, tmp_path):
    """--mode=eval on a folder of class folders: same accuracy as on the arrays the images came from."""
    config, workdir, result = trained
    ds = data_lib.load_dataset("demo", "validation", num_examples=64)
    for i, (image, label) in enumerate(zip(ds.images, ds.labels)):
        folder = tmp_path / "test" / ds.class_names[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    spec = f"folder:{tmp_path / 'test'}"
    assert folder_split(spec, "test") == "train_full"
    got = evaluation.evaluate_checkpoint(workdir, spec, split="test", confusion_png=str(tmp_path / "confusion.png"))
    assert got["num_examples"] == 64 and got["tta"] is True
    assert got["accuracy"] == pytest.approx(result.final_eval["accuracy"], abs=1e-6)
    assert got["confusion_png"] == str(tmp_path / "confusion.png")
    with Image.open(got["confusion_png"]) as picture:
        assert min(picture.size) > 300
    # The stored calibration is measured on this data; a relative folder resolves under data_dir (--data_dir).
    assert got["head_temperature"] == pytest.approx(result.final_eval["head_temperature"])
    assert 0.0 <= got["head_ece_calibrated"] <= 1.0
    relative = evaluation.evaluate_checkpoint(workdir, "folder:test", split="test", data_dir=str(tmp_path))
    assert relative["num_examples"] == 64 and relative["accuracy"] == got["accuracy"]


def test_confusion_counts_each_example_once(trained):
    config, workdir, result = trained
    _, meta, task, variables = evaluation.restore_for_eval(workdir)
    arrays = task.eval_arrays(metadata=meta["task"])
    matrix = task.confusion(variables, arrays, batch_size=24, tta=True)  # 64 examples: a padded last batch
    assert matrix.sum() == 64 and matrix.shape == (config.model.num_classes,) * 2
    assert np.trace(matrix) / 64 == pytest.approx(result.final_eval["accuracy"], abs=1e-6)


def test_incompatible_config_is_refused(trained):
    config, workdir, _ = trained
    changed = ml_collections.ConfigDict(config.to_dict())
    changed.optimizer.learning_rate = 0.5
    changed.global_batch_size = 16
    changed.log_every_steps = 1  # resume-safe: not reported
    with pytest.raises(loop.ckpt_lib.IncompatibleConfigError) as error:
        loop.train_and_evaluate(changed, workdir)
    message = str(error.value)
    assert f"optimizer.learning_rate: checkpoint {config.optimizer.learning_rate}, now 0.5" in message
    assert "global_batch_size: checkpoint 32, now 16" in message
    assert "log_every_steps" not in message


class NaNAtExample(ClassifierTask):
    """The tiny classifier, with a NaN loss on any batch that holds training example `bad_index`."""

    bad_index = 100

    def loss(self, params, model_state, batch, rng, epoch):
        loss, aux = super().loss(params, model_state, batch, rng, epoch)
        poisoned = jnp.any(batch["index"] == self.bad_index)
        return jnp.where(poisoned, jnp.nan, loss), aux


def test_nan_loss_stops_naming_the_step(tmp_path):
    config = cnn_tiny.get_config()
    config.checkpoint_every_steps = 1
    config.eval_split = ""
    task = NaNAtExample(config)
    order = data_lib.epoch_batch_indices(config.num_train_examples, config.global_batch_size, seed=config.seed, epoch=0)
    bad_step = int(np.flatnonzero((order == task.bad_index).any(axis=1))[0]) + 1
    with pytest.raises(loop.NonFiniteLossError, match=rf"at step {bad_step} \(epoch 0, batch {bad_step - 1} "):
        loop.train_and_evaluate(config, str(tmp_path), task=task)
    saved = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
    assert max(saved, default=0) < bad_step


def test_optimizer_groups_follow_airbench():
    """Frozen whitening kernel, whitening bias stops after its epochs, BatchNorm biases at 64x lr."""
    model = cnn_lib.cnn_preset("tiny")
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False))["params"]
    params = jax.tree.map(lambda p: jnp.zeros(p.shape, p.dtype), params)
    cfg = ml_collections.ConfigDict(
        dict(
            name="sgd",
            learning_rate=0.1,
            momentum=0.0,
            nesterov=False,
            weight_decay=0.0,
            schedule="constant",
            groups=airbench_param_groups(2.0, 64.0),
        )
    )
    labels = optim.param_labels(params, cfg.groups)
    assert labels["whiten_kernel"] == "frozen" and labels["whiten_bias"] == "whiten_bias"
    assert labels["block1"]["norm1"]["bias"] == "norm_bias" and labels["head"]["kernel"] == "default"
    tx = optim.make_optimizer(cfg, params, total_steps=10, steps_per_epoch=3)
    grads = jax.tree.map(jnp.ones_like, params)
    opt_state = tx.init(params)
    update = jax.jit(tx.update)
    for step in range(7):
        updates, opt_state = update(grads, opt_state, params)
        if step == 0:
            np.testing.assert_allclose(updates["head"]["kernel"], -0.1)
            np.testing.assert_allclose(updates["block2"]["norm2"]["bias"], -6.4, rtol=1e-6)
        np.testing.assert_array_equal(updates["whiten_kernel"], 0.0)
        expected_bias = -0.1 if step < 6 else 0.0  # 2 epochs x 3 steps
        np.testing.assert_allclose(updates["whiten_bias"], expected_bias)


def test_airbench_lr_and_decay_conversion():
    lr, wd = cifar10.airbench_sgd_values(1024)
    assert lr == pytest.approx(11.5 / (1 + 1 / 0.15))  # 1.5
    assert wd == pytest.approx(0.0153 / 11.5)
    config = cifar10.get_config()
    assert config.global_batch_size == 1024 and config.num_epochs == 9.9 and config.label_smoothing == 0.2


def test_triangle_schedule():
    cfg = ml_collections.ConfigDict(
        dict(learning_rate=2.0, schedule="triangle", start_factor=0.2, peak_fraction=0.5, end_factor=0.0)
    )
    schedule = optim.make_schedule(cfg, total_steps=10, steps_per_epoch=5)
    values = [float(schedule(jnp.asarray(i))) for i in (0, 5, 10)]
    np.testing.assert_allclose(values, [0.4, 2.0, 0.0], atol=1e-6)


def test_lookahead_follows_then_averages_then_ends_on_the_slow_weights():
    cfg = ml_collections.ConfigDict(dict(start_epochs=1.0, every_n_steps=2, decay_base=0.5, decay_pow=1.0))
    update = lambda fast, slow, step: optim.lookahead_update(
        {"params": jnp.float32(fast), "model_state": {}},
        {"params": jnp.float32(slow), "model_state": {}},
        jnp.int32(step),
        cfg,
        steps_per_epoch=3,
        total_steps=11,
    )
    fast, slow = update(3.0, 1.0, 3)  # before the start: slow follows fast
    assert (float(fast["params"]), float(slow["params"])) == (3.0, 3.0)
    fast, slow = update(5.0, 3.0, 4)  # first lookahead step (first multiple of 2 after 3)
    assert (float(fast["params"]), float(slow["params"])) == (5.0, 5.0)
    fast, slow = update(9.0, 5.0, 5)  # not a lookahead step
    assert (float(fast["params"]), float(slow["params"])) == (9.0, 5.0)
    fast, slow = update(9.0, 5.0, 9)  # an epoch end is no lookahead step: fast weights kept
    assert (float(fast["params"]), float(slow["params"])) == (9.0, 5.0)
    fast, slow = update(9.0, 5.0, 10)  # rho = 0.25 * (10/11): slow moves towards fast; fast reset
    expected = 0.25 * 10 / 11 * 5.0 + (1 - 0.25 * 10 / 11) * 9.0
    assert float(slow["params"]) == pytest.approx(expected) and float(fast["params"]) == pytest.approx(expected)
    fast, slow = update(12.0, 7.0, 11)  # the last update, not a lookahead step: ends on the slow ones
    assert (float(fast["params"]), float(slow["params"])) == (7.0, 7.0)


def test_metric_sums_and_config_names():
    total, count = metric(3, 4)
    assert total.dtype == jnp.float32 and float(count) == 4.0
    (arg,) = resolve_config_arg(["--config=cnn_tiny"])
    assert arg.endswith(os.path.join("imgllm", "configs", "cnn_tiny.py"))
    with pytest.raises(
        ValueError,
        match=r"--config=does/not/exist.py: no such config file or name; the names are "
        r"captioner_cifar10, .*cnn_tiny, demo",
    ):
        resolve_config_arg(["--config=does/not/exist.py"])


@pytest.mark.parametrize("shape", [(16, 40), (40, 16)], ids=["wide", "tall"])
def test_orthogonalize_keeps_singular_vectors_and_evens_singular_values(shape):
    matrix = np.asarray(jax.random.normal(jax.random.key(0), shape)) * 30.0  # singular values 50-190
    out = np.asarray(optim.orthogonalize(jnp.asarray(matrix, jnp.float32)))
    singular_values = np.linalg.svd(out, compute_uv=False)
    assert out.shape == shape and 0.5 < singular_values.min() and singular_values.max() < 1.25
    u, _, vt = np.linalg.svd(matrix, full_matrices=False)
    polar = u @ vt  # the exact orthogonal factor
    assert np.sum(out * polar) / (np.linalg.norm(out) * np.linalg.norm(polar)) > 0.97


def _torch_muon_steps(weight, grads, lr, momentum, ns_steps=3):
    """airbench94_muon's Muon step, written here in PyTorch (float32) from the recipe: Nesterov momentum, weight
    rescaled to norm sqrt(out), Newton-Schulz-orthogonalised update of the [out, in*kh*kw] matrix."""
    import torch

    a, b, c = optim.NEWTON_SCHULZ_COEFFICIENTS
    weight, buf = torch.tensor(weight), torch.zeros(weight.shape)
    for grad in map(torch.tensor, grads):
        buf = momentum * buf + grad
        g = (grad + momentum * buf).reshape(len(grad), -1)
        x = g / (g.norm() + 1e-7)
        for _ in range(ns_steps):
            gram = x @ x.T
            x = a * x + (b * gram + c * gram @ gram) @ x
        weight = weight * (len(weight) ** 0.5 / weight.norm()) - lr * x.reshape(weight.shape)
    return weight.numpy()


def test_muon_matches_a_pytorch_reference_on_a_conv_kernel():
    pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    kernel = rng.standard_normal((3, 3, 8, 12)).astype(np.float32)  # flax HWIO
    grads = [rng.standard_normal(kernel.shape).astype(np.float32) for _ in range(3)]
    tx = optim.muon(0.24, momentum=0.6, nesterov=True)
    params, state = jnp.asarray(kernel), tx.init(jnp.asarray(kernel))
    for grad in grads:
        updates, state = tx.update(jnp.asarray(grad), state, params)
        params = params + updates
    to_torch = lambda hwio: np.ascontiguousarray(hwio.transpose(3, 2, 0, 1))  # torch's [out, in, kh, kw]
    expected = _torch_muon_steps(to_torch(kernel), [to_torch(g) for g in grads], lr=0.24, momentum=0.6)
    np.testing.assert_allclose(to_torch(np.asarray(params)), expected, rtol=1e-4, atol=1e-5)
    assert np.linalg.norm(np.asarray(params)) == pytest.approx(np.sqrt(12), rel=0.1)


def test_muon_refuses_a_bias_naming_it():
    params = {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones(3)}}
    cfg = ml_collections.ConfigDict(
        dict(
            name="muon",
            learning_rate=0.1,
            momentum=0.5,
            nesterov=True,
            weight_decay=0.0,
            schedule="constant",
            groups={},
        )
    )
    tx = optim.make_optimizer(cfg, params, total_steps=4, steps_per_epoch=2)
    with pytest.raises(ValueError, match=r"\['dense'\]\['bias'\] has shape \(3,\)"):
        tx.update(params, tx.init(params), params)


def test_muon_config_groups_and_learning_rates():
    """cifar10_muon: conv kernels on Muon at lr 0.24, biases at 64x the head's SGD lr (as in airbench94)."""
    config = cifar10_muon.get_config()
    assert config.global_batch_size == 2000 and config.num_epochs == 8 and not config.lookahead.enabled
    model = cnn_lib.cnn_preset("tiny")
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)["params"]
    labels = optim.param_labels(params, config.optimizer.groups)
    assert labels["block2"]["conv1"]["kernel"] == "conv" and labels["head"]["kernel"] == "default"
    assert labels["block1"]["norm2"]["bias"] == "norm_bias" and labels["whiten_kernel"] == "frozen"
    groups = config.optimizer.groups
    assert groups.norm_bias.lr_scale == pytest.approx(64.0, rel=1e-4)
    assert optim.group_rates(config.optimizer, config.global_batch_size)["conv"].peak_learning_rate == 0.24
    schedule = optim.make_schedule(config.optimizer, total_steps=10, steps_per_epoch=5)
    np.testing.assert_allclose(
        [float(schedule(jnp.asarray(i))) / config.optimizer.learning_rate for i in (0, 5, 10)],
        [1.0, 0.5, 0.0],
        atol=1e-6,
    )
    tx = optim.make_optimizer(
        config.optimizer, params, total_steps=10, steps_per_epoch=5, batch_size=config.global_batch_size
    )
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    new_kernel = params["block2"]["conv1"]["kernel"] + updates["block2"]["conv1"]["kernel"]
    assert float(jnp.linalg.norm(new_kernel)) == pytest.approx(np.sqrt(16 + 0.24**2 * 1), rel=0.2)


def test_data_on_the_devices_trains_as_data_from_the_host():
    """The two feeds (imgllm.train.feed) give each step the same examples: the same parameters after 2 steps of the
    jitted step, fed from device-resident data (the step gathers its rows) or from host batches."""
    config = cnn_tiny.get_config()
    mesh = parallel.make_mesh()
    task = build_task(config)
    arrays = task.train_arrays()
    steps_per_epoch, total_steps = loop.schedule_lengths(evaluation.num_examples(arrays), config)
    state, tx = loop.initial_state(
        task, config, arrays, mesh, loop.run_plan(config, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
    )
    finals = {}
    for placement in ("device", "host"):
        batches = feed.make_feed(placement, arrays, mesh, seed=config.seed, global_batch_size=config.global_batch_size)
        assert batches.placement == placement
        step = steps.jit_train_step(task, tx, mesh, steps_per_epoch=steps_per_epoch, placement=placement)
        batches.epoch(0)
        current = jax.tree.map(jnp.copy, state)
        for index in range(2):
            current, _ = step(current, *batches.args(index))
        finals[placement] = current.params
    for a, b in zip(jax.tree.leaves(finals["device"]), jax.tree.leaves(finals["host"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)


@pytest.mark.parametrize("value", ["3", "5,2", "a,b", "-1,4"])
def test_profile_steps_must_be_a_window(value):
    with pytest.raises(ValueError, match=r"config.profile_steps=.* START,END"):
        loop.profile_window(value)


def test_the_head_is_calibrated_on_the_validation_split_and_the_pipeline_uses_it(trained, tmp_path):
    """The last checkpoint holds the CNN head's temperature (fitted on the eval split, never on training images) and
    final_eval the calibration error before and after; an assembled pipeline's label probabilities use it."""
    config, workdir, result = trained
    _, meta, task, variables = evaluation.restore_for_eval(workdir)
    fitted = meta["calibration"]
    assert result.final_eval["head_temperature"] == fitted["head_temperature"] > 0
    arrays = task.eval_arrays(metadata=meta["task"])
    logits, labels = task.eval_logits(variables, arrays, batch_size=64, tta=False), arrays["labels"]
    assert fitted["head_temperature"] == pytest.approx(calibration.fit_temperature(logits, labels))
    nll = lambda t: calibration.negative_log_likelihood(logits, labels, t)
    assert nll(fitted["head_temperature"]) <= nll(1.0)  # what is fitted; the ECE of 64 examples is only reported
    (final,) = read_metrics(workdir, "final_eval")
    assert final["head_ece"] == pytest.approx(fitted["head_ece"])
    assert final["head_ece"] == pytest.approx(
        calibration.expected_calibration_error(np.exp(calibration.log_softmax(logits)), labels)
    )
