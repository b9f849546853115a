"""Gradient estimators of UNAS for the architecture logits (Vahdat et al. 2020).

The architecture is a dict of logits ``{name: (..., n)}``: independent categoricals over
the last axis. One draw has a leading ``sample_shape`` ((B,) for one architecture per
example, (1,) for one per batch). With the uniform noise u (clamped to [1e-3, 1 - 1e-3]
as the reference) and Gumbel noise g = -log(-log u), theta = log_softmax(logits):

* z = one_hot(argmax(theta + g)), the discrete architecture the loss L(z) scores;
* zeta = softmax((theta + g) / tau), the Gumbel-softmax relaxation;
* zeta~ = softmax(g~ / tau), REBAR's relaxed sample conditioned on z (Tucker et al. 2017,
  appendix): with k = argmax, v_k = u_k^(1/q_k), v_i = u_i / v_k^(q_i) held fixed,
  g~_k = -log(-log v_k) and g~_i = -log(-log v_i / q_i - log v_k). Its value equals zeta;
  its gradient is that of the conditional sample (UNAS eq. 3).

Estimators of d/dlogits E_q[L(z)], ``estimate(estimator, ...)``, each as the gradient of
a surrogate (means over the sample):

* ``reinforce``: mean(log q(z) * sg(L(z) - b)) + b, then b <- 0.1 b + 0.9 mean L(z)
  (UNAS's meter weights the new value by 0.9); b = 0 keeps plain REINFORCE.
* ``relaxed``: mean(L(zeta)); UNAS's argparse default, biased.
* ``rebar`` (every UNAS search): x = zeta - zeta~ + sg(zeta~) (value zeta, gradient
  d zeta - d zeta~); mean(log q(z) * sg(L(z) - L(x))) + mean(L(x)). eta = 1 and the
  control variate's temperature = tau, both fixed, as the reference.
* ``relax`` (Grathwohl et al. 2018, eq. 8 / Alg. 2; a flag without a branch in the
  reference): a learned control variate c_phi(s) = L(s) + r_phi(s), r_phi an MLP over
  the flattened relaxed sample. Per sample i,
    g_i = (L(z_i) - c_phi(zeta~_i)) dlog q(z_i)/dlogits + dc_phi(zeta_i)/dlogits
          - dc_phi(zeta~_i)/dlogits,
  i.e. REBAR with L replaced by c_phi; the gradient returned is mean_i g_i (unbiased for
  any phi), and ``cv_grads`` = d/dphi mean_i ||g_i||^2, the single-sample variance
  surrogate (E||g||^2 = trace Cov g + ||E g||^2, and E g does not depend on phi). The
  per-sample g_i are the gradients w.r.t. the logits broadcast to the sample shape; this
  needs second derivatives of loss_fn (double backprop).

Every function is jittable with ``estimator``, ``loss_fn``, ``sample_shape`` and
``has_aux`` static.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

ESTIMATORS = ('reinforce', 'relaxed', 'rebar', 'relax')
UNIFORM_CLAMP = 1e-3  # u in [1e-3, 1 - 1e-3], as gsm_utils.py of the reference
BASELINE_DECAY = 0.1  # b <- 0.1 b + 0.9 mean L(z)


class Sample(NamedTuple):
  """One draw; every leaf has shape sample_shape + logits[name].shape."""
  z: dict  # one-hot argmax of logits + Gumbel (the discrete architecture)
  zeta: dict  # softmax((logits + Gumbel) / tau)
  zeta_tilde: dict  # REBAR's conditional relaxation given z: zeta in value
  log_q: jax.Array  # sum over all categoricals of log q(z), shape sample_shape


class Estimate(NamedTuple):
  grads: dict  # d/dlogits of E_q[L], like logits
  loss: jax.Array  # mean L(z), the discrete sample's loss
  baseline: jax.Array  # reinforce's updated EMA baseline; the input for the others
  cv_grads: Any  # d/dphi mean_i ||g_i||^2 for 'relax', else None
  cv_loss: Any  # mean_i ||g_i||^2 for 'relax' (for logging), else None
  sample: Sample
  aux: Any  # loss_fn's aux on z with has_aux, else None


def soften(logits, eps: float):
  """log(softmax + eps): UNAS's --gsm_soften_eps, which keeps every op reachable."""
  if eps <= 0:
    return logits
  return jax.tree.map(lambda a: jnp.log(jax.nn.softmax(a, -1) + eps), logits)


