"""Tests of jaxnas.latency: sampling, ridge surrogate, timing, penalty, save/load."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnas import latency

# Two names so that the sorted-name feature order matters: 'a' before 'op'.
SHAPES = {'op': (3, 5), 'a': (2, 3)}
F = 3 * 5 + 2 * 3


def _true_model(seed=0):
  """A known linear latency model: per-name option costs (ms) and a base."""
  rng = np.random.default_rng(seed)
  return {'a': rng.uniform(0.0, 2.0, (2, 3)), 'op': rng.uniform(0.0, 3.0, (3, 5))}, 4.0


def _true_latency(arch, costs, base):
  """base + sum of the chosen options' costs; arch is one-hot (..., *shape)."""
  return base + sum(np.sum(np.asarray(arch[k]) * c, axis=(-2, -1)) for k, c in costs.items())


def _centered(v, shape):
  """Coefficients minus each categorical's mean: the identifiable part."""
  v = np.asarray(v).reshape(shape)
  return v - v.mean(-1, keepdims=True)


@pytest.fixture(scope='module')
def fitted():
  costs, base = _true_model()
  arch = latency.sample_architectures(jax.random.key(0), SHAPES, 2000)
  noise = np.random.default_rng(1).normal(0.0, 0.01, 2000)
  ms = _true_latency(arch, costs, base) + noise
  feats = latency.features(arch, SHAPES)
  return latency.fit(feats, ms, shapes=SHAPES), feats, ms, costs, base


def test_features_sorted_order_and_batch():
  rng = np.random.default_rng(0)
  w = {'op': rng.normal(size=(4, 3, 5)), 'a': rng.normal(size=(4, 2, 3))}
  f = latency.features(w, SHAPES)
  chex.assert_shape(f, (4, F))
  np.testing.assert_allclose(f[:, :6], w['a'].reshape(4, 6), rtol=1e-6)
  np.testing.assert_allclose(f[:, 6:], w['op'].reshape(4, 15), rtol=1e-6)
  # One architecture without shapes: the same row.
  one = latency.features({k: v[2] for k, v in w.items()})
  chex.assert_shape(one, (F,))
  np.testing.assert_allclose(one, f[2], rtol=1e-6)
  with pytest.raises(ValueError, match=r"weights\['op'\]"):
    latency.features({'op': w['op'][..., :4], 'a': w['a']}, SHAPES)
  with pytest.raises(ValueError, match='batch axes'):
    latency.features({'op': w['op'], 'a': w['a'][:3]}, SHAPES)


def test_fit_recovers_coefficients(fitted):
  s, _, _, costs, base = fitted
  assert (s.n_fit, s.n_holdout) == (1600, 400)
  assert s.names == ('a', 'op')
  np.testing.assert_allclose(_centered(s.coef[:6], (2, 3)), _centered(costs['a'], (2, 3)),
                             atol=0.01)
  np.testing.assert_allclose(_centered(s.coef[6:], (3, 5)), _centered(costs['op'], (3, 5)),
                             atol=0.01)
  # Noise 0.01 ms; ridge shrinkage at lambda 1 over ~320 draws per option adds less.
  assert s.r2 > 0.999
  assert s.mae_ms < 0.02
  fresh = latency.sample_architectures(jax.random.key(9), SHAPES, 300)
  np.testing.assert_allclose(s.predict(fresh), _true_latency(fresh, costs, base), atol=0.05)


def test_fit_is_ridge_with_penalized_bias(fitted):
  s, feats, ms, costs, base = fitted
  fit_idx, hold_idx = latency.split_indices(2000, 0.2, 0)
  assert len(fit_idx) == 1600 and len(set(fit_idx) | set(hold_idx)) == 2000
  x = np.concatenate([np.asarray(feats, np.float64), np.ones((2000, 1))], 1)[fit_idx]
  w = np.linalg.solve(x.T @ x + np.eye(F + 1), x.T @ ms[fit_idx])
  np.testing.assert_allclose(s.coef, w[:-1], rtol=1e-9, atol=1e-9)
  np.testing.assert_allclose(s.bias, w[-1], rtol=1e-9)
  # The constant level L (base + each categorical's mean cost) is split between the bias
  # and a per-categorical offset d_j on its k_j one-hot columns; the penalty b^2 +
  # sum k_j d_j^2 is least at b = L / (1 + sum 1/k_j). An unpenalized bias would take L.
  level = base + sum(c.mean(-1).sum() for c in costs.values())
  np.testing.assert_allclose(s.bias, level / (1 + 2 / 3 + 3 / 5), atol=0.01)
  # A different ridge changes the fit.
  other = latency.fit(feats, ms, ridge=100.0, shapes=SHAPES)
  assert not np.allclose(other.coef, s.coef, atol=1e-3)


