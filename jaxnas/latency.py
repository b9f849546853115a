"""UNAS's measured-latency objective (Vahdat et al. 2020; NVlabs/unas), for any space.

An architecture is a dict ``{name: array (..., n)}`` of choice weights laid out as the
space's arch logits: independent categoricals over the last axis, one-hot for a discrete
architecture, relaxed (e.g. Gumbel-softmax) during search. Latency is not differentiable,
so UNAS times sampled discrete networks once and fits a linear surrogate over the
concatenated one-hot choices, which then scores relaxed samples differentiably:

* ``sample_architectures`` draws uniform architectures (the reference samples at the
  first search step, logits still 0); ``measure`` times one (median of 10 runs, in ms);
* ``fit`` solves the linear layer in closed form as ridge, lambda 1, with the bias column
  penalized too (as the reference does), on 80 % of the samples, and scores r2 and MAE on
  the other 20 %;
* ``penalty`` and ``coefficient`` are the loss term c_t * relu(latency - T) with
  c_t = 0.1 * clip(step / 30000, 0, 1).

``build`` runs the whole recipe; ``save``/``load`` keep the fit as JSON, with its layout
so that a surrogate is never applied to another space.
"""

import dataclasses
import json
import math
import time
from typing import Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxnas import files

FORMAT = 'jaxnas.latency/1'


def _layout(shapes, arg: str = 'shapes'):
  """((name, shape), ...) sorted by name: the order of the features."""
  if not isinstance(shapes, Mapping) or not shapes:
    raise ValueError(f'{arg} must be a non-empty dict of name -> shape, got {shapes!r}.')
  out = []
  for name in sorted(shapes):
    try:
      shape = tuple(int(d) for d in shapes[name])
    except TypeError:
      raise ValueError(f'{arg}[{name!r}] must be a shape (a tuple of ints), '
                       f'got {shapes[name]!r}.') from None
    if not shape or min(shape) < 1:
      raise ValueError(f'{arg}[{name!r}] must be a non-empty shape of positive sizes '
                       f'(..., options), got {shape}.')
    out.append((str(name), shape))
  return tuple(out)


def _size(layout) -> int:
  return sum(math.prod(shape) for _, shape in layout)


def features(weights, shapes=None):
  """Choice weights flattened and concatenated in sorted-name order: (*batch, F).

  ``shapes`` gives each name's per-architecture shape; axes in front of it are batch
  axes, e.g. (B, *shape) -> (B, F). Without ``shapes`` each array is one architecture
  and the result is (F,). Differentiable, so relaxed weights get gradients.
  """
  if not isinstance(weights, Mapping) or not weights:
    raise ValueError('weights must be a non-empty dict of name -> choice weights.')
  if shapes is None:
    return jnp.concatenate([jnp.ravel(jnp.asarray(weights[k])) for k in sorted(weights)])
  layout = _layout(shapes)
  if sorted(weights) != [name for name, _ in layout]:
    raise ValueError(f'weights has names {sorted(weights)}, expected '
                     f'{[name for name, _ in layout]} from shapes.')
  batch, flat = None, []
  for name, shape in layout:
    w = jnp.asarray(weights[name])
    lead = w.shape[:w.ndim - len(shape)]
    if w.ndim < len(shape) or w.shape[w.ndim - len(shape):] != shape:
      raise ValueError(f'weights[{name!r}] has shape {w.shape}, expected (..., *{shape}).')
    if batch is not None and lead != batch:
      raise ValueError(f'weights[{name!r}] has batch axes {lead}, the others {batch}.')
    batch = lead
    flat.append(w.reshape(lead + (-1,)))
  return jnp.concatenate(flat, axis=-1)


def measure(fn: Callable, *args, runs: int = 10, warmup: int = 2) -> float:
  """Median wall time in ms of ``fn(*args)``, blocking on its output, after ``warmup``
  calls (compilation, autotuning). The reference: median of 10 synchronised runs. It
  times on whatever backend ``fn`` runs on (jax.default_backend() for a plain jit)."""
  if int(runs) < 1:
    raise ValueError(f'runs must be at least 1, got {runs}.')
  if int(warmup) < 0:
    raise ValueError(f'warmup must be non-negative, got {warmup}.')
  for _ in range(int(warmup)):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(int(runs)):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times)) * 1e3


def sample_architectures(key, shapes, n: int, valid=None):
  """n uniform one-hot architectures: {name: float32 (n, *shape)}.

  Each categorical is uniform over its options (the reference samples at logits 0).
  ``valid[name]`` (bool, broadcastable to shape) masks options that can never be drawn,
  e.g. a node reading a later node; every categorical needs one valid option.
  """
  layout = _layout(shapes)
  if int(n) < 1:
    raise ValueError(f'n must be at least 1, got {n}.')
  valid = dict(valid or {})
  unknown = sorted(set(valid) - {name for name, _ in layout})
  if unknown:
    raise ValueError(f'valid has names {unknown} that are not in shapes.')
  out = {}
  for i, (name, shape) in enumerate(layout):
    mask = np.ones(shape, bool)
    if name in valid:
      try:
        mask = np.broadcast_to(np.asarray(valid[name], bool), shape)
      except ValueError:
        raise ValueError(f'valid[{name!r}] has shape {np.shape(valid[name])}, which does '
                         f'not broadcast to {shape}.') from None
      if not mask.any(-1).all():
        raise ValueError(f'valid[{name!r}] leaves a categorical with no valid option.')
    logits = np.where(mask, 0.0, -np.inf).astype(np.float32)
    idx = jax.random.categorical(jax.random.fold_in(key, i), logits,
                                 shape=(int(n),) + shape[:-1])
    out[name] = jax.nn.one_hot(idx, shape[-1], dtype=jnp.float32)
  return out


