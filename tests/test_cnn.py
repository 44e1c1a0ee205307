"""Tests for imgllm.vision.cnn and .conv: shapes, sizes, the CPU conv fast paths against the plain lax.conv path,
BatchNorm, whitening, the CNN's own features."""

import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from imgllm.vision import cnn, conv, conv_cpu

jax.config.update("jax_enable_x64", False)


def _images(batch=4, size=32, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((batch, size, size, 3), np.float32))


def _init(model, x):
    return jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(x)


@functools.cache
def _tiny_variables():
    """Variables of the tiny preset, initialised (and compiled) once for all tests."""
    return _init(cnn.cnn_preset("tiny"), jnp.zeros((2, 32, 32, 3)))


@functools.partial(jax.jit, static_argnums=(0, 3))
def _apply(model, variables, x, train):
    """Jitted model.apply (one compile instead of many eager ops): ((logits, features), updates)."""
    return model.apply(variables, x, train=train, mutable=["batch_stats"])


def test_tiny_shapes_and_variables():
    model = cnn.cnn_preset("tiny")
    x = _images()
    variables = _tiny_variables()
    assert set(variables) == {"params", "batch_stats"}
    (logits, features), _ = _apply(model, variables, x, False)
    assert logits.shape == (4, 10) and logits.dtype == jnp.float32
    assert features.shape == (4, 16)
    # features are the input of the head: logits = features @ head * 1/9
    np.testing.assert_allclose(logits, features @ variables["params"]["head"]["kernel"] / 9, rtol=1e-5, atol=1e-6)


def test_full_size_parameter_count_and_shapes():
    model = cnn.cnn_preset("airbench94")
    variables = jax.eval_shape(lambda: _init(model, jnp.zeros((2, 32, 32, 3))))
    n_params = sum(leaf.size for leaf in jax.tree.leaves(variables["params"]))
    # whiten 2*2*3*24+24, convs 9*(24*64+64*64+64*256+3*256*256), BN biases 2*(64+256+256), head 256*10
    expected = 2 * 2 * 3 * 24 + 24 + 9 * (24 * 64 + 64 * 64 + 64 * 256 + 3 * 256 * 256) + 2 * (64 + 256 + 256) + 2560
    assert n_params == expected == 1_971_640
    out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, 32, 32, 3)), train=False), variables)
    assert out[0].shape == (2, 10) and out[1].shape == (2, 256)


@pytest.mark.parametrize("chunked", [False, True], ids=["whole_batch", "batch_chunks"])
@pytest.mark.parametrize("padding,kernel_size", [("SAME", 3), ("VALID", 2)])
def test_im2col_conv_matches_lax_conv_forward_and_gradients(padding, kernel_size, chunked, monkeypatch):
    x = _images(batch=6, size=9)
    if chunked:  # patches over 8 kB are built a chunk of the batch at a time (strided rows, lax.map / scan)
        monkeypatch.setattr(conv_cpu, "PATCH_CHUNK_BYTES", 8000)
        assert conv_cpu._batch_chunks(x, kernel_size, padding) in (3, 6)
    kernel = jax.random.normal(jax.random.key(1), (kernel_size, kernel_size, 3, 5))

    def loss(impl):
        return lambda x, k: jnp.sum(jnp.sin(conv.conv2d(x, k, padding=padding, impl=impl)))

    np.testing.assert_allclose(
        conv.conv2d(x, kernel, padding=padding, impl="im2col"), conv.lax_conv(x, kernel, padding), rtol=1e-4, atol=1e-4
    )
    grads_im2col = jax.jit(jax.grad(loss("im2col"), argnums=(0, 1)))(x, kernel)
    grads_xla = jax.jit(jax.grad(loss("xla"), argnums=(0, 1)))(x, kernel)
    for a, b in zip(grads_im2col, grads_xla):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("chunked", [False, True], ids=["whole_batch", "batch_chunks"])