def test_predict_relaxed_is_linear_and_gradient_is_coef(fitted):
  s = fitted[0]
  logits = jax.random.normal(jax.random.key(3), (4, F))
  relaxed = {'a': jax.nn.softmax(logits[:, :6].reshape(4, 2, 3), -1),
             'op': jax.nn.softmax(logits[:, 6:].reshape(4, 3, 5), -1)}
  want = np.asarray(latency.features(relaxed, SHAPES), np.float64) @ s.coef + s.bias
  got = s.predict(relaxed)
  chex.assert_shape(got, (4,))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  grads = jax.grad(lambda w: s.predict(w))({k: v[0] for k, v in relaxed.items()})
  np.testing.assert_allclose(grads['a'].ravel(), s.coef[:6], rtol=1e-6)
  np.testing.assert_allclose(grads['op'].ravel(), s.coef[6:], rtol=1e-6)
  # Feature arrays work too, and a wrong layout is refused.
  np.testing.assert_allclose(s.predict(latency.features(relaxed, SHAPES)), got, rtol=1e-6)
  with pytest.raises(ValueError, match=r"weights\['op'\]"):
    s.predict({'a': relaxed['a'], 'op': relaxed['op'][..., :4]})


def test_penalty_and_coefficient():
  lat = jnp.asarray([5.0, 10.0, 12.5, 20.0])
  np.testing.assert_allclose(latency.penalty(lat, 10.0, 0.3), [0.0, 0.0, 0.75, 3.0],
                             rtol=1e-6)
  assert float(latency.penalty(9.999, 10.0, 0.1)) == 0.0
  g = jax.grad(lambda t: latency.penalty(t, 10.0, 0.3))
  assert float(g(9.0)) == 0.0 and float(g(11.0)) == pytest.approx(0.3)
  c = jax.jit(latency.coefficient)
  np.testing.assert_allclose([float(c(s)) for s in (-5, 0, 15000, 30000, 90000)],
                             [0.0, 0.0, 0.05, 0.1, 0.1], rtol=1e-6)
  assert float(latency.coefficient(100, scale=2.0, ramp_steps=400)) == pytest.approx(0.5)
  with pytest.raises(ValueError, match='ramp_steps'):
    latency.coefficient(1, ramp_steps=0)


def test_measure_counts_calls_and_returns_median():
  f = jax.jit(lambda x: jnp.sin(x) @ x)
  x = jnp.ones((16, 16))
  calls = []

  def wrapped(v):
    calls.append(1)
    return f(v)

  ms = latency.measure(wrapped, x, runs=5, warmup=3)
  assert len(calls) == 8
  assert np.isfinite(ms) and 0.0 < ms < 1000.0
  with pytest.raises(ValueError, match='runs'):
    latency.measure(wrapped, x, runs=0)


def test_sample_architectures_one_hot_and_uniform():
  n = 3000
  arch = latency.sample_architectures(jax.random.key(1), {'op': (4, 5)}, n)
  op = np.asarray(arch['op'])
  chex.assert_shape(op, (n, 4, 5))
  assert set(np.unique(op)) == {0.0, 1.0}
  np.testing.assert_array_equal(op.sum(-1), 1.0)
  counts = op.sum(0)  # (4, 5), expected n / 5 each
  chi2 = ((counts - n / 5) ** 2 / (n / 5)).sum(-1)
  assert (chi2 < 20.0).all(), chi2  # 4 d.o.f.: P(chi2 > 20) < 1e-3
  # Same key, same draw; another key, another.
  np.testing.assert_array_equal(
      latency.sample_architectures(jax.random.key(1), {'op': (4, 5)}, n)['op'], op)
  assert not np.array_equal(
      latency.sample_architectures(jax.random.key(2), {'op': (4, 5)}, n)['op'], op)


def test_sample_architectures_respects_valid_mask():
  # Node i reads one of its i + 2 predecessors, as a DARTS cell's input slots.
  n = 2000
  valid = np.arange(5)[None, :] < np.arange(2, 6)[:, None]  # (4, 5)
  arch = latency.sample_architectures(jax.random.key(4), {'src': (4, 5), 'op': (4, 3)}, n,
                                      valid={'src': valid})
  src = np.asarray(arch['src'])
  np.testing.assert_array_equal(src.sum(-1), 1.0)
  counts = src.sum(0)
  np.testing.assert_array_equal(counts[~valid], 0.0)
  for i in range(4):
    k = i + 2
    np.testing.assert_allclose(counts[i, :k] / n, 1.0 / k, atol=0.05)
  none_for_node0 = valid.copy()
  none_for_node0[0] = False
  with pytest.raises(ValueError, match=r"valid\['src'\] leaves a categorical"):
    latency.sample_architectures(jax.random.key(0), {'src': (4, 5)}, 3,
                                 valid={'src': none_for_node0})
  with pytest.raises(ValueError, match=r"valid\['src'\]"):
    latency.sample_architectures(jax.random.key(0), {'src': (4, 5)}, 3,
                                 valid={'src': np.ones((3, 5), bool)})


