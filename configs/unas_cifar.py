"""UNAS search on CIFAR-10 in the DARTS-like space (Vahdat et al. 2020), with the
settings of the reference's commands.sh.

Batch 128 (4 GPUs x 32 there), 8 cells, C=16, 7 ops (skip_connect, sep_conv_3x3,
max_pool_3x3, dil_conv_3x3, sep_conv_5x5, avg_pool_3x3, sep_conv_7x7), one architecture
per example, REBAR, Gumbel-softmax temperature 0.4, the generalization-gap objective
with 10 % of the training set held out, paired-input penalty 0.2; 15 warm-up epochs
(weights only, Adam at a constant 6e-4) and 85 search epochs (weights Adam 6e-4 cosine to
1e-4, wd 3e-4, clip 5; arch Adam 2e-3 cosine to 3e-4, wd 1e-6: the reference's 3e-4 and
1e-3 scaled by its --scale_lr, 128 / 64).

  python -m jaxnas.main --config=configs/unas_cifar.py --workdir=/tmp/unas_cifar

Needs CIFAR-10 prepared with TFDS (see the README); a GPU/TPU job. No full search has
been run with jaxnas yet. ``configs/unas_cifar.py:smoke`` checks a setup end to end on
CPU.
"""

from jaxnas.methods import unas


def get_config(arg=None):
  config = unas.get_config()
  config.data.name = 'cifar10'
  config.data.train_portion = 0.9
  config.data.augment = True
  config.model.C = 16
  config.model.layers = 8
  config.model.steps = 4
  config.model.primitives = unas.sampled_darts.UNAS_PRIMITIVES
  config.unas.estimator = 'rebar'
  config.unas.temperature = 0.4
  config.unas.sampling = 'example'
  config.unas.objective = 'gen_gap'
  config.unas.gen_gap_weight = 0.5
  config.unas.paired_input_penalty = 0.2
  config.optim.batch_size = 128
  config.optim.epochs = 100
  config.optim.warmup_epochs = 15
  config.optim.learning_rate = 6e-4
  config.optim.learning_rate_min = 1e-4
  config.optim.weight_decay = 3e-4
  config.optim.grad_clip = 5.0
  config.optim.arch_learning_rate = 2e-3
  config.optim.arch_learning_rate_min = 3e-4
  config.optim.arch_weight_decay = 1e-6
  return unas.METHOD.apply_variant(config, arg, 'unas_cifar')