@pytest.mark.parametrize("padding,kernel_size", [("SAME", 3), ("VALID", 2), ("SAME", 2)])
def test_hybrid_conv_matches_lax_conv_forward_and_gradients(padding, kernel_size, chunked, monkeypatch):
    """lax.conv forward, input gradient as a conv with the flipped kernel (asymmetric SAME padding at k=2),
    kernel gradient by im2col, whole or over batch chunks."""
    x = jax.random.normal(jax.random.key(0), (6, 9, 9, conv_cpu.HYBRID_MIN_IN_CHANNELS))
    if chunked:
        monkeypatch.setattr(conv_cpu, "PATCH_CHUNK_BYTES", 40000)
        assert conv_cpu._batch_chunks(x, kernel_size, padding) in (2, 3, 6)
    kernel = jax.random.normal(jax.random.key(1), (kernel_size, kernel_size, x.shape[-1], 5))
    loss = lambda impl: lambda x, k: jnp.sum(jnp.sin(conv.conv2d(x, k, padding=padding, impl=impl)))
    assert "conv_general_dilated" in str(jax.make_jaxpr(loss("hybrid"))(x, kernel))  # not the im2col fallback
    np.testing.assert_allclose(
        conv.conv2d(x, kernel, padding=padding, impl="hybrid"), conv.lax_conv(x, kernel, padding), rtol=1e-4, atol=1e-4
    )
    grads_hybrid = jax.jit(jax.grad(loss("hybrid"), argnums=(0, 1)))(x, kernel)
    grads_xla = jax.jit(jax.grad(loss("xla"), argnums=(0, 1)))(x, kernel)
    for a, b in zip(grads_hybrid, grads_xla):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)


def test_xla_impl_is_the_plain_lax_conv_and_conv2d_checks_its_inputs():
    """impl "xla" (what "auto" runs on GPU/TPU) is `lax_conv` alone: the oracle of the CPU fast paths."""
    x, kernel = _images(batch=2, size=8), jax.random.normal(jax.random.key(1), (3, 3, 3, 4))
    jaxpr = str(jax.make_jaxpr(lambda x: conv.conv2d(x, kernel, impl="xla"))(x))
    assert "conv_general_dilated" in jaxpr and "dot_general" not in jaxpr
    np.testing.assert_array_equal(conv.conv2d(x, kernel, impl="xla"), conv.lax_conv(x, kernel, "SAME"))
    with pytest.raises(ValueError, match="padding='FULL'"):
        conv.conv2d(x, kernel, padding="FULL", impl="xla")
    with pytest.raises(ValueError, match="kernel expects 3"):
        conv.conv2d(x[..., :2], kernel)
    with pytest.raises(ValueError, match="impl='xla'"):
        conv_cpu.cpu_conv(x, kernel, "SAME", "xla")


def test_hybrid_uses_im2col_below_min_in_channels():
    """XLA:CPU's convolution is slow on few input channels (the RGB stem): "hybrid" is im2col there."""
    kernel = jnp.ones((2, 2, 3, 4))
    jaxpr = str(jax.make_jaxpr(lambda x: conv.conv2d(x, kernel, padding="VALID", impl="hybrid"))(_images(batch=2)))
    assert "conv_general_dilated" not in jaxpr and "dot_general" in jaxpr


@pytest.mark.parametrize("impl", ["im2col", "hybrid"])
def test_model_matches_lax_conv_model_forward_and_gradients(impl):
    x = _images(batch=8, size=16)  # 16x16 is the smallest input the three pooling stages accept
    model, xla = (cnn.cnn_preset("tiny", conv_impl=i) for i in (impl, "xla"))
    variables = _tiny_variables()

    def loss_and_grads(model):
        def loss(params):
            (logits, features), _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
            return jnp.sum(logits**2) + jnp.sum(features)

        return jax.jit(jax.value_and_grad(loss))(variables["params"])

    loss, grads = loss_and_grads(model)
    loss_xla, grads_xla = loss_and_grads(xla)
    np.testing.assert_allclose(loss, loss_xla, rtol=1e-4)
    assert jnp.all(grads["whiten_kernel"] == 0)  # frozen stem
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-4), grads, grads_xla)
    assert float(jnp.abs(grads["block2"]["conv1"]["kernel"]).sum()) > 0


