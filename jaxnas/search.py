"""Differentiable architecture search (DARTS, PC-DARTS): state, steps and the loop.

One search step is the bilevel update of the reference code: an architecture update on a
batch of the arch split, then a weight update on a batch of the weight split with the
new architecture. Weights and architecture parameters are separate pytrees with separate
optax states; everything a resumed run needs is in ``SearchState``.
"""

from concurrent import futures
import functools
import json
import os
import time
from typing import Any

from absl import logging
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxnas import checkpoint as ckpt_lib
from jaxnas import data as data_lib
from jaxnas import genotypes
from jaxnas import host_memory
from jaxnas import metrics as metrics_lib
from jaxnas import parallel
from jaxnas import partial_channels
from jaxnas import summary as summary_lib
from jaxnas import visualize
from jaxnas.ops import depthwise
from jaxnas.spaces import darts

METHODS = ('darts', 'pcdarts')
COMPILE_MODES = ('auto', 'concurrent', 'sequential')


class ConfigError(ValueError):
  """A config field has a value the search cannot run with."""


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or inf."""


class SearchState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any
  batch_stats: Any
  arch: Any
  weight_opt_state: Any
  arch_opt_state: Any
  key: jax.Array  # raw uint32[2] key: the run's seed stream


# ----------------------------------------------------------------------------- config


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the field, before any data is read or code compiled."""

  def fail(field, msg):
    raise ConfigError(f'config.{field} {msg}')

  m, o, d = config.model, config.optim, config.data
  if config.method not in METHODS:
    fail('method', f'is {config.method!r}; choose one of {METHODS}.')
  if config.space not in darts.SEARCH_SPACES:
    fail('space', f'is {config.space!r}; choose one of {tuple(darts.SEARCH_SPACES)}.')
  if config.compile_mode not in COMPILE_MODES:
    fail('compile_mode', f'is {config.compile_mode!r}; choose one of {COMPILE_MODES}.')
  for field, value in (('optim.epochs', o.epochs), ('optim.batch_size', o.batch_size),
                       ('model.C', m.C), ('model.layers', m.layers), ('model.k', m.k),
                       ('model.steps', m.steps), ('eval_batch_size', config.eval_batch_size),
                       ('log_every_steps', config.log_every_steps),
                       ('checkpoint_every_steps', config.checkpoint_every_steps)):
    if int(value) <= 0:
      fail(field, f'must be a positive integer, got {value}.')
  if o.steps_per_epoch < 0:
    fail('optim.steps_per_epoch', f'must be >= 0 (0: a full pass), got {o.steps_per_epoch}.')
  if m.C % m.k:
    fail('model.k', f'= {m.k} must divide the channel count model.C = {m.C}.')
  if m.C % 2:
    fail('model.C', f'= {m.C} must be even (FactorizedReduce halves it).')
  if m.channel_sampling not in partial_channels.SAMPLING_MODES:
    fail('model.channel_sampling',
         f'is {m.channel_sampling!r}; choose one of {partial_channels.SAMPLING_MODES}.')
  if m.stem not in ('cifar', 'imagenet'):
    fail('model.stem', f"is {m.stem!r}; choose 'cifar' or 'imagenet'.")
  if m.depthwise_impl not in depthwise.IMPLS:
    fail('model.depthwise_impl', f'is {m.depthwise_impl!r}; choose one of {depthwise.IMPLS}.')
  unknown = [p for p in m.primitives if p not in genotypes.PRIMITIVES]
  if unknown or not [p for p in m.primitives if p != 'none']:
    fail('model.primitives', f'must be ops of {genotypes.PRIMITIVES} (not only none), '
         f'got {tuple(m.primitives)}.')
  if m.multiplier > m.steps:
    fail('model.multiplier', f'= {m.multiplier} cannot exceed model.steps = {m.steps}.')
  if o.order not in (1, 2):
    fail('optim.order', f'must be 1 (first order) or 2 (second order), got {o.order}.')
  if not 0 < d.train_portion < 1:
    fail('data.train_portion', f'must be in (0, 1), got {d.train_portion}.')
  if o.arch_warmup_epochs < 0 or o.warmup_epochs < 0:
    fail('optim.arch_warmup_epochs', 'and optim.warmup_epochs must be >= 0.')
  if o.learning_rate <= 0 or o.arch_learning_rate < 0:
    fail('optim.learning_rate', 'must be positive (and optim.arch_learning_rate >= 0).')
  parallel.check_config(config, fail)


