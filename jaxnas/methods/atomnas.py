"""AtomNAS (Mei et al., ICLR 2020): search and training in one run, by shrinking a
supernet of atoms (``jaxnas/spaces/atomnas.py``).

The network trains on the whole train split with

  L = CE_smooth(w) + 0.5 wd ||w||^2 + rho_t * sum_b p_b * sum_{atoms of b} |gamma|,

wd on the conv and classifier weights and the classifier bias (not BN), rho_t ramped
linearly per step from 0 to ``atomnas.rho`` over ``atomnas.rho_ramp_epochs`` epochs,
p_b the cost per atom of branch b (its multiply-adds per hidden channel) over the
atom-weighted mean cost of the initial supernet. RMSProp (decay 0.9, momentum 0.9,
eps 1e-3 inside the square root, TensorFlow's form), lr = base x batch / 256 after a
linear warm-up from the base, times 0.97 every 2.4 epochs (staircase from step 0);
label smoothing 0.1; an EMA of the weights and BN statistics with decay
min(0.9999^(batch / 4096), (1 + t) / (10 + t)).

After each epoch the EMA weights are evaluated on the test split, their BN statistics
first recomputed on ``eval.recalibrate_batches`` train batches. An atom is dead when its
EMA |gamma| <= ``atomnas.threshold``; once the dead atoms' multiply-adds reach
``atomnas.shrink_min_macs``, or at the last epoch, the network is shrunk physically:
atoms dead in both the weights and the EMA (at the last epoch: in the EMA) leave every
array (weights, statistics, RMSProp moments, EMA), the architecture (live channels per
branch per block) becomes the new one, and the step is compiled again for the new
shapes. Each checkpoint holds the architecture beside the state, so a run resumes across
shrinks; ``architecture.json`` and the exported models (``jaxnas.load_model``) hold it too.

Where jaxnas differs from the reference code (meijieru/AtomNAS):
* a shrink lowers each block BN's running mean by the constant its removed atoms added
  (``spaces/atomnas.py``); the reference has this correction switched off;
* a block that cannot become the identity (stride 2 or new channels) keeps its atom of
  largest EMA |gamma| when all its atoms die, so the network stays connected;
* the recomputed BN statistics are the mean over the batches of each batch's mean and
  unbiased variance;
* the reference cannot resume a shrunk run (it rebuilds the full supernet); here every
  checkpoint holds its architecture;
* the run trains on the whole train split and scores the test split after each epoch
  (the reference: ImageNet's train and validation sets).
"""

import functools
import json
import math
import os
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from jaxnas import base_config
from jaxnas import checkpoint as ckpt_lib
from jaxnas import common
from jaxnas import data as data_lib
from jaxnas import export
from jaxnas import files
from jaxnas import host_memory
from jaxnas import metrics as metrics_lib
from jaxnas import parallel
from jaxnas import summary as summary_lib
from jaxnas import train as train_lib
from jaxnas.methods import base
from jaxnas.ops import depthwise
from jaxnas.spaces import atomnas as space

NonFiniteLossError = common.NonFiniteLossError

# The reference's three targets: rho by model (A: stem 16; B, C: stem 32).
RHO = {'a': 1.8e-4, 'b': 1.2e-4, 'c': 1.0e-4}


class AtomState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  ema_params: Any
  ema_batch_stats: Any
  key: jax.Array  # raw uint32[2] key: dropout is drawn from fold_in(key, step)


# ----------------------------------------------------------------------------- config