def test_auto_runs_the_hybrid_program_on_this_cpu():
    """conv_impl "auto" is chosen when the program is lowered (tests/test_lowering.py exports it for GPU/TPU): on
    this CPU its jitted loss and gradients are "hybrid"'s to the bit, the compiled program keeps no conditional, and
    under vmap a convolution is hybrid's too."""
    x = _images(batch=8, size=16)
    variables = _tiny_variables()

    def loss_and_grads(impl):
        model = cnn.cnn_preset("tiny", conv_impl=impl)

        def loss(params):
            (logits, features), _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
            return jnp.sum(logits**2) + jnp.sum(features)

        return jax.jit(jax.value_and_grad(loss))

    auto, hybrid = (loss_and_grads(impl)(variables["params"]) for impl in ("auto", "hybrid"))
    jax.tree.map(np.testing.assert_array_equal, auto, hybrid)
    assert "conditional" not in loss_and_grads("auto").lower(variables["params"]).compile().as_text()

    kernel = jax.random.normal(jax.random.key(1), (3, 3, 3, 4))
    batched = lambda impl: jax.jit(jax.vmap(lambda v: conv.conv2d(v, kernel, impl=impl)))(x.reshape(2, 4, 16, 16, 3))
    np.testing.assert_array_equal(batched("auto"), batched("hybrid"))


def test_cnn_features_come_from_the_network():
    """CNN.features and the feature_source argument of __call__ give the same features; the logits do not
    depend on which features are asked for."""
    model = cnn.cnn_preset("tiny", conv_impl="xla")
    variables, x = _tiny_variables(), _images()

    @jax.jit
    def outputs(variables, x):
        calls = {
            source: model.apply(variables, x, train=False, feature_source=source) for source in cnn.FEATURE_SOURCES
        }
        methods = {
            source: model.apply(variables, x, train=False, source=source, method=cnn.CNN.features)
            for source in cnn.FEATURE_SOURCES
        }
        return calls, methods

    calls, methods = outputs(variables, x)
    widths = model.widths
    # 32x32 images: the stem's 31x31 map is halved by each block to 15, 7 and 3
    expected = {"pooled": widths[-1], "spatial": 3 * 3 * widths[-1], "pyramid": 3 * 3 * (24 + sum(widths))}
    for source in cnn.FEATURE_SOURCES:
        logits, features = calls[source]
        assert features.shape == methods[source].shape == (4, expected[source])
        np.testing.assert_allclose(methods[source], features, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(logits, calls["pooled"][0], rtol=1e-6, atol=1e-6)
    # The pooled features are the global max of the spatial map, which is the pyramid's last part.
    np.testing.assert_allclose(calls["spatial"][1].reshape(4, 9, widths[-1]).max(1), calls["pooled"][1], rtol=1e-6)
    np.testing.assert_array_equal(calls["pyramid"][1][:, -expected["spatial"] :], calls["spatial"][1])
    with pytest.raises(ValueError, match="feature_source='mean'"):
        model.apply(variables, x, train=False, feature_source="mean")


def test_batch_stats_update_in_train_mode_only():
    model = cnn.cnn_preset("tiny")
    x = _images(batch=8) * 3 + 1
    variables = _tiny_variables()
    (logits_train, _), updates = _apply(model, variables, x, True)
    before, after = variables["batch_stats"]["block1"]["norm1"], updates["batch_stats"]["block1"]["norm1"]
    assert not np.allclose(before["mean"], after["mean"])
    assert not np.allclose(before["var"], after["var"])
    # eval mode reads the running stats and leaves them alone
    (logits_eval, _), unchanged = _apply(model, variables, x, False)
    jax.tree.map(np.testing.assert_array_equal, unchanged["batch_stats"], variables["batch_stats"])
    assert not np.allclose(logits_eval, logits_train)


def test_dirac_init_passes_input_through():
    kernel = jax.jit(cnn.dirac_init(), static_argnums=1)(jax.random.key(0), (3, 3, 4, 6))
    x = _images(batch=1, size=5)[..., :3]
    x = jnp.concatenate([x, x[..., :1]], axis=-1)
    y = jax.jit(functools.partial(conv.conv2d, impl="xla"))(x, kernel)
    np.testing.assert_allclose(y[..., :4], x, atol=1e-6)
    assert float(jnp.abs(kernel[..., 4:]).sum()) > 0  # the other outputs keep a random init


def test_max_pool_floor_mode():
    x = jnp.arange(2 * 5 * 5 * 1, dtype=jnp.float32).reshape(2, 5, 5, 1)
    y = cnn.max_pool(x, 2)
    assert y.shape == (2, 2, 2, 1)
    np.testing.assert_array_equal(y[0, :, :, 0], [[6, 8], [16, 18]])


def test_whitening_kernel_whitens_patches():
    rng = np.random.default_rng(0)
    # correlated images: smooth noise with unequal channel scales
    raw = rng.standard_normal((64, 16, 16, 3)).astype(np.float32)
    images = (raw + np.roll(raw, 1, axis=1) + np.roll(raw, 1, axis=2)) * np.array([1.0, 0.5, 2.0], np.float32)
    kernel = cnn.whitening_kernel(images, patch_size=2, eps=1e-6)
    assert kernel.shape == (2, 2, 3, 24) and kernel.dtype == np.float32
    np.testing.assert_allclose(kernel[..., 12:], -kernel[..., :12])
    patches = np.asarray(conv_cpu.im2col_patches(jnp.asarray(images), 2, "VALID")).reshape(-1, 12)
    covariance_before = patches.T @ patches / len(patches)
    assert np.abs(covariance_before - np.eye(12)).max() > 0.5
    whitened = patches @ kernel.reshape(12, 24)[:, :12]
    covariance = whitened.T @ whitened / len(whitened)
    np.testing.assert_allclose(covariance, np.eye(12), atol=1e-3)


def test_set_whitening():
    variables = _tiny_variables()
    kernel = np.ones((2, 2, 3, 24), np.float32)
    params = cnn.set_whitening(variables["params"], kernel)
    np.testing.assert_array_equal(params["whiten_kernel"], kernel)
    with pytest.raises(ValueError, match="whitening kernel has shape"):
        cnn.set_whitening(variables["params"], kernel[..., :12])


def test_bfloat16_compute_keeps_float32_params():
    model = cnn.cnn_preset("tiny", dtype="bfloat16")
    x = _images()
    shapes = jax.eval_shape(lambda: _init(model, x))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(shapes))
    variables = _tiny_variables()
    (logits, features), _ = _apply(model, variables, x, False)
    assert logits.dtype == jnp.float32 and features.dtype == jnp.bfloat16
    (reference, _), _ = _apply(cnn.cnn_preset("tiny"), variables, x, False)
    np.testing.assert_allclose(logits, reference, rtol=0.1, atol=0.05)


