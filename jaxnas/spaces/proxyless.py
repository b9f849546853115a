"""The ProxylessNAS (GPU) search space of UNAS (Vahdat et al. 2020; NVlabs/unas,
``proxylessnas/``): a MobileNetV2-like chain of 21 searchable layers.

The network (reference ``model_search.py``; channels at width multiplier 1):

* stem: 3x3 stride-2 conv to 40 + BN + ReLU6, then a fixed MBConv (kernel 3,
  expansion 1) to 24;
* 21 searchable layers in 6 stages of (4, 4, 4, 4, 4, 1) layers. The first layer of a
  stage, the *channel-changing* layer (1, 5, 9, 13, 17, 21; stride 2 at 1, 5, 9, 17),
  goes to 32, 56, 112, 128, 256, 432 channels and chooses one of 6 MBConvs, kernel
  {3, 5, 7} x expansion {3, 6}. The other 15 layers (stride 1, channels kept) choose
  among the same 6 or 'zero', which returns its input unchanged (the block is skipped);
  during the search (train mode) 'zero' is followed by dropout 0.1 (reference:
  ``nn.Sequential(zero, nn.Dropout(0.1))``, "following P-DARTS").
* last: 1x1 conv to 1728 + BN + ReLU6, global average pool, linear classifier (bias).

MBConv = 1x1 expand conv + BN + ReLU6 (omitted at expansion 1) -> kxk depthwise conv
(stride) + BN + ReLU6 -> 1x1 project conv + BN, plus the input where stride 1 and
C_in == C_out (so every non-channel-changing layer is residual). Hidden channels are
expansion x C_in. Every BatchNorm is affine with eps 1e-3 (the reference's BN_EPS) and
PyTorch's momentum 0.1, in the search network too; convs have no bias; weights start
from PyTorch's default init. Channels at width multiplier m are int(round(c * m)), as in
the reference.

Architecture logits are held by the caller: ``{'ops': (21, 7)}``, zeros at the start
(`arch_shapes`), ops in the order of `PROXYLESS_OPS`. The reference keeps two tensors,
(15, 7) for the other layers with 'zero' first and (6, 6) for the channel-changing
ones; here (a jaxnas choice) one (layers, ops) array, with 'zero' last and invalid in
the channel-changing layers (`valid_masks`): `mask_logits` sets it to -1e9, so a
softmax, a categorical draw or a Gumbel argmax never picks it, as a categorical over
the 6 MBConvs alone.

The network takes the *weights* of a sample, ``{'ops': (S, layers, ops)}`` with a
leading sample axis S: one architecture per example (S = batch) or one for the batch
(S = 1). A layer computes sum_o w_o * op_o(x), where op_o is the whole block (residual
included) and op_zero(x) = dropout(x). Two paths, named by the static ``path``:

* ``'mixed'``: every candidate op of every layer is computed and weighted per example
  (the memory of the supernet): UNAS's relaxed Gumbel-softmax sample, and one-hot
  weights per example. Like stages of a layer's ops are grouped: the expand convs are
  one matmul (their kernels concatenated) and one BN, the depthwise convs one per kernel
  size (the e3 and e6 hidden channels concatenated) and one BN, the project convs one
  grouped BN over their stacked outputs.
* ``'discrete'``: S = 1 and one-hot weights. Each layer runs only its chosen op, through
  ``lax.switch`` on a scalar index (the argmax of its weights among its valid ops): the
  compiled program holds conditionals, and the ops not chosen are not computed. The
  op's output is multiplied by its (one-hot) weight, so a straight-through gradient
  reaches the chosen entries. A batched switch index (under ``vmap``, one architecture
  per example) would lower to ``select`` and run every branch: one architecture per
  example is the mixed path with one-hot weights.

Weights of 'zero' in a channel-changing layer are ignored by both paths. In train mode
the mixed path updates the BatchNorm statistics of every op, the discrete path only
those of the chosen ops.

To keep the program small (jaxnas choice), the layers of a stage after its first have
the same shapes and run as one ``lax.scan`` over their parameters stacked on a leading
layer axis (the switch index stays a scalar per iteration). Both paths read the same
variables: ``layer_{n}`` (a channel-changing layer, a layer axis of 1) and
``layers_{n}_{m}`` (layers n..m of a stage, stacked; ``layer_{n}`` if n == m) hold, per
MBConv op, ``{op}_expand`` (L, C_in, h), ``{op}_dw`` (L, k, k, 1, h), ``{op}_project``
(L, h, C_out) and the BatchNorms ``{op}_bn{0,1,2}`` (after expand, depthwise,
project: params ``scale``, ``bias``, batch_stats ``mean``, ``var``, each (L, channels)).

Dropout on 'zero' (train mode, ``zero_dropout`` > 0) needs a ``'dropout'`` rng; layer n
uses ``fold_in(make_rng('dropout'), n)`` in both paths, so they drop the same elements.
Init (which may run on one example) applies no dropout and keeps no statistics.

`ProxylessEvalNetwork` trains a derived architecture alone from scratch (reference
``model.py``): the same skeleton, one MBConv per non-'zero' layer, 'zero' layers
removed (they are the identity), no dropout. `architecture_cost` gives its weights and
multiply-adds (convolutions and the classifier, at 224 px): 7.12M and 465M for
`PROXYLESS_GPU` (the ProxylessNAS paper's 465M), 5.97M and 428M for `UNAS_PROXYLESS`,
the reference's architecture found by UNAS.
"""

