"""Training a found architecture from scratch: the evaluation stage of every method.

``config.space`` picks the evaluation network (``jaxnas.spaces.EVAL_SPACES``): 'darts',
the genotype's cell stacked L times (``spaces/darts_eval.py``; DARTS, PC-DARTS, UNAS's
cell space) with an auxiliary head and drop path, or 'proxyless', one MBConv per layer
(``spaces/proxyless.py``; UNAS's ProxylessNAS space). It is trained on the whole train
split with SGD and evaluated on the test split (top-1 / top-5) after every epoch. With
``data.validation_examples`` N > 0 the last N images of the train split are held out
instead: the network trains on the others, is scored on those N after every epoch (what
'best' is chosen by), and meets the test split once, after the last step. The workdir
keeps the last checkpoints of the whole state (to resume) and two exported models,
``export/best`` (highest test top-1, the reference's "best", or highest validation top-1)
and ``export/last``, which ``jaxnas.load_model`` turns into a function from images to
logits.
"""

import functools
import json
import math
import os
import time
from typing import Any

from absl import logging
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxnas import checkpoint as ckpt_lib
from jaxnas import common
from jaxnas import data as data_lib
from jaxnas import export
from jaxnas import flops
from jaxnas import host_memory
from jaxnas import metrics as metrics_lib
from jaxnas import parallel
from jaxnas import summary as summary_lib
from jaxnas import spaces
from jaxnas.ops import depthwise

ConfigError = common.ConfigError
NonFiniteLossError = common.NonFiniteLossError
SCHEDULES = ('cosine', 'linear')


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  key: jax.Array  # raw uint32[2] key: drop path is drawn from fold_in(key, step)


# ----------------------------------------------------------------------------- config


def eval_space(config):
  """The adapter of ``config.space`` (``jaxnas.spaces.EVAL_SPACES``)."""
  if config.space not in spaces.EVAL_SPACES:
    raise ConfigError(f'config.space is {config.space!r}; the evaluation networks exist for '
                      f'{tuple(spaces.EVAL_SPACES)}.')
  return spaces.EVAL_SPACES[config.space]


def validate_config(config: ml_collections.ConfigDict):
  """Raises ConfigError naming the field (GenotypeError for a bad genotype or
  architecture) before any data is read or code compiled; returns the architecture to
  train (a DARTS genotype, or a ProxylessNAS op per layer)."""

  def fail(field, msg):
    raise ConfigError(f'config.{field} {msg}')

  m, o = config.model, config.optim
  space = eval_space(config)
  for field, value in (('optim.epochs', o.epochs), ('optim.batch_size', o.batch_size),
                       ('eval_batch_size', config.eval_batch_size),
                       ('log_every_steps', config.log_every_steps),
                       ('checkpoint_every_steps', config.checkpoint_every_steps)):
    if int(value) <= 0:
      fail(field, f'must be a positive integer, got {value}.')
  if config.data.name not in data_lib.DATASETS:
    fail('data.name', f'is {config.data.name!r}; choose one of {tuple(data_lib.DATASETS)}.')
  for field in ('C', 'layers'):
    if field in m and int(m[field]) <= 0:
      fail(f'model.{field}', f'must be a positive integer, got {m[field]}.')
  if m.depthwise_impl not in depthwise.IMPLS:
    fail('model.depthwise_impl', f'is {m.depthwise_impl!r}; choose one of {depthwise.IMPLS}.')
  space.validate(m, summary_lib.input_spec(config)[0], fail)
  if o.schedule not in SCHEDULES:
    fail('optim.schedule', f'is {o.schedule!r}; choose one of {SCHEDULES}.')
  if o.lr_timing not in ('jaxnas', 'reference'):
    fail('optim.lr_timing', f"is {o.lr_timing!r}; choose 'jaxnas' or 'reference'.")
  if o.learning_rate <= 0 or o.learning_rate_min < 0:
    fail('optim.learning_rate', 'must be positive (and optim.learning_rate_min >= 0).')
  if o.warmup_epochs < 0 or o.steps_per_epoch < 0:
    fail('optim.warmup_epochs', 'and optim.steps_per_epoch must be >= 0.')
  if not 0 <= o.label_smoothing < 1:
    fail('optim.label_smoothing', f'must be in [0, 1), got {o.label_smoothing}.')
  if config.data.cutout < 0:
    fail('data.cutout', f'must be >= 0 (0: off), got {config.data.cutout}.')
  if int(config.data.get('validation_examples', 0)) < 0:
    fail('data.validation_examples',
         f'must be >= 0 (0: no validation split), got {config.data.validation_examples}.')
  parallel.check_config(config, fail, batch_norm_modes=('sync',))  # per-device BN: search
  if not isinstance(config.genotype, str) or not config.genotype:
    fail('genotype', f'must name {space.sources}.')
  return space.load(config.genotype, m)