def get_config() -> ml_collections.ConfigDict:
  """AtomNAS-A on ImageNet, with the reference's settings."""
  c = ml_collections.ConfigDict()
  c.method = 'atomnas'
  c.space = 'atomnas'
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.name = 'imagenet2012'
  c.data.source = 'auto'
  c.data.data_dir = ml_collections.config_dict.placeholder(str)
  c.data.image_size = 224
  c.data.max_examples = ml_collections.config_dict.placeholder(int)
  c.data.augment = True
  c.data.crop_padding = 4
  c.data.cutout = 0

  c.model = ml_collections.ConfigDict()
  c.model.stages = space.STAGES   # [t, c, n, s] per stage; the first: [1, c, 1, s]
  c.model.kernels = space.KERNELS
  c.model.stem = 16
  c.model.stem_stride = 2
  c.model.last = 1280
  c.model.act = 'relu'            # 'relu' | 'swish'
  c.model.se = False
  c.model.dropout = 0.2           # before the classifier
  c.model.depthwise_impl = 'auto'

  c.atomnas = ml_collections.ConfigDict()
  c.atomnas.rho = RHO['a']
  c.atomnas.rho_ramp_epochs = 25
  c.atomnas.threshold = 1e-3      # |gamma| at or below: a dead atom
  c.atomnas.shrink_min_macs = 1e6  # dead atoms' multiply-adds that trigger a shrink

  c.optim = ml_collections.ConfigDict()
  c.optim.batch_size = 512        # global; 64 per GPU on 8 GPUs
  c.optim.epochs = 350
  c.optim.steps_per_epoch = 0     # 0: a full pass over the training images
  c.optim.base_learning_rate = 0.016  # x batch_size / 256 after the warm-up
  c.optim.warmup_epochs = 5.0
  c.optim.lr_decay = 0.97
  c.optim.lr_decay_epochs = 2.4
  c.optim.rms_decay = 0.9
  c.optim.momentum = 0.9
  c.optim.epsilon = 1e-3
  c.optim.weight_decay = 1e-5
  c.optim.label_smoothing = 0.1
  c.optim.ema_decay = 0.9999      # per 4096 images

  c.recalibrate_batches = 10      # train batches that recompute the EMA's BN statistics
  c.log_every_steps = 100
  c.checkpoint_every_steps = 1000
  c.checkpoints_to_keep = 2
  c.eval_batch_size = 500
  c.eval_max_examples = 0
  c.compilation_cache_dir = '~/.cache/jaxnas/xla'
  c.parallel = base_config.parallel_config()  # batch_norm: 'sync'
  return c


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A small network for a few steps: 32 px, stem 8, short stages."""
  if c.data.image_size:
    c.data.image_size = min(c.data.image_size, 32)
  c.model.stages = ((1, 8, 1, 1), (3, 8, 2, 2), (3, 16, 2, 2))
  c.model.stem = 8
  c.model.last = 32
  c.atomnas.rho_ramp_epochs = 1
  c.recalibrate_batches = 2
  base_config.few_steps(c)
  c.optim.batch_size = 16
  return c


def validate(config, fail) -> space.Architecture:
  """Calls ``fail(field, message)`` for the first field AtomNAS cannot run with;
  returns the supernet's architecture."""
  m, o, a = config.model, config.optim, config.atomnas
  base.positive_fields(config, fail, 'optim.epochs', 'optim.batch_size', 'eval_batch_size',
                       'log_every_steps', 'checkpoint_every_steps')
  if config.data.name not in data_lib.DATASETS:
    fail('data.name', f'is {config.data.name!r}; choose one of {tuple(data_lib.DATASETS)}.')
  for field in ('rho', 'threshold', 'shrink_min_macs', 'rho_ramp_epochs'):
    if a[field] < 0:
      fail(f'atomnas.{field}', f'must be >= 0, got {a[field]}.')
  for field in ('base_learning_rate', 'lr_decay', 'lr_decay_epochs', 'epsilon'):
    if o[field] <= 0:
      fail(f'optim.{field}', f'must be positive, got {o[field]}.')
  for field in ('rms_decay', 'momentum', 'ema_decay', 'label_smoothing'):
    if not 0 <= o[field] < 1:
      fail(f'optim.{field}', f'must be in [0, 1), got {o[field]}.')
  if o.warmup_epochs < 0 or o.weight_decay < 0 or o.steps_per_epoch < 0:
    fail('optim.warmup_epochs', 'optim.weight_decay and optim.steps_per_epoch must be >= 0.')
  if m.act not in space.ACTIVATIONS:
    fail('model.act', f'is {m.act!r}; choose one of {space.ACTIVATIONS}.')
  if not 0 <= m.dropout < 1:
    fail('model.dropout', f'must be in [0, 1), got {m.dropout}.')
  if m.depthwise_impl not in depthwise.IMPLS:
    fail('model.depthwise_impl', f'is {m.depthwise_impl!r}; choose one of {depthwise.IMPLS}.')
  if config.recalibrate_batches < 0:
    fail('recalibrate_batches', f'must be >= 0, got {config.recalibrate_batches}.')
  for field in ('stem', 'stem_stride', 'last'):
    if int(m[field]) <= 0:
      fail(f'model.{field}', f'must be a positive integer, got {m[field]}.')
  try:
    arch = space.supernet(m.stages, m.stem, m.stem_stride, m.last, m.kernels)
  except (ValueError, TypeError) as e:
    fail('model.stages', f'(with model.kernels) cannot build the network: {e}')
  (h, w, _), _ = summary_lib.input_spec(config)
  reduction = m.stem_stride * math.prod(b.stride for b in arch.blocks)
  if min(h, w) < reduction:
    fail('model.stages', f'reduce the image by {reduction}x (stem and block strides), more '
         f'than the {h}x{w} images of {config.data.name}; use fewer stride-2 stages or a '
         'larger data.image_size.')
  parallel.check_config(config, fail, batch_norm_modes=('sync',))
  return arch