@dataclasses.dataclass(frozen=True, eq=False)
class Surrogate:
  """Linear latency model: predict = features . coef + bias, in ms.

  r2 and mae_ms are measured on the n_holdout architectures left out of the fit.
  ``layout`` is ((name, shape), ...) in feature order.
  """
  coef: np.ndarray  # (F,) float64
  bias: float
  r2: float
  mae_ms: float
  n_fit: int
  n_holdout: int
  layout: tuple
  ridge: float = 1.0

  @property
  def names(self):
    return tuple(name for name, _ in self.layout)

  @property
  def shapes(self):
    return dict(self.layout)

  def predict(self, weights):
    """Latency in ms of one-hot or relaxed weights, a dict (batched or not) or a feature
    array (..., F); jnp, so jax.grad through it gives coef."""
    if isinstance(weights, Mapping):
      f = features(weights, self.shapes)
    else:
      f = jnp.asarray(weights)
      if f.ndim < 1 or f.shape[-1] != self.coef.shape[0]:
        raise ValueError(f'weights has shape {f.shape}, expected (..., {self.coef.shape[0]}).')
    if not jnp.issubdtype(f.dtype, jnp.floating):
      f = f.astype(jnp.float32)
    return f @ jnp.asarray(self.coef, f.dtype) + jnp.asarray(self.bias, f.dtype)


def split_indices(n: int, holdout: float = 0.2, seed: int = 0):
  """Random (fit, held-out) row indices; held out: round(holdout * n), at least 1."""
  if not 0.0 < holdout < 1.0:
    raise ValueError(f'holdout must be a fraction in (0, 1), got {holdout}.')
  n_holdout = min(max(1, round(holdout * n)), n - 1)
  perm = np.random.default_rng(seed).permutation(n)
  return np.sort(perm[n_holdout:]), np.sort(perm[:n_holdout])


def _check_fit_args(n: int, ridge: float, holdout: float, arg: str):
  if n < 10:
    raise ValueError(f'{arg} gives {n} architectures; the fit needs at least 10 so that '
                     'some can be held out.')
  if not ridge > 0:
    raise ValueError(f'ridge must be positive, got {ridge}.')
  if not 0.0 < holdout < 1.0:
    raise ValueError(f'holdout must be a fraction in (0, 1), got {holdout}.')


def fit(features, latencies_ms, ridge: float = 1.0, holdout: float = 0.2, seed: int = 0,
        shapes=None) -> Surrogate:
  """Ridge fit of latency on features (N, F), closed form in float64.

  As the reference: w = (X^T X + ridge I)^-1 X^T y with X = [features, 1], so the bias is
  penalized like the coefficients. With one-hot features the bias and a per-choice offset
  are interchangeable; the penalty picks the smallest-norm split, so compare per-choice
  differences of coef, or predictions, not the levels. Fitted on a random 1 - holdout of
  the rows, scored on the rest. ``shapes`` records the layout (default: one name
  'features' of shape (F,)).
  """
  x = np.asarray(features, np.float64)
  y = np.asarray(latencies_ms, np.float64)
  if x.ndim != 2:
    raise ValueError(f'features must be (N, F), got shape {x.shape}.')
  if y.shape != (x.shape[0],):
    raise ValueError(f'latencies_ms must have shape ({x.shape[0]},) to match features, '
                     f'got {y.shape}.')
  _check_fit_args(x.shape[0], ridge, holdout, 'features')
  if not (np.isfinite(x).all() and np.isfinite(y).all()):
    raise ValueError('features and latencies_ms must be finite.')
  layout = _layout(shapes) if shapes is not None else (('features', (x.shape[1],)),)
  if _size(layout) != x.shape[1]:
    raise ValueError(f'features has {x.shape[1]} columns, shapes {dict(layout)} '
                     f'give {_size(layout)}.')
  fit_idx, hold_idx = split_indices(x.shape[0], holdout, seed)
  xb = np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)
  a, b = xb[fit_idx], y[fit_idx]
  w = np.linalg.solve(a.T @ a + ridge * np.eye(a.shape[1]), a.T @ b)
  residual = y[hold_idx] - xb[hold_idx] @ w
  ss_tot = float(np.sum((y[hold_idx] - y[hold_idx].mean()) ** 2))
  ss_res = float(np.sum(residual ** 2))
  r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res == 0 else -math.inf)
  return Surrogate(coef=w[:-1], bias=float(w[-1]), r2=float(r2),
                   mae_ms=float(np.mean(np.abs(residual))), n_fit=len(fit_idx),
                   n_holdout=len(hold_idx), layout=layout, ridge=float(ridge))


