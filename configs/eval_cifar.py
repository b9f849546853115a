"""Trains a genotype from scratch on CIFAR-10 with the DARTS / PC-DARTS evaluation settings.

20 cells, C=36, 600 epochs, batch 96, SGD lr 0.025 cosine to 0, momentum 0.9, weight
decay 3e-4, gradient clipping 5, auxiliary head after cell 13 (weight 0.4), drop path 0.3
ramped linearly, cutout 16, random crop + flip. The genotype defaults to PC_DARTS_cifar
(3.635M parameters); --config.genotype=DARTS_V2 | a genotype.json | a search workdir.

  python -m jaxnas.main --config=configs/eval_cifar.py --workdir=runs/eval_cifar
  python -m jaxnas.main --config=configs/eval_cifar.py --workdir=runs/eval_cifar --dry_run

Needs CIFAR-10 prepared with TFDS. Paper: 2.57 +- 0.07 % test error for PC_DARTS_cifar,
2.76 +- 0.09 % for DARTS_V2. Not trained with jaxnas yet: there is no CIFAR-10 or
accelerator where jaxnas was measured. ``--dry_run`` (measured, 2-core CPU): 3.635M
params (4.111M with the auxiliary head), 556.7M multiply-adds per 32x32 image for
PC_DARTS_cifar; DARTS_V2 3.349M, 528.4M. ``:smoke`` (C=8, 5 cells, a few steps) checks a
setup end to end.
"""

from jaxnas import base_config


def get_config(arg=None):
  config = base_config.train_config()
  config.optim.lr_timing = 'reference'  # epoch e at the cosine's eta(e + 1), as the reference
  base_config.apply_variant(config, arg, 'eval_cifar', base_config.TRAIN_VARIANTS)
  return config