import functools
import json
import os
from typing import Any, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxnas import flops
from jaxnas import genotypes
from jaxnas.ops import depthwise as depthwise_lib
from jaxnas.ops import primitives as ops
from jaxnas.spaces import darts
from jaxnas.spaces import darts_eval

# (kernel size, expansion) of the candidate MBConvs, in the reference's op order.
MB_OPS = {'mb3_e3': (3, 3), 'mb3_e6': (3, 6), 'mb5_e3': (5, 3), 'mb5_e6': (5, 6),
          'mb7_e3': (7, 3), 'mb7_e6': (7, 6)}
ZERO = 'zero'
PROXYLESS_OPS = tuple(MB_OPS) + (ZERO,)
# The reference's op names (proxylessnas/genotypes.py).
REFERENCE_NAMES = {'mic_zero': ZERO, **{f'mic_{k}x{k}_e{e}': op
                                       for op, (k, e) in MB_OPS.items()}}
# Stem, fixed first block, the 6 stages' outputs, last 1x1 conv (ProxylessNAS GPU).
CHANNELS = (40, 24, 32, 56, 112, 128, 256, 432, 1728)
DEPTHS = (4, 4, 4, 4, 4, 1)    # layers per stage; the first of each changes channels
STRIDES = (2, 2, 2, 1, 2, 1)   # of each stage's first layer
ZERO_DROPOUT = 0.1
BN_EPSILON = 1e-3
PATHS = ('mixed', 'discrete')
ARCH_NAMES = ('ops',)
# The logit of a choice a layer cannot make: finite (0 * log q stays 0), exp() is 0.
MASKED_LOGIT = -1e9


def _reference_architecture(normal, reduce):
  """A reference genotype (15 'normal' and 6 'reduce' names) as 21 layer ops."""
  normal, reduce = iter(normal), iter(reduce)
  changing = channel_changing_layers()
  return tuple(REFERENCE_NAMES[next(reduce) if n in changing else next(normal)]
               for n in range(1, sum(DEPTHS) + 1))


# --- the macro skeleton ----------------------------------------------------------------


class Layer(NamedTuple):
  """One searchable layer: its 1-based number, channels, stride, and whether it is the
  first (channel-changing) layer of its stage."""
  number: int
  c_in: int
  c_out: int
  stride: int
  changes_channels: bool

  @property
  def residual(self) -> bool:
    return self.stride == 1 and self.c_in == self.c_out


def resolve_channels(channels: Sequence[int] = CHANNELS, width_multiplier: float = 1.0
                     ) -> tuple[int, ...]:
  """The channels at ``width_multiplier``: int(round(c * m)), as the reference."""
  out = tuple(int(round(c * width_multiplier)) for c in channels)
  if min(out) < 1:
    raise ValueError(f'width_multiplier={width_multiplier} leaves a layer of {channels} '
                     f'with no channels ({out}); use a larger multiplier.')
  return out


def check_skeleton(channels: Sequence[int], depths: Sequence[int], strides: Sequence[int]):
  """Raises a ValueError unless the skeleton is consistent."""
  if len(depths) != len(strides) or len(channels) != len(depths) + 3:
    raise ValueError(f'channels (stem, first block, one per stage, last conv) needs '
                     f'len(depths) + 3 = {len(depths) + 3} entries and strides one per '
                     f'stage ({len(depths)}); got {len(channels)} channels and '
                     f'{len(strides)} strides.')
  if not depths or min(depths) < 1:
    raise ValueError(f'depths must give every stage at least one layer; got {depths}.')
  if any(s not in (1, 2) for s in strides):
    raise ValueError(f'strides must be 1 or 2; got {strides}.')


def layer_specs(channels: Sequence[int] = CHANNELS, depths: Sequence[int] = DEPTHS,
                strides: Sequence[int] = STRIDES) -> list[Layer]:
  """The searchable layers of the skeleton (channels already resolved)."""
  check_skeleton(channels, depths, strides)
  layers, c_in, n = [], channels[1], 1
  for stage, (depth, stride) in enumerate(zip(depths, strides)):
    c_out = channels[2 + stage]
    for i in range(depth):
      layers.append(Layer(n, c_in if i == 0 else c_out, c_out, stride if i == 0 else 1,
                          i == 0))
      n += 1
    c_in = c_out
  return layers


def channel_changing_layers(depths: Sequence[int] = DEPTHS) -> tuple[int, ...]:
  """1-based numbers of the stages' first layers: (1, 5, 9, 13, 17, 21) by default."""
  return tuple(int(n) for n in np.cumsum((1,) + tuple(depths[:-1])))


def stages(depths: Sequence[int] = DEPTHS) -> list[tuple[int, int]]:
  """Per stage, its (first, last) 1-based layer numbers."""
  firsts = channel_changing_layers(depths)
  return [(f, f + d - 1) for f, d in zip(firsts, depths)]


# --- architecture parameters and samples ---------------------------------------------


