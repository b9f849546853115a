"""UNAS (Vahdat et al. 2020, "UNAS: Differentiable Architecture Search Meets
Reinforcement Learning"; reference code NVlabs/unas) in the sampled DARTS-like cell
space (jaxnas/spaces/sampled_darts.py).

The architecture is a set of independent categoricals (per node and input slot: its
source and its op), with logits in ``state.arch`` starting at 0. One search step:

1. **arch phase** (after ``optim.warmup_epochs`` of weight training on uniform samples):
   a discrete architecture z is drawn per example (``unas.sampling = 'example'``, the
   CIFAR commands) or per batch (``'batch'``, the ImageNet commands) from the
   Gumbel-max of the logits, and the gradient of E_q[L(z)] with respect to the logits is
   estimated by ``unas.estimator`` (jaxnas/estimators.py): ``rebar`` (the reference's
   choice in every search), ``reinforce`` (moving baseline), ``relaxed`` (plain
   Gumbel-softmax, biased) or ``relax`` (a learned control variate; the reference has
   the flag but no code). The objective, per example i (UNAS sec. 4):

     L_i = CE_train,i + 0.5 * |CE_val,i - CE_train,i|      (``objective = 'gen_gap'``)
           + 0.2 * sum_nodes (w_in0 . w_in1) (w_op0 . w_op1)   (paired inputs)
           + c_t * relu(latency(w) - T)                        (with a latency target)

   with train example i and validation example i scored by the same sample, and w the
   sample being scored (one-hot in L(z), relaxed in L(x)). ``objective = 'ce'`` keeps
   the first term alone. c_t = latency_scale * clip(t / latency_ramp_steps, 0, 1), t
   counted from the first arch step. latency(w) is a linear surrogate of measured
   latencies (jaxnas/latency.py) of the one-hot choices: the same function scores z and
   its relaxation, so the REBAR control variate is exact for this term (the reference
   times z instead, and its REINFORCE branch times another sample than it scores).
2. **weight phase**: the weights take an Adam step on the cross-entropy of the train
   batch under a relaxed sample (Gumbel-softmax, temperature 0.4, detached), every op
   computed (the reference skips an op whose weight stays under 0.05 for every example
   of the batch; here all run, which gives the same result).

jaxnas choices, not in the reference: the arch step leaves the BatchNorm running
statistics alone (the weight step updates them on the train split); the weight phase
draws its own relaxed sample from the logits after the arch update (the reference reuses
the arch step's); the latency term scores the surrogate on both z and its relaxation.

L(z) of one architecture per batch runs the discrete path (only the sampled ops, through
``lax.switch``); one architecture per example runs every op with one-hot weights (the
memory of the supernet: a batched switch would run every branch anyway). The held-out
accuracy after each epoch is that of the most likely architecture (argmax of every
categorical), on the discrete path with the BatchNorm running statistics.
"""

import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxnas import base_config
from jaxnas import estimators
from jaxnas import files
from jaxnas import flops
from jaxnas import genotypes
from jaxnas import latency as latency_lib
from jaxnas import spaces
from jaxnas import summary as summary_lib
from jaxnas.methods import base
from jaxnas.methods import darts as darts_method
from jaxnas.spaces import darts_eval
from jaxnas.spaces import proxyless
from jaxnas.spaces import sampled_darts

SAMPLINGS = ('example', 'batch')
OBJECTIVES = ('ce', 'gen_gap')
SPACES = ('unas_darts', 'proxyless')
ARCHITECTURE_FILE = proxyless.ARCHITECTURE_FILE  # what the proxyless trainer reads
LATENCY_FILE = 'latency_model.json'


