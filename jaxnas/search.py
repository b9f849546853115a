"""The search loop, shared by every method (jaxnas/methods/).

``run_search`` reads the data, builds the method's model and state, compiles its step
(one program per phase) and its held-out evaluation, and runs the steps with progress,
metrics, checkpoints (a search resumes where it stopped), a stop on NaN and the final
outputs. What a step computes and how the final architecture is derived belong to the
method named by ``config.method``.
"""

import functools
import json
import os
import time

from absl import logging
import jax
import ml_collections
import numpy as np

from jaxnas import checkpoint as ckpt_lib
from jaxnas import common
from jaxnas import data as data_lib
from jaxnas import files
from jaxnas import host_memory
from jaxnas import methods as methods_lib
from jaxnas import metrics as metrics_lib
from jaxnas import parallel
from jaxnas import spaces
from jaxnas import summary as summary_lib
from jaxnas.methods import base

COMPILE_MODES = ('auto', 'concurrent', 'sequential')

ConfigError = common.ConfigError
NonFiniteLossError = common.NonFiniteLossError
SearchState = base.SearchState
check_data = common.check_data
setup_compilation_cache = common.setup_compilation_cache
concurrent_compile = common.concurrent_compile
compile_all = common.compile_all


# ----------------------------------------------------------------------------- config


def method_of(config) -> base.Method:
  """The method ``config.method`` names (ConfigError if none)."""
  try:
    return methods_lib.get(config.method)
  except KeyError:
    raise ConfigError(f'config.method is {config.method!r}; choose one of '
                      f'{tuple(methods_lib.METHODS)}.') from None


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the field, before any data is read or code compiled."""

  def fail(field, msg):
    raise ConfigError(f'config.{field} {msg}')

  method = method_of(config)
  if method.own_loop:  # one-stage methods (AtomNAS) check their own fields
    method.validate(config, fail)
    return
  if config.space not in spaces.SEARCH_SPACES:
    fail('space', f'is {config.space!r}; choose one of {tuple(spaces.SEARCH_SPACES)}.')
  if config.compile_mode not in COMPILE_MODES:
    fail('compile_mode', f'is {config.compile_mode!r}; choose one of {COMPILE_MODES}.')
  base.positive_fields(config, fail, 'optim.epochs', 'optim.batch_size', 'eval_batch_size',
                       'log_every_steps', 'checkpoint_every_steps')
  o, d = config.optim, config.data
  if o.steps_per_epoch < 0:
    fail('optim.steps_per_epoch', f'must be >= 0 (0: a full pass), got {o.steps_per_epoch}.')
  if not 0 < d.train_portion < 1:
    fail('data.train_portion', f'must be in (0, 1), got {d.train_portion}.')
  method.validate(config, fail)
  parallel.check_config(config, fail)


# ----------------------------------------------------------------------------- model and step
# The method's parts by config (what the loop, the benchmark and the tests call).


def build_model(config, num_classes: int, num_devices: int = 1):
  """The method's model; ``num_devices`` is the mesh size, for per-device BatchNorm."""
  return method_of(config).build_model(config, num_classes, num_devices)


def make_optimizers(config, steps_per_epoch: int):
  return method_of(config).make_optimizers(config, steps_per_epoch)


def create_state(model, input_shape, weight_tx, arch_tx, seed: int,
                 mesh: jax.sharding.Mesh | None = None) -> SearchState:
  """The initial state of a supernet with an ``arch`` collection (DARTS, PC-DARTS), a
  pure function of ``seed``; replicated over ``mesh`` if given."""
  return base.create_state(model, input_shape, weight_tx, arch_tx, seed, mesh)


def make_search_phases(model, weight_tx, arch_tx, config, steps_per_epoch):
  """The method's phases, each a function of ``(state, train_batch, val_batch)``
  returning ``(state, metrics)``; run in order they are one search step."""
  return method_of(config).make_phases(model, weight_tx, arch_tx, config, steps_per_epoch)


def make_search_step(model, weight_tx, arch_tx, config, steps_per_epoch):
  """The search step as one function of ``(state, train_batch, val_batch)``."""
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


