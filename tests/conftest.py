"""Shared helpers for the supernet tests, and the order of the test files.

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


# The slowest files first (about 3 to 6 minutes each on 2 cores): with one file per
# worker (setup.cfg's --dist loadfile), a long file started last would run alone at the
# end. The rest keep their order.
SLOW_FIRST = ('test_parallel_search.py', 'test_distributed_and_faults.py', 'test_search.py',
              'test_parallel.py', 'test_notebooks.py', 'test_parallel_train.py',
              'test_unas.py', 'test_fpnas.py', 'test_atomnas.py')


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(SLOW_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