def check_data(config: ml_collections.ConfigDict, split: str = 'train') -> None:
  """Checks that the split's data is there (DatasetNotFoundError / DataFileError), a bad
  data.* field becoming a ConfigError; cheap, so it runs before any compute."""
  try:
    data_lib.check_dataset(config.data, split=split)
  except (data_lib.DatasetNotFoundError, data_lib.DataFileError):
    raise
  except ValueError as e:
    raise ConfigError(str(e)) from e


# ----------------------------------------------------------------------------- model


def build_model(config: ml_collections.ConfigDict, num_classes: int,
                num_devices: int = 1) -> nn.Module:
  """The supernet; ``num_devices`` is the mesh size, used by per-device BatchNorm."""
  m = config.model
  per_device = config.parallel.batch_norm == 'per_device'
  return darts.SEARCH_SPACES[config.space](
      num_classes=num_classes, C=m.C, layers=m.layers, steps=m.steps, multiplier=m.multiplier,
      stem_multiplier=m.stem_multiplier, stem=m.stem, k=m.k, sampling=m.channel_sampling,
      edge_normalization=m.edge_normalization, primitives=tuple(m.primitives),
      impl=m.depthwise_impl, remat=m.remat, bn_groups=num_devices if per_device else 1)


def lr_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int):
  """The reference's per-epoch schedule: linear warm-up, then cosine to the minimum."""
  o = config.optim

  def schedule(count):
    epoch = (count // steps_per_epoch).astype(jnp.float32)
    cosine = o.learning_rate_min + 0.5 * (o.learning_rate - o.learning_rate_min) * (
        1 + jnp.cos(jnp.pi * epoch / o.epochs))
    if o.warmup_epochs:
      warm = o.learning_rate * (epoch + 1) / o.warmup_epochs
      return jnp.where(epoch < o.warmup_epochs, warm, cosine)
    return cosine

  return schedule


def make_optimizers(config, steps_per_epoch):
  """SGD with momentum for the weights; Adam for the architecture (coupled L2 on both,
  as torch.optim's weight_decay; clipping before the decay, as the reference)."""
  o = config.optim
  weight_tx = optax.chain(
      optax.clip_by_global_norm(o.grad_clip) if o.grad_clip > 0 else optax.identity(),
      optax.add_decayed_weights(o.weight_decay),
      optax.sgd(lr_schedule(config, steps_per_epoch), momentum=o.momentum))
  arch_tx = optax.chain(
      optax.clip_by_global_norm(o.arch_grad_clip) if o.arch_grad_clip > 0 else optax.identity(),
      optax.add_decayed_weights(o.arch_weight_decay),
      optax.adam(o.arch_learning_rate, b1=o.arch_betas[0], b2=o.arch_betas[1], eps=1e-8))
  return weight_tx, arch_tx


def init_keys(seed: int, impl: str = 'unsafe_rbg') -> tuple[jax.Array, jax.Array]:
  """(initialization key, the run's raw key) from the seed; both pure functions of it.

  The initialization key is an 'unsafe_rbg' key by default. Flax derives each
  parameter's key from it with one ``fold_in`` of a hash of the parameter's path, then
  draws the values with ``rng_bit_generator``. For threefry and 'rbg' keys that
  ``fold_in`` is a threefry hash, which XLA:CPU compiles as a loop per parameter (the
  CIFAR-10 supernet's init then takes about 45 s to compile and run on a 2-core CPU); for
  'unsafe_rbg' it is an XOR with bits drawn from the path's hash (about 22 s). Its weaker
  guarantee, for keys split or folded from one another many times over, does not arise
  here: every path is folded in once, into the one key.
  """
  init_key, run_key = jax.random.split(jax.random.PRNGKey(seed))
  seed_bits = jax.random.randint(init_key, (), 0, 2**31 - 1)
  return jax.random.key(seed_bits, impl=impl), run_key


def create_state(model, input_shape, weight_tx, arch_tx, seed: int,
                 mesh: jax.sharding.Mesh | None = None) -> SearchState:
  """The initial state, a pure function of ``seed``; replicated over ``mesh`` if given."""
  rbg, run_key = init_keys(seed)
  x = jnp.zeros((1,) + tuple(input_shape), jnp.float32)

  def init(rbg_key):
    variables = model.init({'params': rbg_key, 'channels': rbg_key}, x, train=True)
    params, arch = variables['params'], variables['arch']
    return SearchState(
        step=jnp.zeros((), jnp.int32), params=params,
        batch_stats=variables.get('batch_stats', {}), arch=arch,
        weight_opt_state=weight_tx.init(params), arch_opt_state=arch_tx.init(arch),
        key=run_key)

  # Created in place on every device of the mesh (no host round trip).
  shardings = {'out_shardings': parallel.replicated(mesh)} if mesh else {}
  return jax.jit(init, **shardings)(rbg)


# ----------------------------------------------------------------------------- steps


def _loss_fn(model, params, arch, batch_stats, batch, key):
  logits, updates = model.apply(
      {'params': params, 'arch': arch, 'batch_stats': batch_stats}, batch['image'],
      train=True, rngs={'channels': key}, mutable=['batch_stats'])
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()
  acc = jnp.mean(jnp.argmax(logits, -1) == batch['label'])
  return loss, (updates['batch_stats'], acc)


def unrolled_arch_grad(loss_fn, params, arch, batch_stats, train_batch, val_batch,
                       momentum_buffer, lr, momentum, weight_decay, keys):
  """Exact second-order DARTS hypergradient (Liu et al. 2019, eq. 6-7):
  d/d(alpha) L_val(w'(alpha), alpha) with w' = w - lr * (momentum * m + dL_train/dw + wd * w),
  the reference's unrolled SGD step. Autodiff through the inner gradient gives the
  Hessian-vector products exactly instead of by finite differences."""
  k_train, k_val = keys

  def val_loss(arch):
    grads = jax.grad(lambda p: loss_fn(p, arch, batch_stats, train_batch, k_train)[0])(params)
    unrolled = jax.tree.map(lambda w, g, m: w - lr * (momentum * m + g + weight_decay * w),
                            params, grads, momentum_buffer)
    return loss_fn(unrolled, arch, batch_stats, val_batch, k_val)

  return jax.value_and_grad(val_loss, has_aux=True)(arch)


def make_phase_steps(model, weight_tx, arch_tx, config, steps_per_epoch):
  """(arch_step, weight_step): the two halves of a search step, as pure functions.

  arch_step(state, train_batch, val_batch, keys) -> (state, loss, acc) changes only the
  arch params, their optimizer state and BN statistics; weight_step(state, batch, key) ->
  (state, metrics) changes only the weights, their optimizer state and BN statistics.
  """
  o = config.optim
  schedule = lr_schedule(config, steps_per_epoch)
  loss_fn = functools.partial(_loss_fn, model)

  def arch_step(state, train_batch, val_batch, keys):
    if o.order == 2:
      buffer = optax.tree_utils.tree_get(state.weight_opt_state, 'trace')
      (loss, (bs, acc)), grads = unrolled_arch_grad(
          loss_fn, state.params, state.arch, state.batch_stats, train_batch, val_batch,
          buffer, schedule(state.step), o.momentum, o.weight_decay, keys)
    else:
      (loss, (bs, acc)), grads = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)(
          state.params, state.arch, state.batch_stats, val_batch, keys[1])
    updates, opt_state = arch_tx.update(grads, state.arch_opt_state, state.arch)
    state = state.replace(arch=optax.apply_updates(state.arch, updates),
                          arch_opt_state=opt_state, batch_stats=bs)
    return state, loss, acc

  def weight_step(state, batch, key):
    (loss, (bs, acc)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.arch, state.batch_stats, batch, key)
    updates, opt_state = weight_tx.update(grads, state.weight_opt_state, state.params)
    state = state.replace(params=optax.apply_updates(state.params, updates),
                          weight_opt_state=opt_state, batch_stats=bs)
    return state, {'train_loss': loss, 'train_acc': acc, 'grad_norm': optax.tree.norm(grads),
                   'lr': schedule(state.step)}

  return arch_step, weight_step