def _check_primitives(primitives: Sequence[str]):
  unknown = [op for op in primitives if op not in PROXYLESS_OPS]
  if unknown or len(set(primitives)) != len(primitives):
    raise ValueError(f'primitives must be distinct ops of {PROXYLESS_OPS}; got '
                     f'{tuple(primitives)}.')
  if not any(op in MB_OPS for op in primitives):
    raise ValueError(f'primitives need at least one MBConv op (the channel-changing '
                     f'layers cannot be zero); got {tuple(primitives)}.')


def arch_shapes(depths: Sequence[int] = DEPTHS, num_ops: int = len(PROXYLESS_OPS)
                ) -> dict[str, tuple[int, int]]:
  """Shapes of the architecture logits (and of one sample's weights, without its
  leading sample axis): per layer, a categorical over the ops."""
  return {'ops': (int(sum(depths)), num_ops)}


def valid_masks(depths: Sequence[int] = DEPTHS,
                primitives: Sequence[str] = PROXYLESS_OPS) -> dict[str, np.ndarray]:
  """``{'ops': bool (layers, ops)}``: True where a layer may pick the op (every op,
  except 'zero' in the channel-changing layers)."""
  _check_primitives(primitives)
  mask = np.ones(arch_shapes(depths, len(primitives))['ops'], bool)
  if ZERO in primitives:
    mask[np.asarray(channel_changing_layers(depths)) - 1, primitives.index(ZERO)] = False
  return {'ops': mask}


def mask_logits(arch_logits: Mapping[str, Any], depths: Sequence[int] = DEPTHS,
                primitives: Sequence[str] = PROXYLESS_OPS) -> dict[str, jax.Array]:
  """The logits with the choices a layer cannot make set to `MASKED_LOGIT` (leading
  axes are kept). No gradient reaches masked entries."""
  shape = arch_shapes(depths, len(primitives))['ops']
  logits = jnp.asarray(arch_logits['ops'])
  if logits.shape[-2:] != shape:
    raise ValueError(f"arch_logits['ops'] must end in (layers, ops) = {shape} for depths "
                     f'{tuple(depths)} and {len(primitives)} primitives; got '
                     f'{logits.shape}.')
  valid = valid_masks(depths, primitives)['ops']
  return {'ops': jnp.where(valid, logits, jnp.asarray(MASKED_LOGIT, logits.dtype))}


def random_architecture(key: jax.Array, depths: Sequence[int] = DEPTHS,
                        primitives: Sequence[str] = PROXYLESS_OPS, num_samples: int = 1,
                        arch_logits: Mapping[str, Any] | None = None
                        ) -> dict[str, jax.Array]:
  """``num_samples`` architectures drawn from the categoricals of ``arch_logits``
  (uniform over the valid choices when None), as index choices ``{'ops': int32
  (num_samples, layers)}``."""
  shape = arch_shapes(depths, len(primitives))['ops']
  if arch_logits is None:
    arch_logits = {'ops': jnp.zeros(shape)}
  logits = mask_logits(arch_logits, depths, primitives)['ops']
  if logits.shape != shape:
    raise ValueError(f"arch_logits['ops'] has shape {logits.shape}; need {shape}.")
  return {'ops': jax.random.categorical(key, logits, shape=(num_samples, shape[0]))}


def one_hot(choices: Mapping[str, Any], num_ops: int = len(PROXYLESS_OPS),
            dtype=jnp.float32) -> dict[str, jax.Array]:
  """The weights ``{'ops': (S, layers, ops)}`` of index choices ``{'ops': (S, layers)}``."""
  return {'ops': jax.nn.one_hot(jnp.asarray(choices['ops']), num_ops, dtype=dtype)}


def validate_architecture(architecture: Sequence[str], depths: Sequence[int] = DEPTHS,
                          primitives: Sequence[str] = PROXYLESS_OPS) -> tuple[str, ...]:
  """The architecture (one op name per layer) as a tuple, or a ValueError that names
  what is wrong."""
  arch = tuple(architecture)
  if len(arch) != sum(depths):
    raise ValueError(f'An architecture names one op per layer: {sum(depths)} for depths '
                     f'{tuple(depths)}; got {len(arch)}.')
  unknown = sorted(set(arch) - set(primitives))
  if unknown:
    raise ValueError(f'architecture uses {unknown}, which are not among the primitives '
                     f'{tuple(primitives)}.')
  bad = [n for n in channel_changing_layers(depths) if arch[n - 1] == ZERO]
  if bad:
    raise ValueError(f"Layers {bad} change the channels and cannot be 'zero'.")
  return arch


def choices_from_architecture(architecture: Sequence[str],
                              primitives: Sequence[str] = PROXYLESS_OPS,
                              depths: Sequence[int] = DEPTHS) -> dict[str, np.ndarray]:
  """An architecture as index choices of one sample: ``{'ops': int32 (1, layers)}``."""
  arch = validate_architecture(architecture, depths, primitives)
  return {'ops': np.array([[list(primitives).index(op) for op in arch]], np.int32)}


def derive_architecture(arch_logits: Mapping[str, Any], depths: Sequence[int] = DEPTHS,
                        primitives: Sequence[str] = PROXYLESS_OPS) -> list[str]:
  """The most likely architecture: per layer the argmax op among those it may pick."""
  shape = arch_shapes(depths, len(primitives))['ops']
  if 'ops' not in arch_logits or np.shape(arch_logits['ops']) != shape:
    got = np.shape(arch_logits['ops']) if 'ops' in arch_logits else 'nothing'
    raise ValueError(f"derive_architecture needs arch_logits['ops'] of shape {shape} "
                     f'(depths {tuple(depths)}, {len(primitives)} primitives); got {got}.')
  masked = np.asarray(mask_logits(arch_logits, depths, primitives)['ops'])
  return [primitives[int(o)] for o in masked.argmax(-1)]


