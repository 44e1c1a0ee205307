"""Captioner on the demo shapes: a visual prefix from the frozen demo CNN into a tiny GPT-2 trained from scratch.

Run alone, on a trained demo classifier's work directory:
    python train.py --config=captioner_demo --config.classifier_workdir=runs/demo/classifier \
        --workdir=runs/demo/captioner
Usually run by the demo recipe (`python train.py --config=demo`, imgllm.train.demo_recipe), which trains the
classifier first. Measured (2 shared cores at load ~4): captioner 344 s wall, 333 s CPU; whole recipe 458 s wall,
449 s CPU (user + sys; about 225 s on 2 quiet cores). Greedy captions of 500 fresh demo images: exact match 0.970,
BLEU-4 0.994, CIDEr 9.91; classification by the LM's class-prompt likelihood 1.000, CNN 1.000. The bridge reads
the "pyramid" features: the CNN's whitening stem keeps the colours that its shape-trained blocks drop (with only
the blocks' maps, exact match was 0.11: every word right but the colour).
"""

from imgllm.configs.captioner_common import captioner_config


def get_config():
    c = captioner_config()
    c.dataset = "demo"
    c.num_train_examples = 12000  # generated images (one exact caption each)
    c.num_eval_examples = 500  # fresh validation images
    c.bridge.prefix_length = 4
    c.bridge.feature_source = "pyramid"  # captions name positions and colours: stem + every block's map
    c.lm.n_embd = 128
    c.lm.n_layer = 2
    c.lm.n_head = 4
    c.lm.n_positions = 32
    c.lm.vocab_size = 512
    c.lm.train = True  # the tiny LM starts from random weights: train it with the mapper
    c.tokenizer.vocab_size = 512
    c.captions.template_fraction = 0.25  # a quarter of the rows are "a photo of a {shape}." (LM classification)
    c.captions.max_tokens = 16
    c.global_batch_size = 128
    c.num_epochs = 6.0
    c.optimizer.learning_rate = 2e-3
    return c
