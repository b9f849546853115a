"""PC-DARTS quick search on Fashion-MNIST, offline, sized for a 2-core CPU.

The Debian package dataset-fashion-mnist provides the data (IDX files). A smaller supernet
than the paper's (see get_config), K=4 with channel shuffle and edge normalization, the
reference optimizers, arch updates after one warm-up epoch.

  python -m jaxnas.main --config=configs/pcdarts_fashion_mnist.py --workdir=/tmp/fmnist

Measured: see the README's results table.
"""

from jaxnas import base_config


def get_config(arg=None):
  config = base_config.search_config()
  config.data.name = 'fashion_mnist'
  config.data.augment = False
  config.model.C = 8
  config.model.layers = 5
  config.optim.batch_size = 16
  config.optim.epochs = 4
  config.optim.learning_rate = 0.05
  config.optim.steps_per_epoch = 500
  config.optim.arch_warmup_epochs = 1
  config.log_every_steps = 50
  config.eval_max_examples = 5000
  if arg == 'smoke':
    base_config.smoke(config)
  elif arg:
    raise ValueError(f'Unknown variant {arg!r} of pcdarts_fashion_mnist; known: smoke.')
  return config
