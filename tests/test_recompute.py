"""Rematerialization (jaxnas.ops.recompute): same values and gradients, less memory."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxnas.ops import recompute
from jaxnas.spaces import darts


def _f(x, w, n):
  h = x
  for _ in range(3):
    h = jnp.tanh(h @ w) * jnp.cos(h)
  return jnp.sum(h ** 2) + n.astype(jnp.float32)


def test_recompute_fn_value_and_gradients():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(5, 6)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(6, 6)) / 3, jnp.float32)
  n = jnp.int32(3)  # an integer input gets a float0 cotangent, as with jax.vjp
  g = recompute.recompute_fn(_f)
  np.testing.assert_allclose(g(x, w, n), _f(x, w, n), rtol=1e-6)
  grad = lambda f: jax.grad(lambda x, w: f(x, w, n), argnums=(0, 1))  # noqa: E731
  chex.assert_trees_all_close(jax.jit(grad(g))(x, w), grad(_f)(x, w), rtol=1e-5, atol=1e-6)
  # Second order (the unrolled DARTS arch gradient differentiates a weight gradient).
  hess = lambda f: jax.grad(lambda w: jnp.sum(grad(f)(x, w)[0] ** 2))  # noqa: E731
  chex.assert_trees_all_close(jax.jit(hess(g))(w), hess(_f)(w), rtol=1e-4, atol=1e-5)


class _Block(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(x.shape[-1], name='dense')(jnp.tanh(x))
    return nn.BatchNorm(use_running_average=False, name='bn')(x) * jnp.cos(x)


class _Stack(nn.Module):
  remat: bool

  @nn.compact
  def __call__(self, x):
    block = recompute.recompute(_Block) if self.remat else _Block
    for i in range(6):
      x = block(name=f'block_{i}')(x)
    return x


def _compiled_grad(module, variables, x):

  def loss(params):
    y, _ = module.apply({**variables, 'params': params}, x, mutable=['batch_stats'])
    return jnp.mean(y ** 2)

  return jax.jit(jax.grad(loss)).lower(variables['params']).compile()


def test_recompute_keeps_only_block_inputs_on_this_backend():
  # jax.checkpoint's barriers are removed by XLA:CPU and its recomputation merged back
  # into the forward pass; recompute's recomputation waits for the cotangent instead.
  x = jnp.asarray(np.random.default_rng(1).normal(size=(512, 256)), jnp.float32)
  variables = _Stack(False).init(jax.random.key(0), x)
  plain = _compiled_grad(_Stack(False), variables, x)
  remat = _compiled_grad(_Stack(True), variables, x)
  chex.assert_trees_all_close(remat(variables['params']), plain(variables['params']),
                              rtol=1e-4, atol=1e-6)
  # Each block's backward needs about five (512, 256) activations; plain autodiff keeps
  # them for all six blocks, recompute for the block being differentiated only.
  plain_bytes = plain.memory_analysis().temp_size_in_bytes
  remat_bytes = remat.memory_analysis().temp_size_in_bytes
  assert remat_bytes < 0.6 * plain_bytes, (remat_bytes, plain_bytes)


def test_recomputed_search_network_gradients_and_statistics(random_variables):
  # In float64: batch-statistics BatchNorm over two 2x2 images cancels heavily, so the
  # two programs' different float32 summation orders differ by up to 5e-3 of a leaf's
  # largest gradient, a figure no tolerance can tell from a wrong recomputation.
  # In float64 they agree to about 1e-12.
  net = darts.SearchNetwork(10, C=4, layers=2, steps=2, multiplier=2, k=4, sampling='random',
                            edge_normalization=True,
                            primitives=('none', 'max_pool_3x3', 'skip_connect', 'dil_conv_3x3'))
  with jax.enable_x64(True):
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 8, 8, 3)), jnp.float64)
    rngs = {'params': jax.random.key(0), 'channels': jax.random.key(1)}
    variables = jax.tree.map(lambda a: a.astype(jnp.float64),
                             random_variables(net, x, True, rngs=rngs))

    def grads(module):

      @jax.jit
      def f(params, arch):
        def loss(params, arch):
          logits, new = module.apply({**variables, 'params': params, 'arch': arch}, x, True,
                                     rngs={'channels': jax.random.key(3)},
                                     mutable=['batch_stats'])
          return jnp.sum(jax.nn.log_softmax(logits)[:, 0]), new
        return jax.grad(loss, argnums=(0, 1), has_aux=True)(params, arch)

      return f(variables['params'], variables['arch'])

    # Plain autodiff against the default (the cells' preprocessing recomputed) and whole
    # cells recomputed.
    (g_params, g_arch), new = grads(net.clone(recompute_preprocessing=False))
    recomputed = [grads(net), grads(net.clone(remat=True))]
  assert net.recompute_preprocessing and not net.remat
  assert jax.tree.leaves(g_params)[0].dtype == jnp.float64
  for (r_params, r_arch), r_new in recomputed:
    chex.assert_trees_all_close(r_params, g_params, rtol=1e-9, atol=1e-11)
    chex.assert_trees_all_close(r_arch, g_arch, rtol=1e-9, atol=1e-11)
    chex.assert_trees_all_close(r_new, new, rtol=1e-9, atol=1e-11)
  # layers=2: both cells reduce, so the reduction alphas carry the gradient.
  assert np.abs(np.asarray(g_arch['alphas_reduce'])).max() > 0
