"""PC-DARTS quick search on Fashion-MNIST, offline, sized for a 2-core CPU.

The Debian package dataset-fashion-mnist provides the data (IDX files). The DARTS cell
space with a smaller supernet than the paper's (C=8, 5 cells, 4 nodes per cell), K=4 with
channel shuffle and edge normalization, the reference optimizers at batch 16 (lr 0.05
cosine), 4 epochs of 500 steps (2000 weight updates over the 30k weight split), arch
updates (Adam 6e-4) from epoch 2; the supernet is evaluated on 5000 held-out arch-split
images after each epoch.

  python -m jaxnas.main --config=configs/pcdarts_fashion_mnist.py --workdir=/tmp/fmnist

Measured on a 2-core AMD EPYC VM (jax 0.10.2, CPU), cold compilation cache, in a fresh
clone: 13 min 17 s wall with the install (145 s of it setup: 104 s compiling the search
step, 14 s the eval step), about 100 images/s once arch updates start; supernet accuracy
on the held-out arch split 84.9 %; genotype with sep/dil convs in both cells (not
degenerate). With the current CPU path (partial channels selected by matmuls, the
depthwise weight gradient taken from the cotangent, the initial state from an
'unsafe_rbg' key): 84.5 %, 14 min 29 s, sep convs in both cells and max pools in the
reduction cell. ``:smoke`` runs in about a minute cold (46 s measured),
13 s with a warm compilation cache.
"""

from jaxnas.methods import pcdarts


def get_config(arg=None):
  config = pcdarts.get_config()
  config.data.name = 'fashion_mnist'
  config.data.train_portion = 0.5
  config.data.augment = False
  config.model.C = 8
  config.model.layers = 5
  config.model.k = 4
  config.model.channel_sampling = 'shuffle'
  config.model.edge_normalization = True
  config.optim.batch_size = 16
  config.optim.epochs = 4
  config.optim.steps_per_epoch = 500
  config.optim.learning_rate = 0.05
  config.optim.learning_rate_min = 0.0
  config.optim.arch_learning_rate = 6e-4
  config.optim.arch_warmup_epochs = 1
  config.log_every_steps = 50
  config.eval_max_examples = 5000
  return pcdarts.METHOD.apply_variant(config, arg, 'pcdarts_fashion_mnist')
