"""PARSEC (Casale et al. 2019, "Probabilistic Neural Architecture Search") and FP-NAS
(Yan et al., CVPR 2021, "FP-NAS: Fast Probabilistic Neural Architecture Search"): search
over a distribution of architectures by importance-weighted samples. Neither paper has
public code; this is jaxnas's reading of their method sections.

The architecture is a set of independent categoricals, P(A | alpha) = prod_c
softmax(alpha_c)[A_c] (in the sampled DARTS-like cell of ``jaxnas/spaces/sampled_darts.py``
per node and input slot one over its source and one over its op; ``alpha`` in
``state.arch``, zeros at the start). One search step draws K architectures
A_1..A_K ~ P(A | alpha), each from its own key ``fold_in(key, k)``, and scores all K on
the same minibatch:

  l_k = log P(y | X, w, A_k) = - sum_i CE(f(x_i; w, A_k), y_i)       (a sum over the batch)
  v_k = exp(l_k) / sum_j exp(l_j)                                    (self-normalized)

1. **weight phase** (train split): w <- w - lr * sum_k v_k * grad_w (- l_k / B), the
   importance-weighted gradient of the log marginal likelihood (divided by the batch
   size B, so the learning rate means what it means for a mean loss).
2. **arch phase** (validation split, after ``optim.warmup_epochs`` of weight training):
   the empirical-Bayes gradient of log P(y | X, w, alpha) with respect to alpha,

     g_c = sum_k v_k * (onehot(A_k,c) - softmax(alpha_c))       for every categorical c,

   which the arch optimizer ascends. It is the self-normalized importance-sampling
   estimate: consistent as K grows, biased at O(1/K) (tests/test_fpnas.py measures the
   bias against the exact gradient by enumeration).

**FP-NAS adaptive sampling** (``fpnas.adaptive``): K = clip(ceil(lambda * H(P(A | alpha))),
min_samples, max_samples), with H the entropy in nats of all categoricals and lambda =
``fpnas.sample_scale`` (the paper: 1/4). K falls as the distribution sharpens. The step is
one compiled program for every K: the K samples run in a ``lax.scan`` of max_samples
iterations whose body is a ``lax.cond`` on k < K, a real conditional (the index is a
scalar), so the iterations past K compute nothing and are masked out of both
normalizations (their l_k is -inf) and of the sample count; the BatchNorm statistics see
only the active samples. PARSEC is the same step with K = ``fpnas.num_samples`` fixed.

**Coarse-to-fine** (``fpnas.switch_epoch`` > 0, the FBNetV2-like space of
``jaxnas/spaces/fbnet.py``): until that epoch a stage's choice is sampled factor by factor
(one categorical per factor: kernel, expansion, width, squeeze-excite, nonlinearity);
from it on, from one categorical over their 32 combinations. At the switch the joint
logits become the sums of the factor logits, joint[c] = sum_f alpha_f[c_f], so that
softmax(joint) = prod_f softmax(alpha_f): the distribution (and its entropy, and so K) is
unchanged by the switch; the arch optimizer restarts there (jaxnas choice: Adam's moments
and step count belong to the factors). ``state.arch`` holds both sets of logits from the
start (static shapes); the joint ones stay exactly 0 until the switch. Each step logs
which phase it is in (``fine``).

**Cost** (``fpnas.cost_weight`` = beta > 0, with ``fpnas.flops_target`` T): the arch
objective becomes log P(y | X, w, alpha) - beta * log C(alpha), C(alpha) = (1/K) sum_k
C(A_k), C(A) = max(0, FLOPs(A) / T - 1) computed as max(0, FLOPs(A) - T) / T (so FLOPs
= T gives exactly 0), FLOPs(A) the multiply-adds of architecture A from the space's
formula (``fbnet.multiply_adds``). Its score-function gradient turns the sample weights
into v_k - beta * C(A_k) / sum_j C(A_j); where no sample exceeds the target the papers
define nothing and the term is 0 (jaxnas choice).

Every sample is one architecture for the whole batch on the space's discrete path: each
node slot (cell space) or block (FBNetV2-like space) runs only its sampled op
(``lax.switch`` on a scalar index). The weight phase
accumulates sum_k v_k grad_k in one pass with a running log-sum-exp (memory of one
gradient, not K). The arch phase runs the K samples forward only.

jaxnas choices (not in the papers, which give no code): the likelihood is a sum over the
batch (a mean would flatten the weights); the same K architectures serve the weight
phase on the train batch and the arch phase on the validation batch of a step; the
BatchNorm running statistics take each active sample's update in turn (weight phase
only; the arch phase normalizes with batch statistics and keeps none); the entropy is in
nats, K rounds up, ``fpnas.min_samples`` >= 2 (with K = 1 the weight is always 1 and alpha
only reinforces its own draw). Each step logs K, the entropy and the effective sample
size 1 / sum_k v_k^2.
"""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxnas import base_config
from jaxnas import files
from jaxnas import genotypes
from jaxnas import summary as summary_lib
from jaxnas.methods import base
from jaxnas.methods import unas as unas_method
from jaxnas.spaces import darts_eval
from jaxnas.spaces import fbnet


