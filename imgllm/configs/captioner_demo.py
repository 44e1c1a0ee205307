"""Captioner on the demo shapes: a visual prefix from the frozen demo CNN into a tiny GPT-2 trained from scratch.

Run (after the classifier, `python train.py --config=demo --workdir=runs/demo/classifier`):
    python train.py --config=captioner_demo --config.classifier_workdir=runs/demo/classifier \
        --workdir=runs/demo/captioner
Measured (8 min wall on 2 shared cores at load ~10; 500 fresh validation images): lm_accuracy (classification by
the LM's class-prompt likelihood) 1.000, CNN accuracy 1.000, token_accuracy 0.875, caption_exact 0.108: size,
shape and position are right, the colour word is not (the frozen shape classifier keeps little colour: a linear
probe on its "pyramid" features reads the colour of 60% of images, of its pooled features 23%).
"""
from imgllm.configs.captioner_common import captioner_config


def get_config():
  c = captioner_config()
  c.dataset = "demo"
  c.num_train_examples = 8000          # generated images (one exact caption each)
  c.num_eval_examples = 500            # fresh validation images
  c.bridge.prefix_length = 4
  c.bridge.feature_source = "pyramid"  # captions name positions and colours: every block's map, not the max-pool
  c.lm.n_embd = 128
  c.lm.n_layer = 2
  c.lm.n_head = 4
  c.lm.n_positions = 32
  c.lm.vocab_size = 512
  c.lm.train = True                    # the tiny LM starts from random weights: train it with the mapper
  c.tokenizer.vocab_size = 512
  c.captions.template_fraction = 0.25  # a quarter of the rows are "a photo of a {shape}." (LM classification)
  c.captions.max_tokens = 16
  c.global_batch_size = 128
  c.num_epochs = 6.0
  c.optimizer.learning_rate = 2e-3
  return c