def get_config(space: str = 'unas_darts') -> ml_collections.ConfigDict:
  """UNAS with the settings of the reference's commands.sh for CIFAR-10 (4 GPUs x 32 =
  batch 128, learning rates scaled by 128/64 = 2) and the model fields of ``space``:
  'unas_darts' (C=16, 8 cells) or 'proxyless' (the ProxylessNAS GPU skeleton)."""
  if space not in SPACES:
    raise ValueError(f'space is {space!r}; UNAS searches {SPACES}.')
  c = base_config.loop_config()
  c.method = 'unas'
  c.space = space
  c.data.train_portion = 0.9   # 10 % of the training set held out as the validation split
  c.optim.batch_size = 128
  c.optim.epochs = 100         # warm-up included: 15 + 85 search epochs

  c.model = ml_collections.ConfigDict()
  if space == 'unas_darts':
    c.model.C = 16
    c.model.layers = 8
    c.model.steps = 4
    c.model.multiplier = 4
    c.model.stem_multiplier = 3
    c.model.stem = 'cifar'       # 'cifar' | 'imagenet' (three stride-2 convs)
    c.model.primitives = sampled_darts.UNAS_PRIMITIVES
  else:
    c.model.channels = proxyless.CHANNELS  # stem, first block, 6 stages, last conv
    c.model.width_multiplier = 1.0
    c.model.depths = proxyless.DEPTHS      # layers per stage: 21 searchable
    c.model.strides = proxyless.STRIDES
    c.model.primitives = proxyless.PROXYLESS_OPS
  c.model.depthwise_impl = 'auto'

  c.unas = ml_collections.ConfigDict()
  c.unas.estimator = 'rebar'   # 'rebar' | 'reinforce' | 'relaxed' | 'relax'
  c.unas.temperature = 0.4     # Gumbel-softmax temperature, fixed
  c.unas.soften_eps = 0.0      # logits <- log(softmax + eps) before sampling (0: off)
  c.unas.sampling = 'example'  # 'example': an architecture per example | 'batch'
  c.unas.objective = 'gen_gap'  # 'gen_gap': L_train + w |L_val - L_train| | 'ce'
  c.unas.gen_gap_weight = 0.5
  c.unas.paired_input_penalty = 0.2
  c.unas.latency_target_ms = 0.0  # > 0: the latency term, with unas.latency_model
  # '' (none) | 'measure' (time latency_samples sampled networks at the start, fit, and
  # write the surrogate to the workdir) | a surrogate's JSON (jaxnas.latency.save).
  c.unas.latency_model = ''
  c.unas.latency_samples = 200  # architectures timed for the surrogate
  c.unas.latency_images = 24    # images per timed forward pass (the reference: 24)
  c.unas.latency_runs = 10      # timed runs per architecture; their median counts
  c.unas.latency_scale = 0.1   # c_t ramps from 0 to this over latency_ramp_steps
  c.unas.latency_ramp_steps = 30000
  c.unas.control_variate_hidden = 32      # 'relax': hidden units of r_phi
  c.unas.control_variate_learning_rate = 1e-3

  c.optim.learning_rate = 6e-4          # weights: Adam, cosine to learning_rate_min
  c.optim.learning_rate_min = 1e-4
  c.optim.weight_decay = 3e-4
  c.optim.grad_clip = 5.0
  c.optim.warmup_epochs = 15            # weights only, constant rate, uniform samples
  c.optim.arch_learning_rate = 2e-3     # arch: Adam, cosine to arch_learning_rate_min
  c.optim.arch_learning_rate_min = 3e-4
  c.optim.arch_weight_decay = 1e-6
  c.optim.arch_betas = (0.9, 0.999)
  return c


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A few steps on a tiny network, for checking a setup end to end."""
  if c.space == 'proxyless':
    c.model.channels = (8, 8, 8, 16, 16, 24, 24, 32, 64)
    c.model.depths = (2, 2, 1, 1, 1, 1)
  else:
    c.model.C = 8
    c.model.layers = 3
    c.model.steps = 2
    c.model.multiplier = 2
  c.unas.latency_samples = min(c.unas.latency_samples, 20)  # a measured model: a few s
  c.unas.latency_runs = min(c.unas.latency_runs, 2)
  c.optim.warmup_epochs = 1
  return base_config.few_steps(c)


# ----------------------------------------------------------------------------- objective


def paired_input_penalty(weights) -> jax.Array:
  """sum over cell types and nodes of (w_in0 . w_in1) (w_op0 . w_op1), per sample: how
  much a node's two slots pick the same (source, op) (UNAS's DARTS space)."""
  total = 0.0
  for kind in ('normal', 'reduce'):
    w_in, w_op = weights[f'inputs_{kind}'], weights[f'ops_{kind}']
    same_in = jnp.sum(w_in[:, :, 0] * w_in[:, :, 1], -1)  # (S, steps)
    same_op = jnp.sum(w_op[:, :, 0] * w_op[:, :, 1], -1)
    total = total + jnp.sum(same_in * same_op, -1)
  return total


def gen_gap(train_loss, val_loss, weight: float):
  """UNAS's generalization-gap objective L_train + weight * |L_val - L_train|."""
  return train_loss + weight * jnp.abs(val_loss - train_loss)