def arch_start_step(config, steps_per_epoch: int) -> int:
  """The first step whose arch phase runs (after ``arch_warmup_epochs``)."""
  return config.optim.arch_warmup_epochs * steps_per_epoch


def make_search_phases(model, weight_tx, arch_tx, config, steps_per_epoch):
  """(arch_phase, weight_phase): a search step's two halves as functions of
  ``(state, train_batch, val_batch)`` returning ``(state, metrics)``, each a program of
  its own. The arch phase updates the arch params on the val batch (``lax.cond`` skips
  its compute during the warm-up); the weight phase then updates the weights on the train
  batch and advances ``state.step``. Both draw their keys from ``state.key`` and
  ``state.step``, so running them one after the other is ``make_search_step``."""
  arch_start = arch_start_step(config, steps_per_epoch)
  arch_step, weight_step = make_phase_steps(model, weight_tx, arch_tx, config, steps_per_epoch)

  def keys(state):  # (arch train, arch val, weight)
    return jax.random.split(jax.random.fold_in(state.key, state.step), 3)

  def skip_arch(state, train_batch, val_batch, keys):
    nan = jnp.full((), jnp.nan, jnp.float32)
    return state, nan, nan

  def arch_phase(state: SearchState, train_batch, val_batch):
    k_train, k_val, _ = keys(state)
    state, val_loss, val_acc = jax.lax.cond(
        state.step >= arch_start, arch_step, skip_arch, state, train_batch, val_batch,
        (k_train, k_val))
    return state, {'val_loss': val_loss, 'val_acc': val_acc}

  def weight_phase(state: SearchState, train_batch, val_batch):
    del val_batch  # the same signature as arch_phase
    state, metrics = weight_step(state, train_batch, keys(state)[2])
    return state.replace(step=state.step + 1), metrics

  return arch_phase, weight_phase


