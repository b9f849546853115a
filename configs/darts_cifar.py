"""DARTS search on CIFAR-10 (Liu et al. 2019): the PC-DARTS baseline.

All channels through every mixed op (K=1), no edge normalization, batch 64, SGD lr 0.025
cosine to 0.001, Adam arch lr 3e-4, arch updates from the first epoch, first order by
default; ``--config.optim.order=2`` runs the exact unrolled second order.

  python -m jaxnas.main --config=configs/darts_cifar.py --workdir=/tmp/darts_cifar

Needs CIFAR-10 prepared with TFDS. Paper (second order): 2.76 +- 0.09 % test error,
3.3M parameters after retraining. Measured on a 2-core CPU: 11.6 s per first-order step
at batch 64 (79 s to compile, with the native CPU kernels), so a GPU/TPU job; no full search has been run with jaxnas
yet. ``configs/darts_cifar.py:smoke`` checks a setup end to end on CPU.
"""

from jaxnas.methods import darts


def get_config(arg=None):
  config = darts.get_config()
  config.data.name = 'cifar10'
  config.data.train_portion = 0.5
  config.data.augment = True
  config.model.C = 16
  config.model.layers = 8
  config.model.k = 1
  config.model.edge_normalization = False
  config.optim.batch_size = 64
  config.optim.epochs = 50
  config.optim.lr_timing = 'reference'  # epoch e at eta(e + 1), as the reference
  config.optim.learning_rate = 0.025
  config.optim.learning_rate_min = 0.001
  config.optim.momentum = 0.9
  config.optim.weight_decay = 3e-4
  config.optim.grad_clip = 5.0
  config.optim.arch_learning_rate = 3e-4
  config.optim.arch_weight_decay = 1e-3
  config.optim.arch_warmup_epochs = 0
  config.optim.order = 1
  return darts.METHOD.apply_variant(config, arg, 'darts_cifar')
