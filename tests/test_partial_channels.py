"""Tests of jaxnas.partial_channels: channel shuffle, channel sampling, edge normalization."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnas import partial_channels as pc

SHUFFLE_CASES = [(8, 4), (8, 2), (6, 3), (12, 4), (16, 4), (16, 2), (4, 1)]


def _shuffle_ref(x, groups):
  """PyTorch reference: view (groups, C/groups), transpose, flatten, by indices."""
  x = np.asarray(x)
  c = x.shape[-1]
  out = np.empty_like(x)
  for g in range(groups):
    for j in range(c // groups):
      out[..., j * groups + g] = x[..., g * (c // groups) + j]
  return out


@pytest.mark.parametrize('c,groups', SHUFFLE_CASES)
def test_channel_shuffle_index_formula(c, groups):
  x = jnp.arange(c, dtype=jnp.float32)
  y = pc.channel_shuffle(x, groups)
  np.testing.assert_array_equal(y, _shuffle_ref(x, groups))
  # A permutation of the channels.
  np.testing.assert_array_equal(np.sort(np.asarray(y)), np.arange(c))
  if 1 < groups < c:
    assert not np.array_equal(y, x)


@pytest.mark.parametrize('c,groups', SHUFFLE_CASES)
def test_channel_shuffle_nhwc_and_inverse(c, groups):
  # Only the channel axis moves; shuffling with C/groups groups undoes it.
  x = jnp.asarray(np.random.default_rng(c).normal(size=(2, 3, 3, c)), jnp.float32)
  y = pc.channel_shuffle(x, groups)
  chex.assert_shape(y, x.shape)
  np.testing.assert_array_equal(y, _shuffle_ref(x, groups))
  np.testing.assert_array_equal(pc.channel_shuffle(y, c // groups), x)


def test_channel_shuffle_k4_c8_explicit():
  y = pc.channel_shuffle(jnp.arange(8), 4)
  np.testing.assert_array_equal(y, [0, 2, 4, 6, 1, 3, 5, 7])


@pytest.mark.parametrize('by_matmul', (False, True))
@pytest.mark.parametrize('start,stop', [(0, 4), (4, 16), (3, 9)])
def test_take_channels_is_the_slice_in_value_and_gradient(start, stop, by_matmul):
  rng = np.random.default_rng(start + stop)
  x = jnp.asarray(rng.normal(size=(2, 3, 3, 16)), jnp.float32)
  ct = jnp.asarray(rng.normal(size=(2, 3, 3, stop - start)), jnp.float32)
  y, vjp = jax.vjp(lambda t: pc.take_channels(t, start, stop, by_matmul), x)
  np.testing.assert_array_equal(y, np.asarray(x)[..., start:stop])
  expected = np.zeros(x.shape, np.float32)
  expected[..., start:stop] = ct
  np.testing.assert_array_equal(vjp(ct)[0], expected)


@pytest.mark.parametrize('by_matmul', (False, True))
@pytest.mark.parametrize('widths,groups', [((4, 12), 4), ((8, 8), 2), ((2, 2, 2), 3)])
def test_shuffle_concat_is_shuffle_of_concat(widths, groups, by_matmul):
  rng = np.random.default_rng(sum(widths))
  parts = [jnp.asarray(rng.normal(size=(2, 3, w)), jnp.float32) for w in widths]
  fn = lambda *ps: pc.shuffle_concat(ps, groups, by_matmul)  # noqa: E731
  y, vjp = jax.vjp(fn, *parts)
  np.testing.assert_array_equal(y, _shuffle_ref(np.concatenate(parts, -1), groups))
  # The gradient is the inverse permutation, split back into the parts.
  ct = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
  unshuffled = np.split(np.asarray(pc.channel_shuffle(ct, sum(widths) // groups)),
                        np.cumsum(widths)[:-1], -1)
  for got, want in zip(vjp(ct), unshuffled):
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize('num_edges,c,k', [(5, 16, 4), (3, 8, 4), (4, 8, 2), (2, 8, 1)])
def test_sample_channels_distinct_sorted_in_range(num_edges, c, k):
  idx = np.asarray(pc.sample_channels(jax.random.key(3), num_edges, c, k))
  chex.assert_shape(idx, (num_edges, c // k))
  assert np.issubdtype(idx.dtype, np.integer)
  for row in idx:
    assert len(set(row.tolist())) == c // k, row
    np.testing.assert_array_equal(row, np.sort(row))
    assert row.min() >= 0 and row.max() < c
  if k == 1:
    np.testing.assert_array_equal(idx, np.broadcast_to(np.arange(c), idx.shape))


def test_sample_channels_depends_on_key_only():
  a = pc.sample_channels(jax.random.key(0), 6, 16, 4)
  np.testing.assert_array_equal(a, pc.sample_channels(jax.random.key(0), 6, 16, 4))
  b = pc.sample_channels(jax.random.key(1), 6, 16, 4)
  assert not np.array_equal(a, b)
  # The edges of one draw get different subsets.
  assert len({tuple(r) for r in np.asarray(a).tolist()}) > 1


def test_sample_channels_is_uniform_over_channels():
  # Over many keys every channel is picked with probability 1/K.
  keys = jax.random.split(jax.random.key(7), 400)
  idx = jax.jit(jax.vmap(lambda kk: pc.sample_channels(kk, 2, 8, 4)))(keys)
  counts = np.bincount(np.asarray(idx).ravel(), minlength=8)
  freq = counts / (400 * 2)  # fraction of draws containing each channel
  np.testing.assert_allclose(freq, 0.25, atol=0.05)


def _softmax(v):
  e = np.exp(v - v.max())
  return e / e.sum()


@pytest.mark.parametrize('steps', (4, 3, 2))
def test_edge_normalization_is_per_node_softmax(steps):
  n = steps * (steps + 3) // 2
  betas = jnp.asarray(np.random.default_rng(steps).normal(0, 2, n), jnp.float32)
  w = np.asarray(pc.edge_normalization(betas, steps))
  chex.assert_shape(w, (n,))
  start = 0
  for i in range(steps):
    group = slice(start, start + i + 2)  # node i has 2 + i incoming edges
    np.testing.assert_allclose(w[group].sum(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(w[group], _softmax(np.asarray(betas)[group]), rtol=1e-5)
    start += i + 2
  assert start == n
  # Not one softmax over all edges.
  assert not np.allclose(w, _softmax(np.asarray(betas)))


def test_edge_normalization_group_sizes_for_darts_cell():
  # Shifting one node's betas by a constant leaves every weight unchanged; bumping one
  # beta changes exactly that node's group (edges 5..8 for node 2).
  betas = jnp.asarray(np.random.default_rng(0).normal(size=14), jnp.float32)
  w = np.asarray(pc.edge_normalization(betas, 4))
  np.testing.assert_allclose(pc.edge_normalization(betas.at[9:14].add(5.0), 4), w, rtol=1e-5)
  w2 = np.asarray(pc.edge_normalization(betas.at[6].add(1.0), 4))
  changed = np.flatnonzero(~np.isclose(w2, w, rtol=1e-6))
  np.testing.assert_array_equal(changed, [5, 6, 7, 8])


def test_scatter_channels():
  m = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 3, 2)), jnp.float32)
  idx = jnp.asarray([1, 6])
  out = pc.scatter_channels(m, idx, 8)
  chex.assert_shape(out, (2, 3, 3, 8))
  np.testing.assert_array_equal(out[..., 1], m[..., 0])
  np.testing.assert_array_equal(out[..., 6], m[..., 1])
  np.testing.assert_array_equal(np.delete(np.asarray(out), [1, 6], -1), 0.0)