def make_search_step(model, weight_tx, arch_tx, config, steps_per_epoch):
  """The bilevel step as one function: arch update on the val batch, then weight update."""
  phases = PhasedStep(make_search_phases(model, weight_tx, arch_tx, config, steps_per_epoch))

  def step(state: SearchState, train_batch, val_batch):
    return phases(state, train_batch, val_batch)

  return step


class PhasedStep:
  """Runs ``phases`` (functions or compiled programs of ``(state, train_batch,
  val_batch)`` returning ``(state, metrics)``) one after the other: one search step."""

  def __init__(self, phases):
    self.phases = tuple(phases)

  def __call__(self, state, train_batch, val_batch):
    metrics = {}
    for phase in self.phases:
      state, phase_metrics = phase(state, train_batch, val_batch)
      metrics.update(phase_metrics)
    return state, metrics


def make_eval_step(model):
  """Supernet accuracy with BN running statistics (the reference's ``infer``)."""

  def eval_step(state: SearchState, batch):
    logits = model.apply(
        {'params': state.params, 'arch': state.arch, 'batch_stats': state.batch_stats},
        batch['image'], train=False, rngs={'channels': state.key})
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label'])
    correct = jnp.argmax(logits, -1) == batch['label']
    mask = batch['mask']
    return {'loss': jnp.sum(loss * mask), 'correct': jnp.sum(correct * mask),
            'count': jnp.sum(mask)}

  return eval_step


def jit_search_step(step, mesh: jax.sharding.Mesh):
  """``step(state, train_batch, val_batch)`` (a search step or one of its phases) jitted
  for ``mesh``: the state replicated and donated, the batches split over the ``data``
  axis (a global batch, so BN statistics and gradients are those of the whole batch)."""
  rep, rows = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  return jax.jit(step, in_shardings=(rep, rows, rows), out_shardings=(rep, rep),
                 donate_argnums=0, compiler_options=parallel.compiler_options(mesh))


def compile_search_step(model, weight_tx, arch_tx, config, steps_per_epoch,
                        mesh: jax.sharding.Mesh, state, train_batch, val_batch,
                        *more_jobs):
  """The search step compiled for ``mesh`` as two programs, its arch phase and its weight
  phase, followed by the ``(jitted, args)`` jobs in ``more_jobs``; returns the step (a
  ``PhasedStep`` of the two executables, which computes what
  ``jit_search_step(make_search_step(...))`` computes) and then the executables of
  ``more_jobs``, all compiled by ``compile_all`` as ``config.compile_mode`` says.

  Each phase is about half the one-program step. Compiled side by side
  ('concurrent') they are ready sooner on a host with two cores or more, as XLA
  compiles a program mostly on one core; one at a time, the host memory of compiling,
  of writing the programs to the persistent compilation cache and of loading them from
  it stays at or below that of the one program (on a 2-core CPU for the batch-64
  PC-DARTS step with its depthwise convs as XLA ops: 3.4-3.5, 3.8-4.0 and 3.3 GB peak
  RSS against 3.5-3.6, 4.6 and 4.2 GB)."""
  phases = make_search_phases(model, weight_tx, arch_tx, config, steps_per_epoch)
  compiled = compile_all(
      *[(jit_search_step(phase, mesh), (state, train_batch, val_batch)) for phase in phases],
      *more_jobs, concurrent=concurrent_compile(config.compile_mode))
  return (PhasedStep(compiled[:2]), *compiled[2:])


