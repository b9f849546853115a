"""Tests of jaxnas.estimators: the sample, and UNAS's gradient estimators on a toy.

The toy: 3 independent categoricals of 4 options ({'ops': (2, 4), 'inputs': (4,)}), fixed
random logits, and a CE-like loss L = sum_c w_c . v_c + sum_{c<c'} w_c^T A_cc' w_c' with
v ~ 2/3 + U(0, 1) (so L is about 2 to 4, positive like a cross entropy) and A ~ N(0, 0.5):
multilinear, so the same formula on soft weights is its relaxation. The exact gradient
of E_q[L(z)] comes from enumerating all 4^3 architectures.
"""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxnas import estimators as est

N = 20_000  # per-sample gradients per estimator (one architecture per key)
RNG = np.random.default_rng(0)
LOGITS = {'ops': jnp.asarray(RNG.normal(0, 1, (2, 4)), jnp.float32),
          'inputs': jnp.asarray(RNG.normal(0, 1, (4,)), jnp.float32)}
VALUES = jnp.asarray(2 / 3 + RNG.uniform(0, 1, (3, 4)), jnp.float32)
INTERACTIONS = jnp.asarray(RNG.normal(0, 0.5, (3, 4, 4)), jnp.float32)


def _categoricals(w):
  return [w['ops'][..., 0, :], w['ops'][..., 1, :], w['inputs']]


def toy_loss(w):
  """Per-sample loss for weights with any leading sample shape."""
  c = _categoricals(w)
  out = sum(jnp.einsum('...o,o->...', c[i], VALUES[i]) for i in range(3))
  for j, (a, b) in enumerate([(0, 1), (1, 2), (0, 2)]):
    out = out + jnp.einsum('...o,op,...p->...', c[a], INTERACTIONS[j], c[b])
  return out


def _all_architectures():
  eye = np.eye(4, dtype=np.float32)
  idx = np.array(list(itertools.product(range(4), repeat=3)))  # (64, 3)
  return idx, {'ops': jnp.asarray(np.stack([eye[idx[:, 0]], eye[idx[:, 1]]], 1)),
               'inputs': jnp.asarray(eye[idx[:, 2]])}


def exact_expected_loss(logits):
  idx, archs = _all_architectures()
  q = _categoricals(jax.tree.map(lambda a: jax.nn.softmax(a, -1), logits))
  prob = q[0][idx[:, 0]] * q[1][idx[:, 1]] * q[2][idx[:, 2]]
  return jnp.sum(prob * toy_loss(archs))


# Jitted once per estimator and shape: eager dispatch of the many small ops is slow.
estimate = jax.jit(est.estimate,
                   static_argnames=('estimator', 'loss_fn', 'sample_shape', 'has_aux'))
sample = jax.jit(est.sample, static_argnames=('sample_shape', 'temperature', 'eps'))


def loss_with_aux(w):
  loss = toy_loss(w)
  return loss, {'twice': 2 * loss}


CV0 = est.init_control_variate(jax.random.key(0), LOGITS, hidden=16)


def _run(estimator, key, sample_shape=(8,), baseline=0.0, control_variate=CV0):
  """One jitted call, always with the same arguments so that tests share compilations."""
  return estimate(estimator, LOGITS, key, loss_with_aux, sample_shape=sample_shape,
                  baseline=baseline, control_variate=control_variate, has_aux=True)


def _flat(g):
  return jnp.concatenate([g['inputs'].ravel(), g['ops'].ravel()])


EXACT = np.asarray(_flat(jax.grad(exact_expected_loss)(LOGITS)), np.float64)


def _per_sample_grads(estimator, control_variate=None):
  """(N, 12) gradients, one architecture each: sample_shape (1,), vmapped over keys."""
  keys = jax.random.split(jax.random.key(1), N)
  one = lambda k: _flat(estimate(  # noqa: E731
      estimator, LOGITS, k, toy_loss, sample_shape=(1,), control_variate=control_variate
  ).grads)
  return np.asarray(jax.jit(jax.vmap(one))(keys), np.float64)