def to_json(architecture: Sequence[str]) -> dict:
  """The architecture as a JSON-ready dict."""
  return {'ops': list(architecture)}


def from_json(d: Mapping[str, Any], depths: Sequence[int] = DEPTHS) -> tuple[str, ...]:
  """`to_json`'s dict (or its JSON text) back to a validated architecture."""
  if isinstance(d, str):
    d = json.loads(d)
  if not isinstance(d, Mapping) or 'ops' not in d:
    raise ValueError("A ProxylessNAS architecture is a JSON object with key 'ops' (one op "
                     'name per layer).')
  return validate_architecture(d['ops'], depths)


def format_architecture(architecture: Sequence[str], depths: Sequence[int] = DEPTHS) -> str:
  """One line, a ``|`` between stages: ``mb5_e3 zero zero zero | mb7_e3 ...``."""
  arch = list(architecture)
  return ' | '.join(' '.join(arch[f - 1:l]) for f, l in stages(depths))


def is_degenerate(architecture: Sequence[str], depths: Sequence[int] = DEPTHS) -> bool:
  """True if every layer that may be skipped is 'zero' (the search collapsed to the
  smallest network: the analogue of a DARTS cell of parameter-free ops)."""
  changing = set(channel_changing_layers(depths))
  return all(op == ZERO for n, op in enumerate(architecture, 1) if n not in changing)


def check_weights(weights: Mapping[str, Any], batch: int, depths: Sequence[int],
                  num_ops: int, path: str) -> int:
  """Raises a ValueError unless ``weights`` fit the network; returns the sample count."""
  if path not in PATHS:
    raise ValueError(f'path must be one of {PATHS}; got {path!r}.')
  if 'ops' not in weights:
    raise ValueError("weights has no 'ops'; it needs {'ops': (S, layers, ops)}.")
  shape = arch_shapes(depths, num_ops)['ops']
  got = np.shape(weights['ops'])
  if len(got) != 3 or got[1:] != shape or got[0] not in (1, batch):
    raise ValueError(f"weights['ops'] must be (S,) + {shape} with S = 1 or the batch size "
                     f'{batch}; got {got}.')
  if path == 'discrete' and got[0] != 1:
    raise ValueError(f"path='discrete' runs one architecture for the batch (S = 1); got "
                     f"S = {got[0]}. One architecture per example is path='mixed'.")
  return got[0]


# --- one layer's candidate ops, as pure functions of explicit variables --------------


def _relu6(x):
  return jnp.clip(x, 0.0, 6.0)


def _dropout(x, key, rate):
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype))


def _bn(params, stats, names, y, *, train, bn_groups, grouped=False):
  """ops.BatchNorm (affine, eps 1e-3) of y with the variables of the BNs ``names``:
  concatenated along the channels (y holds their channels side by side) or, with
  ``grouped``, stacked (y is (G, B, ..., C)). Returns y and {name: new stats}."""
  join = jnp.stack if grouped else functools.partial(jnp.concatenate, axis=-1)
  variables = {'params': {k: join([params[n][k] for n in names]) for k in ('scale', 'bias')},
               'batch_stats': {k: join([stats[n][k] for n in names])
                               for k in ('mean', 'var')}}
  bn = ops.BatchNorm(train, affine=True, grouped=grouped, epsilon=BN_EPSILON,
                     batch_groups=bn_groups, parent=None)
  if train:
    y, state = bn.apply(variables, y, mutable=['batch_stats'])
    new = state['batch_stats']
  else:
    y, new = bn.apply(variables, y), variables['batch_stats']
  if grouped:
    return y, {n: {k: v[g] for k, v in new.items()} for g, n in enumerate(names)}
  ends = np.cumsum([stats[n]['mean'].shape[-1] for n in names])[:-1]
  parts = {k: jnp.split(v, ends, -1) for k, v in new.items()}
  return y, {n: {k: parts[k][g] for k in parts} for g, n in enumerate(names)}


def _weighted(y, w):
  """y * w with w of shape (S,): a scalar for S = 1, else one weight per example."""
  return y * w.reshape((-1,) + (1,) * (y.ndim - 1))


def single_op(params, stats, x, op, key, *, layer: Layer, train, impl='auto', bn_groups=1,
              zero_dropout=0.0):
  """op(x) of one layer alone (the variables of `mixed_layer`), the whole block: the
  MBConv plus the residual where the layer has one; 'zero' is x (dropout in train mode
  where ``zero_dropout`` > 0). Returns the output and the layer's statistics with this
  op's updated."""
  new = dict(stats)
  if op == ZERO:
    return (_dropout(x, key, zero_dropout) if key is not None else x), new
  k, e = MB_OPS[op]
  config = dict(train=train, bn_groups=bn_groups)
  h = x
  if e != 1:
    h, update = _bn(params, stats, [f'{op}_bn0'], ops.pointwise(x, params[f'{op}_expand']),
                    **config)
    new.update(update)
    h = _relu6(h)
  h = depthwise_lib.depthwise_conv(h, params[f'{op}_dw'][:, :, 0, :], stride=layer.stride,
                                   impl=impl)
  h, update = _bn(params, stats, [f'{op}_bn1'], h, **config)
  new.update(update)
  y, update = _bn(params, stats, [f'{op}_bn2'], ops.pointwise(_relu6(h),
                                                              params[f'{op}_project']),
                  **config)
  new.update(update)
  return (x + y if layer.residual else y), new


