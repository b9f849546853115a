"""Shared defaults of the search configs (configs/*.py import this module).

Every field a search reads is declared here, so an override of a field that does not
exist (``--config.optim.lr=...`` instead of ``learning_rate``) fails at flag parsing.
"""

import ml_collections

from jaxnas import genotypes


def search_config() -> ml_collections.ConfigDict:
  """PC-DARTS on CIFAR-10 with the paper's settings; the configs change what differs."""
  c = ml_collections.ConfigDict()
  c.method = 'pcdarts'       # 'pcdarts' | 'darts' (the label a run is reported under)
  c.space = 'darts'          # search space, by name (jaxnas.spaces)
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.name = 'cifar10'
  c.data.source = 'auto'     # 'auto' | 'idx' | 'tfds'
  c.data.data_dir = ml_collections.config_dict.placeholder(str)
  c.data.image_size = ml_collections.config_dict.placeholder(int)
  c.data.max_examples = ml_collections.config_dict.placeholder(int)
  c.data.train_portion = 0.5  # first half of the train split for weights, rest for alphas
  # ImageNet search: fractions of each class for (weights, alphas) instead of train_portion.
  c.data.per_class_fractions = ml_collections.config_dict.placeholder(tuple)
  c.data.augment = True       # random crop (padding crop_padding) + horizontal flip
  c.data.crop_padding = 4

  c.model = ml_collections.ConfigDict()
  c.model.C = 16
  c.model.layers = 8
  c.model.steps = 4
  c.model.multiplier = 4
  c.model.stem_multiplier = 3
  c.model.stem = 'cifar'      # 'cifar' | 'imagenet' (three stride-2 convs)
  c.model.primitives = genotypes.PRIMITIVES  # the candidate ops of every edge
  c.model.k = 4               # partial channels: 1/k of the channels go through the mixed op
  c.model.channel_sampling = 'shuffle'  # 'shuffle' (reference) | 'random'
  c.model.edge_normalization = True
  c.model.depthwise_impl = 'auto'       # 'auto' | 'xla' | 'shifted'
  c.model.remat = False

  c.optim = ml_collections.ConfigDict()
  c.optim.batch_size = 256
  c.optim.epochs = 50
  c.optim.learning_rate = 0.1
  c.optim.learning_rate_min = 0.0
  c.optim.warmup_epochs = 0
  c.optim.momentum = 0.9
  c.optim.weight_decay = 3e-4
  c.optim.grad_clip = 5.0
  c.optim.arch_learning_rate = 6e-4
  c.optim.arch_betas = (0.5, 0.999)
  c.optim.arch_weight_decay = 1e-3
  c.optim.arch_grad_clip = 0.0     # 0: no clipping of the arch gradient
  c.optim.arch_warmup_epochs = 15  # alphas/betas are updated from this epoch on
  c.optim.order = 1                # 1: first order; 2: unrolled second order (DARTS)
  c.optim.steps_per_epoch = 0      # 0: a full pass over the smaller split

  c.log_every_steps = 50
  c.checkpoint_every_steps = 500
  c.checkpoints_to_keep = 2
  c.eval_batch_size = 500
  c.eval_max_examples = 0          # 0: evaluate on the whole held-out arch split
  c.compilation_cache_dir = '~/.cache/jaxnas/xla'  # '' disables the persistent cache
  return c


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A run of a few steps on a tiny supernet, for checking a setup end to end."""
  c.model.C = 8
  c.model.layers = 3
  c.model.steps = 2
  c.model.multiplier = 2
  c.optim.batch_size = 16
  c.optim.epochs = 2
  c.optim.steps_per_epoch = 3
  c.optim.arch_warmup_epochs = 1
  c.data.max_examples = 256
  c.eval_max_examples = 64
  c.eval_batch_size = 64
  c.log_every_steps = 1
  c.checkpoint_every_steps = 2
  return c


VARIANTS = {'smoke': smoke}


def apply_variant(c: ml_collections.ConfigDict, arg, config_name: str):
  """Applies the variant named after the config path's colon (``configs/x.py:smoke``)."""
  if not arg:
    return c
  if arg not in VARIANTS:
    raise ValueError(f'Unknown variant {arg!r} of {config_name}; known: {", ".join(VARIANTS)}.')
  return VARIANTS[arg](c)