# ----------------------------------------------------------------------------- optimizer


def lr_schedule(config, steps_per_epoch: int):
  """Linear warm-up from the base rate to base x batch / 256, then x lr_decay every
  lr_decay_epochs epochs (staircase, counted from step 0)."""
  o = config.optim
  peak = o.base_learning_rate * o.batch_size / 256
  warmup = o.warmup_epochs * steps_per_epoch
  decay_steps = o.lr_decay_epochs * steps_per_epoch

  def schedule(count):
    t = jnp.asarray(count, jnp.float32)
    decayed = peak * o.lr_decay ** jnp.floor(t / decay_steps)
    if not warmup:
      return decayed
    ramp = o.base_learning_rate + (peak - o.base_learning_rate) * t / warmup
    return jnp.where(t < warmup, ramp, decayed)

  return schedule


def make_optimizer(config, steps_per_epoch: int) -> optax.GradientTransformation:
  """RMSProp in TensorFlow's form: v = d v + (1 - d) g^2 (from 0), m = mu m + lr g /
  sqrt(v + eps), w -= m."""
  o = config.optim
  return optax.rmsprop(lr_schedule(config, steps_per_epoch), decay=o.rms_decay,
                       eps=o.epsilon, eps_in_sqrt=True, momentum=o.momentum)


def decay_mask(params):
  """True for the weights that take weight decay: conv, SE and classifier kernels and
  the classifier's bias; BN scale and bias do not."""
  def leaf(path, _):
    names = [getattr(p, 'key', '') for p in path]
    return names[-1] == 'kernel' or (names[0] == 'classifier' and names[-1] == 'bias')
  return jax.tree_util.tree_map_with_path(leaf, params)


def ema_decay(config, step):
  o = config.optim
  return jnp.minimum(o.ema_decay ** (o.batch_size / 4096),
                     (1.0 + step) / (10.0 + step))


# ----------------------------------------------------------------------------- model and steps


def build_model(config, arch: space.Architecture, num_classes: int, impl=None):
  m = config.model
  return space.AtomNet(arch, num_classes, m.act, m.se, m.dropout, impl or m.depthwise_impl)


def create_state(model, input_shape, tx, seed: int,
                 mesh: jax.sharding.Mesh | None = None) -> AtomState:
  """The initial state, a pure function of ``seed``; replicated over ``mesh``."""
  init_key, run_key = common.init_keys(seed)
  x = jnp.zeros((1,) + tuple(input_shape), jnp.float32)

  def init(key):
    variables = model.init({'params': key, 'dropout': key}, x, train=True)
    params, stats = variables['params'], variables.get('batch_stats', {})
    return AtomState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=stats,
                     opt_state=tx.init(params), ema_params=params, ema_batch_stats=stats,
                     key=run_key)

  shardings = {'out_shardings': parallel.replicated(mesh)} if mesh else {}
  return jax.jit(init, **shardings)(init_key)


