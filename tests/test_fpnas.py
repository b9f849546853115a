"""PARSEC and FP-NAS: the importance-weighted arch gradient against the exact gradient,
adaptive K, the masked samples, reproducibility, the step and its config errors."""

import itertools
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

from jaxnas import search
from jaxnas.methods import fpnas
from jaxnas.spaces import sampled_darts
from test_data import write_fashion_mnist

# ------------------------------------------------------------------ the estimator on a toy

# Two categoricals of three options: 9 architectures, each with a log-likelihood.
TOY_SHAPE = (2, 3)
TOY_LL = np.array([[-3.0, -1.0, -2.5], [-0.5, -2.0, -4.0]])  # additive per categorical
TOY_LOGITS = {'a': jnp.array([[0.3, -0.2, 0.1], [0.0, 0.4, -0.3]])}
ARCHS = np.array(list(itertools.product(range(3), range(3))))  # (9, 2)


def toy_log_likelihood(choices):
  """log P(y | A) of architectures ``choices`` (..., 2)."""
  return TOY_LL[0][choices[..., 0]] + TOY_LL[1][choices[..., 1]]


def exact_gradient(logits):
  """grad_alpha log sum_A P(A | alpha) P(y | A), by enumerating the 9 architectures."""

  def log_marginal(a):
    logp = jax.nn.log_softmax(a, -1)
    log_q = logp[0][ARCHS[:, 0]] + logp[1][ARCHS[:, 1]]
    return jax.nn.logsumexp(log_q + toy_log_likelihood(ARCHS))

  return np.asarray(jax.grad(log_marginal)(logits['a']))


def estimate(logits, choices):
  """fpnas's estimate from K architectures ``choices`` (K, 2)."""
  v = fpnas.importance_weights(jnp.asarray(toy_log_likelihood(choices)),
                               jnp.ones(len(choices), bool))
  return np.asarray(fpnas.arch_gradient(logits, {'a': jnp.asarray(choices)}, v)['a'])


def compositions(k: int, n: int = 9) -> np.ndarray:
  """Every way to draw k samples from n options, as counts (M, n)."""
  out = []
  for bars in itertools.combinations(range(k + n - 1), n - 1):
    edges = (-1,) + bars + (k + n - 1,)
    out.append([edges[i + 1] - edges[i] - 1 for i in range(n)])
  return np.array(out)


def expected_estimate(logits, k: int):
  """E[estimate] over K i.i.d. samples, exactly: the estimate depends on how often each
  of the 9 architectures was drawn, so the sum runs over those counts, each with its
  multinomial probability."""
  logp = np.asarray(jax.nn.log_softmax(logits['a'], -1))
  log_q = logp[0][ARCHS[:, 0]] + logp[1][ARCHS[:, 1]]
  counts = compositions(k)
  log_mult = (scipy.special.gammaln(k + 1) - scipy.special.gammaln(counts + 1).sum(1)
              + counts @ log_q)
  choices = np.stack([np.repeat(ARCHS, c, axis=0) for c in counts])  # (M, k, 2)
  estimates = jax.vmap(lambda c: jnp.asarray(estimate_jnp(logits, c)))(choices)
  return np.tensordot(np.exp(log_mult), np.asarray(estimates), 1)


def estimate_jnp(logits, choices):
  ll = jnp.asarray(TOY_LL[0])[choices[:, 0]] + jnp.asarray(TOY_LL[1])[choices[:, 1]]
  v = fpnas.importance_weights(ll, jnp.ones(choices.shape[0], bool))
  return fpnas.arch_gradient(logits, {'a': choices}, v)['a']


def test_arch_gradient_bias_shrinks_as_one_over_k():
  """The self-normalized estimate is consistent, biased at O(1/K): its exact expectation
  approaches the exact gradient, with K * bias converging (to about 1.02 on this toy:
  bias <= 1.05 / K for K <= 10)."""
  exact = exact_gradient(TOY_LOGITS)
  ks = range(1, 11)
  bias = np.array([np.abs(expected_estimate(TOY_LOGITS, k) - exact).max() for k in ks])
  # K = 1: the weight is 1, the expectation of onehot - p is 0: the bias is the gradient.
  np.testing.assert_allclose(bias[0], np.abs(exact).max(), rtol=1e-5)
  assert np.all(np.diff(bias) < 0)
  scaled = bias * np.array(ks)
  steps = np.diff(scaled)
  assert np.all(steps > 0) and np.all(np.diff(steps) < 0) and steps[-1] < 0.01, scaled
  assert scaled[-1] < 1.05


