"""Shared config defaults: the search loop's fields (each method adds its own, in
jaxnas/methods/) and the evaluation stage's.

Every field a run reads is declared in a config, so an override of a field that does
not exist (``--config.optim.lr=...`` instead of ``learning_rate``) fails at flag parsing.
"""

import ml_collections

from jaxnas.spaces import fbnet
from jaxnas.spaces import proxyless


def loop_config() -> ml_collections.ConfigDict:
  """The fields of the shared search loop (data, batches, logging, checkpoints,
  compilation, devices); a method's ``get_config`` adds its model and optimizer fields
  (jaxnas/methods/)."""
  c = ml_collections.ConfigDict()
  c.method = ''              # a name in jaxnas.methods.METHODS
  c.space = ''               # a name in jaxnas.spaces.SEARCH_SPACES
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.name = 'cifar10'
  c.data.source = 'auto'     # 'auto' | 'idx' | 'tfds'
  c.data.data_dir = ml_collections.config_dict.placeholder(str)
  c.data.image_size = ml_collections.config_dict.placeholder(int)
  c.data.max_examples = ml_collections.config_dict.placeholder(int)
  c.data.train_portion = 0.5  # first part of the train split for weights, rest for the arch
  # ImageNet search: fractions of each class for (weights, arch) instead of train_portion.
  c.data.per_class_fractions = ml_collections.config_dict.placeholder(tuple)
  c.data.augment = True       # random crop (padding crop_padding) + horizontal flip
  c.data.crop_padding = 4

  c.optim = ml_collections.ConfigDict()
  c.optim.batch_size = 256
  c.optim.epochs = 50
  c.optim.steps_per_epoch = 0      # 0: a full pass over the smaller split

  c.log_every_steps = 50
  c.checkpoint_every_steps = 500
  c.checkpoints_to_keep = 2
  c.eval_batch_size = 500
  c.eval_max_examples = 0          # 0: evaluate on the whole held-out arch split
  c.compilation_cache_dir = '~/.cache/jaxnas/xla'  # '' disables the persistent cache
  # The search step's programs (one per phase), compiled with the eval step:
  # 'concurrent' side by side (sooner on 2+ cores, more host memory while compiling),
  # 'sequential' one at a time; 'auto': concurrent on GPU/TPU hosts, sequential on CPU.
  c.compile_mode = 'auto'
  c.parallel = parallel_config()
  return c


def parallel_config() -> ml_collections.ConfigDict:
  """Data parallelism: the global batch optim.batch_size is split over the devices."""
  p = ml_collections.ConfigDict()
  p.num_devices = 0        # 0: all devices (of all hosts)
  p.batch_norm = 'sync'    # 'sync': statistics over the global batch (as on one
                           # device) | 'per_device': per device, as PyTorch DataParallel
  p.multi_host = False     # True: jax.distributed.initialize() before the run
  # Where the cluster environment (Cloud TPU, SLURM, Open MPI, Kubernetes) does not say:
  # the coordinator's host:port, the process count and this process's id.
  p.coordinator_address = ''  # '': detected (or the JAX_COORDINATOR_ADDRESS variable)
  p.num_processes = 0         # 0: detected
  p.process_id = -1           # -1: detected
  return p


