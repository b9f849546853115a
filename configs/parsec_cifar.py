"""PARSEC (Casale et al. 2019) on CIFAR-10 in the sampled DARTS-like cell space, at the
DARTS search size.

C=16, 8 cells, 4 nodes per cell, per node two (source, op) slots over the 7 UNAS ops;
K = 16 architectures per step (PARSEC's K in the DARTS space), each run alone on the
batch; batch 64, 50 epochs on a 50/50 split of the training set. PARSEC gives no code or
optimizer settings: the weights take DARTS's (SGD 0.025 cosine to 0.001, momentum 0.9,
wd 3e-4, gradient clip 5) and alpha Adam 3e-3 (betas 0.5, 0.999) after 10 weights-only
epochs: jaxnas choices.

  python -m jaxnas.main --config=configs/parsec_cifar.py --workdir=runs/parsec_cifar

A GPU/TPU job, not run with jaxnas yet. ``:smoke`` (a tiny supernet, a few steps) checks
a setup end to end.
"""

from jaxnas.methods import fpnas


def get_config(arg=None):
  config = fpnas.get_config(adaptive=False)
  config.data.name = 'cifar10'
  config.data.train_portion = 0.5
  config.model.C = 16
  config.model.layers = 8
  config.model.steps = 4
  config.fpnas.num_samples = 16
  config.optim.batch_size = 64
  config.optim.epochs = 50
  config.optim.warmup_epochs = 10
  config.optim.learning_rate = 0.025
  config.optim.learning_rate_min = 0.001
  config.optim.arch_learning_rate = 3e-3
  return fpnas.PARSEC.apply_variant(config, arg, 'parsec_cifar')