def test_arch_gradient_converges_to_the_exact_gradient_at_large_k():
  """K = 512, 200 draws: the mean estimate lies within 4 standard errors plus the O(1/K)
  bias bound (C / K with C from K = 2) of the exact gradient."""
  exact = exact_gradient(TOY_LOGITS)
  c_bias = 2 * np.abs(expected_estimate(TOY_LOGITS, 2) - exact).max()
  draws = []
  for seed in range(200):
    choices = fpnas.draw(jax.random.key(seed), TOY_LOGITS, 512)['a']
    draws.append(estimate(TOY_LOGITS, np.asarray(choices)))
  draws = np.stack(draws)
  err = np.abs(draws.mean(0) - exact)
  stderr = draws.std(0) / np.sqrt(len(draws))
  assert np.all(err < 4 * stderr + c_bias / 512), (err, stderr)


@pytest.mark.parametrize('adaptive', [False, True])
def test_both_methods_move_alpha_to_the_best_architecture_on_a_toy(adaptive):
  """Adam ascent of the estimate from uniform logits: the most likely architecture
  becomes the most likely one under the data (1, 0), and with adaptive K the sample count
  falls with the entropy."""
  import optax  # pylint: disable=g-import-not-at-top
  config = fpnas.get_config(adaptive)
  config.fpnas.update(num_samples=8, sample_scale=4.0, min_samples=2, max_samples=8)
  logits = {'a': jnp.zeros(TOY_SHAPE)}
  tx = optax.adam(0.05)
  opt = tx.init(logits)
  ks = []
  for step in range(150):
    k = int(fpnas.num_samples(config, logits))
    ks.append(k)
    choices = np.asarray(fpnas.draw(jax.random.key(step), logits, k)['a'])
    grads = {'a': -estimate(logits, choices)}
    updates, opt = tx.update(grads, opt)
    logits = optax.apply_updates(logits, updates)
  assert tuple(np.argmax(logits['a'], -1)) == (1, 0)
  if adaptive:
    assert ks[0] == 8 and ks[-1] < ks[0]
  else:
    assert set(ks) == {8}


# ------------------------------------------------------------------ adaptive K


def test_k_follows_the_entropy_formula():
  config = fpnas.get_config(True)
  config.fpnas.update(sample_scale=0.25, min_samples=2, max_samples=16)
  shapes = sampled_darts.arch_shapes(4, 7)
  uniform = sampled_darts.mask_logits({k: jnp.zeros(s) for k, s in shapes.items()})
  # Per cell type: 2 slots x (log 2 + log 3 + log 4 + log 5) sources, 8 slots x log 7 ops.
  h = 2 * (2 * np.log(120) + 8 * np.log(7))
  np.testing.assert_allclose(fpnas.entropy(uniform), h, rtol=1e-5)
  assert int(fpnas.num_samples(config, uniform)) == int(np.ceil(0.25 * h)) == 13
  sharp = {k: v * 30.0 + jnp.arange(v.shape[-1]) * 3.0 for k, v in uniform.items()}
  assert int(fpnas.num_samples(config, sharp)) == 2  # the minimum
  config.fpnas.sample_scale = 10.0
  assert int(fpnas.num_samples(config, uniform)) == 16  # the maximum
  config.fpnas.adaptive = False
  assert int(fpnas.num_samples(config, sharp)) == config.fpnas.num_samples


def test_samples_are_reproducible_from_the_key_and_independent_per_index():
  shapes = sampled_darts.arch_shapes(2, 3)
  logits = sampled_darts.mask_logits({k: jnp.zeros(s) for k, s in shapes.items()})
  a = fpnas.draw(jax.random.key(3), logits, 8)
  chex.assert_trees_all_equal(a, fpnas.draw(jax.random.key(3), logits, 8))
  # Sample k depends on (key, k) alone: the first 4 of 8 are the 4 of a shorter draw.
  chex.assert_trees_all_equal(jax.tree.map(lambda x: x[:4], a),
                              fpnas.draw(jax.random.key(3), logits, 4))
  b = fpnas.draw(jax.random.key(4), logits, 8)
  assert any(np.any(a[k] != b[k]) for k in a)
  # Never a source a node cannot read.
  valid = sampled_darts.valid_masks(2, 3)
  for k in ('inputs_normal', 'inputs_reduce'):
    picked = np.take_along_axis(np.broadcast_to(valid[k], (8,) + valid[k].shape),
                                np.asarray(a[k])[..., None], -1)
    assert picked.all()


# ------------------------------------------------------------------ the step