def concurrent_compile(mode: str) -> bool:
  """Whether ``config.compile_mode`` compiles side by side: 'auto' does except on the
  CPU backend, where the compilers' host memory sets the search's peak."""
  return mode == 'concurrent' or (mode == 'auto' and jax.default_backend() != 'cpu')


def compile_all(*jobs, concurrent: bool = True):
  """Compiles each ``(jitted, args)`` job; returns the executables in order.

  The jobs are lowered one after another on this thread (tracing holds the GIL), and
  each lowered program is handed at once to a compiling thread, so XLA compiles while
  the next job is traced: with ``concurrent`` each job has a thread of its own and the
  compilations run side by side, on as many cores; without, one thread compiles them in
  turn and holds one compilation's working memory at a time."""
  with futures.ThreadPoolExecutor(max_workers=len(jobs) if concurrent else 1) as pool:
    pending = [pool.submit(jitted.lower(*args).compile) for jitted, args in jobs]
    return [job.result() for job in pending]


def jit_eval_step(eval_step, mesh: jax.sharding.Mesh):
  """``eval_step(state, batch)`` jitted for ``mesh``; its sums come back replicated."""
  rep, rows = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  return jax.jit(eval_step, in_shardings=(rep, rows), out_shardings=rep,
                 compiler_options=parallel.compiler_options(mesh))


def sum_over_batches(eval_step, dataset, indices, batch_size,
                     mesh: jax.sharding.Mesh | None = None) -> dict[str, float]:
  """Sums each output of ``eval_step(batch)`` over masked eval batches of ``indices``,
  each split over ``mesh`` if given (``batch_size`` must then divide by it)."""
  totals = {}
  for batch in data_lib.eval_batches(dataset, indices, batch_size, jax.process_index(),
                                     jax.process_count()):
    if mesh is not None:
      batch = parallel.shard_batch(batch, mesh)
    for k, v in jax.device_get(eval_step(batch)).items():
      totals[k] = totals.get(k, 0.0) + float(v)
  return totals


def evaluate(eval_step, state, dataset, indices, batch_size, mesh: jax.sharding.Mesh):
  """Masked loss and accuracy over ``indices``; ``batch_size`` must divide by the mesh."""
  totals = sum_over_batches(lambda batch: eval_step(state, batch), dataset, indices,
                            batch_size, mesh)
  n = max(totals['count'], 1.0)
  return {'loss': totals['loss'] / n, 'accuracy': totals['correct'] / n}


# ----------------------------------------------------------------------------- outputs


def arch_arrays(state: SearchState) -> dict[str, np.ndarray]:
  return {k: np.asarray(v) for k, v in jax.device_get(state.arch).items()}


def write_genotype_outputs(workdir, genotype, arch, **extra):
  genotypes.save(genotype, os.path.join(workdir, genotypes.GENOTYPE_FILE),
                 **{k: v.tolist() for k, v in arch.items()}, **extra)
  np.savez(os.path.join(workdir, 'arch.npz'), **arch)
  visualize.save_genotype_svg(genotype, os.path.join(workdir, 'cells.svg'))
  visualize.save_genotype_png(genotype, os.path.join(workdir, 'cells.png'))


def setup_compilation_cache(path: str) -> None:
  if not path:
    return
  jax.config.update('jax_compilation_cache_dir', os.path.expanduser(path))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