def mixed_layer(params, stats, x, weights, key, *, layer: Layer, primitives, train,
                impl='auto', bn_groups=1, zero_dropout=0.0):
  """sum_o weights[:, o] * op_o(x) of one layer, per example: x (B, H, W, C_in),
  weights (S, ops) with S = 1 or B. Like stages are grouped (module docstring).
  Returns the sum and the layer's new statistics."""
  index = {op: o for o, op in enumerate(primitives)}
  config = dict(train=train, bn_groups=bn_groups)
  new = dict(stats)
  # Ordered by kernel size, so that each kernel's hidden channels are one slice.
  mbs = sorted((op for op in primitives if op in MB_OPS), key=lambda op: MB_OPS[op][0])
  expanding = [op for op in mbs if MB_OPS[op][1] != 1]
  hidden = {op: x for op in mbs}
  if expanding:
    kernel = jnp.concatenate([params[f'{op}_expand'] for op in expanding], -1)
    h, update = _bn(params, stats, [f'{op}_bn0' for op in expanding],
                    ops.pointwise(x, kernel), **config)
    new.update(update)
    ends = np.cumsum([params[f'{op}_expand'].shape[-1] for op in expanding])[:-1]
    hidden.update(zip(expanding, jnp.split(_relu6(h), ends, -1)))
  # One depthwise conv per kernel size over its ops' hidden channels, then one BN.
  convs = []
  for k in sorted({MB_OPS[op][0] for op in mbs}):
    group = [op for op in mbs if MB_OPS[op][0] == k]
    h = jnp.concatenate([hidden[op] for op in group], -1)
    dw = jnp.concatenate([params[f'{op}_dw'][:, :, 0, :] for op in group], -1)
    convs.append(depthwise_lib.depthwise_conv(h, dw, stride=layer.stride, impl=impl))
  h, update = _bn(params, stats, [f'{op}_bn1' for op in mbs], jnp.concatenate(convs, -1),
                  **config)
  new.update(update)
  ends = np.cumsum([params[f'{op}_dw'].shape[-1] for op in mbs])[:-1]
  hidden = jnp.split(_relu6(h), ends, -1)
  # The project convs, their BNs as one grouped BN over the stacked outputs.
  y = jnp.stack([ops.pointwise(h, params[f'{op}_project']) for op, h in zip(mbs, hidden)])
  y, update = _bn(params, stats, [f'{op}_bn2' for op in mbs], y, grouped=True, **config)
  new.update(update)
  scale = darts.weighting(impl)
  if weights.shape[0] == 1:
    out = sum(scale(y[m], weights[0, index[op]]) for m, op in enumerate(mbs))
  else:
    out = sum(_weighted(y[m], weights[:, index[op]]) for m, op in enumerate(mbs))
  if layer.residual:  # sum_o w_o (x + y_o): the MBConvs' share of x
    out = out + _weighted(x, sum(weights[:, index[op]] for op in mbs))
  if ZERO in index and not layer.changes_channels:
    zero, _ = single_op(params, stats, x, ZERO, key, layer=layer, train=train,
                        zero_dropout=zero_dropout)
    out = out + _weighted(zero, weights[:, index[ZERO]])
  return out, new


def valid_ops(layer: Layer, primitives) -> list[str]:
  """The ops a layer may pick, in ``primitives`` order."""
  return [op for op in primitives if not (op == ZERO and layer.changes_channels)]


def discrete_layer(params, stats, x, weights, key, *, layer: Layer, primitives, train,
                   impl='auto', bn_groups=1, zero_dropout=0.0):
  """Only the chosen op of one layer (weights (1, ops), one-hot), under lax.switch on
  a scalar index; its output times its weight. Returns it and the layer's statistics
  (the chosen op's updated)."""
  choices = valid_ops(layer, primitives)
  w = weights[0, np.array([primitives.index(op) for op in choices])]
  chosen = jnp.argmax(w)
  config = dict(layer=layer, train=train, impl=impl, bn_groups=bn_groups,
                zero_dropout=zero_dropout)
  branches = [functools.partial(_branch, op, config) for op in choices]
  y, new = lax.switch(chosen, branches, params, stats, x, key)
  return darts.weighting(impl)(y, w[chosen]), new


def _branch(op, config, params, stats, x, key):
  return single_op(params, stats, x, op, key, **config)


# --- modules ---------------------------------------------------------------------------


class BatchNormVariables(nn.Module):
  """An affine BatchNorm's variables (ops.BatchNorm's names) without the BatchNorm:
  returns ({'scale', 'bias'}, {'mean', 'var'}), after writing ``new`` stats if given."""
  shape: tuple[int, ...]

  @nn.compact
  def __call__(self, new=None):
    scale = self.param('scale', nn.initializers.ones, self.shape)
    bias = self.param('bias', nn.initializers.zeros, self.shape)
    mean = self.variable('batch_stats', 'mean', jnp.zeros, self.shape, jnp.float32)
    var = self.variable('batch_stats', 'var', jnp.ones, self.shape, jnp.float32)
    if new is not None:
      mean.value, var.value = new['mean'], new['var']
    return {'scale': scale, 'bias': bias}, {'mean': mean.value, 'var': var.value}