TINY_PRIMITIVES = ('skip_connect', 'sep_conv_3x3', 'max_pool_3x3')


def tiny_config(adaptive=True, **fields):
  method = fpnas.FPNAS if adaptive else fpnas.PARSEC
  c = method.apply_variant(fpnas.get_config(adaptive), 'smoke', method.name)
  c.model.update(dict(C=4, layers=3, steps=2, multiplier=2, primitives=TINY_PRIMITIVES))
  c.fpnas.update(fields)
  c.optim.batch_size = 4
  c.eval_batch_size = 8
  c.eval_max_examples = 8
  c.compilation_cache_dir = ''
  return c


def run_step(config, seed=0):
  method = search.method_of(config)
  model = method.build_model(config, 10)
  weight_tx, arch_tx = method.make_optimizers(config, 3)
  state = method.create_state(model, (8, 8, 1), weight_tx, arch_tx, config)
  phases = method.make_phases(model, weight_tx, arch_tx, config, 3)
  rng = np.random.default_rng(seed)
  batches = [{'image': jnp.asarray(rng.normal(size=(4, 8, 8, 1)), jnp.float32),
              'label': jnp.asarray(rng.integers(0, 10, 4), jnp.int32)} for _ in range(2)]
  metrics = {}
  for phase in phases:
    state, m = jax.jit(phase)(state, *batches)
    metrics.update(m)
  return state, metrics


@pytest.fixture(scope='module')
def masked_and_unmasked():
  """One step with K = 3 of a scan of 6 (the last 3 masked), and with a scan of 3."""
  masked = run_step(tiny_config(sample_scale=1e-3, min_samples=3, max_samples=6))
  unmasked = run_step(tiny_config(sample_scale=1e-3, min_samples=3, max_samples=3))
  return masked, unmasked


def test_masked_samples_change_nothing(masked_and_unmasked):
  (a, ma), (b, mb) = masked_and_unmasked
  assert ma['num_samples'] == mb['num_samples'] == 3
  chex.assert_trees_all_close(a.params, b.params, atol=1e-6)
  chex.assert_trees_all_close(a.batch_stats, b.batch_stats, atol=1e-6)
  chex.assert_trees_all_close(a.arch, b.arch, atol=1e-6)
  for k in ('train_loss', 'val_loss', 'train_ess', 'val_ess'):
    np.testing.assert_allclose(ma[k], mb[k], rtol=1e-5)
  assert int(a.extra['samples_drawn']) == 3
  # The step moved the weights and the arch logits; the ESS lies in [1, K].
  assert max(float(jnp.abs(v).max()) for v in a.arch.values()) > 1e-4
  assert 1.0 <= ma['val_ess'] <= 3.0 + 1e-5


@pytest.fixture(scope='module')
def idx_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp('fmnist_idx')
  write_fashion_mnist(str(directory), np.random.default_rng(0), n_train=48, n_test=8)
  return str(directory)


def test_parsec_search_resumes_to_the_same_result_from_its_seed(tmp_path, idx_dir):
  """PARSEC (K = 3 fixed) through the shared loop: a warm-up epoch, then a search epoch;
  interrupted and resumed, it ends with the same arch logits."""
  def config():
    c = tiny_config(adaptive=False, num_samples=3)
    c.data.update(name='fashion_mnist', source='idx', data_dir=idx_dir, max_examples=None)
    c.optim.update(epochs=2, steps_per_epoch=3, warmup_epochs=1)
    c.checkpoint_every_steps = 2
    c.compilation_cache_dir = str(tmp_path / 'cache')
    return c

  full = search.run_search(config(), str(tmp_path / 'full'))
  assert full['method'] == 'parsec' and full['samples_drawn'] == 3 * 6
  assert np.isfinite(full['arch_split_loss']) and full['final_entropy'] > 0
  stopped = str(tmp_path / 'stopped')
  search.run_search(config(), stopped, stop_at_step=4)
  resumed = search.run_search(config(), stopped)
  assert resumed['genotype'] == full['genotype'] and resumed['samples_drawn'] == 18
  a, b = np.load(tmp_path / 'full' / 'arch.npz'), np.load(os.path.join(stopped, 'arch.npz'))
  for name in a.files:
    np.testing.assert_array_equal(a[name], b[name])
  assert max(np.abs(a[name]).max() for name in a.files) > 1e-4  # moved in epoch 2
  with open(tmp_path / 'full' / 'metrics.jsonl') as f:
    logged = [json.loads(line) for line in f]
  assert {r['num_samples'] for r in logged if 'num_samples' in r} == {3.0}


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize('adaptive, field, value, match', [
    (True, 'fpnas.sample_scale', 0.0, r'config\.fpnas\.sample_scale \(lambda\) must be positive'),
    (True, 'fpnas.sample_scale', -0.25, r'config\.fpnas\.sample_scale \(lambda\) must be'),
    (True, 'fpnas.min_samples', 1, r'config\.fpnas\.min_samples must be at least 2'),
    (True, 'fpnas.max_samples', 1, r'config\.fpnas\.max_samples = 1 must be >='),
    (False, 'fpnas.num_samples', 1, r'config\.fpnas\.num_samples must be at least 2'),
    (True, 'fpnas.adaptive', False, r"config\.fpnas\.adaptive is False, but method 'fpnas'"),
    (True, 'space', 'darts', r"config\.space is 'darts'; fpnas searches"),
    (False, 'space', 'proxyless9', r"config\.space is 'proxyless9'"),
    (True, 'optim.warmup_epochs', 2, r'config\.optim\.warmup_epochs = 2 must be in'),
])
def test_bad_fields_are_named_before_compute(adaptive, field, value, match):
  config = tiny_config(adaptive)
  section, _, name = field.rpartition('.')
  (config[section] if section else config)[name] = value
  with pytest.raises(search.ConfigError, match=match):
    search.validate_config(config)


