"""Retrains the Fashion-MNIST quick search's cell from scratch, offline, on a 2-core CPU.

The genotype comes from the quick search's workdir (run configs/pcdarts_fashion_mnist.py
first), or any other source: --config.genotype=DARTS_V2 | PC_DARTS_cifar | a .json file |
a search workdir.

  python -m jaxnas.main --config=configs/eval_fashion_mnist.py --workdir=runs/eval_fmnist \
      --config.genotype=runs/fmnist

C=8, 6 cells, batch 64, 3 epochs of 250 steps (48k images), SGD lr 0.05 cosine, auxiliary
head 0.4, drop path 0.1, crop + flip, no cutout; test top-1 on all 10,000 test images.
Measured on a 2-core AMD EPYC VM (jax 0.10.2, CPU), cold compilation cache: 6 min 05 s
wall (24 s compiling), about 165 images/s, 2.2 GB peak RSS; a second run gives identical
numbers. experiments/fashion_mnist_pipeline.py trains searched, random and published
cells with this config at 400 steps, from two seeds each, with a validation split
(README, Results). ``:smoke`` (C=8, 5 cells, PC_DARTS_cifar, 6 steps) runs in
38 s cold (1.5 GB peak RSS).
"""

from jaxnas import base_config


def get_config(arg=None):
  config = base_config.train_config()
  config.genotype = 'runs/fmnist'
  config.data.name = 'fashion_mnist'
  config.data.cutout = 0
  config.model.C = 8
  config.model.layers = 6
  config.model.drop_path = 0.1
  config.optim.batch_size = 64
  config.optim.epochs = 3
  config.optim.steps_per_epoch = 250
  config.optim.learning_rate = 0.05
  config.log_every_steps = 50
  base_config.apply_variant(config, arg, 'eval_fashion_mnist', base_config.TRAIN_VARIANTS)
  return config