def make_eval_step(model, config=None):
  """Held-out masked sums of the method (supernet accuracy with BN running statistics
  for DARTS and PC-DARTS)."""
  if config is None:
    return base.make_eval_step(model)
  return method_of(config).make_eval_step(model, config)


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
  """The search step compiled for ``mesh``, one program per phase of the method,
  followed by the ``(jitted, args)`` jobs in ``more_jobs``; returns the step (a
  ``PhasedStep`` of the phases' executables, which computes what
  ``jit_search_step(make_search_step(...))`` computes) and then the executables of
  ``more_jobs``, all compiled by ``compile_all`` as ``config.compile_mode`` says.

  Each phase of a DARTS step is about half the one-program step. Compiled side by
  side ('concurrent') they are ready sooner on a host with two cores or more, as XLA
  compiles a program mostly on one core; one at a time, the host memory of compiling,
  of writing the programs to the persistent compilation cache and of loading them from
  it stays at or below that of the one program (on a 2-core CPU for the batch-64
  PC-DARTS step with its depthwise convs as XLA ops: 3.4-3.5, 3.8-4.0 and 3.3 GB peak
  RSS against 3.5-3.6, 4.6 and 4.2 GB)."""
  phases = make_search_phases(model, weight_tx, arch_tx, config, steps_per_epoch)
  compiled = compile_all(
      *[(jit_search_step(phase, mesh), (state, train_batch, val_batch)) for phase in phases],
      *more_jobs, concurrent=concurrent_compile(config.compile_mode))
  return (PhasedStep(compiled[:len(phases)]), *compiled[len(phases):])


def jit_eval_step(eval_step, mesh: jax.sharding.Mesh):
  """``eval_step(state, batch)`` jitted for ``mesh``; its sums come back replicated."""
  rep, rows = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  return jax.jit(eval_step, in_shardings=(rep, rows), out_shardings=rep,
                 compiler_options=parallel.compiler_options(mesh))


def evaluate(eval_step, state, dataset, indices, batch_size, mesh: jax.sharding.Mesh):
  """Masked loss and accuracy over ``indices``; ``batch_size`` must divide by the mesh."""
  totals = common.sum_over_batches(lambda batch: eval_step(state, batch), dataset, indices,
                                   batch_size, mesh)
  n = max(totals['count'], 1.0)
  return {'loss': totals['loss'] / n, 'accuracy': totals['correct'] / n}


def arch_arrays(state: SearchState) -> dict[str, np.ndarray]:
  return {k: np.asarray(v) for k, v in jax.device_get(state.arch).items()}


# ----------------------------------------------------------------------------- loop


def epoch_record(epoch: int, step: int, description: dict, arch) -> dict:
  """A line of ``genotypes.jsonl``: the architecture's description and the arch params
  side by side, or the description under ``architecture`` where a name is in both
  (UNAS's ProxylessNAS space: ``ops``)."""
  arrays = {k: np.asarray(v).tolist() for k, v in arch.items()}
  if set(description) & set(arrays):
    return {'epoch': epoch, 'step': step, 'architecture': description, **arrays}
  return {'epoch': epoch, 'step': step, **description, **arrays}