@jax.jit
def all_finite(tree) -> jax.Array:
  """True if every leaf of ``tree`` is free of NaN and inf."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def save_if_finite(manager, step: int, state, checked, what: str, workdir: str) -> None:
  """Checkpoints ``state`` unless ``checked`` (part of it) holds NaN or inf, which raises
  NonFiniteLossError instead: a good checkpoint is never replaced by a bad one."""
  if not bool(all_finite(checked)):
    raise NonFiniteLossError(
        f'The {what} became NaN/inf at step {step}; stopped without saving, so the last '
        f'checkpoint in {workdir} is the last good state.')
  ckpt_lib.save(manager, step, state)


# ----------------------------------------------------------------------------- loop


def run_search(config: ml_collections.ConfigDict, workdir: str,
               stop_at_step: int | None = None) -> dict:
  """Runs (or resumes) a search in ``workdir``; returns its final summary.

  ``stop_at_step`` ends the run after that step, as if it were interrupted there (the
  next call resumes from the last checkpoint); for notebooks and tests.
  """
  parallel.maybe_initialize_distributed(config)  # before anything touches the devices
  host_memory.map_large_allocations()  # a lower compile-time peak of host memory
  # --- checks: every user error surfaces here, before data loading or compilation.
  validate_config(config)
  check_data(config)
  os.makedirs(workdir, exist_ok=True)
  ckpt_lib.check_workdir_config(workdir, config)
  model_summary = summary_lib.supernet_summary(config, build_model)
  summary_lib.write_summary(workdir, {'model': model_summary})
  print(summary_lib.format_summary(model_summary), flush=True)
  setup_compilation_cache(config.compilation_cache_dir)
  o = config.optim

  # --- data: each process reads its rows of every global batch; the mesh splits them.
  t_start = time.perf_counter()
  mesh = parallel.make_mesh(config.parallel.num_devices)
  dataset = data_lib.load_dataset(config.data, split='train')
  weight_idx, arch_idx = data_lib.search_split(
      dataset, config.data.train_portion, seed=config.seed,
      per_class_fractions=config.data.per_class_fractions)
  batches = data_lib.SearchBatches(dataset, weight_idx, arch_idx, o.batch_size, config.seed,
                                   augment=config.data.augment,
                                   crop_padding=config.data.crop_padding,
                                   process_index=jax.process_index(),
                                   process_count=jax.process_count())
  steps_per_epoch = batches.steps_per_epoch
  if o.steps_per_epoch:
    steps_per_epoch = min(steps_per_epoch, o.steps_per_epoch)
  total_steps = o.epochs * steps_per_epoch
  eval_idx = arch_idx[:config.eval_max_examples] if config.eval_max_examples else arch_idx
  # Masked padding rows make every eval batch split evenly over the devices.
  eval_batch_size = parallel.padded_batch_size(config.eval_batch_size, mesh.size)
  logging.info('data: %d weight / %d arch examples of %s, %d steps/epoch', len(weight_idx),
               len(arch_idx), dataset.name, steps_per_epoch)

  # --- model and state
  model = build_model(config, dataset.num_classes, mesh.size)
  weight_tx, arch_tx = make_optimizers(config, steps_per_epoch)
  state = create_state(model, dataset.image_shape, weight_tx, arch_tx, config.seed, mesh)
  host_memory.release_host_memory()
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  logging.info('supernet: %.3fM weights, arch params %s', n_params / 1e6,
               {k: v.shape for k, v in state.arch.items()})

  # --- checkpoint: resume where the last run stopped (on any device count: restored
  # onto this run's mesh).
  manager = ckpt_lib.manager(workdir, config.checkpoints_to_keep)
  state, resumed = ckpt_lib.restore_latest(manager, state)
  start_step = int(state.step)
  if resumed:
    print(f'Resuming from step {start_step} in {workdir}.', flush=True)
  ckpt_lib.write_config(workdir, config)

  # --- compile (reported; a persistent cache hit makes this fast): the search step's two
  # programs and the eval step's, side by side or in turn (config.compile_mode).
  train0, val0 = (parallel.shard_batch(b, mesh) for b in batches.batch(0))
  eval0 = next(iter(data_lib.eval_batches(dataset, eval_idx[:1], eval_batch_size,
                                          jax.process_index(), jax.process_count())))
  t_compile = time.perf_counter()
  step_fn, eval_fn = compile_search_step(
      model, weight_tx, arch_tx, config, steps_per_epoch, mesh, state, train0, val0,
      (jit_eval_step(make_eval_step(model), mesh), (state, parallel.shard_batch(eval0, mesh))))
  compile_s = time.perf_counter() - t_compile
  host_memory.release_host_memory()
  host_memory.reuse_freed_allocations()
  print(f'Compiled the search step and the eval step in '
        f'{compile_s:.1f} s for {mesh.size} device(s) (setup '
        f'{time.perf_counter() - t_start:.1f} s).', flush=True)

  arch_start = arch_start_step(config, steps_per_epoch)
  progress = metrics_lib.Progress(total_steps, steps_per_epoch, start_step)
  images = 0  # processed by this run: a weight batch per step, plus an arch batch after warm-up
  derive = functools.partial(darts.derive_genotype, steps=config.model.steps,
                             primitives=tuple(config.model.primitives))
  summary = {}

  # --- loop
  epoch_sums, epoch_t0 = {}, time.perf_counter()
  with metrics_lib.MetricWriter(workdir) as writer, \
       batches.iterate(start_step, total_steps - start_step) as stream:
    writer.write(start_step, {'compile_s': compile_s}, kind='compile')
    for step in range(start_step + 1, total_steps + 1):
      if stop_at_step is not None and step > stop_at_step:
        return {'stopped_at_step': step - 1}
      train_batch, val_batch = (parallel.shard_batch(b, mesh) for b in next(stream))
      state, metrics = step_fn(state, train_batch, val_batch)
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      images += o.batch_size * (2 if step > arch_start else 1)
      if not np.isfinite(metrics['train_loss']) or (
          step > arch_start and not np.isfinite(metrics['val_loss'])):
        raise NonFiniteLossError(
            f'The loss became {metrics["train_loss"]} (arch batch {metrics["val_loss"]}) at '
            f'step {step}; stopped without saving, so the last checkpoint in {workdir} is the '
            'last good state. Lower optim.learning_rate or optim.arch_learning_rate.')
      for k, v in metrics.items():
        if np.isfinite(v):
          epoch_sums.setdefault(k, []).append(v)
      if step % config.log_every_steps == 0 or step == total_steps:
        rate = progress.images_per_s(images)
        progress.line(step, metrics, rate)
        writer.write(step, {**{k: v for k, v in metrics.items() if np.isfinite(v)},
                            'images_per_s': rate})

      epoch_end = step % steps_per_epoch == 0
      if epoch_end:
        epoch = step // steps_per_epoch
        arch = arch_arrays(state)
        genotype = derive(arch)
        held_out = evaluate(eval_fn, state, dataset, eval_idx, eval_batch_size, mesh)
        epoch_time = time.perf_counter() - epoch_t0
        means = {k: float(np.mean(v)) for k, v in epoch_sums.items()}
        summary = {'epoch': epoch, 'step': step, 'train_loss': means['train_loss'],
                   'train_acc': means['train_acc'], 'arch_split_loss': held_out['loss'],
                   'arch_split_acc': held_out['accuracy'], 'epoch_time_s': epoch_time}
        writer.write(step, {k: v for k, v in summary.items() if k != 'step'}, kind='epoch')
        with open(os.path.join(workdir, 'genotypes.jsonl'), 'a') as f:
          f.write(json.dumps({'epoch': epoch, 'step': step, **genotypes.to_json(genotype),
                              **{k: v.tolist() for k, v in arch.items()}}) + '\n')
        print(f'== epoch {epoch}/{o.epochs}: train loss {means["train_loss"]:.4f} '
              f'acc {100 * means["train_acc"]:.2f}% | supernet on held-out arch split: loss '
              f'{held_out["loss"]:.4f} acc {100 * held_out["accuracy"]:.2f}% | '
              f'{metrics_lib.format_seconds(epoch_time)}\n   genotype '
              f'{genotypes.format_genotype(genotype)}', flush=True)
        epoch_sums, epoch_t0 = {}, time.perf_counter()
      if epoch_end or step % config.checkpoint_every_steps == 0:
        save_if_finite(manager, step, state, (state.params, state.arch),
                       'weights or arch params', workdir)

  manager.wait_until_finished()
  arch = arch_arrays(state)
  genotype = derive(arch)
  result = {'method': config.method, 'dataset': dataset.name, 'steps': total_steps,
            'compile_s': compile_s, 'wall_s': time.perf_counter() - t_start,
            'degenerate': genotypes.is_degenerate(genotype), **summary}
  write_genotype_outputs(workdir, genotype, arch, **result)
  summary_lib.write_summary(workdir, {'model': model_summary, 'result': {
      **result, 'genotype': genotypes.to_json(genotype)}})
  print(f'Search done: genotype written to {os.path.join(workdir, genotypes.GENOTYPE_FILE)}, '
        f'cells pictured in {os.path.join(workdir, "cells.svg")}.\n   '
        f'{genotypes.format_genotype(genotype)}', flush=True)
  return {**result, 'genotype': genotype}