class CandidateOps(nn.Module):
  """The variables of the MBConv ops of ``num_layers`` layers of equal shapes, stacked
  on a leading layer axis (names in the module docstring). Calling it returns
  ``(params, stats)``; ``new_stats`` (that form) are written first."""
  num_layers: int
  c_in: int
  c_out: int
  primitives: tuple[str, ...]

  @nn.compact
  def __call__(self, new_stats=None):
    n, c_in, c_out = self.num_layers, self.c_in, self.c_out
    params, bns = {}, {}
    for op in self.primitives:
      if op not in MB_OPS:
        continue
      k, e = MB_OPS[op]
      h = c_in * e
      # fan_in of a 1x1 kernel is C_in, of a depthwise kernel k*k (the layer axis is a
      # batch axis), as ops.Conv1x1 and ops.DepthwiseConv.
      if e != 1:
        params[f'{op}_expand'] = self.param(f'{op}_expand', ops.torch_init_stacked,
                                            (n, c_in, h))
        bns[f'{op}_bn0'] = h
      params[f'{op}_dw'] = self.param(f'{op}_dw', ops.torch_init_stacked, (n, k, k, 1, h))
      params[f'{op}_project'] = self.param(f'{op}_project', ops.torch_init_stacked,
                                           (n, h, c_out))
      bns[f'{op}_bn1'], bns[f'{op}_bn2'] = h, c_out
    stats = {}
    for name, c in bns.items():
      params[name], stats[name] = BatchNormVariables((n, c), name=name)(
          new_stats and new_stats[name])
    return params, stats


class MBConv(nn.Module):
  """MobileNetV2's inverted residual block: 1x1 expand + BN + ReLU6 (not at expansion
  1) -> kxk depthwise (stride) + BN + ReLU6 -> 1x1 project + BN (+ x where stride 1 and
  C_in == C_out). Affine BNs, eps 1e-3."""
  features: int
  kernel_size: int
  expansion: int
  stride: int = 1
  impl: str = 'auto'
  bn_groups: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    bn = functools.partial(ops.BatchNorm, train, affine=True, epsilon=BN_EPSILON,
                           batch_groups=self.bn_groups)
    h = x
    if self.expansion != 1:
      h = ops.Conv1x1(x.shape[-1] * self.expansion, name='expand')(h)
      h = _relu6(bn(name='expand_bn')(h))
    h = ops.DepthwiseConv(self.kernel_size, self.stride, impl=self.impl, name='dw')(h)
    h = _relu6(bn(name='dw_bn')(h))
    y = bn(name='project_bn')(ops.Conv1x1(self.features, name='project')(h))
    return x + y if self.stride == 1 and x.shape[-1] == self.features else y


def _stem(x, train, channels, impl, bn_groups):
  """3x3 stride-2 conv + BN + ReLU6, then the fixed MBConv (k3, e1); inside the caller."""
  x = nn.Conv(channels[0], (3, 3), (2, 2), padding=1, use_bias=False,
              kernel_init=ops.torch_init, name='stem_conv')(x)
  x = _relu6(ops.BatchNorm(train, affine=True, epsilon=BN_EPSILON, batch_groups=bn_groups,
                           name='stem_bn')(x))
  return MBConv(channels[1], 3, 1, 1, impl, bn_groups, name='first_block')(x, train)


def _head(x, train, channels, num_classes, bn_groups, dropout=0.0):
  """1x1 conv + BN + ReLU6, global average pool, (dropout,) linear classifier; inside
  the caller."""
  x = ops.Conv1x1(channels[-1], name='feature_mix_conv')(x)
  x = _relu6(ops.BatchNorm(train, affine=True, epsilon=BN_EPSILON, batch_groups=bn_groups,
                           name='feature_mix_bn')(x))
  x = jnp.mean(x, axis=(1, 2))
  if dropout:
    x = nn.Dropout(dropout, deterministic=False)(x)
  return nn.Dense(num_classes, kernel_init=ops.torch_init,
                  bias_init=darts.torch_bias_init(x.shape[-1]), name='classifier')(x)


def group_name(first, last):
  """The variables' name of stacked layers first..last (one layer: ``layer_{first}``)."""
  return f'layer_{first}' if first == last else f'layers_{first}_{last}'


def tree_at(tree, i):
  """Entry i of every array of ``tree`` (one layer of stacked variables)."""
  return jax.tree_util.tree_map(lambda a: a[i], tree)