def test_build_times_every_sample_and_fits():
  costs, base = _true_model(2)
  seen, ticks = [], []

  def time_fn(arch):
    assert {k: v.shape for k, v in arch.items()} == {'a': (2, 3), 'op': (3, 5)}
    seen.append(arch)
    return float(_true_latency(arch, costs, base))

  s, samples, ms = latency.build(time_fn, SHAPES, jax.random.key(5), 200,
                                 progress=lambda i, n: ticks.append((i, n)))
  assert len(seen) == 200 and ticks[0] == (1, 200) and ticks[-1] == (200, 200)
  chex.assert_shape(samples['op'], (200, 3, 5))
  np.testing.assert_allclose(ms, _true_latency(samples, costs, base), rtol=1e-9)
  assert (s.n_fit, s.n_holdout) == (160, 40)
  assert s.r2 > 0.98  # noiseless; only the ridge shrinkage (~32 draws per option)
  latency.check_layout(s, SHAPES)


def test_save_load_round_trip(fitted, tmp_path):
  s = fitted[0]
  path = tmp_path / 'latency.json'
  latency.save(s, path)
  t = latency.load(path, SHAPES)
  np.testing.assert_array_equal(t.coef, s.coef)
  assert (t.bias, t.r2, t.mae_ms, t.n_fit, t.n_holdout, t.layout, t.ridge) == (
      s.bias, s.r2, s.mae_ms, s.n_fit, s.n_holdout, s.layout, s.ridge)
  x = latency.sample_architectures(jax.random.key(6), SHAPES, 5)
  np.testing.assert_array_equal(t.predict(x), s.predict(x))


def test_load_rejects_bad_files(fitted, tmp_path):
  s = fitted[0]
  good = tmp_path / 'good.json'
  latency.save(s, good)
  bad = tmp_path / 'broken.json'
  bad.write_text('{"coef": [1, 2')
  with pytest.raises(ValueError, match='broken.json'):
    latency.load(bad)
  doc = json.loads(good.read_text())
  del doc['bias']
  missing = tmp_path / 'missing.json'
  missing.write_text(json.dumps(doc))
  with pytest.raises(ValueError, match="missing.json is missing field 'bias'"):
    latency.load(missing)
  doc = json.loads(good.read_text())
  doc['coef'] = doc['coef'][:-1]
  short = tmp_path / 'short.json'
  short.write_text(json.dumps(doc))
  with pytest.raises(ValueError, match=r"short.json.*'coef' has 20 values"):
    latency.load(short)
  with pytest.raises(ValueError, match=r"good.json.*'op' has shape \(3, 5\) in the surrogate "
                     r'and \(3, 4\)'):
    latency.load(good, {'op': (3, 4), 'a': (2, 3)})
  with pytest.raises(ValueError, match=r"'b' has shape None"):
    latency.check_layout(s, {'op': (3, 5), 'a': (2, 3), 'b': (1, 2)})


def test_bad_inputs_name_the_argument():
  feats = np.eye(12)[:9]
  with pytest.raises(ValueError, match='features gives 9 architectures'):
    latency.fit(feats, np.ones(9))
  x, y = np.eye(12), np.arange(12.0)
  with pytest.raises(ValueError, match='ridge'):
    latency.fit(x, y, ridge=0.0)
  for h in (0.0, 1.0, -0.1):
    with pytest.raises(ValueError, match='holdout'):
      latency.fit(x, y, holdout=h)
  with pytest.raises(ValueError, match='latencies_ms'):
    latency.fit(x, y[:11])
  with pytest.raises(ValueError, match='features has 12 columns'):
    latency.fit(x, y, shapes={'op': (3, 5)})
  called = []
  with pytest.raises(ValueError, match='n gives 5'):
    latency.build(called.append, SHAPES, jax.random.key(0), 5)
  with pytest.raises(ValueError, match='ridge'):
    latency.build(called.append, SHAPES, jax.random.key(0), 50, ridge=-1.0)
  assert not called  # refused before any timing
  with pytest.raises(ValueError, match=r"shapes\['op'\]"):
    latency.sample_architectures(jax.random.key(0), {'op': (3, 0)}, 4)
  with pytest.raises(ValueError, match='valid has names'):
    latency.sample_architectures(jax.random.key(0), {'op': (3, 2)}, 4, valid={'x': [1, 0]})
