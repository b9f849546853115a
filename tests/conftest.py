"""Shared helpers for the supernet tests.

`random_variables` builds a module's variables from `jax.eval_shape` and fills them
with numpy random numbers. On CPU a Flax `init` of a supernet compiles one random
initializer per parameter shape (minutes for a small network), while these tests only
need some fixed parameters, so they skip `init`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest


def _fill(shapes, seed: int, scale: float):
  rng = np.random.default_rng(seed)

  def leaf(path, s):
    name = path[-1].key
    if name == 'var':  # running variances must be positive
      return jnp.asarray(rng.uniform(0.5, 2.0, s.shape), s.dtype)
    if name == 'mean':
      return jnp.asarray(rng.normal(0.0, 0.5, s.shape), s.dtype)
    return jnp.asarray(rng.uniform(-scale, scale, s.shape), s.dtype)

  return jax.tree_util.tree_map_with_path(leaf, shapes)


@pytest.fixture
def random_variables():
  """random_variables(module, *args, rngs=None, seed=0, scale=0.5) -> variables.

  Params ~ U(-scale, scale); batch_stats: mean ~ N(0, 0.5), var ~ U(0.5, 2).
  """

  def make(module, *args, rngs=None, seed=0, scale=0.5, **kwargs):
    rngs = rngs if rngs is not None else {'params': jax.random.key(0)}
    shapes = jax.eval_shape(lambda: module.init(rngs, *args, **kwargs))
    return _fill(dict(shapes), seed, scale)

  return make