def rho_at(config, step, steps_per_epoch: int):
  a = config.atomnas
  ramp = a.rho_ramp_epochs * steps_per_epoch
  if not ramp:
    return jnp.asarray(a.rho, jnp.float32)
  return a.rho * jnp.minimum(jnp.asarray(step, jnp.float32) / ramp, 1.0)


def make_train_step(model, tx, config, steps_per_epoch: int, weights):
  """One step on a train batch; ``weights`` are the penalty's p_b by (block, kernel)."""
  o = config.optim
  schedule = lr_schedule(config, steps_per_epoch)
  arch = model.arch

  def step(state: AtomState, batch):
    key = jax.random.fold_in(state.key, state.step)
    rho = rho_at(config, state.step, steps_per_epoch)

    def loss_fn(params):
      (logits, _), updates = model.apply(
          {'params': params, 'batch_stats': state.batch_stats}, batch['image'], train=True,
          rngs={'dropout': key}, mutable=['batch_stats'])
      ce = train_lib.cross_entropy(logits, batch['label'], o.label_smoothing)
      decayed = jax.tree.leaves(jax.tree.map(
          lambda w, d: jnp.sum(jnp.square(w)) if d else jnp.zeros(()), params,
          decay_mask(params)))
      wd = 0.5 * o.weight_decay * sum(decayed)
      pen = space.penalty(params, arch, weights)
      return ce + wd + rho * pen, (ce, pen, logits, updates['batch_stats'])

    (total, (ce, pen, logits, batch_stats)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    d = ema_decay(config, state.step)
    ema = lambda e, n: d * e + (1 - d) * n  # noqa: E731
    new_state = state.replace(
        step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state,
        ema_params=jax.tree.map(ema, state.ema_params, params),
        ema_batch_stats=jax.tree.map(ema, state.ema_batch_stats, batch_stats))
    metrics = {'train_loss': ce, 'train_total_loss': total, 'penalty': pen, 'rho': rho,
               'train_acc': jnp.mean(jnp.argmax(logits, -1) == batch['label']),
               'lr': schedule(state.step)}
    return new_state, metrics

  return step


def make_batch_statistics(model):
  """``stats(params, batch)``: every BN's mean and unbiased variance on one batch in
  train mode (the running statistics from zeros after one update, over the momentum)."""

  def stats(params, batch_stats, batch):
    zeros = jax.tree.map(jnp.zeros_like, batch_stats)
    _, updates = model.apply({'params': params, 'batch_stats': zeros}, batch['image'],
                             train=True, mutable=['batch_stats'])
    return jax.tree.map(lambda s: s / space.BN_MOMENTUM, updates['batch_stats'])

  return stats


def recalibrate(stats_fn, params, batch_stats, batches, mesh):
  """BN statistics of ``params`` averaged over ``batches`` (the reference's recomputed
  statistics before evaluation); ``batch_stats`` unchanged when there are none."""
  total, n = None, 0
  for batch in batches:
    s = stats_fn(params, batch_stats, parallel.shard_batch(batch, mesh))
    total = s if total is None else jax.tree.map(jnp.add, total, s)
    n += 1
  return batch_stats if total is None else jax.tree.map(lambda t: t / n, total)


# ----------------------------------------------------------------------------- shrinking


def shrink_state(state: AtomState, arch: space.Architecture, keep, act: str) -> AtomState:
  """The state without the atoms ``keep`` removes: weights, statistics (running means
  corrected, `space.shrink_batch_stats`), RMSProp moments and the EMA."""
  host = jax.device_get(state)
  keys = set(host.params)
  return host.replace(
      params=space.shrink_tree(host.params, arch, keep),
      batch_stats=space.shrink_batch_stats(host.batch_stats, host.params, arch, keep, act),
      opt_state=space.shrink_params_like(host.opt_state, arch, keep, keys),
      ema_params=space.shrink_tree(host.ema_params, arch, keep),
      ema_batch_stats=space.shrink_batch_stats(host.ema_batch_stats, host.ema_params, arch,
                                               keep, act))


def shrink_records(workdir: str) -> list[dict]:
  """The run's shrinks from its metrics.jsonl, one per step (a step run again after a
  resumption counts once)."""
  records = {}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      record = json.loads(line)
      if record.get('kind') == 'shrink':
        records[record['step']] = {k: v if k == 'compile_s' else int(v)
                                   for k, v in record.items() if k != 'kind'}
  return [records[s] for s in sorted(records)]


def dead_macs(arch, dead, costs) -> int:
  return int(sum(int(np.sum(d)) * costs[key] for key, d in dead.items()))


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(manager, step: int, state: AtomState, arch, workdir: str) -> None:
  """The state and its architecture, in one checkpoint (unless the weights hold NaN/inf)."""
  if not bool(common.all_finite(state.params)):
    raise NonFiniteLossError(
        f'The weights became NaN/inf at step {step}; stopped without saving, so the last '
        f'checkpoint in {workdir} is the last good state.')
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      architecture=ocp.args.JsonSave(space.to_json(arch))))


