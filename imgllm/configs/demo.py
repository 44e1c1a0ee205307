"""Default config: the demo on procedurally generated "demo" shapes (no download).

Run:  python train.py --workdir=runs/demo            (same as --config=demo)
Stage 1 trains this small CNN on the 10 shape classes (about 1.5 min on 2 CPU cores; 0.998 validation accuracy
after 2 epochs in our runs); `recipe = "demo"` then trains the captioner on the frozen CNN (captioner_demo),
exports <workdir>/pipeline for infer.py, and scores it on 500 fresh images: 0.97 exact-match captions and 1.00
LM-classification accuracy in our runs, about 7.5 min in all on 2 shared cores (imgllm/train/demo_recipe.py).
"""

from imgllm.configs.common import base_config


def get_config():
    c = base_config()
    c.dataset = "demo"
    c.num_train_examples = 4000  # generated images to train on
    c.num_eval_examples = 500  # generated validation images
    c.model.preset = "tiny"
    c.model.widths = (16, 32, 64)  # a little wider than the test preset
    c.whiten_init_examples = 1000
    c.global_batch_size = 100
    c.num_epochs = 4.0
    c.optimizer.learning_rate = 0.2
    c.label_smoothing = 0.1
    c.augment.translate = 2
    c.augment.flip = "none"  # left/right matters for some shapes' captions; keep images as drawn
    c.tta = "none"  # and so no flipped views at test time either
    c.recipe = "demo"  # train.py then also trains the captioner (captioner_demo) on this CNN,
    # exports <workdir>/pipeline and scores it (imgllm/train/demo_recipe.py)
    return c
