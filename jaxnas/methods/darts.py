"""DARTS (Liu et al. 2019): the continuous relaxation of the DARTS cell space, searched
by the bilevel update; also the step of PC-DARTS (jaxnas/methods/pcdarts.py), which
differs in its supernet (partial channels, edge normalization) and its settings.

One search step is the bilevel update of the reference code: an architecture update on
a batch of the arch split, then a weight update on a batch of the weight split with the
new architecture. First order by default; ``optim.order = 2`` is the exact unrolled
second order (eq. 6-7 of the paper).
"""

import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxnas import base_config
from jaxnas import files
from jaxnas import genotypes
from jaxnas import partial_channels
from jaxnas import spaces
from jaxnas import visualize
from jaxnas.methods import base
from jaxnas.spaces import darts as darts_space


def get_config() -> ml_collections.ConfigDict:
  """DARTS (first order) on CIFAR-10 with the paper's settings."""
  c = base_config.loop_config()
  c.method = 'darts'
  c.space = 'darts'
  c.optim.batch_size = 64
  c.optim.epochs = 50

  c.model = ml_collections.ConfigDict()
  c.model.C = 16
  c.model.layers = 8
  c.model.steps = 4
  c.model.multiplier = 4
  c.model.stem_multiplier = 3
  c.model.stem = 'cifar'      # 'cifar' | 'imagenet' (three stride-2 convs)
  c.model.primitives = genotypes.PRIMITIVES  # the candidate ops of every edge
  c.model.k = 1               # partial channels: 1/k of the channels go through the mixed op
  c.model.channel_sampling = 'shuffle'  # 'shuffle' (reference) | 'random'
  c.model.edge_normalization = False
  c.model.depthwise_impl = 'auto'       # 'auto' | 'xla' | 'shifted' | 'native'
  c.model.remat = False  # recompute each cell in the backward pass (less memory, slower)
  # 'unrolled': one mixed op per source state in the program (5 per cell); 'scanned': 2 per
  # cell, the edges between nodes in a scan: the same function, a program half the size
  # to compile on GPU and TPU; 'auto': scanned on GPU/TPU, unrolled on the CPU. A
  # checkpoint holds the parameter layout of the form that wrote it.
  c.model.cell_form = 'auto'

  c.optim.learning_rate = 0.025
  c.optim.learning_rate_min = 0.001
  c.optim.warmup_epochs = 0
  # 'jaxnas': epoch e trains at eta(e); 'reference': at eta(e + 1), as the reference's
  # scheduler.step() at the top of each epoch sets it (the reference configs' choice).
  c.optim.lr_timing = 'jaxnas'
  c.optim.momentum = 0.9
  c.optim.weight_decay = 3e-4
  c.optim.grad_clip = 5.0
  c.optim.arch_learning_rate = 3e-4
  c.optim.arch_betas = (0.5, 0.999)
  c.optim.arch_weight_decay = 1e-3
  c.optim.arch_grad_clip = 0.0     # 0: no clipping of the arch gradient
  c.optim.arch_warmup_epochs = 0   # alphas/betas are updated from this epoch on
  c.optim.order = 1                # 1: first order; 2: unrolled second order
  return c


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A run of a few steps on a tiny supernet, for checking a setup end to end."""
  c.model.C = 8
  c.model.layers = 3
  c.model.steps = 2
  c.model.multiplier = 2
  c.optim.arch_warmup_epochs = 1
  return base_config.few_steps(c)


# ----------------------------------------------------------------------------- steps


def loss_fn(model, params, arch, batch_stats, batch, key):
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


LR_TIMINGS = ('jaxnas', 'reference')


def lr_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int):
  """The per-epoch schedule: linear warm-up, then cosine to the minimum.

  ``optim.lr_timing`` 'jaxnas': epoch e trains at eta(e) = min + (max - min) (1 +
  cos(pi e / E)) / 2, warm-up epochs at max (e + 1) / W. 'reference': as the reference
  code, whose ``scheduler.step()`` runs at the top of each epoch (PyTorch before 1.1
  counts it first), so epoch e trains at eta(e + 1) (with max 0.1 and min 0 over 50
  epochs: 0.099901 at epoch 0, 0 at epoch 49), warm-up epochs at eta(e + 1) (e + 1) / W.
  (The reference also clips gradients by max_norm / (norm + 1e-6); optax's
  clip_by_global_norm divides by the norm alone.)
  """
  o = config.optim
  shift = 1 if o.get('lr_timing', 'jaxnas') == 'reference' else 0

  def schedule(count):
    epoch = (count // steps_per_epoch).astype(jnp.float32)
    cosine = o.learning_rate_min + 0.5 * (o.learning_rate - o.learning_rate_min) * (
        1 + jnp.cos(jnp.pi * (epoch + shift) / o.epochs))
    if o.warmup_epochs:
      peak = cosine if shift else o.learning_rate
      warm = peak * (epoch + 1) / o.warmup_epochs
      return jnp.where(epoch < o.warmup_epochs, warm, cosine)
    return cosine

  return schedule


class Bilevel(base.Method):
  """The DARTS bilevel search over the DARTS cell supernet."""

  name = 'darts'

  def get_config(self):
    return get_config()

  def variants(self):
    return {'smoke': smoke}

  def validate(self, config, fail):
    m, o = config.model, config.optim
    if config.space != 'darts':
      fail('space', f"is {config.space!r}; {self.name} searches the 'darts' space.")
    check_cell_stack(m, fail)
    base.positive_fields(config, fail, 'model.k')
    if m.C % m.k:
      fail('model.k', f'= {m.k} must divide the channel count model.C = {m.C}.')
    if m.channel_sampling not in partial_channels.SAMPLING_MODES:
      fail('model.channel_sampling',
           f'is {m.channel_sampling!r}; choose one of {partial_channels.SAMPLING_MODES}.')
    base.check_depthwise_impl(m, fail)
    if m.get('cell_form', 'auto') not in ('auto', *darts_space.CELL_FORMS):
      fail('model.cell_form',
           f"is {m.cell_form!r}; choose 'auto' or one of {tuple(darts_space.CELL_FORMS)}.")
    unknown = [p for p in m.primitives if p not in genotypes.PRIMITIVES]
    if unknown or not [p for p in m.primitives if p != 'none']:
      fail('model.primitives', f'must be ops of {genotypes.PRIMITIVES} (not only none), '
           f'got {tuple(m.primitives)}.')
    if m.multiplier > m.steps:
      fail('model.multiplier', f'= {m.multiplier} cannot exceed model.steps = {m.steps}.')
    if o.order not in (1, 2):
      fail('optim.order', f'must be 1 (first order) or 2 (second order), got {o.order}.')
    if o.arch_warmup_epochs < 0 or o.warmup_epochs < 0:
      fail('optim.arch_warmup_epochs', 'and optim.warmup_epochs must be >= 0.')
    if o.learning_rate <= 0 or o.arch_learning_rate < 0:
      fail('optim.learning_rate', 'must be positive (and optim.arch_learning_rate >= 0).')
    if o.lr_timing not in LR_TIMINGS:
      fail('optim.lr_timing', f'is {o.lr_timing!r}; choose one of {LR_TIMINGS}.')

  def build_model(self, config, num_classes, num_devices=1):
    """The supernet; ``num_devices`` is the mesh size, used by per-device BatchNorm."""
    m = config.model
    per_device = config.parallel.batch_norm == 'per_device'
    return spaces.SEARCH_SPACES[config.space](
        num_classes=num_classes, C=m.C, layers=m.layers, steps=m.steps,
        multiplier=m.multiplier, stem_multiplier=m.stem_multiplier, stem=m.stem, k=m.k,
        sampling=m.channel_sampling, edge_normalization=m.edge_normalization,
        primitives=tuple(m.primitives), impl=m.depthwise_impl, remat=m.remat,
        bn_groups=num_devices if per_device else 1,
        cell_form=darts_space.resolve_cell_form(m.get('cell_form', 'auto')))

  def make_optimizers(self, config, steps_per_epoch):
    """SGD with momentum for the weights; Adam for the architecture (coupled L2 on both,
    as torch.optim's weight_decay; clipping before the decay, as the reference)."""
    o = config.optim
    weight_tx = optax.chain(
        optax.clip_by_global_norm(o.grad_clip) if o.grad_clip > 0 else optax.identity(),
        optax.add_decayed_weights(o.weight_decay),
        optax.sgd(lr_schedule(config, steps_per_epoch), momentum=o.momentum))
    arch_tx = optax.chain(
        optax.clip_by_global_norm(o.arch_grad_clip) if o.arch_grad_clip > 0
        else optax.identity(),
        optax.add_decayed_weights(o.arch_weight_decay),
        optax.adam(o.arch_learning_rate, b1=o.arch_betas[0], b2=o.arch_betas[1], eps=1e-8))
    return weight_tx, arch_tx

  def make_phases(self, model, weight_tx, arch_tx, config, steps_per_epoch):
    """(arch_phase, weight_phase): the arch params updated on the val batch
    (``lax.cond`` skips its compute during the warm-up), then the weights on the train
    batch; both draw their keys from ``state.key`` and ``state.step``."""
    arch_start = arch_start_step(config, steps_per_epoch)
    arch_step, weight_step = make_phase_steps(model, weight_tx, arch_tx, config,
                                              steps_per_epoch)

    def keys(state):  # (arch train, arch val, weight)
      return jax.random.split(jax.random.fold_in(state.key, state.step), 3)

    def skip_arch(state, train_batch, val_batch, keys):
      nan = jnp.full((), jnp.nan, jnp.float32)
      return state, nan, nan

    def arch_phase(state, train_batch, val_batch):
      k_train, k_val, _ = keys(state)
      state, val_loss, val_acc = jax.lax.cond(
          state.step >= arch_start, arch_step, skip_arch, state, train_batch, val_batch,
          (k_train, k_val))
      return state, {'val_loss': val_loss, 'val_acc': val_acc}

    def weight_phase(state, train_batch, val_batch):
      del val_batch  # the same signature as arch_phase
      state, metrics = weight_step(state, train_batch, keys(state)[2])
      return state.replace(step=state.step + 1), metrics

    return arch_phase, weight_phase

  def arch_active(self, config, step, steps_per_epoch):
    return step > arch_start_step(config, steps_per_epoch)

  def derive(self, config, arch):
    return darts_space.derive_genotype(arch, steps=config.model.steps,
                                       primitives=tuple(config.model.primitives))

  def to_json(self, architecture):
    return genotypes.to_json(architecture)

  def format(self, config, architecture):
    return genotypes.format_genotype(architecture)

  def is_degenerate(self, config, architecture):
    return genotypes.is_degenerate(architecture)

  def write_outputs(self, workdir, config, architecture, arch, **result):
    write_genotype_outputs(workdir, architecture, arch, **result)
    return (f'genotype written to {os.path.join(workdir, genotypes.GENOTYPE_FILE)}, cells '
            f'pictured in {os.path.join(workdir, "cells.svg")}')


def make_phase_steps(model, weight_tx, arch_tx, config, steps_per_epoch):
  """(arch_step, weight_step): the two halves of a search step, as pure functions.

  arch_step(state, train_batch, val_batch, keys) -> (state, loss, acc) changes only the
  arch params, their optimizer state and BN statistics; weight_step(state, batch, key) ->
  (state, metrics) changes only the weights, their optimizer state and BN statistics.
  """
  o = config.optim
  schedule = lr_schedule(config, steps_per_epoch)
  loss = functools.partial(loss_fn, model)

  def arch_step(state, train_batch, val_batch, keys):
    if o.order == 2:
      buffer = optax.tree_utils.tree_get(state.weight_opt_state, 'trace')
      (val_loss, (bs, acc)), grads = unrolled_arch_grad(
          loss, state.params, state.arch, state.batch_stats, train_batch, val_batch,
          buffer, schedule(state.step), o.momentum, o.weight_decay, keys)
    else:
      (val_loss, (bs, acc)), grads = jax.value_and_grad(loss, argnums=1, has_aux=True)(
          state.params, state.arch, state.batch_stats, val_batch, keys[1])
    updates, opt_state = arch_tx.update(grads, state.arch_opt_state, state.arch)
    state = state.replace(arch=optax.apply_updates(state.arch, updates),
                          arch_opt_state=opt_state, batch_stats=bs)
    return state, val_loss, acc

  def weight_step(state, batch, key):
    (train_loss, (bs, acc)), grads = jax.value_and_grad(loss, has_aux=True)(
        state.params, state.arch, state.batch_stats, batch, key)
    updates, opt_state = weight_tx.update(grads, state.weight_opt_state, state.params)
    state = state.replace(params=optax.apply_updates(state.params, updates),
                          weight_opt_state=opt_state, batch_stats=bs)
    return state, {'train_loss': train_loss, 'train_acc': acc,
                   'grad_norm': optax.tree.norm(grads), 'lr': schedule(state.step)}

  return arch_step, weight_step


def check_cell_stack(m, fail) -> None:
  """The fields of a stack of DARTS-style cells (``config.model``): C, layers and steps
  positive, C even, a known stem; ``fail(field, message)`` for the first bad one."""
  base.positive_fields(m, lambda f, msg: fail(f'model.{f}', msg), 'C', 'layers', 'steps')
  if m.C % 2:
    fail('model.C', f'= {m.C} must be even (FactorizedReduce halves it).')
  if m.stem not in ('cifar', 'imagenet'):
    fail('model.stem', f"is {m.stem!r}; choose 'cifar' or 'imagenet'.")


def arch_start_step(config, steps_per_epoch: int) -> int:
  """The first step whose arch phase runs (after ``arch_warmup_epochs``)."""
  return config.optim.arch_warmup_epochs * steps_per_epoch


def write_genotype_outputs(workdir, genotype, arch, **extra):
  """genotype.json (with the arch params and ``extra``), arch.npz and the cell pictures."""
  genotypes.save(genotype, os.path.join(workdir, genotypes.GENOTYPE_FILE),
                 **{k: v.tolist() for k, v in arch.items()}, **extra)
  files.write_npz(os.path.join(workdir, 'arch.npz'), **arch)
  visualize.save_genotype_svg(genotype, os.path.join(workdir, 'cells.svg'))
  visualize.save_genotype_png(genotype, os.path.join(workdir, 'cells.png'))


METHOD = Bilevel()