def restore_checkpoint(manager, make_template):
  """(state, architecture) of the newest readable checkpoint (``restore_newest``), or
  (None, None) if there is none;
  ``make_template(arch)`` gives the abstract state (with shardings) of an architecture."""
  def restore(step):
    arch = space.from_json(manager.restore(step, args=ocp.args.Composite(
        architecture=ocp.args.JsonRestore()))['architecture'])
    state = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(make_template(arch))))['state']
    return state, arch

  restored, step = ckpt_lib.restore_newest(manager, restore)
  return (None, None) if step is None else restored


def write_architecture(workdir: str, arch, **info) -> str:
  return files.write_json(os.path.join(workdir, space.ARCHITECTURE_FILE),
                          {'architecture': space.to_json(arch), **info})


# ----------------------------------------------------------------------------- method


class AtomNAS(base.Method):
  """The registry's view of AtomNAS: its config, validation, summary and its own loop
  (`run`): a one-stage run has no arch params and changes its shapes as it shrinks."""
  name = 'atomnas'
  own_loop = True

  def get_config(self):
    return get_config()

  def variants(self):
    return {'smoke': smoke}

  def validate(self, config, fail):
    validate(config, fail)

  def summary(self, config) -> dict:
    (h, w, c), num_classes = summary_lib.input_spec(config)
    arch = space.supernet(config.model.stages, config.model.stem, config.model.stem_stride,
                          config.model.last, config.model.kernels)
    return {'network': 'AtomNAS supernet', 'dataset': config.data.name,
            'input_shape': [h, w, c], 'atoms': arch.atoms(), 'blocks': len(arch.blocks),
            **cost(config, arch, h, c, num_classes)}

  def format_summary(self, s: dict) -> str:
    size = 'x'.join(map(str, s['input_shape']))
    return (f'{s["network"]} on {s["dataset"]} {size}: {s["blocks"]} blocks, {s["atoms"]} '
            f'atoms, {s["params"] / 1e6:.3f}M params, {s["multiply_adds"] / 1e6:.1f}M '
            'multiply-adds per image')

  def run(self, config, workdir: str, stop_at_step: int | None = None) -> dict:
    return run(config, workdir, stop_at_step)


def cost(config, arch, image_size, in_channels, num_classes) -> dict:
  m = config.model
  model = space.AtomNet(arch, num_classes, m.act, m.se, impl='xla')
  x = jax.ShapeDtypeStruct((1, image_size, image_size, in_channels), jnp.float32)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  return {'params': space.count_params(shapes['params']),
          'multiply_adds': space.multiply_adds(arch, image_size, num_classes, in_channels,
                                               m.se)}


METHOD = AtomNAS()


# ----------------------------------------------------------------------------- loop