def _uniforms(key, logits, sample_shape):
  names = sorted(logits)
  keys = jax.random.split(key, len(names))
  return {
      name: jax.random.uniform(k, tuple(sample_shape) + logits[name].shape,
                               logits[name].dtype, UNIFORM_CLAMP, 1.0 - UNIFORM_CLAMP)
      for name, k in zip(names, keys)}


def _relax_one(logits, u, temperature):
  """z, zeta, zeta~ and log q(z) per categorical for logits already of u's shape."""
  theta = jax.nn.log_softmax(logits, -1)
  q = jnp.exp(theta)
  perturbed = theta - jnp.log(-jnp.log(u))
  k = jnp.argmax(perturbed, -1)
  z = jax.nn.one_hot(k, logits.shape[-1], dtype=logits.dtype)
  zeta = jax.nn.softmax(perturbed / temperature, -1)
  # Conditional sample given z (REBAR appendix), with k and v held fixed: log v_k =
  # log u_k / q_k, log v_i = log u_i - q_i log v_k. log v rather than v, as the reference.
  log_vk = jax.lax.stop_gradient(jnp.sum(z * jnp.log(u), -1, keepdims=True)
                                 / jnp.sum(z * q, -1, keepdims=True))
  log_v = jax.lax.stop_gradient(jnp.log(u) - q * log_vk)
  # At k the formula below gives the same value up to rounding; set it exactly. A
  # masked choice (logit -1e9, q = 0) would make it -inf with a NaN gradient: there it
  # is a constant -1e9 (zeta~ 0, no gradient), computed from q = 1 so that the branch
  # not taken stays finite.
  reachable = q > 1e-30
  other = jnp.where(reachable, -jnp.log(-log_v / jnp.where(reachable, q, 1.0) - log_vk),
                    -1e9)
  g_tilde = jnp.where(z > 0, -jnp.log(-log_vk), other)
  zeta_tilde = jax.nn.softmax(g_tilde / temperature, -1)
  log_q = jnp.sum(z * theta, -1)
  return z, zeta, zeta_tilde, log_q


def _sample_from(logits_b, u, temperature, eps, sample_ndim):
  logits_b = soften(logits_b, eps)
  z, zeta, zeta_tilde, log_q = {}, {}, {}, 0.0
  for name in sorted(logits_b):
    z[name], zeta[name], zeta_tilde[name], lq = _relax_one(logits_b[name], u[name],
                                                           temperature)
    # Sum over every categorical, keeping the sample axes.
    log_q = log_q + jnp.sum(lq, axis=tuple(range(sample_ndim, lq.ndim)))
  return Sample(z, zeta, zeta_tilde, log_q)


def _broadcast(logits, sample_shape):
  return jax.tree.map(lambda a: jnp.broadcast_to(a, tuple(sample_shape) + a.shape), logits)


def _check(temperature, eps):
  if isinstance(temperature, (int, float, np.number)) and not temperature > 0:
    raise ValueError(f'temperature must be positive (UNAS uses 0.4), got {temperature}.')
  if isinstance(eps, (int, float, np.number)) and not eps >= 0:
    raise ValueError(f'eps must be >= 0 (0 turns softening off), got {eps}.')


def sample(key, logits, sample_shape, temperature: float = 0.4, eps: float = 0.0) -> Sample:
  """Draws z, zeta and zeta~ from one uniform noise; see the module docstring."""
  _check(temperature, eps)
  sample_shape = tuple(sample_shape)
  u = _uniforms(key, logits, sample_shape)
  return _sample_from(_broadcast(logits, sample_shape), u, temperature, eps,
                      len(sample_shape))


# --- RELAX control variate -------------------------------------------------------------


def init_control_variate(key, logits, hidden: int = 32):
  """Params of r_phi: flattened relaxed sample -> tanh(hidden) -> scalar.

  The output layer starts at zero, so an untrained 'relax' is exactly 'rebar'.
  """
  dim = sum(int(np.prod(a.shape)) for a in logits.values())
  return {
      'w1': jax.random.normal(key, (dim, hidden), jnp.float32) / np.sqrt(dim),
      'b1': jnp.zeros((hidden,), jnp.float32),
      'w2': jnp.zeros((hidden,), jnp.float32),
      'b2': jnp.zeros((), jnp.float32),
  }


def control_variate_residual(params, weights, sample_ndim: int):
  """r_phi(weights), shape sample_shape: the MLP over the concatenated categoricals."""
  flat = jnp.concatenate(
      [weights[name].reshape(weights[name].shape[:sample_ndim] + (-1,))
       for name in sorted(weights)], -1)
  h = jnp.tanh(flat @ params['w1'] + params['b1'])
  return h @ params['w2'] + params['b2']