# ------------------------------------------------------------------ FBNetV2-like space


def test_flops_hinge_is_zero_at_the_target_and_the_cost_term_follows_its_formula():
  target = 3e8
  np.testing.assert_array_equal(fpnas.flops_cost(jnp.float32(target), target), 0.0)
  np.testing.assert_allclose(fpnas.flops_cost(jnp.float32(4.5e8), target), 0.5)
  v = jnp.array([0.5, 0.3, 0.2, 0.0])
  active = jnp.array([True, True, True, False])
  costs = jnp.array([0.0, 0.5, 1.5, 9.0])  # the masked sample's cost is ignored
  np.testing.assert_allclose(fpnas.cost_weights(v, costs, active, 0.4),
                             [0.5, 0.3 - 0.4 * 0.25, 0.2 - 0.4 * 0.75, 0.0], rtol=1e-6)
  # Every sample under the target: the term is 0.
  np.testing.assert_array_equal(fpnas.cost_weights(v, jnp.zeros(4), active, 0.4), v)


def fbnet_config(**fields):
  c = fpnas.FPNAS.apply_variant(fpnas.get_config(True, 'fbnet'), 'smoke', 'fpnas')
  c.model.update(channels=(4, 4, 8, 8, 8, 16, 32), depths=(1, 1, 1, 3, 1))
  c.fpnas.update(fields)
  c.optim.batch_size = 4
  c.compilation_cache_dir = ''
  return c


@pytest.fixture(scope='module')
def fbnet_switch_step():
  """One FP-NAS step in the FBNetV2-like space at the switch (epoch 1 of 3 steps), from
  random factor logits, with a FLOPs target every sample exceeds."""
  config = fbnet_config(switch_epoch=1, flops_target=1e3, cost_weight=0.5,
                        sample_scale=1e-3, min_samples=3, max_samples=3)
  method = search.method_of(config)
  model = method.build_model(config, 10)
  weight_tx, arch_tx = method.make_optimizers(config, 3)
  state = method.create_state(model, (8, 8, 1), weight_tx, arch_tx, config)
  rng = np.random.default_rng(0)
  arch = {k: (jnp.asarray(rng.normal(size=v.shape), jnp.float32) if k != 'joint' else v)
          for k, v in state.arch.items()}
  state = state.replace(step=jnp.int32(3), arch=arch)
  weight_phase, arch_phase = method.make_phases(model, weight_tx, arch_tx, config, 3)
  batches = [{'image': jnp.asarray(rng.normal(size=(4, 8, 8, 1)), jnp.float32),
              'label': jnp.asarray(rng.integers(0, 10, 4), jnp.int32)} for _ in range(2)]
  switched, m_weights = jax.jit(weight_phase)(state, *batches)
  after, m_arch = jax.jit(arch_phase)(switched, *batches)
  return state, switched, m_weights, after, m_arch