class ProxylessNetwork(nn.Module):
  """The ProxylessNAS (GPU) supernet of UNAS (module docstring).

  ``apply(variables, x, weights, train=..., path='mixed' | 'discrete')``: ``weights``
  is ``{'ops': (S, layers, len(primitives))}`` with S = batch or 1; ``path`` is static.
  In train mode with ``zero_dropout`` > 0 the call needs ``rngs={'dropout': key}``.

  ``channels`` (stem, first block, one per stage, last conv) are scaled by
  ``width_multiplier``; ``depths`` and ``strides`` give each stage's layer count and
  its first layer's stride: the defaults are the paper's, smaller ones make a tiny
  version of the same skeleton. ``bn_groups`` > 1 gives every BatchNorm per-device
  statistics over that many equal slices of the batch."""
  num_classes: int = 1000
  channels: tuple[int, ...] = CHANNELS
  width_multiplier: float = 1.0
  depths: tuple[int, ...] = DEPTHS
  strides: tuple[int, ...] = STRIDES
  primitives: tuple[str, ...] = PROXYLESS_OPS
  zero_dropout: float = ZERO_DROPOUT
  impl: str = 'auto'
  bn_groups: int = 1

  def arch_shapes(self) -> dict[str, tuple[int, int]]:
    return arch_shapes(self.depths, len(self.primitives))

  @nn.compact
  def __call__(self, x, weights, train: bool, path: str = 'mixed'):
    _check_primitives(self.primitives)
    channels = resolve_channels(self.channels, self.width_multiplier)
    layers = layer_specs(channels, self.depths, self.strides)
    check_weights(weights, x.shape[0], self.depths, len(self.primitives), path)
    if not 0 <= self.zero_dropout < 1:
      raise ValueError(f'zero_dropout must be in [0, 1); got {self.zero_dropout}.')
    initializing = self.is_initializing()
    dropout = (train and self.zero_dropout > 0 and ZERO in self.primitives
               and not initializing)
    if dropout and not self.has_rng('dropout'):
      raise ValueError(f"ProxylessNetwork in train mode applies dropout {self.zero_dropout} "
                       "after 'zero': pass rngs={'dropout': key} to apply, or set "
                       'zero_dropout=0.')
    base_key = self.make_rng('dropout') if dropout else None
    keep = train and not initializing
    config = dict(primitives=self.primitives, train=train, impl=self.impl,
                  bn_groups=1 if initializing else self.bn_groups,
                  zero_dropout=self.zero_dropout)
    layer_fn = {'mixed': mixed_layer, 'discrete': discrete_layer}[path]
    w = weights['ops']

    x = _stem(x, train, channels, self.impl, self.bn_groups)
    for first, last in stages(self.depths):
      # The channel-changing layer, then the stage's other layers (equal shapes) stacked.
      for lo, hi in ((first, first), (first + 1, last)):
        if lo > hi:
          continue
        specs = layers[lo - 1:hi]
        group = CandidateOps(hi - lo + 1, specs[0].c_in, specs[0].c_out, self.primitives,
                             name=group_name(lo, hi))
        params, stats = group()
        fn = functools.partial(layer_fn, layer=specs[0], **config)
        keys = None
        if base_key is not None and not specs[0].changes_channels:
          keys = jax.vmap(lambda n: jax.random.fold_in(base_key, n))(jnp.arange(lo, hi + 1))
        w_group = jnp.swapaxes(w[:, lo - 1:hi], 0, 1)  # (layers, S, ops)
        if hi == lo:
          x, new = fn(tree_at(params, 0), tree_at(stats, 0), x, w_group[0],
                      None if keys is None else keys[0])
          new = jax.tree_util.tree_map(lambda a: a[None], new)
        else:
          def body(x, xs, fn=fn):
            p, s, w_i, key = xs
            return fn(p, s, x, w_i, key)
          x, new = lax.scan(body, x, (params, stats, w_group, keys))
        if keep:
          group(new)
    return _head(x, train, channels, self.num_classes, self.bn_groups)


class ProxylessEvalNetwork(nn.Module):
  """A derived architecture (one op name per layer) alone, trained from scratch: the
  supernet's skeleton with one MBConv per non-'zero' layer (named ``layer_{n}``,
  1-based) and the 'zero' layers removed.

  ``apply(variables, x, train=...)`` returns ``(logits, None)``, as every evaluation
  network does (the second: auxiliary logits, which this one has none of). ``dropout``
  > 0 drops the pooled features before the classifier in train mode (ProxylessNAS
  trains its GPU model with 0.3) and needs ``rngs={'dropout': key}``."""
  architecture: tuple[str, ...]
  num_classes: int = 1000
  channels: tuple[int, ...] = CHANNELS
  width_multiplier: float = 1.0
  depths: tuple[int, ...] = DEPTHS
  strides: tuple[int, ...] = STRIDES
  impl: str = 'auto'
  bn_groups: int = 1
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool):
    arch = validate_architecture(self.architecture, self.depths)
    channels = resolve_channels(self.channels, self.width_multiplier)
    x = _stem(x, train, channels, self.impl, self.bn_groups)
    for layer, op in zip(layer_specs(channels, self.depths, self.strides), arch):
      if op == ZERO:
        continue
      k, e = MB_OPS[op]
      x = MBConv(layer.c_out, k, e, layer.stride, self.impl, self.bn_groups,
                 name=f'layer_{layer.number}')(x, train)
    return _head(x, train, channels, self.num_classes, self.bn_groups,
                 self.dropout if train else 0.0), None


def count_params(params) -> int:
  """Number of weights of a params tree (BN scale and bias included, statistics not)."""
  return darts_eval.count_params(params, exclude=None)