def entropy(logits) -> jax.Array:
  """Total entropy (nats) of the categoricals, invalid choices masked."""
  total = 0.0
  for v in logits.values():
    logp = jax.nn.log_softmax(v, -1)
    total = total + jnp.sum(-jnp.exp(logp) * logp)
  return total


def cosine(start: float, end: float, epochs: int, steps_per_epoch: int):
  """Per-epoch cosine from ``start`` to ``end`` over ``epochs`` (the count of updates)."""
  epochs = max(epochs, 1)

  def schedule(count):
    epoch = jnp.minimum(count // steps_per_epoch, epochs).astype(jnp.float32)
    return end + 0.5 * (start - end) * (1 + jnp.cos(jnp.pi * epoch / epochs))

  return schedule


def weight_schedule(config, steps_per_epoch: int):
  """The weights' rate: constant during the warm-up, then a per-epoch cosine to
  ``learning_rate_min`` over the search epochs (the step count is the update count)."""
  o = config.optim
  warm_steps = o.warmup_epochs * steps_per_epoch
  after_warmup = cosine(o.learning_rate, o.learning_rate_min, o.epochs - o.warmup_epochs,
                        steps_per_epoch)

  def schedule(count):
    return jnp.where(count < warm_steps, o.learning_rate,
                     after_warmup(jnp.maximum(count - warm_steps, 0)))

  return schedule


class DartsCells:
  """UNAS's DARTS-like space: per node two (source, op) slots; the output a genotype."""
  name = 'unas_darts'
  dropout = False

  def arch_shapes(self, m):
    return sampled_darts.arch_shapes(m.steps, len(m.primitives))

  def valid_masks(self, m):
    return sampled_darts.valid_masks(m.steps, len(m.primitives))

  def mask(self, m, logits):
    return sampled_darts.mask_logits(logits)

  def build(self, m, num_classes, bn_groups):
    return sampled_darts.SampledNetwork(
        num_classes=num_classes, C=m.C, layers=m.layers, steps=m.steps,
        multiplier=m.multiplier, stem_multiplier=m.stem_multiplier, stem=m.stem,
        primitives=tuple(m.primitives), impl=m.depthwise_impl, bn_groups=bn_groups)

  def validate(self, m, fail):
    darts_method.check_cell_stack(m, fail)
    if not 1 <= m.multiplier <= m.steps:
      fail('model.multiplier', f'= {m.multiplier} must be in 1..model.steps = {m.steps}.')
    return sampled_darts.UNAS_PRIMITIVES

  def penalty(self, weights):
    return paired_input_penalty(weights)

  def derive(self, m, arch):
    return sampled_darts.derive_genotype(arch, steps=m.steps, primitives=tuple(m.primitives))

  def to_json(self, architecture):
    return genotypes.to_json(architecture)

  def format(self, m, architecture):
    return genotypes.format_genotype(architecture)

  def is_degenerate(self, m, architecture):
    return genotypes.is_degenerate(architecture)

  def write_outputs(self, workdir, config, architecture, arch, **result):
    return darts_method.METHOD.write_outputs(workdir, config, architecture, arch, **result)


class Proxyless:
  """The ProxylessNAS (GPU) space: per layer an MBConv (kernel x expansion) or 'zero'."""
  name = 'proxyless'
  dropout = True  # 0.1 on a skipped block's input during search, as the reference

  def arch_shapes(self, m):
    return proxyless.arch_shapes(tuple(m.depths), len(m.primitives))

  def valid_masks(self, m):
    return proxyless.valid_masks(tuple(m.depths), tuple(m.primitives))

  def mask(self, m, logits):
    return proxyless.mask_logits(logits, tuple(m.depths), tuple(m.primitives))

  def build(self, m, num_classes, bn_groups):
    return proxyless.ProxylessNetwork(
        num_classes=num_classes, channels=tuple(m.channels),
        width_multiplier=m.width_multiplier, depths=tuple(m.depths),
        strides=tuple(m.strides), primitives=tuple(m.primitives), impl=m.depthwise_impl,
        bn_groups=bn_groups)

  def validate(self, m, fail):
    try:
      proxyless.check_skeleton(proxyless.resolve_channels(tuple(m.channels),
                                                          m.width_multiplier),
                               tuple(m.depths), tuple(m.strides))
    except ValueError as e:
      fail('model.channels', f'(with model.depths and model.strides) cannot build the '
           f'network: {e}')
    return proxyless.PROXYLESS_OPS

  def penalty(self, weights):
    return jnp.zeros(weights['ops'].shape[:1])  # the reference: off in this space

  def derive(self, m, arch):
    return proxyless.derive_architecture(arch, tuple(m.depths), tuple(m.primitives))

  def to_json(self, architecture):
    return proxyless.to_json(architecture)

  def format(self, m, architecture):
    return proxyless.format_architecture(architecture, tuple(m.depths))

  def is_degenerate(self, m, architecture):
    return proxyless.is_degenerate(architecture, tuple(m.depths))

  def write_outputs(self, workdir, config, architecture, arch, **result):
    path = os.path.join(workdir, ARCHITECTURE_FILE)
    files.write_json(path, {**proxyless.to_json(architecture), **result,
                            'arch_logits': {k: np.asarray(v).tolist() for k, v in arch.items()}},
                     indent=1)
    files.write_npz(os.path.join(workdir, 'arch.npz'), **arch)
    return f'architecture written to {path}'


SPACE_ADAPTERS = {'unas_darts': DartsCells(), 'proxyless': Proxyless()}


class Unas(base.Method):
  """UNAS's search: sampled architectures, estimated arch gradients."""

  name = 'unas'
  cycle_arch_split = True  # the validation split is 10 %: its batches cycle

  def get_config(self):
    return get_config()

  def variants(self):
    return {'smoke': smoke}

  def validate(self, config, fail):
    m, o, u = config.model, config.optim, config.unas
    if config.space not in SPACES:
      fail('space', f'is {config.space!r}; UNAS searches {SPACES}.')
    ops = SPACE_ADAPTERS[config.space].validate(m, fail)
    base.check_depthwise_impl(m, fail)
    unknown = [p for p in m.primitives if p not in ops]
    if unknown or len(set(m.primitives)) != len(m.primitives) or len(m.primitives) < 2:
      fail('model.primitives', f'must be two or more distinct ops of {ops}, got '
           f'{tuple(m.primitives)}.')
    if u.estimator not in estimators.ESTIMATORS:
      fail('unas.estimator', f'is {u.estimator!r}; choose one of {estimators.ESTIMATORS}.')
    if not u.temperature > 0:
      fail('unas.temperature', f'must be positive, got {u.temperature}.')
    if u.soften_eps < 0:
      fail('unas.soften_eps', f'must be >= 0, got {u.soften_eps}.')
    if u.sampling not in SAMPLINGS:
      fail('unas.sampling', f'is {u.sampling!r}; choose one of {SAMPLINGS}.')
    if u.objective not in OBJECTIVES:
      fail('unas.objective', f'is {u.objective!r}; choose one of {OBJECTIVES}.')
    if u.gen_gap_weight < 0 or u.paired_input_penalty < 0:
      fail('unas.gen_gap_weight', 'and unas.paired_input_penalty must be >= 0.')
    if u.latency_target_ms < 0:
      fail('unas.latency_target_ms', f'must be >= 0 (0: no latency term), got '
           f'{u.latency_target_ms}.')
    if u.latency_target_ms > 0 and not u.latency_model:
      fail('unas.latency_model', f"is empty, but unas.latency_target_ms = "
           f"{u.latency_target_ms} needs a latency surrogate: 'measure' or a JSON file "
           'of jaxnas.latency.save.')
    if u.latency_model == 'measure':
      base.positive_fields(config, fail, 'unas.latency_images', 'unas.latency_runs')
      if u.latency_samples < 10:
        fail('unas.latency_samples', f'must be at least 10 (a fifth is held out to score '
             f'the fit), got {u.latency_samples}.')
    elif u.latency_model:
      try:
        latency_lib.load(u.latency_model, self.arch_shapes(config))
      except (OSError, ValueError) as e:
        fail('unas.latency_model', f'= {u.latency_model!r} cannot be used: {e}')
    if o.warmup_epochs < 0 or o.warmup_epochs >= o.epochs:
      fail('optim.warmup_epochs', f'= {o.warmup_epochs} must be in 0..optim.epochs - 1 = '
           f'{o.epochs - 1} (the search needs epochs after the warm-up).')
    if o.learning_rate <= 0 or o.arch_learning_rate <= 0:
      fail('optim.learning_rate', 'and optim.arch_learning_rate must be positive.')

  # ------------------------------------------------------------------- model and state

  def space(self, config):
    return SPACE_ADAPTERS[config.space]

  def arch_shapes(self, config):
    return self.space(config).arch_shapes(config.model)

  def mask(self, config, logits):
    """The logits with the choices the space forbids set to -1e9."""
    return self.space(config).mask(config.model, logits)

  def build_model(self, config, num_classes, num_devices=1):
    per_device = config.parallel.batch_norm == 'per_device'
    return self.space(config).build(config.model, num_classes,
                                    num_devices if per_device else 1)

  def uniform_weights(self, config):
    """Every valid choice equally weighted: one sample (S = 1) for initialization."""
    masked = self.mask(config, {k: jnp.zeros(s) for k, s in self.arch_shapes(config).items()})
    return {k: jax.nn.softmax(v, -1)[None] for k, v in masked.items()}

  def init_variables(self, model, x, key, config):
    variables = model.init({'params': key}, x, self.uniform_weights(config), train=True)
    arch = {k: jnp.zeros(s, jnp.float32) for k, s in self.arch_shapes(config).items()}
    return {**variables, 'arch': arch}

  def init_extra(self, config, arch):
    extra = {'baseline': jnp.zeros((), jnp.float32)}
    if config.unas.estimator == 'relax':
      cv = estimators.init_control_variate(jax.random.PRNGKey(config.seed + 1), arch,
                                           hidden=config.unas.control_variate_hidden)
      extra.update(cv=cv, cv_opt=self._cv_tx(config).init(cv))
    return extra

  def _cv_tx(self, config):
    return optax.adam(config.unas.control_variate_learning_rate)

  def make_optimizers(self, config, steps_per_epoch):
    """Adam for the weights (constant during the warm-up, then cosine) and for the
    arch logits (cosine over the search epochs); coupled L2 as torch.optim's."""
    o = config.optim
    search_epochs = o.epochs - o.warmup_epochs
    weight_tx = optax.chain(
        optax.clip_by_global_norm(o.grad_clip) if o.grad_clip > 0 else optax.identity(),
        optax.add_decayed_weights(o.weight_decay),
        optax.adam(weight_schedule(config, steps_per_epoch)))
    arch_tx = optax.chain(
        optax.add_decayed_weights(o.arch_weight_decay),
        optax.adam(cosine(o.arch_learning_rate, o.arch_learning_rate_min, search_epochs,
                          steps_per_epoch), b1=o.arch_betas[0], b2=o.arch_betas[1]))
    return weight_tx, arch_tx

  # ------------------------------------------------------------------- steps

  def make_phases(self, model, weight_tx, arch_tx, config, steps_per_epoch):
    u, o = config.unas, config.optim
    arch_start = o.warmup_epochs * steps_per_epoch
    per_example = u.sampling == 'example'
    surrogate = None
    if u.latency_target_ms > 0:
      surrogate = latency_lib.load(u.latency_model, self.arch_shapes(config))
    shapes = self.arch_shapes(config)
    cv_tx = self._cv_tx(config)
    space = self.space(config)

    def rngs(key):  # the space's dropout ('zero' blocks of ProxylessNAS), if any
      return {'dropout': key} if space.dropout else {}

    def keys(state):  # (arch sample, weight sample)
      return jax.random.split(jax.random.fold_in(state.key, state.step), 2)

    def sample_shape(batch):
      return (batch['image'].shape[0],) if per_example else (1,)

    def per_example_ce(params, batch_stats, weights, batch, path, key):
      logits = model.apply({'params': params, 'batch_stats': batch_stats}, batch['image'],
                           weights, train=True, path=path, mutable=['batch_stats'],
                           rngs=rngs(key))[0]
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label'])
      return ce, jnp.argmax(logits, -1) == batch['label']

    def objective(state, train_batch, val_batch, t, path, key):
      """L(weights) per sample, and the train-batch accuracy of the sample."""

      def loss_fn(weights):
        ce, correct = per_example_ce(state.params, state.batch_stats, weights, train_batch,
                                     path, key)
        if u.objective == 'gen_gap':
          ce_val, _ = per_example_ce(state.params, state.batch_stats, weights, val_batch,
                                     path, jax.random.fold_in(key, 1))
          ce = gen_gap(ce, ce_val, u.gen_gap_weight)
        if not per_example:  # one sample scores the whole batch
          ce, correct = jnp.mean(ce, keepdims=True), jnp.mean(correct, keepdims=True)
        loss = ce + u.paired_input_penalty * space.penalty(weights)
        aux = {'acc': jnp.mean(correct)}
        if surrogate is not None:
          ms = surrogate.predict(latency_lib.features(weights, shapes))
          c_t = latency_lib.coefficient(t, u.latency_scale, u.latency_ramp_steps)
          loss = loss + latency_lib.penalty(ms, u.latency_target_ms, c_t)
          aux['latency_ms'] = jnp.mean(ms)
        return loss, aux

      return loss_fn

    def arch_step(state, train_batch, val_batch, key):
      logits = self.mask(config, state.arch)
      t = state.step - arch_start
      key, dropout_key = jax.random.split(key)
      loss_fn = objective(state, train_batch, val_batch, t, 'mixed', dropout_key)
      discrete = None if per_example else objective(state, train_batch, val_batch, t,
                                                     'discrete', dropout_key)
      est = estimators.estimate(
          u.estimator, logits, key, loss_fn, sample_shape=sample_shape(train_batch),
          temperature=u.temperature, baseline=state.extra['baseline'],
          control_variate=state.extra.get('cv'), eps=u.soften_eps, has_aux=True,
          discrete_loss_fn=discrete)
      updates, opt_state = arch_tx.update(est.grads, state.arch_opt_state, state.arch)
      extra = {**state.extra, 'baseline': est.baseline}
      if u.estimator == 'relax':
        cv_updates, cv_opt = cv_tx.update(est.cv_grads, state.extra['cv_opt'])
        extra.update(cv=optax.apply_updates(state.extra['cv'], cv_updates), cv_opt=cv_opt)
      state = state.replace(arch=optax.apply_updates(state.arch, updates),
                            arch_opt_state=opt_state, extra=extra)
      metrics = {'val_loss': est.loss, 'val_acc': est.aux['acc'],
                 'arch_grad_norm': optax.tree.norm(est.grads),
                 'baseline': est.baseline,
                 'latency_ms': est.aux.get('latency_ms', jnp.full((), jnp.nan))}
      return state, metrics

    def skip_arch(state, train_batch, val_batch, key):
      nan = jnp.full((), jnp.nan, jnp.float32)
      return state, {k: nan for k in ('val_loss', 'val_acc', 'arch_grad_norm', 'baseline',
                                       'latency_ms')}

    def arch_phase(state, train_batch, val_batch):
      state, metrics = jax.lax.cond(state.step >= arch_start, arch_step, skip_arch, state,
                                    train_batch, val_batch, keys(state)[0])
      metrics['entropy'] = entropy(self.mask(config, state.arch))
      return state, metrics

    def weight_phase(state, train_batch, val_batch):
      del val_batch
      logits = self.mask(config, state.arch)
      sample_key, dropout_key = jax.random.split(keys(state)[1])
      relaxed = estimators.sample(sample_key, logits, sample_shape(train_batch),
                                  temperature=u.temperature, eps=u.soften_eps).zeta
      relaxed = jax.lax.stop_gradient(relaxed)

      def loss(params):
        logits, updates = model.apply(
            {'params': params, 'batch_stats': state.batch_stats}, train_batch['image'],
            relaxed, train=True, path='mixed', mutable=['batch_stats'],
            rngs=rngs(dropout_key))
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, train_batch['label'])
        acc = jnp.mean(jnp.argmax(logits, -1) == train_batch['label'])
        return ce.mean(), (updates['batch_stats'], acc)

      (train_loss, (bs, acc)), grads = jax.value_and_grad(loss, has_aux=True)(state.params)
      updates, opt_state = weight_tx.update(grads, state.weight_opt_state, state.params)
      lr = weight_lr(state.step)
      state = state.replace(params=optax.apply_updates(state.params, updates),
                            weight_opt_state=opt_state, batch_stats=bs, step=state.step + 1)
      return state, {'train_loss': train_loss, 'train_acc': acc,
                     'grad_norm': optax.tree.norm(grads), 'lr': lr}

    weight_lr = weight_schedule(config, steps_per_epoch)  # for the log
    return arch_phase, weight_phase

  def arch_active(self, config, step, steps_per_epoch):
    return step > config.optim.warmup_epochs * steps_per_epoch

  # ------------------------------------------------------------------- latency

  def prepare(self, config, workdir, model, state, batch, mesh):
    """With ``unas.latency_model = 'measure'``: times sampled networks on this backend,
    fits the surrogate and writes it to the workdir (a resumed run reads it back)."""
    if config.unas.latency_model != 'measure':
      return config
    path = os.path.join(workdir, LATENCY_FILE)
    if not os.path.exists(path):
      u = config.unas
      time_fn = self._latency_timer(config, model, state, batch)
      t0 = time.perf_counter()
      print(f'Measuring the latency of {u.latency_samples} sampled networks '
            f'({u.latency_images} images, median of {u.latency_runs} runs each) on '
            f'{jax.default_backend()} ...', flush=True)
      step = max(1, u.latency_samples // 5)
      surrogate, _, ms = latency_lib.build(
          lambda arch: time_fn({k: v[None] for k, v in arch.items()}),
          self.arch_shapes(config), jax.random.fold_in(jax.random.PRNGKey(config.seed), 7),
          u.latency_samples, valid=self.valid_masks(config), seed=config.seed,
          progress=lambda i, n: i % step == 0 and print(f'   timed {i}/{n}', flush=True))
      latency_lib.save(surrogate, path)
      print(f'Latency model: {np.min(ms):.2f}-{np.max(ms):.2f} ms measured; the linear fit '
            f'scores R^2 {surrogate.r2:.3f}, mean abs error {surrogate.mae_ms:.3f} ms on '
            f'{surrogate.n_holdout} held-out networks ({time.perf_counter() - t0:.0f} s); '
            f'written to {path}.', flush=True)
    config = config.copy_and_resolve_references()
    with config.unlocked():
      config.unas.latency_model = path
    return config

  def finish(self, config, workdir, model, state, batch, architecture):
    """The final architecture's latency: measured, and predicted by the surrogate when
    there is one."""
    weights = self.argmax_weights(config, jax.device_get(state.arch))
    out = {'latency_ms': self._latency_timer(config, model, state, batch)(weights)}
    if config.unas.latency_model:
      surrogate = latency_lib.load(config.unas.latency_model, self.arch_shapes(config))
      out.update(latency_predicted_ms=float(surrogate.predict(
          latency_lib.features(weights, self.arch_shapes(config)))[0]),
                 latency_model_r2=surrogate.r2, latency_model_mae_ms=surrogate.mae_ms,
                 latency_model_samples=surrogate.n_fit + surrogate.n_holdout)
    return out

  def _latency_timer(self, config, model, state, batch):
    """weights (S = 1, one-hot) -> median ms of the discrete network's forward pass
    (BN running statistics, only the chosen ops) on ``unas.latency_images`` images."""
    u = config.unas
    variables = jax.device_get({'params': state.params, 'batch_stats': state.batch_stats})
    images = np.asarray(jax.device_get(batch['image']))[:u.latency_images]
    forward = jax.jit(lambda v, x, w: model.apply(v, x, w, train=False, path='discrete'))
    return lambda weights: latency_lib.measure(forward, variables, images, weights,
                                               runs=u.latency_runs, warmup=1)

  def valid_masks(self, config):
    return self.space(config).valid_masks(config.model)

  def argmax_weights(self, config, arch):
    """One-hot weights (S = 1) of the most likely architecture."""
    masked = self.mask(config, arch)
    return {k: jax.nn.one_hot(jnp.argmax(v, -1), v.shape[-1])[None]
            for k, v in masked.items()}

  def make_eval_step(self, model, config):
    """The most likely architecture on held-out data, only its ops run, with the
    BatchNorm running statistics."""

    def eval_step(state, batch):
      logits = model.apply({'params': state.params, 'batch_stats': state.batch_stats},
                           batch['image'], self.argmax_weights(config, state.arch), train=False,
                           path='discrete')
      return base.masked_sums(logits, batch)

    return eval_step

  # ------------------------------------------------------------------- outputs

  def derive(self, config, arch):
    return self.space(config).derive(config.model, arch)

  @staticmethod
  def _space_of(architecture):  # a genotype (cells) or a list of op names (layers)
    return SPACE_ADAPTERS['unas_darts' if isinstance(architecture, genotypes.Genotype)
                          else 'proxyless']

  def to_json(self, architecture):
    return self._space_of(architecture).to_json(architecture)

  def format(self, config, architecture):
    return self.space(config).format(config.model, architecture)

  def is_degenerate(self, config, architecture):
    return self.space(config).is_degenerate(config.model, architecture)

  def write_outputs(self, workdir, config, architecture, arch, **result):
    return self.space(config).write_outputs(workdir, config, architecture, arch, **result)

  def summary(self, config):
    """Weights, arch logits and multiply-adds of the supernet (every candidate op)."""
    shape, num_classes = summary_lib.input_spec(config)
    traced = config.copy_and_resolve_references()
    with traced.unlocked():
      traced.model.depthwise_impl = 'xla'  # so the depthwise convs are counted
    model = self.build_model(traced, num_classes)
    x = jnp.zeros((1,) + shape, jnp.float32)
    weights = self.uniform_weights(config)
    variables = jax.eval_shape(
        lambda: model.init({'params': jax.random.key(0)}, x, weights, train=True))
    macs = flops.count_macs(
        lambda v, x: model.apply(v, x, weights, train=False, path='mixed'), variables, x)
    m = config.model
    return {'method': config.method, 'space': config.space, 'dataset': config.data.name,
            'input_shape': list(shape), 'num_classes': num_classes,
            'primitives': list(m.primitives),
            'params': darts_eval.count_params(variables['params'], exclude=None),
            'arch_params': int(sum(np.prod(s) for s in self.arch_shapes(config).values())),
            'multiply_adds': macs}

  def format_summary(self, s):
    size = 'x'.join(map(str, s['input_shape']))
    return (f'{s["method"]} supernet ({s["space"]} space) on {s["dataset"]} {size}: '
            f'{len(s["primitives"])} candidate ops, {s["params"] / 1e6:.3f}M weights, '
            f'{s["arch_params"]} arch logits, {s["multiply_adds"] / 1e6:.1f}M multiply-adds '
            'per image with every op')


METHOD = Unas()