def few_steps(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Two epochs of three steps of 16 images on a few hundred examples (smoke runs)."""
  c.optim.batch_size = 16
  c.optim.epochs = 2
  c.optim.steps_per_epoch = 3
  c.data.max_examples = 256
  c.eval_max_examples = 64
  c.eval_batch_size = 64
  c.log_every_steps = 1
  c.checkpoint_every_steps = 2
  return c


def apply_variant(c: ml_collections.ConfigDict, arg, config_name: str, variants: dict):
  """Applies the variant named after the config path's colon (``configs/x.py:smoke``)."""
  if not arg:
    return c
  if arg not in variants:
    raise ValueError(f'Unknown variant {arg!r} of {config_name}; known: {", ".join(variants)}.')
  return variants[arg](c)


# ----------------------------------------------------------------------------- training


def train_config(space: str = 'darts') -> ml_collections.ConfigDict:
  """Training a found architecture from scratch, with the DARTS / PC-DARTS CIFAR-10
  evaluation settings and the model fields of ``space`` (a name in
  jaxnas.spaces.EVAL_SPACES); configs/eval_*.py change what differs."""
  c = ml_collections.ConfigDict()
  c.method = 'train'
  c.space = space
  # 'darts': a published name (PC_DARTS_cifar, PC_DARTS_image, DARTS_V2), a genotype.json
  # file or a search workdir (its genotype.json). 'proxyless': PROXYLESS_GPU,
  # UNAS_PROXYLESS, an architecture .json file or a UNAS search workdir. 'fbnet': an
  # architecture .json file or an FP-NAS / PARSEC search workdir. 'atomnas': an
  # AtomNAS run's workdir or its architecture.json.
  c.genotype = {'darts': 'PC_DARTS_cifar', 'proxyless': 'UNAS_PROXYLESS'}.get(space, '')
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.name = 'cifar10'
  c.data.source = 'auto'
  c.data.data_dir = ml_collections.config_dict.placeholder(str)
  c.data.image_size = ml_collections.config_dict.placeholder(int)
  c.data.max_examples = ml_collections.config_dict.placeholder(int)  # first N train images
  c.data.augment = True
  c.data.crop_padding = 4
  c.data.cutout = 16          # side of the cutout square; 0 switches it off
  # The last N train images held out: scored each epoch and for 'best'; test once, at the end.
  c.data.validation_examples = 0

  c.model = ml_collections.ConfigDict()
  if space in ('proxyless', 'fbnet'):
    skeleton = proxyless if space == 'proxyless' else fbnet
    c.model.channels = skeleton.CHANNELS  # (stem, ...,) stages, last conv
    c.model.width_multiplier = 1.0
    c.model.depths = skeleton.DEPTHS      # layers per stage (as the search's)
    c.model.strides = skeleton.STRIDES
    c.model.dropout = 0.0                 # before the classifier
  elif space == 'atomnas':  # a shrunk AtomNAS network (its blocks are in the architecture)
    c.model.act = 'relu'                  # 'relu' | 'swish' (AtomNAS+: swish)
    c.model.se = False                    # squeeze-excite per branch (AtomNAS+: True)
    c.model.dropout = 0.0                 # before the classifier (AtomNAS+: 0.28)
  else:
    c.model.C = 36
    c.model.layers = 20
    c.model.stem = 'cifar'      # 'cifar' | 'imagenet' (three stride-2 convs)
    c.model.stem_multiplier = 3
    c.model.auxiliary = True
    c.model.auxiliary_weight = 0.4
    c.model.drop_path = 0.3     # ramped linearly from 0 over the epochs
  c.model.depthwise_impl = 'auto'

  c.optim = ml_collections.ConfigDict()
  c.optim.batch_size = 96
  c.optim.epochs = 600
  c.optim.schedule = 'cosine'  # 'cosine' (to learning_rate_min) | 'linear' (PC-DARTS ImageNet)
  c.optim.learning_rate = 0.025
  c.optim.learning_rate_min = 0.0
  c.optim.warmup_epochs = 0
  # 'cosine' only: 'jaxnas' epoch e at eta(e); 'reference' at eta(e + 1), as the
  # reference's scheduler.step() at each epoch's top (the reference configs' choice).
  c.optim.lr_timing = 'jaxnas'
  c.optim.momentum = 0.9
  c.optim.nesterov = False
  c.optim.weight_decay = 3e-4
  c.optim.decay_batch_norm = True  # False: no weight decay on BN scale and bias
  c.optim.grad_clip = 5.0
  c.optim.label_smoothing = 0.0
  c.optim.steps_per_epoch = 0  # 0: a full pass over the training images

  c.log_every_steps = 100
  c.checkpoint_every_steps = 1000
  c.checkpoints_to_keep = 2
  c.eval_batch_size = 500
  c.eval_max_examples = 0      # 0: the whole test split
  c.compilation_cache_dir = '~/.cache/jaxnas/xla'
  c.parallel = parallel_config()  # batch_norm: 'sync' only (per-device BN is search-only)
  return c


def train_smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A few steps of a small network of a published architecture, for checking a setup."""
  if c.space == 'proxyless':
    c.genotype = 'UNAS_PROXYLESS'
    c.model.width_multiplier = 0.25
  elif c.space == 'fbnet':  # no published architecture: the config's stays
    c.model.width_multiplier = 0.25
  else:
    c.genotype = 'PC_DARTS_cifar'
    c.model.C = 8
    c.model.layers = 5
  return few_steps(c)


TRAIN_VARIANTS = {'smoke': train_smoke}