def get_config(adaptive: bool = True, space: str = 'unas_darts'
               ) -> ml_collections.ConfigDict:
  """FP-NAS (``adaptive``) or PARSEC, with the model fields of ``space``: 'unas_darts'
  (the sampled DARTS-like cell at the DARTS CIFAR-10 search size: C=16, 8 cells) or
  'fbnet' (the FBNetV2-like skeleton). Batch 64, 50 epochs; jaxnas choices where the
  papers give none."""
  if space not in SPACE_ADAPTERS:
    raise ValueError(f'space is {space!r}; PARSEC and FP-NAS search {tuple(SPACE_ADAPTERS)}.')
  c = base_config.loop_config()
  c.method = 'fpnas' if adaptive else 'parsec'
  c.space = space
  c.data.train_portion = 0.5
  c.optim.batch_size = 64
  c.optim.epochs = 50

  c.model = ml_collections.ConfigDict()
  if space == 'unas_darts':
    c.model.C = 16
    c.model.layers = 8
    c.model.steps = 4
    c.model.multiplier = 4
    c.model.stem_multiplier = 3
    c.model.stem = 'cifar'
    c.model.primitives = unas_method.sampled_darts.UNAS_PRIMITIVES
  else:
    c.model.channels = fbnet.CHANNELS    # stem, 5 stages, head conv
    c.model.width_multiplier = 1.0
    c.model.depths = fbnet.DEPTHS        # blocks per stage
    c.model.strides = fbnet.STRIDES
  c.model.depthwise_impl = 'auto'

  c.fpnas = ml_collections.ConfigDict()
  c.fpnas.adaptive = adaptive   # FP-NAS: K from the entropy; PARSEC: K = num_samples
  c.fpnas.num_samples = 16      # PARSEC's K in the DARTS space
  c.fpnas.sample_scale = 0.25   # FP-NAS's lambda: K = ceil(lambda * H)
  c.fpnas.min_samples = 2
  c.fpnas.max_samples = 16      # the scan's length: K never exceeds it
  c.fpnas.switch_epoch = 0      # coarse-to-fine (fbnet): the joint takes over here; 0: never
  c.fpnas.flops_target = 0.0    # multiply-adds, for the cost term (fbnet)
  c.fpnas.cost_weight = 0.0     # beta of beta * log C; 0: no cost term

  c.optim.learning_rate = 0.025        # weights: SGD momentum, cosine (DARTS's settings)
  c.optim.learning_rate_min = 0.001
  c.optim.momentum = 0.9
  c.optim.weight_decay = 3e-4
  c.optim.grad_clip = 5.0
  c.optim.warmup_epochs = 0            # weights only, on samples of the initial alpha
  c.optim.arch_learning_rate = 3e-3    # alpha: Adam, constant
  c.optim.arch_betas = (0.5, 0.999)
  c.optim.arch_weight_decay = 0.0
  return c


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A few steps of a tiny supernet, for checking a setup end to end."""
  if c.space == 'fbnet':
    c.model.width_multiplier = 0.25
    c.model.depths = (1, 1, 1, 3, 1)
    c.fpnas.switch_epoch = min(c.fpnas.switch_epoch, 1)
  else:
    c.model.C = 8
    c.model.layers = 3
    c.model.steps = 2
    c.model.multiplier = 2
  c.fpnas.num_samples = min(c.fpnas.num_samples, 4)
  c.fpnas.max_samples = 4
  c.fpnas.sample_scale = 0.05
  c.optim.warmup_epochs = 0
  return base_config.few_steps(c)


# ----------------------------------------------------------------------------- the estimate


def entropy(logits) -> jax.Array:
  """Total entropy (nats) of the categoricals (masked choices have probability 0)."""
  return unas_method.entropy(logits)


def num_samples(config, logits) -> jax.Array:
  """K of this step: PARSEC's fixed count, or FP-NAS's ceil(lambda * H) within
  [min_samples, max_samples], H the entropy of the categoricals ``logits``."""
  return num_samples_from_entropy(config, entropy(logits))


def num_samples_from_entropy(config, h) -> jax.Array:
  f = config.fpnas
  if not f.adaptive:
    return jnp.asarray(f.num_samples, jnp.int32)
  k = jnp.ceil(f.sample_scale * h).astype(jnp.int32)
  return jnp.clip(k, f.min_samples, f.max_samples)


def max_samples(config) -> int:
  """Length of the scan over samples (a static shape)."""
  f = config.fpnas
  return f.max_samples if f.adaptive else f.num_samples


def draw(key, logits, n: int) -> dict[str, jax.Array]:
  """n architectures, sample k from ``fold_in(key, k)``: index choices
  ``{name: int32 (n, *shape[:-1])}``."""

  def one(k):
    keys = jax.random.split(jax.random.fold_in(key, k), len(logits))
    return {name: jax.random.categorical(kk, logits[name], -1)
            for kk, name in zip(keys, sorted(logits))}

  return jax.vmap(one)(jnp.arange(n))


def importance_weights(log_likelihoods, active) -> jax.Array:
  """v_k = softmax(l_k) over the active samples; 0 for the others."""
  masked = jnp.where(active, log_likelihoods, -jnp.inf)
  return jax.nn.softmax(masked)


def arch_gradient(logits, choices, weights) -> dict[str, jax.Array]:
  """The ascent direction sum_k w_k (onehot(A_k) - softmax(alpha)) per categorical:
  with the importance weights v (summing to 1 over the samples) the gradient of the log
  marginal likelihood, with `cost_weights` that of the objective with the cost term.
  Choices the mask forbids get 0."""
  out = {}
  for name, v in logits.items():
    probs = jax.nn.softmax(v, -1)
    hot = jax.nn.one_hot(choices[name], v.shape[-1], dtype=v.dtype)  # (K, ..., n)
    w = weights.reshape((-1,) + (1,) * (hot.ndim - 1))
    out[name] = jnp.sum(w * hot, 0) - jnp.sum(weights) * probs
  return out


def effective_sample_size(weights) -> jax.Array:
  return 1.0 / jnp.sum(weights ** 2)


# ----------------------------------------------------------------------------- spaces


class CellSpace:
  """The sampled DARTS-like cell (``'unas_darts'``, shared with UNAS): per node and
  input slot a categorical over its source and one over its op. No factorized choice
  (no coarse-to-fine) and no FLOPs formula."""
  name = 'unas_darts'
  factorized = False
  cells = unas_method.SPACE_ADAPTERS['unas_darts']

  def arch_shapes(self, m):
    return self.cells.arch_shapes(m)

  def distribution(self, m, arch, fine):
    """The masked logits of the categoricals in use."""
    del fine
    return self.cells.mask(m, arch)

  def draw(self, m, arch, key, n, fine):
    return draw(key, self.distribution(m, arch, fine), n)

  def ascent(self, m, arch, choices, weights, fine):
    return arch_gradient(self.distribution(m, arch, fine), choices, weights)

  def apply(self, model, variables, x, choices, m, **kwargs):
    """One architecture (index choices) on the batch, only its ops run."""
    weights = {k: jax.nn.one_hot(choices[k], s[-1])[None]
               for k, s in self.arch_shapes(m).items()}
    return model.apply(variables, x, weights, path='discrete', **kwargs)

  def most_likely(self, m, arch, fine):
    return {k: jnp.argmax(v, -1) for k, v in self.distribution(m, arch, fine).items()}

  def switched(self, arch):
    del arch
    return False

  def build(self, m, num_classes, bn_groups):
    return self.cells.build(m, num_classes, bn_groups)

  def init_variables(self, model, x, key, m):
    shapes = self.arch_shapes(m)
    uniform = {k: jax.nn.softmax(v, -1)[None] for k, v in
               self.cells.mask(m, {k: jnp.zeros(s) for k, s in shapes.items()}).items()}
    return model.init({'params': key}, x, uniform, train=True)

  def validate(self, m, fail):
    return self.cells.validate(m, fail)

  def derive(self, m, arch, fine):
    return self.cells.derive(m, arch)

  def to_json(self, architecture):
    return self.cells.to_json(architecture)

  def format(self, m, architecture):
    return self.cells.format(m, architecture)

  def is_degenerate(self, m, architecture):
    return self.cells.is_degenerate(m, architecture)

  def write_outputs(self, workdir, config, architecture, arch, **result):
    return self.cells.write_outputs(workdir, config, architecture, arch, **result)

  multiply_adds = None


class FBNetSpace:
  """The FBNetV2-like micro space (``jaxnas/spaces/fbnet.py``): per stage a kernel,
  expansion, width, squeeze-excite and nonlinearity choice. ``state.arch`` holds both
  distributions, the factorized logits ``{factor: (stages, options)}`` and the joint
  ``{'joint': (stages, 32)}``; ``fine`` (a traced bool) says which one is in use."""
  name = 'fbnet'
  factorized = True

  def arch_shapes(self, m):
    return {**fbnet.factorized_shapes(tuple(m.depths)), **fbnet.joint_shapes(tuple(m.depths))}

  def distribution(self, m, arch, fine):
    """The factorized logits, or (``fine``) the joint's, as one dict."""
    del m
    if isinstance(fine, bool):
      return {'joint': arch['joint']} if fine else {f: arch[f] for f in fbnet.FACTORS}
    raise TypeError('distribution needs a static phase; use entropy or draw in traced code')

  def entropy(self, arch, fine):
    coarse = entropy({f: arch[f] for f in fbnet.FACTORS})
    return jnp.where(fine, entropy({'joint': arch['joint']}), coarse)

  def draw(self, m, arch, key, n, fine):
    """n architectures as factor choices ``{factor: (n, stages)}``, from the factorized
    or the joint distribution."""
    coarse = draw(key, {f: arch[f] for f in fbnet.FACTORS}, n)
    joint = fbnet.factor_choices_from_joint(draw(key, {'joint': arch['joint']}, n)['joint'])
    return {f: jnp.where(fine, joint[f], coarse[f]).astype(jnp.int32) for f in fbnet.FACTORS}

  def ascent(self, m, arch, choices, weights, fine):
    """The ascent direction of the distribution in use; 0 for the other one."""
    coarse = arch_gradient({f: arch[f] for f in fbnet.FACTORS}, choices, weights)
    joint = arch_gradient({'joint': arch['joint']},
                          {'joint': fbnet.joint_index(choices)}, weights)
    on = jnp.asarray(fine, jnp.float32)
    return {**{f: g * (1 - on) for f, g in coarse.items()},
            **{k: g * on for k, g in joint.items()}}

  def apply(self, model, variables, x, choices, m, **kwargs):
    del m
    return model.apply(variables, x, choices, **kwargs)

  def switched(self, arch):
    """Whether the joint distribution has taken over: its logits stay exactly 0 until
    the switch sets them to the sums of the factors' (where those are all 0 as well,
    both distributions give the same most likely architecture)."""
    return jnp.any(arch['joint'] != 0)

  def most_likely(self, m, arch, fine):
    coarse = {f: jnp.argmax(arch[f], -1) for f in fbnet.FACTORS}
    joint = fbnet.factor_choices_from_joint(jnp.argmax(arch['joint'], -1))
    return {f: jnp.where(fine, joint[f], coarse[f]).astype(jnp.int32) for f in fbnet.FACTORS}

  def build(self, m, num_classes, bn_groups):
    return fbnet.FBNetNetwork(num_classes=num_classes, channels=tuple(m.channels),
                              width_multiplier=m.width_multiplier, depths=tuple(m.depths),
                              strides=tuple(m.strides), impl=m.depthwise_impl,
                              bn_groups=bn_groups)

  def init_variables(self, model, x, key, m):
    choices = {f: jnp.zeros((len(m.depths),), jnp.int32) for f in fbnet.FACTORS}
    return model.init({'params': key}, x, choices, train=True)

  def validate(self, m, fail):
    try:
      fbnet.check_skeleton(fbnet.resolve_channels(tuple(m.channels), m.width_multiplier),
                           tuple(m.depths), tuple(m.strides))
    except ValueError as e:
      fail('model.channels', f'(with model.width_multiplier, model.depths and '
           f'model.strides) cannot build the network: {e}')
    return None

  def derive(self, m, arch, fine):
    return fbnet.freeze({k: np.asarray(v) for k, v in
                         jax.device_get(self.most_likely(m, arch, fine)).items()})

  def to_json(self, architecture):
    return fbnet.to_json(architecture)

  def format(self, m, architecture):
    return fbnet.format_architecture(architecture)

  def is_degenerate(self, m, architecture):
    return False  # every architecture of the space is a full network

  def write_outputs(self, workdir, config, architecture, arch, **result):
    path = os.path.join(workdir, fbnet.ARCHITECTURE_FILE)
    files.write_json(path, {**fbnet.to_json(architecture), **result,
                            'arch_logits': {k: np.asarray(v).tolist() for k, v in arch.items()}},
                     indent=1)
    files.write_npz(os.path.join(workdir, 'arch.npz'), **arch)
    return f'architecture written to {path}'

  def multiply_adds(self, m, choices, image_shape, num_classes):
    return fbnet.multiply_adds(
        choices, image_size=image_shape[:2], num_classes=num_classes,
        channels=tuple(m.channels), width_multiplier=m.width_multiplier,
        depths=tuple(m.depths), strides=tuple(m.strides), in_channels=image_shape[2])