# ----------------------------------------------------------------------------- model


def build_model(config, genotype, num_classes: int, impl: str | None = None):
  """The evaluation network of ``genotype`` (the architecture) in ``config.space``."""
  return eval_space(config).build(config.model, genotype, num_classes, impl)


def _rngs(key):
  """The random streams of a training step: drop path (DARTS cells) and dropout."""
  return {'drop_path': key, 'dropout': key}


def model_summary(config, genotype) -> dict:
  """Parameter counts (auxiliary head excluded and included) and multiply-adds of one
  image, from the config alone: shapes are traced, nothing is run or compiled."""
  space = eval_space(config)
  shape, num_classes = summary_lib.input_spec(config)
  x = jnp.zeros((1,) + shape, jnp.float32)
  # The XLA depthwise conv shows up as a convolution in the trace, which is counted.
  model = build_model(config, genotype, num_classes, impl='xla')
  variables = jax.eval_shape(
      lambda: model.init({'params': jax.random.key(0), **_rngs(jax.random.key(0))}, x,
                         train=True))
  macs = flops.count_macs(lambda v, x: model.apply(v, x, train=False)[0], variables, x)
  m = config.model
  if space.name == 'darts':
    network = f'C={m.C}, {m.layers} cells'
  elif space.name == 'atomnas':
    network = f'{len(genotype.blocks)} blocks of atoms, {genotype.atoms()} atoms'
  else:
    network = f'width x{m.width_multiplier:g}, {sum(m.depths)} layers'
  return {
      'method': config.method, 'space': space.name, 'genotype_source': config.genotype,
      'genotype': space.to_json(genotype), 'architecture': space.format(m, genotype),
      'network': network, 'dataset': config.data.name,
      'input_shape': list(shape), 'num_classes': num_classes,
      **({'C': m.C, 'layers': m.layers} if space.name == 'darts' else {}),
      **space.count_params(variables['params']),
      'multiply_adds': macs,
  }


def format_summary(s: dict) -> str:
  """Two lines: the evaluation network's size and cost, and its architecture."""
  size = 'x'.join(map(str, s['input_shape']))
  aux = ''
  if s['params_with_auxiliary'] != s['params']:
    aux = f' ({s["params_with_auxiliary"] / 1e6:.3f}M with the auxiliary head)'
  return (f'Evaluation network of {s["genotype_source"]} on {s["dataset"]} {size}: '
          f'{s["network"]}, {s["params"] / 1e6:.3f}M params{aux}, '
          f'{s["multiply_adds"] / 1e6:.1f}M multiply-adds per image\n   {s["architecture"]}')


