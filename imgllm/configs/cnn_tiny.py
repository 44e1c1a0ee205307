"""Test config: the tiny CNN on a few hundred demo images; seconds on CPU. Used by tests/test_train*.py.

Run:  python train.py --config=cnn_tiny --workdir=/tmp/tiny
"""

from imgllm.configs.common import base_config


def get_config():
    c = base_config()
    c.dataset = "demo"
    c.num_train_examples = 256
    c.num_eval_examples = 64
    c.model.preset = "tiny"
    c.whiten_init_examples = 128
    c.global_batch_size = 32
    c.eval_batch_size = 64
    c.num_epochs = 2.0
    c.optimizer.learning_rate = 0.4
    c.log_every_steps = 4
    c.checkpoint_every_steps = 4
    c.progress_bar = False
    return c