def _trace_cov(g):
  return float(g.var(0).sum())


@pytest.fixture(scope='module')
def trained_cv():
  """RELAX's r_phi after 300 Adam steps (lr 3e-2) on cv_grads with batches of 64."""
  cv = est.init_control_variate(jax.random.key(2), LOGITS, hidden=32)
  opt = optax.adam(3e-2)

  @jax.jit
  def train(cv, key):
    def step(carry, k):
      cv, st = carry
      r = estimate('relax', LOGITS, k, toy_loss, sample_shape=(64,), control_variate=cv)
      updates, st = opt.update(r.cv_grads, st, cv)
      return (optax.apply_updates(cv, updates), st), r.cv_loss
    return jax.lax.scan(step, (cv, opt.init(cv)), jax.random.split(key, 300))

  (cv, _), cv_loss = train(cv, jax.random.key(3))
  # mean ||g||^2 fell: 1.53 -> 1.46 over the first/last 50 steps.
  assert np.mean(cv_loss[-50:]) < np.mean(cv_loss[:50])
  return cv


@pytest.fixture(scope='module')
def grads(trained_cv):
  out = {e: _per_sample_grads(e) for e in ('reinforce', 'relaxed', 'rebar')}
  out['relax'] = _per_sample_grads('relax', trained_cv)
  return out


# --- The sample -------------------------------------------------------------------------


def _log_softmax(a):
  a = np.asarray(a, np.float64)
  m = a.max(-1, keepdims=True)
  return a - m - np.log(np.exp(a - m).sum(-1, keepdims=True))


