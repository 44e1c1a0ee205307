"""The image classifier: uint8 images → CNN logits and features.

cnn.py       the airbench94-style CNN (flax.linen), presets, the whitening stem from data; CNN.features
conv.py      conv2d and the conv_impl switch; the plain lax.conv path (what GPU/TPU run, the tests' oracle)
conv_cpu.py  XLA:CPU fast paths: im2col and hybrid (lax.conv forward, im2col kernel gradient)
features.py  images → (logits, features) for inference, captioner training and the demo alike
"""
