"""FP-NAS (Yan et al., CVPR 2021) on CIFAR-10 in the sampled DARTS-like cell space: PARSEC's
CIFAR-10 search (configs/parsec_cifar.py) with adaptive sampling.

K = ceil(H / 4) architectures per step (FP-NAS's lambda = 1/4; H the entropy in nats of
the categoricals, 50.3 at the start of this space: K = 13), at least 2, at most 16; the
step is one compiled program for every K. The DARTS cell has no multi-factor choice, so
no coarse-to-fine here (that runs in the FBNetV2-like space: configs/fpnas_imagenet.py).
Settings as parsec_cifar.py (jaxnas choices where the papers give none).

  python -m jaxnas.main --config=configs/fpnas_cifar.py --workdir=runs/fpnas_cifar

A GPU/TPU job, not run with jaxnas yet. ``:smoke`` checks a setup end to end.
"""

from jaxnas.methods import fpnas


def get_config(arg=None):
  config = fpnas.get_config(adaptive=True)
  config.data.name = 'cifar10'
  config.data.train_portion = 0.5
  config.model.C = 16
  config.model.layers = 8
  config.model.steps = 4
  config.fpnas.sample_scale = 0.25
  config.fpnas.min_samples = 2
  config.fpnas.max_samples = 16
  config.optim.batch_size = 64
  config.optim.epochs = 50
  config.optim.warmup_epochs = 10
  config.optim.learning_rate = 0.025
  config.optim.learning_rate_min = 0.001
  config.optim.arch_learning_rate = 3e-3
  return fpnas.FPNAS.apply_variant(config, arg, 'fpnas_cifar')