@pytest.mark.parametrize('sample_shape', [(5,), (1,)])
def test_sample_values_and_shapes(sample_shape):
  s = sample(jax.random.key(0), LOGITS, sample_shape, temperature=0.4)
  for name, a in LOGITS.items():
    for part in (s.z, s.zeta, s.zeta_tilde):
      chex.assert_shape(part[name], sample_shape + a.shape)
    z = np.asarray(s.z[name])
    np.testing.assert_array_equal(np.sort(z, -1)[..., :-1], 0.0)  # one-hot
    np.testing.assert_array_equal(z.sum(-1), 1.0)
    np.testing.assert_allclose(np.asarray(s.zeta[name]).sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(z.argmax(-1), np.asarray(s.zeta[name]).argmax(-1))
    np.testing.assert_allclose(s.zeta_tilde[name], s.zeta[name], rtol=1e-4, atol=1e-6)
  chex.assert_shape(s.log_q, sample_shape)
  want = sum(np.sum(np.asarray(s.z[n]) * _log_softmax(LOGITS[n]), -1).reshape(
      sample_shape + (-1,)).sum(-1) for n in LOGITS)
  np.testing.assert_allclose(s.log_q, want, rtol=1e-5)


def test_sample_is_gumbel_max_with_clamped_noise():
  # z and zeta rebuilt from the same uniforms (key split per name, in sorted order).
  key = jax.random.key(4)
  s = sample(key, LOGITS, (5,), temperature=0.4)
  for name, k in zip(sorted(LOGITS), jax.random.split(key, len(LOGITS))):
    u = np.asarray(jax.random.uniform(k, (5,) + LOGITS[name].shape, minval=1e-3,
                                      maxval=1 - 1e-3), np.float64)
    perturbed = _log_softmax(LOGITS[name]) - np.log(-np.log(u))
    np.testing.assert_array_equal(np.asarray(s.z[name]).argmax(-1), perturbed.argmax(-1))
    soft = np.exp(perturbed / 0.4 - (perturbed / 0.4).max(-1, keepdims=True))
    np.testing.assert_allclose(s.zeta[name], soft / soft.sum(-1, keepdims=True), rtol=1e-4)


def _conditional_gumbel(logits, k, log_v, log_vk):
  """REBAR appendix: perturbed logits given argmax k with v fixed (numpy, float64)."""
  q = np.exp(_log_softmax(logits))
  g = -np.log(-log_v / q - log_vk)
  g[k] = -np.log(-log_vk)
  return g


def test_zeta_tilde_gradient_is_the_conditional_samples():
  # d zeta~ / d logits against finite differences of Tucker et al.'s formula with k and v
  # held fixed; it is not d zeta / d logits.
  logits = jnp.asarray([0.3, -0.5, 1.2, 0.1], jnp.float32)
  tau, key = 0.4, jax.random.key(5)
  u = np.asarray(jax.random.uniform(jax.random.split(key, 1)[0], (1, 4), minval=1e-3,
                                    maxval=1 - 1e-3), np.float64)[0]
  q = np.exp(_log_softmax(logits))
  k = int(np.argmax(np.log(q) - np.log(-np.log(u))))
  log_vk = np.log(u[k]) / q[k]
  log_v = np.log(u) - q * log_vk

  def zeta_tilde_np(a):
    g = _conditional_gumbel(a, k, log_v, log_vk) / tau
    e = np.exp(g - g.max())
    return e / e.sum()

  h = 1e-5
  base = np.asarray(logits, np.float64)
  fd = np.stack([(zeta_tilde_np(base + h * e) - zeta_tilde_np(base - h * e)) / (2 * h)
                 for e in np.eye(4)], 1)

  def fn(field):
    return lambda a: getattr(sample(key, {'x': a}, (1,), tau), field)['x'][0]

  jac_tilde = np.asarray(jax.jacobian(fn('zeta_tilde'))(logits))
  np.testing.assert_allclose(jac_tilde, fd, rtol=2e-3, atol=2e-4)
  np.testing.assert_allclose(fn('zeta_tilde')(logits), zeta_tilde_np(base), rtol=1e-4)
  assert np.abs(np.asarray(jax.jacobian(fn('zeta'))(logits)) - jac_tilde).max() > 1e-2


def test_soften_eps():
  s0 = sample(jax.random.key(6), LOGITS, (4,), eps=0.08)
  softened = {n: np.log(np.exp(_log_softmax(a)) + 0.08) for n, a in LOGITS.items()}
  want = sum(np.sum(np.asarray(s0.z[n]) * _log_softmax(softened[n]), -1).reshape(4, -1)
             .sum(-1) for n in LOGITS)
  np.testing.assert_allclose(s0.log_q, want, rtol=1e-5)
  np.testing.assert_allclose(est.soften(LOGITS, 0.08)['ops'], softened['ops'], rtol=1e-5)
  assert est.soften(LOGITS, 0.0) is LOGITS


# --- Estimators: exact values ------------------------------------------------------------


def test_exact_gradient_is_that_of_the_loss_at_q():
  # The loss is multilinear in independent categoricals, so E_q[L(z)] = L(q): a check of
  # the enumeration.
  at_q = lambda lg: toy_loss(jax.tree.map(lambda a: jax.nn.softmax(a, -1), lg))  # noqa: E731
  np.testing.assert_allclose(EXACT, _flat(jax.grad(at_q)(LOGITS)), rtol=1e-4, atol=1e-6)


def test_reinforce_gradient_and_baseline_update():
  b = 0.7
  r = _run('reinforce', jax.random.key(7), baseline=b)
  loss_z = np.asarray(toy_loss(r.sample.z), np.float64)
  np.testing.assert_allclose(r.loss, loss_z.mean(), rtol=1e-6)
  np.testing.assert_allclose(r.baseline, 0.1 * b + 0.9 * loss_z.mean(), rtol=1e-6)
  for name, a in LOGITS.items():
    # d log q(z) / d logits = z - softmax(logits), per categorical.
    score = np.asarray(r.sample.z[name]) - np.exp(_log_softmax(a))
    want = np.mean((loss_z - b).reshape((8,) + (1,) * a.ndim) * score, 0)
    np.testing.assert_allclose(r.grads[name], want, rtol=1e-4, atol=1e-6)
  assert r.cv_grads is None
  # The others leave the baseline as it was.
  np.testing.assert_allclose(_run('rebar', jax.random.key(7), baseline=b).baseline, b)


@pytest.mark.parametrize('estimator,sample_shape',
                         [(e, (8,)) for e in est.ESTIMATORS]
                         + [('rebar', (1,)), ('reinforce', (2, 3))])
def test_estimate_shapes_loss_and_aux(estimator, sample_shape):
  r = _run(estimator, jax.random.key(8), sample_shape)
  for name, a in LOGITS.items():
    chex.assert_shape(r.grads[name], a.shape)
    chex.assert_shape(r.sample.z[name], sample_shape + a.shape)
  chex.assert_shape(r.sample.log_q, sample_shape)
  chex.assert_shape(r.aux['twice'], sample_shape)
  # aux and loss are those of the discrete sample z.
  np.testing.assert_allclose(r.aux['twice'], 2 * toy_loss(r.sample.z), rtol=1e-6)
  np.testing.assert_allclose(r.loss, np.mean(toy_loss(r.sample.z)), rtol=1e-6)
  if estimator == 'relax':
    chex.assert_trees_all_equal_shapes(r.cv_grads, CV0)
  else:
    assert r.cv_grads is None and r.cv_loss is None


def test_relax_untrained_is_rebar_and_cv_grads_are_the_variance_gradient():
  key = jax.random.key(9)
  rebar, relax = _run('rebar', key), _run('relax', key)
  # r_phi starts at 0 (zero output layer): the same gradient as REBAR.
  for name in LOGITS:
    np.testing.assert_allclose(relax.grads[name], rebar.grads[name], rtol=1e-5, atol=1e-6)
  # g is linear in (w2, b2), so mean ||g||^2 is quadratic there: a central difference
  # is its exact derivative.
  cv = dict(CV0, w2=jax.random.normal(jax.random.key(1), CV0['w2'].shape) * 0.3)
  relax = _run('relax', key, control_variate=cv)
  cv_loss = lambda params: float(_run('relax', key, control_variate=params).cv_loss)  # noqa: E731
  h = 0.05
  fd_b2 = (cv_loss(dict(cv, b2=cv['b2'] + h)) - cv_loss(dict(cv, b2=cv['b2'] - h))) / (2 * h)
  np.testing.assert_allclose(relax.cv_grads['b2'], fd_b2, rtol=2e-3, atol=1e-4)
  e3 = jnp.zeros_like(cv['w2']).at[3].set(h)
  fd_w2 = (cv_loss(dict(cv, w2=cv['w2'] + e3)) - cv_loss(dict(cv, w2=cv['w2'] - e3))) / (2 * h)
  np.testing.assert_allclose(relax.cv_grads['w2'][3], fd_w2, rtol=2e-3, atol=1e-4)
  assert abs(fd_b2) > 1e-2  # not a trivially zero derivative


# --- Estimators: statistics over N samples -----------------------------------------------


@pytest.mark.parametrize('estimator', ['reinforce', 'rebar', 'relax'])
def test_unbiased(grads, estimator):
  # Mean of N one-architecture gradients within 5 standard errors (+1e-3) of the exact
  # gradient, per coordinate; measured max |mean - exact| / se: 3.2, 1.8, 2.0.
  g = grads[estimator]
  se = g.std(0) / np.sqrt(N)
  dev = np.abs(g.mean(0) - EXACT)
  assert np.all(dev <= 5 * se + 1e-3), (estimator, dev / se)


def test_relaxed_is_biased(grads):
  # Gumbel-softmax at tau 0.4: measured max |mean - exact| 0.023 (6 % of ||exact||) =
  # 11.9 standard errors, outside the bound that the unbiased estimators meet.
  g = grads['relaxed']
  se = g.std(0) / np.sqrt(N)
  dev = np.abs(g.mean(0) - EXACT)
  assert np.any(dev > 5 * se + 1e-3), dev / se
  assert np.max(dev / se) > 8


def _moving_baseline_variance(batch=32, steps=1000):
  """Per-sample trace of the covariance of REINFORCE with UNAS's moving baseline.

  One batch of `batch` architectures per step, b carried across steps. b depends only on
  past batches, so Var(step gradient) = E[per-sample variance given b] / batch.
  """
  def step(b, k):
    r = estimate('reinforce', LOGITS, k, toy_loss, sample_shape=(batch,), baseline=b)
    return r.baseline, _flat(r.grads)

  run = jax.jit(lambda key: jax.lax.scan(step, jnp.float32(0.0),
                                         jax.random.split(key, steps))[1])
  g = np.asarray(run(jax.random.key(11)), np.float64)[10:]  # b starts at 0
  return batch * _trace_cov(g)


def test_variance_rebar_and_relax_below_reinforce(grads):
  var = {e: _trace_cov(g) for e, g in grads.items()}
  var['reinforce_baseline'] = _moving_baseline_variance()
  ratio = {e: v / var['reinforce'] for e, v in var.items()}
  print('trace cov / plain REINFORCE:', {e: round(r, 4) for e, r in ratio.items()})
  # Measured: rebar 0.045, relax (trained) 0.041, REINFORCE + moving baseline 0.063
  # (REBAR / baseline 0.71), relaxed (biased) 0.019.
  assert ratio['rebar'] < 0.1
  assert ratio['relax'] < 0.1
  assert ratio['reinforce_baseline'] < 0.2
  # The trained control variate lowers REBAR's variance (measured 0.92x; same keys).
  assert var['relax'] < 0.97 * var['rebar']


# --- Errors -------------------------------------------------------------------------------


def test_errors_name_the_argument():
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="estimator must be one of .*'rebar'.*'gumbel'"):
    est.estimate('gumbel', LOGITS, key, toy_loss, sample_shape=(1,))
  for t in (0.0, -0.4):
    with pytest.raises(ValueError, match='temperature must be positive'):
      est.estimate('rebar', LOGITS, key, toy_loss, sample_shape=(1,), temperature=t)
    with pytest.raises(ValueError, match='temperature must be positive'):
      est.sample(key, LOGITS, (1,), temperature=t)
  with pytest.raises(ValueError, match="control_variate must be given for the 'relax'"):
    est.estimate('relax', LOGITS, key, toy_loss, sample_shape=(1,))
  with pytest.raises(ValueError, match='eps must be >= 0'):
    est.estimate('rebar', LOGITS, key, toy_loss, sample_shape=(1,), eps=-0.1)


def test_masked_choices_get_finite_zero_gradients():
  """A choice masked out with logit -1e9 (a source a node cannot read) is never drawn
  and gets a zero, finite gradient from every estimator."""
  logits = {'a': jnp.array([[0.0, 0.0, -1e9], [0.1, 0.2, 0.3]])}

  def loss_fn(w):
    return jnp.sum(w['a'][..., 0] * jnp.arange(2.0), -1) + jnp.sum(w['a'][..., 1] ** 2, -1)

  cv = est.init_control_variate(jax.random.PRNGKey(1), logits)
  for name in est.ESTIMATORS:
    out = est.estimate(name, logits, jax.random.PRNGKey(0), loss_fn,
                              sample_shape=(64,), control_variate=cv)
    assert np.all(np.isfinite(out.grads['a'])), name
    assert out.grads['a'][0, 2] == 0.0, name
    assert float(jnp.max(out.sample.z['a'][:, 0, 2])) == 0.0, name
    assert float(jnp.max(out.sample.zeta_tilde['a'][:, 0, 2])) < 1e-6, name
    if out.cv_grads is not None:
      assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(out.cv_grads))