SPACE_ADAPTERS = {'unas_darts': CellSpace(), 'fbnet': FBNetSpace()}


def flops_cost(flops, target: float):
  """C(A) = max(0, FLOPs(A) / target - 1), computed as max(0, FLOPs - target) / target
  so that FLOPs = target gives exactly 0."""
  return jnp.maximum(flops - target, 0.0) / target


def cost_weights(v, costs, active, beta: float):
  """The samples' weights in the arch gradient with the cost term beta * log C(alpha),
  C(alpha) = mean_k C(A_k): v_k - beta * C(A_k) / sum_j C(A_j); where no active sample
  exceeds the target (sum C = 0) the term is 0."""
  costs = jnp.where(active, costs, 0.0)
  total = jnp.sum(costs)
  share = jnp.where(total > 0, costs / jnp.where(total > 0, total, 1.0), 0.0)
  return v - beta * share


# ----------------------------------------------------------------------------- the method


class Parsec(base.Method):
  """PARSEC, and FP-NAS with ``fpnas.adaptive`` (module docstring)."""

  name = 'parsec'
  adaptive = False

  def get_config(self):
    return get_config(self.adaptive)

  def variants(self):
    return {'smoke': smoke}

  def space(self, config):
    return SPACE_ADAPTERS[config.space]

  def validate(self, config, fail):
    m, o, f = config.model, config.optim, config.fpnas
    if config.space not in SPACE_ADAPTERS:
      fail('space', f'is {config.space!r}; {self.name} searches {tuple(SPACE_ADAPTERS)}.')
    space = self.space(config)
    allowed = space.validate(m, fail)
    base.check_depthwise_impl(m, fail)
    if allowed is not None:
      unknown = [p for p in m.primitives if p not in allowed]
      if unknown or len(set(m.primitives)) != len(m.primitives) or len(m.primitives) < 2:
        fail('model.primitives', f'must be two or more distinct ops of {allowed}, got '
             f'{tuple(m.primitives)}.')
    if f.adaptive != self.adaptive:
      fail('fpnas.adaptive', f'is {f.adaptive}, but method {self.name!r} '
           f'{"samples adaptively" if self.adaptive else "draws a fixed K"}; set method to '
           f'{"fpnas" if f.adaptive else "parsec"}.')
    if f.adaptive:
      if not f.sample_scale > 0:
        fail('fpnas.sample_scale', f'(lambda) must be positive, got {f.sample_scale}.')
      if f.min_samples < 2:
        fail('fpnas.min_samples', f'must be at least 2 (one sample always gets weight 1), '
             f'got {f.min_samples}.')
      if f.max_samples < f.min_samples:
        fail('fpnas.max_samples', f'= {f.max_samples} must be >= fpnas.min_samples = '
             f'{f.min_samples}.')
    elif f.num_samples < 2:
      fail('fpnas.num_samples', f'must be at least 2, got {f.num_samples}.')
    if f.switch_epoch:
      if not space.factorized:
        fail('fpnas.switch_epoch', f'= {f.switch_epoch} asks for coarse-to-fine, but the '
             f"{config.space!r} space has no factorized choice; use 'fbnet' or set it to 0.")
      if not 0 < f.switch_epoch < o.epochs:
        fail('fpnas.switch_epoch', f'= {f.switch_epoch} must be in 1..optim.epochs - 1 = '
             f'{o.epochs - 1} (0: no switch).')
    if f.cost_weight < 0:
      fail('fpnas.cost_weight', f'(beta) must be >= 0 (0: no cost term), got '
           f'{f.cost_weight}.')
    if f.cost_weight > 0 and not f.flops_target > 0:
      fail('fpnas.flops_target', f'must be positive (multiply-adds) with fpnas.cost_weight '
           f'= {f.cost_weight}; got {f.flops_target}.')
    if f.cost_weight > 0 and space.multiply_adds is None:
      fail('fpnas.cost_weight', f"> 0 needs a FLOPs formula, which the {config.space!r} "
           "space has not; use 'fbnet'.")
    if o.warmup_epochs < 0 or o.warmup_epochs >= o.epochs:
      fail('optim.warmup_epochs', f'= {o.warmup_epochs} must be in 0..optim.epochs - 1 = '
           f'{o.epochs - 1} (the search needs epochs after the warm-up).')
    if o.learning_rate <= 0 or o.arch_learning_rate <= 0:
      fail('optim.learning_rate', 'and optim.arch_learning_rate must be positive.')

  def fine(self, config, step, steps_per_epoch):
    """Whether step ``step`` (0-based count) samples from the joint distribution."""
    f = config.fpnas
    if not f.switch_epoch:
      return jnp.asarray(False)
    return step >= f.switch_epoch * steps_per_epoch

  # ------------------------------------------------------------------- model and state

  def arch_shapes(self, config):
    return self.space(config).arch_shapes(config.model)

  def build_model(self, config, num_classes, num_devices=1):
    per_device = config.parallel.batch_norm == 'per_device'
    return self.space(config).build(config.model, num_classes,
                                    num_devices if per_device else 1)

  def init_variables(self, model, x, key, config):
    variables = self.space(config).init_variables(model, x, key, config.model)
    arch = {k: jnp.zeros(s, jnp.float32) for k, s in self.arch_shapes(config).items()}
    return {**variables, 'arch': arch}

  def init_extra(self, config, arch):
    n = max_samples(config)
    space = self.space(config)
    probe = jax.eval_shape(lambda: space.draw(config.model, arch, jax.random.key(0), n,
                                              jnp.asarray(False)))
    return {'samples': {k: jnp.zeros(v.shape, jnp.int32) for k, v in probe.items()},
            'num_samples': jnp.zeros((), jnp.int32),
            'samples_drawn': jnp.zeros((), jnp.int32)}

  def make_optimizers(self, config, steps_per_epoch):
    """SGD with momentum for the weights (cosine over all epochs), Adam for alpha."""
    o = config.optim
    schedule = unas_method.cosine(o.learning_rate, o.learning_rate_min, o.epochs,
                                  steps_per_epoch)
    weight_tx = optax.chain(
        optax.clip_by_global_norm(o.grad_clip) if o.grad_clip > 0 else optax.identity(),
        optax.add_decayed_weights(o.weight_decay),
        optax.sgd(schedule, momentum=o.momentum))
    arch_tx = optax.chain(
        optax.add_decayed_weights(o.arch_weight_decay),
        optax.adam(o.arch_learning_rate, b1=o.arch_betas[0], b2=o.arch_betas[1]))
    return weight_tx, arch_tx

  # ------------------------------------------------------------------- steps

  def make_phases(self, model, weight_tx, arch_tx, config, steps_per_epoch):
    o, f, m = config.optim, config.fpnas, config.model
    space = self.space(config)
    arch_start = o.warmup_epochs * steps_per_epoch
    switch_step = f.switch_epoch * steps_per_epoch if f.switch_epoch else -1
    n_max = max_samples(config)
    schedule = unas_method.cosine(o.learning_rate, o.learning_rate_min, o.epochs,
                                  steps_per_epoch)
    image_shape, num_classes = summary_lib.input_spec(config)

    def forward(params, batch_stats, batch, choices, keep_stats: bool):
      """Sum of the batch's cross-entropy, correct count, BN statistics after it."""
      logits, updates = space.apply(model, {'params': params, 'batch_stats': batch_stats},
                                    batch['image'], choices, m, train=True,
                                    mutable=['batch_stats'])
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label'])
      correct = jnp.sum(jnp.argmax(logits, -1) == batch['label'])
      return jnp.sum(ce), (correct, updates['batch_stats'] if keep_stats else batch_stats)

    def entropy_of(arch, fine):
      if space.factorized:
        return space.entropy(arch, fine)
      return entropy(space.distribution(m, arch, False))

    def switch(state):
      """At the switch step: the joint logits from the factors (the same distribution),
      and a fresh arch optimizer state."""
      at = state.step == switch_step
      arch = {**state.arch, **fbnet.joint_from_factorized(
          {k: state.arch[k] for k in fbnet.FACTORS})}
      arch = jax.tree.map(lambda new, old: jnp.where(at, new, old), arch, state.arch)
      fresh = arch_tx.init(arch)
      opt = jax.tree.map(lambda new, old: jnp.where(at, new, old), fresh,
                         state.arch_opt_state)
      return state.replace(arch=arch, arch_opt_state=opt)

    def weight_phase(state, train_batch, val_batch):
      del val_batch
      if switch_step >= 0:
        state = switch(state)
      fine = self.fine(config, state.step, steps_per_epoch)
      k_active = num_samples_from_entropy(config, entropy_of(state.arch, fine))
      key = jax.random.fold_in(state.key, state.step)
      choices = space.draw(m, state.arch, key, n_max, fine)
      batch_size = train_batch['label'].shape[0]
      zeros = jax.tree.map(jnp.zeros_like, state.params)

      def body(carry, xs):
        k, choice_k = xs

        def run(carry):
          grad_sum, top, total, bs, ce_sum, correct_sum = carry
          (ce, (correct, new_bs)), g = jax.value_and_grad(
              lambda p: forward(p, bs, train_batch, choice_k, True), has_aux=True)(
                  state.params)
          # A running log-sum-exp: sum_k exp(l_k - top) g_k and sum_k exp(l_k - top).
          l_k = -ce
          new_top = jnp.maximum(top, l_k)
          old, new = jnp.exp(top - new_top), jnp.exp(l_k - new_top)
          grad_sum = jax.tree.map(lambda a, b: a * old + b * new, grad_sum, g)
          return (grad_sum, new_top, total * old + new, new_bs, ce_sum + ce,
                  correct_sum + correct), l_k

        def skip(carry):
          return carry, jnp.asarray(-jnp.inf, jnp.float32)

        return jax.lax.cond(k < k_active, run, skip, carry)

      init = (zeros, jnp.asarray(-jnp.inf, jnp.float32), jnp.zeros((), jnp.float32),
              state.batch_stats, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
      (grad_sum, _, total, batch_stats, ce_sum, correct_sum), log_lik = jax.lax.scan(
          body, init, (jnp.arange(n_max), choices))
      # sum_k v_k grad(sum_i CE_ik), over the batch size: a mean-loss gradient's scale.
      grads = jax.tree.map(lambda g: g / (total * batch_size), grad_sum)
      updates, opt_state = weight_tx.update(grads, state.weight_opt_state, state.params)
      active = jnp.arange(n_max) < k_active
      v = importance_weights(log_lik, active)
      n = k_active.astype(jnp.float32) * batch_size
      state = state.replace(
          params=optax.apply_updates(state.params, updates), weight_opt_state=opt_state,
          batch_stats=batch_stats,
          extra={**state.extra, 'samples': choices, 'num_samples': k_active,
                 'samples_drawn': state.extra['samples_drawn'] + k_active})
      metrics = {'train_loss': ce_sum / n, 'train_acc': correct_sum / n,
                 'grad_norm': optax.tree.norm(grads), 'lr': schedule(state.step),
                 'num_samples': k_active.astype(jnp.float32),
                 'entropy': entropy_of(state.arch, fine), 'train_ess': effective_sample_size(v)}
      if config.fpnas.switch_epoch:  # coarse-to-fine: 1 once the joint has taken over
        metrics['fine'] = jnp.asarray(fine, jnp.float32)
      if space.multiply_adds is not None:
        flops = space.multiply_adds(m, choices, image_shape, num_classes)
        metrics['mflops'] = jnp.sum(jnp.where(active, flops, 0)) / k_active / 1e6
      return state, metrics

    def arch_step(state, val_batch):
      fine = self.fine(config, state.step, steps_per_epoch)
      choices, k_active = state.extra['samples'], state.extra['num_samples']

      def body(_, xs):
        k, choice_k = xs

        def run(_):
          ce, (correct, _) = forward(state.params, state.batch_stats, val_batch, choice_k,
                                     False)
          return -ce, correct

        def skip(_):
          return jnp.asarray(-jnp.inf, jnp.float32), jnp.zeros((), jnp.int32)

        return None, jax.lax.cond(k < k_active, run, skip, None)

      _, (log_lik, correct) = jax.lax.scan(body, None, (jnp.arange(n_max), choices))
      active = jnp.arange(n_max) < k_active
      v = importance_weights(log_lik, active)
      metrics = {}
      if f.cost_weight > 0:
        costs = flops_cost(space.multiply_adds(m, choices, image_shape, num_classes)
                           .astype(jnp.float32), f.flops_target)
        v_cost = cost_weights(v, costs, active, f.cost_weight)
        metrics['cost'] = jnp.sum(jnp.where(active, costs, 0.0)) / k_active
      else:
        v_cost = v
      ascent = space.ascent(m, state.arch, choices, v_cost, fine)
      grads = jax.tree.map(jnp.negative, ascent)
      updates, opt_state = arch_tx.update(grads, state.arch_opt_state, state.arch)
      batch_size = val_batch['label'].shape[0]
      n = k_active.astype(jnp.float32) * batch_size
      state = state.replace(arch=optax.apply_updates(state.arch, updates),
                            arch_opt_state=opt_state)
      return state, {'val_loss': -jnp.sum(jnp.where(active, log_lik, 0.0)) / n,
                     'val_acc': jnp.sum(correct) / n,
                     'arch_grad_norm': optax.tree.norm(grads),
                     'val_ess': effective_sample_size(v), **metrics}

    arch_metrics = ('val_loss', 'val_acc', 'arch_grad_norm', 'val_ess') + (
        ('cost',) if f.cost_weight > 0 else ())

    def skip_arch(state, val_batch):
      nan = jnp.full((), jnp.nan, jnp.float32)
      return state, {k: nan for k in arch_metrics}

    def arch_phase(state, train_batch, val_batch):
      del train_batch
      state, metrics = jax.lax.cond(state.step >= arch_start, arch_step, skip_arch, state,
                                    val_batch)
      return state.replace(step=state.step + 1), metrics

    return weight_phase, arch_phase

  def arch_active(self, config, step, steps_per_epoch):
    return step > config.optim.warmup_epochs * steps_per_epoch

  def make_eval_step(self, model, config):
    """The most likely architecture on held-out data, only its ops run, with the
    BatchNorm running statistics."""
    space, m = self.space(config), config.model

    def eval_step(state, batch):
      choices = space.most_likely(m, state.arch, space.switched(state.arch))
      logits = space.apply(model, {'params': state.params, 'batch_stats': state.batch_stats},
                           batch['image'], choices, m, train=False)
      return base.masked_sums(logits, batch)

    return eval_step

  def finish(self, config, workdir, model, state, batch, architecture):
    arch = jax.device_get(state.arch)
    space = self.space(config)
    fine = space.switched(arch)
    out = {'samples_drawn': int(jax.device_get(state.extra['samples_drawn'])),
           'final_entropy': float(space.entropy(arch, fine) if space.factorized else
                                  entropy(space.distribution(config.model, arch, False)))}
    if space.multiply_adds is not None:
      image_shape, num_classes = summary_lib.input_spec(config)
      choices = fbnet.thaw(architecture)
      out['multiply_adds'] = int(space.multiply_adds(config.model, choices, image_shape,
                                                     num_classes))
      if config.fpnas.cost_weight:
        out['flops_target'] = config.fpnas.flops_target
    return out

  # ------------------------------------------------------------------- outputs

  def derive(self, config, arch):
    space = self.space(config)
    return space.derive(config.model, arch, space.switched(arch))

  def to_json(self, architecture):
    space = SPACE_ADAPTERS['unas_darts' if isinstance(architecture, genotypes.Genotype)
                           else 'fbnet']
    return space.to_json(architecture)

  def format(self, config, architecture):
    return self.space(config).format(config.model, architecture)

  def is_degenerate(self, config, architecture):
    return self.space(config).is_degenerate(config.model, architecture)

  def write_outputs(self, workdir, config, architecture, arch, **result):
    return self.space(config).write_outputs(workdir, config, architecture, arch, **result)

  def summary(self, config):
    if config.space == 'unas_darts':
      return unas_method.METHOD.summary(config)
    shape, num_classes = summary_lib.input_spec(config)
    traced = config.copy_and_resolve_references()
    with traced.unlocked():
      traced.model.depthwise_impl = 'xla'
    model = self.build_model(traced, num_classes)
    x = jnp.zeros((1,) + shape, jnp.float32)
    choices = {f: jnp.full((len(config.model.depths),), len(v) - 1, jnp.int32)
               for f, v in fbnet.FACTORS.items()}  # the largest architecture
    variables = jax.eval_shape(lambda: model.init({'params': jax.random.key(0)}, x, choices,
                                                  train=True))
    return {'method': config.method, 'space': config.space, 'dataset': config.data.name,
            'input_shape': list(shape), 'num_classes': num_classes,
            'primitives': [f'{k}{list(v)}' for k, v in fbnet.FACTORS.items()],
            'params': darts_eval.count_params(variables['params'], exclude=None),
            'arch_params': int(sum(np.prod(s) for s in self.arch_shapes(config).values())),
            'multiply_adds': int(self.space(config).multiply_adds(
                config.model, choices, shape, num_classes))}

  def format_summary(self, s):
    if s['space'] != 'fbnet':
      return unas_method.METHOD.format_summary(s)
    size = 'x'.join(map(str, s['input_shape']))
    return (f'{s["method"]} supernet (fbnet space) on {s["dataset"]} {size}: per stage '
            f'{" x ".join(s["primitives"])}, {s["params"] / 1e6:.3f}M weights, '
            f'{s["arch_params"]} arch logits (factorized and joint), largest architecture '
            f'{s["multiply_adds"] / 1e6:.1f}M multiply-adds per image')


class FpNas(Parsec):
  """FP-NAS: PARSEC with K adapted to the distribution's entropy."""
  name = 'fpnas'
  adaptive = True


PARSEC = Parsec()
FPNAS = FpNas()