# --- Estimators ------------------------------------------------------------------------


def _call(loss_fn, weights, has_aux):
  out = loss_fn(weights)
  return out if has_aux else (out, None)


def estimate(estimator: str, logits, key, loss_fn, *, sample_shape, temperature=0.4,
             baseline=0.0, control_variate=None, eps=0.0, has_aux=False,
             discrete_loss_fn=None) -> Estimate:
  """One estimate of d/dlogits E_q[L(z)] with ``estimator`` (see the module docstring).

  loss_fn(weights) -> per-sample losses of shape sample_shape (with has_aux, (losses,
  aux)); weights is a dict like logits with sample_shape leading. Only the logits (and,
  for 'relax', the control variate's params) are differentiated. L(z) is always
  evaluated (for ``loss`` and ``aux``), also by 'relaxed', whose gradient uses L(zeta).
  ``discrete_loss_fn``, if given, computes L(z) instead of ``loss_fn`` (the same
  function of one-hot weights, computed another way: only the sampled ops).
  """
  if estimator not in ESTIMATORS:
    raise ValueError(f'estimator must be one of {ESTIMATORS}, got {estimator!r}.')
  _check(temperature, eps)
  if estimator == 'relax' and control_variate is None:
    raise ValueError("control_variate must be given for the 'relax' estimator; "
                     'create it with init_control_variate(key, logits).')
  sample_shape = tuple(sample_shape)
  nd = len(sample_shape)
  n = int(np.prod(sample_shape))
  u = _uniforms(key, logits, sample_shape)
  # Differentiating w.r.t. the logits broadcast to the sample shape gives per-sample
  # gradients (RELAX's variance needs them); their sum over the sample axes is the
  # gradient w.r.t. the logits, exactly.
  logits_b = _broadcast(logits, sample_shape)
  drawn = jax.lax.stop_gradient(_sample_from(logits_b, u, temperature, eps, nd))
  loss_z, aux = _call(discrete_loss_fn or loss_fn, drawn.z, has_aux)
  loss_z = jax.lax.stop_gradient(loss_z)
  baseline = jnp.asarray(baseline, loss_z.dtype)
  cv_grads = cv_loss = None

  def relaxed_input(s):
    # x: the value of zeta with the gradient d zeta - d zeta~.
    return jax.tree.map(lambda a, b: a - b + jax.lax.stop_gradient(b), s.zeta, s.zeta_tilde)

  def surrogate(lb, phi=None):
    s = _sample_from(lb, u, temperature, eps, nd)
    if estimator == 'reinforce':
      return jnp.mean(s.log_q * (loss_z - baseline)) + baseline
    if estimator == 'relaxed':
      return jnp.mean(_call(loss_fn, s.zeta, has_aux)[0])
    x = relaxed_input(s)
    loss_x = _call(loss_fn, x, has_aux)[0]
    if estimator == 'rebar':
      return jnp.mean(s.log_q * jax.lax.stop_gradient(loss_z - loss_x)) + jnp.mean(loss_x)
    # relax: c_phi(x) = L(x) + r_phi(x). The coefficient of log q is constant in the
    # logits but not in phi, so r_phi sees a stopped sample instead of a stopped output.
    coef = jax.lax.stop_gradient(loss_z - loss_x) - control_variate_residual(
        phi, jax.lax.stop_gradient(x), nd)
    return jnp.mean(s.log_q * coef + loss_x + control_variate_residual(phi, x, nd))

  def sum_samples(g):
    return jax.tree.map(lambda a: jnp.sum(a, tuple(range(nd))), g)

  if estimator == 'relax':

    def variance(phi):
      per = jax.grad(surrogate)(logits_b, phi)  # g_i / n
      sq = sum(jnp.sum(jnp.square(n * g), tuple(range(nd, g.ndim)))
               for g in jax.tree.leaves(per))
      return jnp.mean(sq), per

    (cv_loss, per), cv_grads = jax.value_and_grad(variance, has_aux=True)(control_variate)
    grads = sum_samples(per)
  else:
    grads = sum_samples(jax.grad(surrogate)(logits_b))
    if estimator == 'reinforce':
      baseline = BASELINE_DECAY * baseline + (1 - BASELINE_DECAY) * jnp.mean(loss_z)
  return Estimate(grads, jnp.mean(loss_z), baseline, cv_grads, cv_loss, drawn, aux)
