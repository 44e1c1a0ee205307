"""CIFAR-10 with the airbench94_muon recipe (Jordan, cifar10-airbench): 94.01% test accuracy in 8 epochs.

Same network, data and augmentation as configs/cifar10.py (airbench94, 9.9 epochs); what differs:
    conv kernels trained with Muon (lr 0.24, momentum 0.6, Nesterov; imgllm.train.optim.muon), the rest with
    Nesterov SGD (momentum 0.85); batch 2000; 8 epochs; learning rates fall linearly from the first step to 0;
    no lookahead.

Run (the CIFAR-10 training images as an image folder, validation carved from train):
    python train.py --config=cifar10_muon --config.dataset=folder:/tmp/cifar --workdir=runs/cifar10_muon
Measured here (benchmarks/bench_cifar10_run.py --config=cifar10_muon; the 45,000 JPEG images of the shared copy,
5,000 carved for validation; one seed): 90.36% with flip + translate TTA after 8 epochs, 51 minutes on 2 CPU
cores (120 images/s), peak RSS 6.4 GiB. configs/cifar10.py (SGD, 9.9 epochs) gave 90.64% on the same split.

The reference sums the loss over the batch and uses PyTorch SGD with lr and weight_decay = decay / lr (so that
each step shrinks the weights by decay times the schedule's factor); `mean_loss_sgd` converts those to the
mean-loss optax form that imgllm's optimizer uses, at the reference batch of 2000. The reference head is
`features @ W / 256` with W of unit std; imgllm's is `features @ W' * head_scale (1/9)` with W' of std
1/sqrt(768) (`CNN`), the same function for W = W' * 256/9, so the head's SGD learning rate is divided by
(256/9)**2 for the same trajectory.
Another --config.global_batch_size keeps the recipe: the trainer scales the SGD learning rates linearly to it
(the decay coefficients stay, so each step's decay follows the batch as the reference's 2e-6 x batch does),
while Muon's lr stays 0.24 (its group has scale_with_batch=False: an orthogonalised update has no loss scale).
The whitening bias trains for 3 epochs as in the reference; here it follows the global schedule and then stops,
where the reference decays it to 0 over those 3 epochs.
"""

from imgllm.configs import cifar10
from imgllm.configs.common import airbench_param_groups

REFERENCE_BATCH_SIZE = 2000  # SGD learning rates below are for this batch (optim.batch_scale)
EPOCHS = 8.0
BIAS_LR = 0.053  # reference, summed loss: whitening and BatchNorm biases
HEAD_LR = 0.67  # reference, summed loss, unit-std head weights divided by 256
DECAY_PER_STEP = 2e-6 * REFERENCE_BATCH_SIZE  # reference wd: each SGD step shrinks the weights by this x
# the schedule (at the reference batch)
MUON_LR = 0.24  # Muon's lr does not depend on the loss scale (its update is orthogonalised)
MUON_MOMENTUM = 0.6
SGD_MOMENTUM = 0.85
HEAD_REPARAMETRISATION = (256 / 9) ** 2  # reference head weight = imgllm's x 256/9 (see above)


def mean_loss_sgd(summed_loss_lr: float, decay_per_step: float, batch_size: int) -> tuple[float, float]:
    """(learning_rate, weight_decay) for optax SGD on the mean loss that reproduce PyTorch SGD on the summed loss
    with lr=summed_loss_lr and weight_decay=decay_per_step / summed_loss_lr."""
    learning_rate = summed_loss_lr * batch_size
    return learning_rate, decay_per_step / learning_rate


def get_config():
    c = cifar10.get_config()
    c.global_batch_size = REFERENCE_BATCH_SIZE
    c.num_epochs = EPOCHS
    c.lookahead.enabled = False
    head_lr, head_decay = mean_loss_sgd(HEAD_LR / HEAD_REPARAMETRISATION, DECAY_PER_STEP, REFERENCE_BATCH_SIZE)
    bias_lr, _ = mean_loss_sgd(BIAS_LR, DECAY_PER_STEP, REFERENCE_BATCH_SIZE)  # decay: the head's (1/lr scale)
    c.optimizer.name = "sgd"  # the default group: the head
    c.optimizer.reference_batch_size = REFERENCE_BATCH_SIZE
    c.optimizer.learning_rate = head_lr  # 1.66 at batch 2000
    c.optimizer.weight_decay = head_decay  # 0.0024 at any batch
    c.optimizer.momentum = SGD_MOMENTUM
    c.optimizer.nesterov = True
    c.optimizer.schedule = "triangle"  # linear from 1 at step 0 to 0 at the end
    c.optimizer.start_factor = 1.0
    c.optimizer.peak_fraction = 0.0
    c.optimizer.end_factor = 0.0
    groups = airbench_param_groups(whiten_bias_epochs=3.0, norm_bias_lr_scale=bias_lr / head_lr)
    groups.whiten_bias.update(
        lr_scale=groups.norm_bias.lr_scale,  # the reference trains it like the
        weight_decay_scale=groups.norm_bias.weight_decay_scale,
    )  # BatchNorm biases
    groups.conv = dict(
        pattern=r"(^|/)conv\d*/kernel$",
        optimizer="muon",
        momentum=MUON_MOMENTUM,
        learning_rate=MUON_LR,
        scale_with_batch=False,
        weight_decay_scale=0.0,
        train_epochs=None,
    )
    c.optimizer.groups = groups
    return c