def test_config_and_errors():
    model = cnn.cnn_from_config(ml_collections.ConfigDict(dict(preset="tiny", num_classes=3, conv_impl="xla")))
    assert model.widths == (8, 16, 16) and model.num_classes == 3 and model.conv_impl == "xla"
    logits = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), _images(), train=False)[0][0])
    assert logits.shape == (4, 3)
    with pytest.raises(ValueError, match="unknown CNN preset 'huge'"):
        cnn.cnn_from_config({"preset": "huge"})
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['widht'\]"):
        cnn.cnn_from_config({"preset": "tiny", "widht": 3})
    with pytest.raises(ValueError, match="conv_impl='cudnn'"):
        cnn.cnn_from_config({"preset": "tiny", "conv_impl": "cudnn"})
    with pytest.raises(ValueError, match="needs a 'preset' key"):
        cnn.cnn_from_config({"widths": (8, 8, 8)})
    with pytest.raises(ValueError, match=r"images \[B,H,W,3\]"):
        model.init(jax.random.key(0), jnp.zeros((2, 32, 32)), train=False)
    assert conv.resolve_conv_impl("auto", backend="cpu") == "hybrid"
    assert conv.resolve_conv_impl("auto", backend="gpu") == conv.resolve_conv_impl("auto", backend="tpu") == "xla"
    assert conv.resolve_conv_impl("im2col", backend="gpu") == "im2col"


def test_chunked_im2col_on_a_sharded_batch_matches_one_device():
    """Batch chunks are strided, so a batch sharded over 4 devices gives the same conv and gradients as one."""
    script = textwrap.dedent("""
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from imgllm.vision import conv, conv_cpu
        conv_cpu.PATCH_CHUNK_BYTES = 200000               # patches of 8 9x9x16 images: 373 kB, 2 chunks of 4
        x = np.random.default_rng(0).standard_normal((8, 9, 9, 16)).astype(np.float32)
        k = np.random.default_rng(1).standard_normal((3, 3, 16, 5)).astype(np.float32)
        assert conv_cpu._batch_chunks(jnp.asarray(x), 3, "SAME") == 2
        mesh = Mesh(np.array(jax.devices()), ("data",))
        assert mesh.shape["data"] == 4
        for impl in ("im2col", "hybrid"):
            loss = lambda x, k: jnp.sum(jnp.sin(conv.conv2d(x, k, impl=impl)))
            step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
            sharded = step(jax.device_put(x, NamedSharding(mesh, P("data"))),
                           jax.device_put(k, NamedSharding(mesh, P())))
            single = step(jax.device_put(x, jax.devices()[0]), jax.device_put(k, jax.devices()[0]))
            for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(single)):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-4)
        print("OK")
    """)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