def architecture_cost(architecture: Sequence[str], *, num_classes: int = 1000,
                      image_size: int = 224, channels: Sequence[int] = CHANNELS,
                      width_multiplier: float = 1.0, depths: Sequence[int] = DEPTHS,
                      strides: Sequence[int] = STRIDES) -> dict[str, int]:
  """``{'params', 'multiply_adds'}`` of the evaluation network of ``architecture`` for
  one image_size x image_size RGB image (convolutions and the classifier; traced, not
  run)."""
  model = ProxylessEvalNetwork(tuple(architecture), num_classes, tuple(channels),
                               width_multiplier, tuple(depths), tuple(strides), impl='xla')
  x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  macs = flops.count_macs(lambda v, x: model.apply(v, x, train=False)[0], variables, x)
  return {'params': count_params(variables['params']), 'multiply_adds': int(macs)}


# Reference architectures (NVlabs/unas proxylessnas/genotypes.py), one op per layer.
PROXYLESS_GPU = _reference_architecture(
    ['mic_zero'] * 5 + ['mic_3x3_e3', 'mic_zero', 'mic_zero', 'mic_5x5_e3', 'mic_zero',
                        'mic_3x3_e3', 'mic_5x5_e3', 'mic_7x7_e6', 'mic_7x7_e6',
                        'mic_5x5_e6'],
    ['mic_5x5_e3', 'mic_7x7_e3', 'mic_7x7_e6', 'mic_5x5_e6', 'mic_7x7_e6', 'mic_7x7_e6'])
# The architecture UNAS found in this space.
UNAS_PROXYLESS = _reference_architecture(
    ['mic_3x3_e3'] + ['mic_zero'] * 5 + ['mic_3x3_e3'] * 6 + ['mic_7x7_e3'] * 3,
    ['mic_5x5_e3', 'mic_7x7_e3', 'mic_7x7_e3', 'mic_5x5_e3', 'mic_7x7_e6', 'mic_7x7_e6'])

PUBLISHED = {'PROXYLESS_GPU': PROXYLESS_GPU, 'UNAS_PROXYLESS': UNAS_PROXYLESS}
# What a UNAS search in this space writes to its workdir (the trainer reads it).
ARCHITECTURE_FILE = 'architecture.json'


def load_architecture(spec, depths: Sequence[int] = DEPTHS) -> tuple[str, ...]:
  """The architecture ``spec`` names: a published one (`PUBLISHED`), a JSON file of
  `to_json`'s form, or a search workdir (its ``architecture.json``). Raises
  ``genotypes.GenotypeError`` naming the source and what is wrong."""
  names = ', '.join(PUBLISHED)
  if not isinstance(spec, (str, os.PathLike)):
    raise genotypes.GenotypeError(f'cannot load an architecture from a '
                                  f'{type(spec).__name__}; name one of {names}, a .json '
                                  'file or a search workdir.')
  spec = os.fspath(spec)
  if spec in PUBLISHED:
    source, d = spec, to_json(PUBLISHED[spec])
  else:
    path = os.path.join(spec, ARCHITECTURE_FILE) if os.path.isdir(spec) else spec
    if not os.path.isfile(path):
      raise genotypes.GenotypeError(
          f'{path}: no such architecture file; name a published architecture ({names}), '
          f'a .json file or the workdir of a finished search in this space.')
    source = path
    try:
      with open(path) as f:
        d = json.load(f)
    except (OSError, ValueError) as e:
      raise genotypes.GenotypeError(f'{path}: cannot read the architecture ({e}).') from e
  try:
    return from_json(d, depths)
  except ValueError as e:
    raise genotypes.GenotypeError(f'{source}: {e}') from e


class EvalSpace:
  """Training a found architecture of this space from scratch (``jaxnas.train``): the
  adapter ``jaxnas.spaces.EVAL_SPACES['proxyless']``. Model fields: ``channels``,
  ``width_multiplier``, ``depths``, ``strides``, ``dropout``, ``depthwise_impl``."""
  name = 'proxyless'
  drop_path = False  # no drop path in this network
  sources = f'a published architecture ({", ".join(PUBLISHED)}), an architecture .json ' \
            'file or a UNAS search workdir of this space'

  def validate(self, m, image_shape, fail):
    del image_shape  # any size: the stride-2 layers round up
    try:
      check_skeleton(resolve_channels(tuple(m.channels), m.width_multiplier),
                     tuple(m.depths), tuple(m.strides))
    except ValueError as e:
      fail('model.channels', f'(with model.depths and model.strides) cannot build the '
           f'network: {e}')
    if not 0 <= m.dropout < 1:
      fail('model.dropout', f'must be in [0, 1), got {m.dropout}.')

  def load(self, spec, m):
    return load_architecture(spec, tuple(m.depths))

  def from_json(self, d, source, m):
    try:
      return from_json(d, tuple(m.depths))
    except ValueError as e:
      raise genotypes.GenotypeError(f'{source}: {e}') from e

  def build(self, m, architecture, num_classes, impl=None):
    return ProxylessEvalNetwork(tuple(architecture), num_classes, tuple(m.channels),
                                m.width_multiplier, tuple(m.depths), tuple(m.strides),
                                impl=impl or m.depthwise_impl, dropout=m.dropout)

  def to_json(self, architecture):
    return to_json(architecture)

  def format(self, m, architecture):
    return format_architecture(architecture, tuple(m.depths))

  def count_params(self, params):
    n = count_params(params)
    return {'params': n, 'params_with_auxiliary': n}


EVAL_SPACE = EvalSpace()