def build(time_fn: Callable, shapes, key, n: int, valid=None, ridge: float = 1.0,
          holdout: float = 0.2, progress: Optional[Callable] = None, seed: int = 0):
  """Samples n uniform architectures, times each and fits: (Surrogate, samples, ms).

  ``time_fn(arch) -> ms`` gets one architecture as {name: numpy one-hot (*shape)} and
  builds and times the discrete network (e.g. with ``measure``). ``progress(i, n)`` is
  called after the i-th timing. The reference: n = 10 000 at the first search step.
  """
  layout = _layout(shapes)
  _check_fit_args(int(n), ridge, holdout, 'n')
  samples = sample_architectures(key, shapes, n, valid)
  host = {name: np.asarray(v) for name, v in samples.items()}
  latencies = np.empty(int(n), np.float64)
  for i in range(int(n)):
    latencies[i] = float(time_fn({name: v[i] for name, v in host.items()}))
    if not np.isfinite(latencies[i]):
      raise ValueError(f'time_fn returned {latencies[i]} for architecture {i}; it must '
                       'return a finite time in ms.')
    if progress is not None:
      progress(i + 1, int(n))
  surrogate = fit(features(samples, shapes), latencies, ridge, holdout, seed,
                  dict(layout))
  return surrogate, samples, latencies


def check_layout(surrogate: Surrogate, shapes):
  """Raises ValueError unless the surrogate was fitted for exactly these shapes."""
  want = _layout(shapes)
  if surrogate.layout == want:
    return
  have, need = dict(surrogate.layout), dict(want)
  for name in sorted(set(have) | set(need)):
    if have.get(name) != need.get(name):
      raise ValueError(f'The latency surrogate does not match the search space: '
                       f'{name!r} has shape {have.get(name)} in the surrogate and '
                       f'{need.get(name)} in the space; rebuild it for this space.')


def save(surrogate: Surrogate, path):
  """Writes the surrogate as JSON (coefficients, bias, scores, counts, layout)."""
  doc = {
      'format': FORMAT,
      'layout': [[name, list(shape)] for name, shape in surrogate.layout],
      'coef': [float(c) for c in surrogate.coef],
      'bias': float(surrogate.bias),
      'r2': float(surrogate.r2),
      'mae_ms': float(surrogate.mae_ms),
      'n_fit': int(surrogate.n_fit),
      'n_holdout': int(surrogate.n_holdout),
      'ridge': float(surrogate.ridge),
  }
  files.write_json(path, doc, indent=1)


def load(path, shapes=None) -> Surrogate:
  """Reads a surrogate written by ``save``; with ``shapes``, checks it fits that space."""
  try:
    with open(path) as f:
      doc = json.load(f)
    if doc.get('format') != FORMAT:
      raise ValueError(f"field 'format' is {doc.get('format')!r}, expected {FORMAT!r}")
    layout = _layout({name: shape for name, shape in doc['layout']}, 'layout')
    coef = np.asarray(doc['coef'], np.float64)
    if coef.shape != (_size(layout),):
      raise ValueError(f"field 'coef' has {coef.size} values, the layout needs "
                       f'{_size(layout)}')
    surrogate = Surrogate(coef=coef, bias=float(doc['bias']), r2=float(doc['r2']),
                          mae_ms=float(doc['mae_ms']), n_fit=int(doc['n_fit']),
                          n_holdout=int(doc['n_holdout']), layout=layout,
                          ridge=float(doc.get('ridge', 1.0)))
  except KeyError as e:
    raise ValueError(f'Latency surrogate file {path} is missing field {e}; '
                     'rebuild it with jaxnas.latency.build and save.') from None
  except (ValueError, TypeError, AttributeError) as e:
    raise ValueError(f'Latency surrogate file {path} is malformed ({e}); '
                     'rebuild it with jaxnas.latency.build and save.') from None
  if shapes is not None:
    try:
      check_layout(surrogate, shapes)
    except ValueError as e:
      raise ValueError(f'Latency surrogate file {path}: {e}') from None
  return surrogate


def penalty(latency_ms, target_ms, coefficient):
  """c_t * relu(latency - T): zero at or below the target, linear above it."""
  return coefficient * jax.nn.relu(latency_ms - target_ms)


def coefficient(step, scale: float = 0.1, ramp_steps: int = 30000):
  """c_t = scale * clip(step / ramp_steps, 0, 1), step counted from the start of the
  search epochs (the reference: 0.1 and 30 000); jittable with a traced step."""
  if ramp_steps <= 0:
    raise ValueError(f'ramp_steps must be positive, got {ramp_steps}.')
  return scale * jnp.clip(jnp.asarray(step, jnp.float32) / ramp_steps, 0.0, 1.0)