def test_the_switch_to_the_joint_keeps_the_distribution(fbnet_switch_step):
  from jaxnas.spaces import fbnet  # pylint: disable=g-import-not-at-top
  before, switched, m_weights, _, _ = fbnet_switch_step
  assert m_weights['fine'] == 1.0
  joint = jax.nn.softmax(switched.arch['joint'], -1)  # (stages, 32)
  factors = [jax.nn.softmax(before.arch[f], -1) for f in fbnet.FACTORS]
  product = factors[0]
  for p in factors[1:]:
    product = (product[..., :, None] * p[..., None, :]).reshape(p.shape[0], -1)
  np.testing.assert_allclose(joint, product, atol=1e-6)
  # The entropy (so K) is the same under both.
  np.testing.assert_allclose(m_weights['entropy'], fpnas.entropy(
      {f: before.arch[f] for f in fbnet.FACTORS}), rtol=1e-5)
  # The arch optimizer restarted: Adam's step count is 0 again.
  counts = [x for x in jax.tree.leaves(switched.arch_opt_state) if x.dtype == jnp.int32]
  assert counts and all(int(c) == 0 for c in counts)


def test_after_the_switch_only_the_joint_moves_and_the_cost_counts(fbnet_switch_step):
  from jaxnas.spaces import fbnet  # pylint: disable=g-import-not-at-top
  _, switched, m_weights, after, m_arch = fbnet_switch_step
  for f in fbnet.FACTORS:
    np.testing.assert_array_equal(after.arch[f], switched.arch[f])
  assert float(jnp.abs(after.arch['joint'] - switched.arch['joint']).max()) > 1e-4
  assert m_arch['cost'] > 0 and m_weights['mflops'] > 0
  assert np.isfinite(m_arch['val_loss']) and m_weights['num_samples'] == 3


@pytest.mark.parametrize('field, value, match', [
    ('fpnas.switch_epoch', 2, r'config\.fpnas\.switch_epoch = 2 must be in 1\.\.optim\.'),
    ('fpnas.cost_weight', -1.0, r'config\.fpnas\.cost_weight \(beta\) must be >= 0'),
    ('fpnas.flops_target', 0.0, r'config\.fpnas\.flops_target must be positive'),
    ('fpnas.flops_target', -5e8, r'config\.fpnas\.flops_target must be positive'),
])
def test_bad_fbnet_fields_are_named_before_compute(field, value, match):
  config = fbnet_config(switch_epoch=1, flops_target=1e8, cost_weight=0.5)
  section, _, name = field.rpartition('.')
  config[section][name] = value
  with pytest.raises(search.ConfigError, match=match):
    search.validate_config(config)


def test_coarse_to_fine_needs_a_factorized_space():
  config = tiny_config(switch_epoch=1)
  with pytest.raises(search.ConfigError, match=r"config\.fpnas\.switch_epoch = 1 asks for "
                     r"coarse-to-fine, but the 'unas_darts' space has no factorized"):
    search.validate_config(config)


@pytest.mark.parametrize('name', ['parsec_cifar', 'fpnas_cifar', 'fpnas_imagenet',
                                  'parsec_fashion_mnist', 'fpnas_fashion_mnist',
                                  'fpnas_fbnet_fashion_mnist'])
def test_every_config_and_its_smoke_variant_validates(name):
  import importlib  # pylint: disable=g-import-not-at-top
  module = importlib.import_module(f'configs.{name}')
  for arg in (None, 'smoke'):
    config = module.get_config(arg)
    search.validate_config(config)
    if config.space == 'fbnet':  # the cell space's summary is UNAS's (tested there)
      summary = search.method_of(config).summary(config)
      assert summary['params'] > 0 and summary['multiply_adds'] > 0


def test_each_sample_runs_only_its_ops():
  """The arch phase's program: per sample, every node slot of every cell is one
  conditional (a branch per op; only the taken one runs), inside the conditional that
  skips the samples past K (the sampled cell's tests check that the ops live in the
  branches)."""
  config = tiny_config(sample_scale=1e-3, min_samples=2, max_samples=2)
  method = search.method_of(config)
  model = method.build_model(config, 10)
  weight_tx, arch_tx = method.make_optimizers(config, 3)
  state = jax.eval_shape(lambda: method.create_state(model, (8, 8, 1), weight_tx, arch_tx,
                                                     config))
  _, arch_phase = method.make_phases(model, weight_tx, arch_tx, config, 3)
  batch = {'image': jax.ShapeDtypeStruct((4, 8, 8, 1), jnp.float32),
           'label': jax.ShapeDtypeStruct((4,), jnp.int32)}
  text = jax.jit(arch_phase).lower(state, batch, batch).as_text()
  slots = config.model.layers * config.model.steps * 2  # 3 cells x 2 nodes x 2 slots
  # + the skip of samples past K + the skip of the arch step during the warm-up.
  assert text.count('stablehlo.case') == slots + 2
