"""PC-DARTS partial channel connections and edge normalization (Xu et al. 2019).

Each edge sends only 1/K of its input channels through the mixed op; the others bypass
it (2x2 max-pooled on stride-2 edges). Two ways to choose the channels:

* ``shuffle`` (the reference code): the first C/K channels go through the mixed op, then
  a channel shuffle with K groups mixes the processed and bypassed channels so the next
  cell sees a different subset.
* ``random`` (the paper's description): every forward draws a fresh subset of C/K
  channels per edge with ``jax.random``; fixed-size index arrays keep shapes static.

Only the selected channels are computed in both modes (no masking of full tensors),
which is where the memory saving comes from.
"""

import jax
import jax.numpy as jnp
import numpy as np

SAMPLING_MODES = ('shuffle', 'random')


def channel_shuffle(x, groups: int):
  """NHWC channel shuffle: output channel j*groups + g takes input channel g*(C/groups) + j."""
  if groups == 1:
    return x
  *lead, c = x.shape
  x = x.reshape(*lead, groups, c // groups)
  return jnp.swapaxes(x, -1, -2).reshape(*lead, c)


def take_channels(x, start: int, stop: int, by_matmul: bool = False):
  """x[..., start:stop]. ``by_matmul`` computes it as x times a 0/1 selection matrix,
  which is exact (one nonzero term per output; a non-finite input channel would spread
  to all outputs, as NaN). On XLA:CPU the product keeps the slice, and the zero padding
  of its gradient, out of the loops fused around it: fused into the depthwise convs'
  gradients, the padding made those loops scalar (the PC-DARTS search step 1.26x slower,
  and its peak memory 0.5 GB higher)."""
  if not by_matmul:
    return x[..., start:stop]
  # A numpy constant: XLA gets a literal, not a program that builds it.
  return jnp.dot(x, np.eye(x.shape[-1], dtype=x.dtype)[:, start:stop])


def shuffle_concat(parts, groups: int, by_matmul: bool = False):
  """channel_shuffle(concatenate(parts, -1), groups); ``by_matmul`` as a sum of products
  with the rows of the shuffle's permutation matrix (exact, as ``take_channels``)."""
  if not by_matmul:
    return channel_shuffle(jnp.concatenate(parts, -1), groups)
  c = sum(part.shape[-1] for part in parts)
  # x @ perm = shuffle(x); numpy, as in take_channels.
  perm = np.eye(c, dtype=parts[0].dtype).reshape(c, groups, c // groups)
  perm = perm.swapaxes(-1, -2).reshape(c, c)
  out, start = 0.0, 0
  for part in parts:
    out = out + jnp.dot(part, perm[start:start + part.shape[-1]])
    start += part.shape[-1]
  return out


def sample_channels(key, num_edges: int, channels: int, k: int):
  """For each edge, C/K distinct channel indices (sorted), shape (num_edges, C/K)."""
  keys = jax.random.split(key, num_edges)
  pick = jax.vmap(lambda kk: jax.random.permutation(kk, channels)[:channels // k])
  return jnp.sort(pick(keys), axis=-1)


def edge_normalization(betas, steps: int):
  """Softmax of betas over each node's incoming edges (groups of 2, 3, ..., steps+1)."""
  out, start = [], 0
  for i in range(steps):
    n = i + 2
    out.append(jax.nn.softmax(betas[start:start + n]))
    start += n
  return jnp.concatenate(out)


def scatter_channels(m, idx, channels: int):
  """Places m (..., C/K) at channel positions idx (C/K,) of a zero (..., C) tensor."""
  out = jnp.zeros(m.shape[:-1] + (channels,), m.dtype)
  return out.at[..., idx].set(m)