def _reference_airbench94_torch():
    """benchmarks/reference_airbench94_torch.py (airbench94 in PyTorch, written from the paper) as a module."""
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "reference_airbench94_torch.py")
    spec = importlib.util.spec_from_file_location("reference_airbench94_torch", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load_into_torch(net, params):
    """Copies flax CNN params into the reference's torch Sequential (HWIO -> OIHW, [in, out] -> [out, in])."""
    import torch

    oihw = lambda k: torch.tensor(np.asarray(k).transpose(3, 2, 0, 1))
    with torch.no_grad():
        net[0].weight.copy_(oihw(params["whiten_kernel"]))
        net[0].bias.copy_(torch.tensor(np.asarray(params["whiten_bias"])))
        for i in range(3):
            block, ours = net[2 + i], params[f"block{i + 1}"]
            for torch_conv, norm, name in ((block[0], block[2], "1"), (block[4], block[5], "2")):
                torch_conv.weight.copy_(oihw(ours["conv" + name]["kernel"]))
                norm.bias.copy_(torch.tensor(np.asarray(ours["norm" + name]["bias"])))
        net[-2].weight.copy_(torch.tensor(np.asarray(params["head"]["kernel"]).T))


@pytest.mark.parametrize("impl", ["hybrid", "xla"])
def test_airbench94_matches_the_pytorch_reference_in_train_mode(impl):
    """Same weights: train-mode logits (batch statistics), running statistics and gradients of every trained
    parameter agree with the PyTorch airbench94 of benchmarks/reference_airbench94_torch.py."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = cnn.cnn_preset("airbench94", conv_impl=impl)
    x = _images(batch=6)
    variables = _init(model, x)
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(3), p.shape), variables["params"])
    net = _reference_airbench94_torch().make_net()
    _load_into_torch(net, params)
    labels = np.arange(6) % 10

    def loss(params):
        (logits, _), updates = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(6), labels]), (logits, updates["batch_stats"])

    (_, (logits, batch_stats)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    torch_logits = net.train()(torch.tensor(np.asarray(x).transpose(0, 3, 1, 2)))
    torch.nn.functional.cross_entropy(torch_logits, torch.tensor(labels)).backward()
    np.testing.assert_allclose(logits, torch_logits.detach().numpy(), rtol=1e-4, atol=1e-5)
    norm = net[4][5]  # block 3's second BatchNorm
    np.testing.assert_allclose(batch_stats["block3"]["norm2"]["mean"], norm.running_mean.numpy(), rtol=1e-4, atol=1e-6)
    # torch updates running_var with the unbiased batch variance (x n/(n-1), n = 6 images x 3 x 3), flax the biased
    n, momentum = 6 * 3 * 3, 0.6
    torch_biased = momentum + (norm.running_var.numpy() - momentum) * (n - 1) / n
    np.testing.assert_allclose(batch_stats["block3"]["norm2"]["var"], torch_biased, rtol=1e-4, atol=1e-6)
    to_hwio = lambda t: t.grad.numpy().transpose(2, 3, 1, 0)
    for i in range(3):
        block, ours = net[2 + i], grads[f"block{i + 1}"]
        for torch_conv, bn, name in ((block[0], block[2], "1"), (block[4], block[5], "2")):
            scale = np.abs(to_hwio(torch_conv.weight)).max()
            np.testing.assert_allclose(ours["conv" + name]["kernel"], to_hwio(torch_conv.weight), atol=1e-4 * scale)
            np.testing.assert_allclose(ours["norm" + name]["bias"], bn.bias.grad.numpy(), rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(grads["whiten_bias"], net[0].bias.grad.numpy(), rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(grads["head"]["kernel"], net[-2].weight.grad.numpy().T, rtol=1e-3, atol=1e-6)