def lr_schedule(config, steps_per_epoch: int):
  """Per-epoch learning rate, as the reference sets it at each epoch's start.

  'cosine': cosine from learning_rate to learning_rate_min over the epochs (DARTS,
  PC-DARTS CIFAR); with ``optim.lr_timing`` 'reference' epoch e trains at the cosine's
  value at e + 1, as the reference's scheduler.step() at the top of each epoch sets it.
  'linear': PC-DARTS ImageNet's linear decay to 0, with a gentler slope over the last 5
  epochs (the reference sets it from the epoch itself: no shift). Both are multiplied by
  (epoch + 1) / warmup_epochs during the warm-up epochs.
  """
  o = config.optim
  E = o.epochs
  shift = 1 if o.get('lr_timing', 'jaxnas') == 'reference' else 0

  def schedule(count):
    epoch = (count // steps_per_epoch).astype(jnp.float32)
    if o.schedule == 'cosine':
      lr = o.learning_rate_min + 0.5 * (o.learning_rate - o.learning_rate_min) * (
          1 + jnp.cos(jnp.pi * (epoch + shift) / E))
    else:
      body = max(E - 5, 1)
      lr = jnp.where(E - epoch > 5, o.learning_rate * (body - epoch) / body,
                     o.learning_rate * (E - epoch) / (body * 5))
    if o.warmup_epochs:
      lr = jnp.where(epoch < o.warmup_epochs, lr * (epoch + 1) / o.warmup_epochs, lr)
    return lr

  return schedule


def batch_norm_mask(params):
  """False for a BatchNorm's scale and bias (the arrays of a dict that holds 'scale'),
  True for every other weight."""
  is_bn = 'scale' in params
  return {k: batch_norm_mask(v) if hasattr(v, 'items') else not is_bn
          for k, v in params.items()}


def make_optimizer(config, steps_per_epoch: int) -> optax.GradientTransformation:
  """SGD with (Nesterov) momentum; clipping, then coupled weight decay (on every weight,
  or, with ``optim.decay_batch_norm`` False, on all but the BatchNorms' scale and bias, as
  ProxylessNAS's 'bn' no-decay keys), as torch.optim.SGD after clip_grad_norm_."""
  o = config.optim
  mask = None if o.get('decay_batch_norm', True) else batch_norm_mask
  return optax.chain(
      optax.clip_by_global_norm(o.grad_clip) if o.grad_clip > 0 else optax.identity(),
      optax.add_decayed_weights(o.weight_decay, mask=mask),
      optax.sgd(lr_schedule(config, steps_per_epoch), momentum=o.momentum,
                nesterov=o.get('nesterov', False)))


def create_state(model, input_shape, tx, seed: int,
                 mesh: jax.sharding.Mesh | None = None) -> TrainState:
  # 'rbg' keys: the retraining results in the README were measured with them.
  rbg, run_key = common.init_keys(seed, impl='rbg')
  x = jnp.zeros((1,) + tuple(input_shape), jnp.float32)

  def init(rbg_key):
    variables = model.init({'params': rbg_key, **_rngs(rbg_key)}, x, train=True)
    params = variables['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get('batch_stats', {}), opt_state=tx.init(params),
                      key=run_key)

  shardings = {'out_shardings': parallel.replicated(mesh)} if mesh else {}
  return jax.jit(init, **shardings)(rbg)


# ----------------------------------------------------------------------------- steps


def cross_entropy(logits, labels, label_smoothing: float = 0.0):
  if label_smoothing:
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    return optax.softmax_cross_entropy(logits, targets).mean()
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def make_train_step(model, tx, config, steps_per_epoch: int):
  m, o = config.model, config.optim
  space = eval_space(config)
  schedule = lr_schedule(config, steps_per_epoch)

  def step(state: TrainState, batch):
    key = jax.random.fold_in(state.key, state.step)
    epoch = state.step // steps_per_epoch
    # DARTS ramps the drop-path rate linearly: rate * epoch / epochs.
    drop_rate = None
    if m.get('drop_path', 0.0) > 0:
      drop_rate = m.drop_path * epoch / o.epochs
    drop_kwargs = {'drop_rate': drop_rate} if space.drop_path else {}

    def loss_fn(params):
      (logits, aux_logits), updates = model.apply(
          {'params': params, 'batch_stats': state.batch_stats}, batch['image'], train=True,
          rngs=_rngs(key), mutable=['batch_stats'], **drop_kwargs)
      loss = cross_entropy(logits, batch['label'], o.label_smoothing)
      total = loss
      if aux_logits is not None:
        total = total + m.auxiliary_weight * cross_entropy(aux_logits, batch['label'],
                                                           o.label_smoothing)
      return total, (loss, logits, updates['batch_stats'])

    (total, (loss, logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(step=state.step + 1,
                              params=optax.apply_updates(state.params, updates),
                              batch_stats=batch_stats, opt_state=opt_state)
    metrics = {'train_loss': loss, 'train_total_loss': total,
               'train_acc': jnp.mean(jnp.argmax(logits, -1) == batch['label']),
               'lr': schedule(state.step), 'grad_norm': optax.tree.norm(grads),
               'drop_rate': 0.0 if drop_rate is None else drop_rate}
    return new_state, metrics

  return step


def topk_correct(logits, labels, k: int):
  """Per example: is the label among the k largest logits."""
  k = min(k, logits.shape[-1])
  _, top = jax.lax.top_k(logits, k)
  return jnp.any(top == labels[:, None], axis=-1)


def make_eval_step(model):

  def eval_step(params, batch_stats, batch):
    logits, _ = model.apply({'params': params, 'batch_stats': batch_stats}, batch['image'],
                            train=False)
    mask = batch['mask']
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label'])
    return {'loss': jnp.sum(loss * mask),
            'top1': jnp.sum(topk_correct(logits, batch['label'], 1) * mask),
            'top5': jnp.sum(topk_correct(logits, batch['label'], 5) * mask),
            'count': jnp.sum(mask)}

  return eval_step


def evaluate(eval_step, params, batch_stats, dataset, indices, batch_size,
             mesh: jax.sharding.Mesh | None = None) -> dict:
  """Masked loss, top-1 and top-5 over ``indices``; batches are split over ``mesh``."""
  totals = common.sum_over_batches(lambda batch: eval_step(params, batch_stats, batch),
                                   dataset, indices, batch_size, mesh)
  n = max(totals['count'], 1.0)
  return {'loss': totals['loss'] / n, 'top1': totals['top1'] / n, 'top5': totals['top5'] / n,
          'examples': int(totals['count'])}


def _read_best(workdir: str, key: str = 'test_top1') -> float:
  """``key`` (test_top1 or val_top1) of the exported best model, -1 if there is none (a
  fresh run)."""
  path = os.path.join(workdir, export.EXPORT_DIR, 'best', export.MODEL_FILE)
  try:
    with open(path) as f:
      return float(json.load(f)[key])
  except (OSError, ValueError, KeyError):
    return -1.0


# ----------------------------------------------------------------------------- loop


def split_train(config, num_train: int):
  """(train indices, validation indices) of the train split: the last
  ``data.validation_examples`` images are the validation split (none when it is 0)."""
  n_val = int(config.data.get('validation_examples', 0))
  if n_val >= num_train:
    raise ConfigError(f'config.data.validation_examples is {n_val}; the train split of '
                      f'{config.data.name} has {num_train} images, so none would be left '
                      'to train on.')
  return np.arange(num_train - n_val), np.arange(num_train - n_val, num_train)


def run_train(config: ml_collections.ConfigDict, workdir: str,
              stop_at_step: int | None = None) -> dict:
  """Trains (or resumes training) the configured genotype in ``workdir``; returns the
  final summary. ``stop_at_step`` ends the run after that step, as an interruption."""
  parallel.maybe_initialize_distributed(config, common.config_fail)  # before anything touches the devices
  host_memory.map_large_allocations()  # a lower compile-time peak of host memory
  # --- checks: every user error surfaces here, before data loading or compilation.
  genotype = validate_config(config)
  for split in ('train', 'test'):
    common.check_data(config, split)
  os.makedirs(workdir, exist_ok=True)
  ckpt_lib.lock_workdir(workdir)  # one run per workdir at a time
  ckpt_lib.check_workdir_config(workdir, config)
  common.setup_compilation_cache(config.compilation_cache_dir)
  o = config.optim
  t_start = time.perf_counter()
  summary = model_summary(config, genotype)
  summary_lib.write_summary(workdir, {'model': summary})
  print(format_summary(summary), flush=True)

  # --- data: each process reads its rows of every global batch; the mesh splits them.
  mesh = parallel.make_mesh(config.parallel.num_devices)
  train_set = data_lib.load_dataset(config.data, split='train')
  test_set = data_lib.load_dataset(config.data, split='test')
  train_idx, val_idx = split_train(config, len(train_set))
  validating = len(val_idx) > 0
  # What 'best' and the per-epoch line are scored on: the validation split, or the test.
  epoch_set, epoch_name = (train_set, 'val') if validating else (test_set, 'test')
  batches = data_lib.TrainBatches(
      train_set, train_idx, o.batch_size, config.seed,
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
  epoch_idx = val_idx if validating else test_idx
  logging.info('data: %d train / %d validation / %d test examples of %s, %d steps/epoch',
               len(train_idx), len(val_idx), len(test_idx), train_set.name, steps_per_epoch)

  # --- model and state
  model = build_model(config, genotype, train_set.num_classes)
  tx = make_optimizer(config, steps_per_epoch)
  state = create_state(model, train_set.image_shape, tx, config.seed, mesh)
  host_memory.release_host_memory()

  # --- checkpoint: resume where the last run stopped.
  manager = ckpt_lib.manager(workdir, config.checkpoints_to_keep)
  state, resumed = ckpt_lib.restore_latest(manager, state)
  start_step = int(state.step)
  if resumed:
    print(f'Resuming from step {start_step} in {workdir}.', flush=True)
  ckpt_lib.write_config(workdir, config)
  best_top1 = _read_best(workdir, f'{epoch_name}_top1') if resumed else -1.0
  save_model = functools.partial(
      export.save_model, genotype=genotype, space=config.space, config=config,
      num_classes=train_set.num_classes, image_shape=train_set.image_shape,
      mean=train_set.mean, std=train_set.std)

  # --- compile (reported; a persistent cache hit makes this fast)
  # The state is replicated, batches are split over the mesh's data axis (a global batch:
  # BN statistics and gradients are those of the whole batch).
  rep, rows = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  t0 = time.perf_counter()
  step_fn = jax.jit(make_train_step(model, tx, config, steps_per_epoch),
                    in_shardings=(rep, rows), out_shardings=(rep, rep), donate_argnums=0
                    ).lower(state, parallel.shard_batch(batches.batch(0), mesh)).compile()
  compile_s = time.perf_counter() - t0
  host_memory.release_host_memory()
  eval_fn = jax.jit(make_eval_step(model), in_shardings=(rep, rep, rows), out_shardings=rep)
  eval_batch_size = parallel.padded_batch_size(config.eval_batch_size, mesh.size)
  print(f'Compiled the training step in {compile_s:.1f} s for {mesh.size} device(s) (setup '
        f'{time.perf_counter() - t_start:.1f} s).', flush=True)

  progress = metrics_lib.Progress(total_steps, steps_per_epoch, start_step)
  images = 0
  epoch_result: dict = {}
  epoch_sums, epoch_t0 = {}, time.perf_counter()

  # --- loop
  with metrics_lib.MetricWriter(workdir, start_step) as writer, \
       batches.iterate(start_step, total_steps - start_step) as stream, \
       common.StopRequest() as stop:
    writer.write(start_step, {'compile_s': compile_s}, kind='compile')
    for step in range(start_step + 1, total_steps + 1):
      if stop_at_step is not None and step > stop_at_step:
        return {'stopped_at_step': step - 1}
      state, metrics = step_fn(state, parallel.shard_batch(next(stream), mesh))
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      images += o.batch_size
      if not math.isfinite(metrics['train_total_loss']):
        raise NonFiniteLossError(
            f'The loss became {metrics["train_total_loss"]} at step {step}; stopped without '
            f'saving, so the last checkpoint in {workdir} is the last good state. Lower '
            'optim.learning_rate.')
      for k, v in metrics.items():
        epoch_sums.setdefault(k, []).append(v)
      if step % config.log_every_steps == 0 or step == total_steps:
        rate = progress.images_per_s(images)
        progress.line(step, metrics, rate)
        writer.write(step, {**metrics, 'images_per_s': rate})

      epoch_end = step % steps_per_epoch == 0
      if epoch_end:
        epoch = step // steps_per_epoch
        scores = evaluate(eval_fn, state.params, state.batch_stats, epoch_set, epoch_idx,
                          eval_batch_size, mesh)
        means = {k: float(np.mean(v)) for k, v in epoch_sums.items()}
        epoch_result = {'epoch': epoch, 'step': step, 'train_loss': means['train_loss'],
                        'train_acc': means['train_acc'],
                        **{f'{epoch_name}_{k}': scores[k] for k in ('loss', 'top1', 'top5')},
                        f'{epoch_name}_examples': scores['examples'],
                        'epoch_time_s': time.perf_counter() - epoch_t0}
        writer.write(step, {k: v for k, v in epoch_result.items() if k != 'step'},
                     kind='epoch')
        is_best = scores['top1'] > best_top1
        if is_best:
          best_top1 = scores['top1']
          save_model(os.path.join(workdir, export.EXPORT_DIR, 'best'), state.params,
                     state.batch_stats, **epoch_result)
        label = 'validation' if validating else 'test'
        print(f'== epoch {epoch}/{o.epochs}: train loss {means["train_loss"]:.4f} acc '
              f'{100 * means["train_acc"]:.2f}% | {label} loss {scores["loss"]:.4f} top-1 '
              f'{100 * scores["top1"]:.2f}% top-5 {100 * scores["top5"]:.2f}%'
              f'{" (best)" if is_best else ""} | '
              f'{metrics_lib.format_seconds(epoch_result["epoch_time_s"])}', flush=True)
        epoch_sums, epoch_t0 = {}, time.perf_counter()
      save = functools.partial(common.save_if_finite, manager, step, state, state.params,
                               'weights', workdir)
      if epoch_end or step % config.checkpoint_every_steps == 0:
        save()
      if stop.requested:  # SIGTERM / Ctrl-C: this step's checkpoint, then out
        return stop.finish(manager, step, workdir, save)

  manager.wait_until_finished()
  ran_steps = bool(epoch_result)
  if not epoch_result:  # resumed a finished run: score the final state again
    scores = evaluate(eval_fn, state.params, state.batch_stats, epoch_set, epoch_idx,
                      eval_batch_size, mesh)
    epoch_result = {'epoch': o.epochs, 'step': total_steps,
                    **{f'{epoch_name}_{k}': scores[k] for k in ('loss', 'top1', 'top5')},
                    f'{epoch_name}_examples': scores['examples']}
  if validating:  # the test split, once, for the final network
    test = evaluate(eval_fn, state.params, state.batch_stats, test_set, test_idx,
                    eval_batch_size, mesh)
    epoch_result.update({f'test_{k}': test[k] for k in ('loss', 'top1', 'top5')},
                        test_examples=test['examples'])
    if ran_steps:  # a finished run read back has its line already
      with metrics_lib.MetricWriter(workdir) as writer:
        writer.write(total_steps, {k: epoch_result[k] for k in
                                   ('test_loss', 'test_top1', 'test_top5')}, kind='test')
  save_model(os.path.join(workdir, export.EXPORT_DIR, 'last'), state.params,
             state.batch_stats, **epoch_result)
  result = {**epoch_result, f'best_{epoch_name}_top1': best_top1, 'compile_s': compile_s,
            'wall_s': time.perf_counter() - t_start}
  summary_lib.write_summary(workdir, {'model': summary, 'result': result})
  print(f'Training done: final test top-1 {100 * epoch_result["test_top1"]:.2f}% '
        f'(best {"validation " if validating else ""}{100 * best_top1:.2f}%); models in {os.path.join(workdir, export.EXPORT_DIR)}'
        f'/{{best,last}}, loaded by jaxnas.load_model({workdir!r}).', flush=True)
  return {'model': summary, **result}