def run_search(config: ml_collections.ConfigDict, workdir: str,
               stop_at_step: int | None = None) -> dict:
  """Runs (or resumes) a search in ``workdir``; returns its final summary.

  ``stop_at_step`` ends the run after that step, as if it were interrupted there (the
  next call resumes from the last checkpoint); for notebooks and tests.
  """
  method = method_of(config)
  if method.own_loop:  # a one-stage method (AtomNAS) runs a loop of its own
    return method.run(config, workdir, stop_at_step)
  parallel.maybe_initialize_distributed(config, common.config_fail)  # before anything touches the devices
  host_memory.map_large_allocations()  # a lower compile-time peak of host memory
  # --- checks: every user error surfaces here, before data loading or compilation.
  validate_config(config)
  check_data(config)
  os.makedirs(workdir, exist_ok=True)
  ckpt_lib.lock_workdir(workdir)  # one run per workdir at a time
  ckpt_lib.check_workdir_config(workdir, config)
  model_summary = method.summary(config)
  summary_lib.write_summary(workdir, {'model': model_summary})
  print(method.format_summary(model_summary), flush=True)
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
                                   process_count=jax.process_count(),
                                   cycle_arch=method.cycle_arch_split)
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
  model = method.build_model(config, dataset.num_classes, mesh.size)
  weight_tx, arch_tx = method.make_optimizers(config, steps_per_epoch)
  state = method.create_state(model, dataset.image_shape, weight_tx, arch_tx, config, mesh)
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
  metrics_lib.drop_after(os.path.join(workdir, 'genotypes.jsonl'), start_step)
  ckpt_lib.write_config(workdir, config)
  # The method's own preparation (UNAS: a latency model measured on this backend); the
  # config it returns differs from the workdir's only in fields the method resolved.
  train0, val0 = (parallel.shard_batch(b, mesh) for b in batches.batch(0))
  config = method.prepare(config, workdir, model, state, train0, mesh)

  # --- compile (reported; a persistent cache hit makes this fast): the search step's two
  # programs and the eval step's, side by side or in turn (config.compile_mode).
  eval0 = next(iter(data_lib.eval_batches(dataset, eval_idx[:1], eval_batch_size,
                                          jax.process_index(), jax.process_count())))
  t_compile = time.perf_counter()
  step_fn, eval_fn = compile_search_step(
      model, weight_tx, arch_tx, config, steps_per_epoch, mesh, state, train0, val0,
      (jit_eval_step(method.make_eval_step(model, config), mesh), (state, parallel.shard_batch(eval0, mesh))))
  compile_s = time.perf_counter() - t_compile
  host_memory.release_host_memory()
  host_memory.reuse_freed_allocations()
  print(f'Compiled the search step and the eval step in '
        f'{compile_s:.1f} s for {mesh.size} device(s) (setup '
        f'{time.perf_counter() - t_start:.1f} s).', flush=True)

  progress = metrics_lib.Progress(total_steps, steps_per_epoch, start_step)
  images = 0  # processed by this run: a weight batch per step, plus an arch batch after warm-up
  summary = {}

  # --- loop
  epoch_sums, epoch_t0 = {}, time.perf_counter()
  with metrics_lib.MetricWriter(workdir, start_step) as writer, \
       batches.iterate(start_step, total_steps - start_step) as stream, \
       common.StopRequest() as stop:
    writer.write(start_step, {'compile_s': compile_s}, kind='compile')
    for step in range(start_step + 1, total_steps + 1):
      if stop_at_step is not None and step > stop_at_step:
        return {'stopped_at_step': step - 1}
      train_batch, val_batch = (parallel.shard_batch(b, mesh) for b in next(stream))
      state, metrics = step_fn(state, train_batch, val_batch)
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      arch_active = method.arch_active(config, step, steps_per_epoch)
      images += o.batch_size * (2 if arch_active else 1)
      if not np.isfinite(metrics['train_loss']) or (
          arch_active and not np.isfinite(metrics['val_loss'])):
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
        architecture = method.derive(config, arch)
        held_out = evaluate(eval_fn, state, dataset, eval_idx, eval_batch_size, mesh)
        epoch_time = time.perf_counter() - epoch_t0
        means = {k: float(np.mean(v)) for k, v in epoch_sums.items()}
        summary = {'epoch': epoch, 'step': step, 'train_loss': means['train_loss'],
                   'train_acc': means['train_acc'], 'arch_split_loss': held_out['loss'],
                   'arch_split_acc': held_out['accuracy'], 'epoch_time_s': epoch_time}
        writer.write(step, {k: v for k, v in summary.items() if k != 'step'}, kind='epoch')
        if files.is_writer():
          with open(os.path.join(workdir, 'genotypes.jsonl'), 'a') as f:
            f.write(json.dumps(epoch_record(epoch, step, method.to_json(architecture),
                                            arch)) + '\n')
        print(f'== epoch {epoch}/{o.epochs}: train loss {means["train_loss"]:.4f} '
              f'acc {100 * means["train_acc"]:.2f}% | supernet on held-out arch split: loss '
              f'{held_out["loss"]:.4f} acc {100 * held_out["accuracy"]:.2f}% | '
              f'{metrics_lib.format_seconds(epoch_time)}\n   genotype '
              f'{method.format(config, architecture)}', flush=True)
        epoch_sums, epoch_t0 = {}, time.perf_counter()
      save = functools.partial(common.save_if_finite, manager, step, state,
                               (state.params, state.arch), 'weights or arch params', workdir)
      if epoch_end or step % config.checkpoint_every_steps == 0:
        save()
      if stop.requested:  # SIGTERM / Ctrl-C: this step's checkpoint, then out
        return stop.finish(manager, step, workdir, save)

  manager.wait_until_finished()
  arch = arch_arrays(state)
  architecture = method.derive(config, arch)
  extra = method.finish(config, workdir, model, state, train0, architecture)
  result = {'method': config.method, 'dataset': dataset.name, 'steps': total_steps,
            'compile_s': compile_s, 'wall_s': time.perf_counter() - t_start,
            'degenerate': method.is_degenerate(config, architecture), **summary, **extra}
  written = method.write_outputs(workdir, config, architecture, arch, **result)
  summary_lib.write_summary(workdir, {'model': model_summary, 'result': {
      **result, 'genotype': method.to_json(architecture)}})
  print(f'Search done: {written}.\n   {method.format(config, architecture)}', flush=True)
  return {**result, 'genotype': architecture}