def run(config: ml_collections.ConfigDict, workdir: str,
        stop_at_step: int | None = None) -> dict:
  """Runs (or resumes) AtomNAS in ``workdir``; returns the final summary. ``stop_at_step``
  ends the run after that step, as an interruption."""
  parallel.maybe_initialize_distributed(config, common.config_fail)
  host_memory.map_large_allocations()

  def fail(field, msg):
    raise common.ConfigError(f'config.{field} {msg}')

  supernet = validate(config, fail)
  for split in ('train', 'test'):
    common.check_data(config, split)
  os.makedirs(workdir, exist_ok=True)
  ckpt_lib.lock_workdir(workdir)  # one run per workdir at a time
  ckpt_lib.check_workdir_config(workdir, config)
  common.setup_compilation_cache(config.compilation_cache_dir)
  o, a = config.optim, config.atomnas
  t_start = time.perf_counter()
  summary = METHOD.summary(config)
  summary_lib.write_summary(workdir, {'model': summary})
  print(METHOD.format_summary(summary), flush=True)
  (image_size, _, in_channels), _ = summary_lib.input_spec(config)

  # --- data
  mesh = parallel.make_mesh(config.parallel.num_devices)
  train_set = data_lib.load_dataset(config.data, split='train')
  test_set = data_lib.load_dataset(config.data, split='test')
  batches = data_lib.TrainBatches(
      train_set, np.arange(len(train_set)), o.batch_size, config.seed,
      augment=config.data.augment, crop_padding=config.data.crop_padding,
      cutout_length=config.data.cutout, process_index=jax.process_index(),
      process_count=jax.process_count())
  steps_per_epoch = batches.steps_per_epoch
  if o.steps_per_epoch:
    steps_per_epoch = min(steps_per_epoch, o.steps_per_epoch)
  total_steps = o.epochs * steps_per_epoch
  test_idx = np.arange(len(test_set))
  if config.eval_max_examples:
    test_idx = test_idx[:config.eval_max_examples]
  num_classes = train_set.num_classes

  # --- the penalty's weights and the atoms' costs: of the initial supernet, once.
  weights = space.penalty_weights(supernet, image_size)
  costs = space.atom_costs(supernet, image_size)
  tx = make_optimizer(config, steps_per_epoch)
  rep, rows = parallel.replicated(mesh), parallel.batch_sharding(mesh)

  def make_template(arch):
    model = build_model(config, arch, num_classes)
    abstract = jax.eval_shape(lambda: create_state(model, train_set.image_shape, tx,
                                                   config.seed))
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep),
                        abstract)

  manager = ckpt_lib.manager(workdir, config.checkpoints_to_keep)
  state, arch = restore_checkpoint(manager, make_template)
  resumed = state is not None
  if resumed:
    print(f'Resuming from step {int(state.step)} in {workdir} '
          f'({arch.atoms()} of {supernet.atoms()} atoms left).', flush=True)
  else:
    arch = supernet
    state = create_state(build_model(config, arch, num_classes), train_set.image_shape, tx,
                         config.seed, mesh)
  start_step = int(state.step)
  ckpt_lib.write_config(workdir, config)
  host_memory.release_host_memory()

  def compile_for(arch, state):
    """The step, BN-statistics and eval programs of ``arch`` (compiled for its shapes)."""
    model = build_model(config, arch, num_classes)
    t0 = time.perf_counter()
    step_fn = jax.jit(make_train_step(model, tx, config, steps_per_epoch, weights),
                      in_shardings=(rep, rows), out_shardings=(rep, rep), donate_argnums=0
                      ).lower(state, parallel.shard_batch(batches.batch(0), mesh)).compile()
    stats_fn = jax.jit(make_batch_statistics(model), in_shardings=(rep, rep, rows),
                       out_shardings=rep)
    eval_fn = jax.jit(train_lib.make_eval_step(model), in_shardings=(rep, rep, rows),
                      out_shardings=rep)
    return step_fn, stats_fn, eval_fn, time.perf_counter() - t0

  step_fn, stats_fn, eval_fn, compile_s = compile_for(arch, state)
  eval_batch_size = parallel.padded_batch_size(config.eval_batch_size, mesh.size)
  print(f'Compiled the step in {compile_s:.1f} s for {mesh.size} device(s) (setup '
        f'{time.perf_counter() - t_start:.1f} s).', flush=True)
  save_model = functools.partial(
      export.save_model, space='atomnas', config=config, num_classes=num_classes,
      image_shape=train_set.image_shape, mean=train_set.mean, std=train_set.std)
  best_top1 = train_lib._read_best(workdir) if resumed else -1.0  # pylint: disable=protected-access
  initial = cost(config, supernet, image_size, in_channels, num_classes)

  def ema_eval(state, arch, epoch):
    """Test loss/top-1/top-5 of the EMA weights after recomputing their BN statistics."""
    recal = [batches.batch(epoch * steps_per_epoch + i) for i in
             range(config.recalibrate_batches)]
    stats = recalibrate(stats_fn, state.ema_params, state.ema_batch_stats, recal, mesh)
    test = train_lib.evaluate(eval_fn, state.ema_params, stats, test_set, test_idx,
                              eval_batch_size, mesh)
    return test, stats

  progress = metrics_lib.Progress(total_steps, steps_per_epoch, start_step)
  images, epoch_result = 0, {}
  epoch_sums, epoch_t0 = {}, time.perf_counter()
  with metrics_lib.MetricWriter(workdir, start_step) as writer, \
       batches.iterate(start_step, total_steps - start_step) as stream, \
       common.StopRequest() as stop:
    writer.write(start_step, {'compile_s': compile_s}, kind='compile')
    for step in range(start_step + 1, total_steps + 1):
      if stop_at_step is not None and step > stop_at_step:
        manager.wait_until_finished()
        return {'stopped_at_step': step - 1}
      state, metrics = step_fn(state, parallel.shard_batch(next(stream), mesh))
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      images += o.batch_size
      if not math.isfinite(metrics['train_total_loss']):
        raise NonFiniteLossError(
            f'The loss became {metrics["train_total_loss"]} at step {step}; stopped without '
            f'saving, so the last checkpoint in {workdir} is the last good state. Lower '
            'optim.base_learning_rate.')
      for k, v in metrics.items():
        epoch_sums.setdefault(k, []).append(v)
      if step % config.log_every_steps == 0 or step == total_steps:
        rate = progress.images_per_s(images)
        progress.line(step, metrics, rate)
        writer.write(step, {**metrics, 'images_per_s': rate})

      epoch_end = step % steps_per_epoch == 0
      if epoch_end:
        epoch = step // steps_per_epoch
        last = step == total_steps
        test, stats = ema_eval(state, arch, epoch)
        host = jax.device_get(state)
        dead = space.dead_atoms(host.ema_params, arch, a.threshold)
        macs = cost(config, arch, image_size, in_channels, num_classes)
        means = {k: float(np.mean(v)) for k, v in epoch_sums.items()}
        epoch_result = {'epoch': epoch, 'step': step, 'train_loss': means['train_loss'],
                        'train_acc': means['train_acc'], 'penalty': means['penalty'],
                        'test_loss': test['loss'], 'test_top1': test['top1'],
                        'test_top5': test['top5'], 'test_examples': test['examples'],
                        'atoms': arch.atoms(), 'dead_atoms': int(sum(map(np.sum, dead.values()))),
                        'multiply_adds': macs['multiply_adds'], 'num_params': macs['params'],
                        'epoch_time_s': time.perf_counter() - epoch_t0}
        writer.write(step, {k: v for k, v in epoch_result.items() if k != 'step'},
                     kind='epoch')
        print(f'== epoch {epoch}/{o.epochs}: train loss {means["train_loss"]:.4f} acc '
              f'{100 * means["train_acc"]:.2f}% | EMA test top-1 {100 * test["top1"]:.2f}% | '
              f'{arch.atoms()} atoms ({epoch_result["dead_atoms"]} dead), '
              f'{macs["multiply_adds"] / 1e6:.2f}M multiply-adds, {macs["params"] / 1e6:.3f}M '
              f'params | {metrics_lib.format_seconds(epoch_result["epoch_time_s"])}', flush=True)

        # --- dynamic shrinkage
        if dead and (last or dead_macs(arch, dead, costs) >= a.shrink_min_macs):
          if not last:  # removed only where the weights agree with the EMA
            dead = space.dead_atoms(host.params, arch, a.threshold, host.ema_params)
          importance = {k: np.abs(np.asarray(g)) for k, g in
                        space.gammas(host.ema_params, arch).items()}
          keep = space.keep_masks(arch, dead, importance)
          if not all(k.all() for k in keep.values()):
            stats = space.shrink_batch_stats(jax.device_get(stats), host.ema_params, arch,
                                             keep, config.model.act)
            state = jax.device_put(shrink_state(host, arch, keep, config.model.act), rep)
            new_arch = space.shrink_architecture(arch, keep)
            new_macs = cost(config, new_arch, image_size, in_channels, num_classes)
            removed = arch.atoms() - new_arch.atoms()
            arch = new_arch
            t0 = time.perf_counter()
            step_fn, stats_fn, eval_fn, recompile_s = compile_for(arch, state)
            writer.write(step, {'atoms_removed': removed, 'atoms': arch.atoms(),
                                'multiply_adds': new_macs['multiply_adds'],
                                'params': new_macs['params'], 'compile_s': recompile_s},
                         kind='shrink')
            write_architecture(workdir, arch, step=step)
            print(f'   shrunk: {removed} atoms removed, {arch.atoms()} left; '
                  f'{macs["multiply_adds"] / 1e6:.2f}M -> {new_macs["multiply_adds"] / 1e6:.2f}M '
                  f'multiply-adds, {macs["params"] / 1e6:.3f}M -> '
                  f'{new_macs["params"] / 1e6:.3f}M params; recompiled in '
                  f'{time.perf_counter() - t0:.1f} s', flush=True)
            epoch_result.update(atoms=arch.atoms(), multiply_adds=new_macs['multiply_adds'],
                                num_params=new_macs['params'])
            if last:  # the final model is the shrunk one: score it
              test = train_lib.evaluate(eval_fn, state.ema_params, stats, test_set, test_idx,
                                        eval_batch_size, mesh)
              epoch_result.update(test_loss=test['loss'], test_top1=test['top1'],
                                  test_top5=test['top5'])
              print(f'   shrunk network: EMA test top-1 {100 * test["top1"]:.2f}%', flush=True)
        is_best = test['top1'] > best_top1
        if is_best:
          best_top1 = test['top1']
          save_model(os.path.join(workdir, export.EXPORT_DIR, 'best'), state.ema_params,
                     stats, genotype=arch, **epoch_result)
        if last:
          save_model(os.path.join(workdir, export.EXPORT_DIR, 'last'), state.ema_params,
                     stats, genotype=arch, **epoch_result)
        epoch_sums, epoch_t0 = {}, time.perf_counter()
      save = functools.partial(save_checkpoint, manager, step, state, arch, workdir)
      if epoch_end or step % config.checkpoint_every_steps == 0:
        save()
      if stop.requested:  # SIGTERM / Ctrl-C: this step's checkpoint, then out
        return stop.finish(manager, step, workdir, save)

  manager.wait_until_finished()
  path = write_architecture(workdir, arch, step=total_steps)
  recompiles = shrink_records(workdir)  # those before a resumption too
  result = {**epoch_result, 'best_test_top1': best_top1, 'compile_s': compile_s,
            'supernet_multiply_adds': initial['multiply_adds'],
            'supernet_params': initial['params'], 'recompiles': recompiles,
            'wall_s': time.perf_counter() - t_start}
  summary_lib.write_summary(workdir, {'model': summary, 'result': result})
  if epoch_result:
    print(f'AtomNAS done: EMA test top-1 {100 * epoch_result["test_top1"]:.2f}% at '
          f'{epoch_result["multiply_adds"] / 1e6:.2f}M multiply-adds (supernet '
          f'{initial["multiply_adds"] / 1e6:.2f}M), {len(recompiles)} shrink(s); '
          f'architecture in {path}, model by jaxnas.load_model({workdir!r}).', flush=True)
  return {'model': summary, **result, 'architecture': arch}
