"""Retrains the Fashion-MNIST quick search's cell from scratch, offline, on a 2-core CPU.

The genotype comes from the quick search's workdir (run configs/pcdarts_fashion_mnist.py
first), or any other source: --config.genotype=DARTS_V2 | PC_DARTS_cifar | a .json file |
a search workdir.

  python -m jaxnas.main --config=configs/eval_fashion_mnist.py --workdir=runs/eval_fmnist \
      --config.genotype=runs/fmnist
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
  base_config.apply_variant(config, arg, 'eval_fashion_mnist')
  return config
