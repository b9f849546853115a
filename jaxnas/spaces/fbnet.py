"""An FBNetV2-like micro search space, the space FP-NAS (Yan et al., CVPR 2021) searches
(FBNetV2: Wan et al., CVPR 2020): a MobileNetV3-style chain of inverted-residual blocks
whose kernel size, expansion, width, squeeze-excite and nonlinearity are searched.

The macro skeleton is that of FBNetV2's released F models (channels at width multiplier
1; the stage widths and the head's 1280 are jaxnas choices, FBNetV2's heads have
1280-1600):

* stem: 3x3 stride-2 conv to 8 + BN + h-swish;
* 5 stages of (1, 2, 2, 6, 4) blocks with 16, 24, 40, 80, 112 output channels; the
  first block of a stage has stride (1, 2, 2, 2, 2), the others stride 1;
* head: 1x1 conv to 1280 + BN + h-swish, global average pool, linear classifier (bias).

A block is 1x1 expand conv + BN + act -> kxk depthwise conv (stride) + BN + act ->
squeeze-excite (if on) -> 1x1 project conv + BN (no act), plus its input where the
block has stride 1 and its input and output have equal channel counts in the chosen
architecture (always so in a stage's later blocks; a stage's first block also needs
equal full widths and the two stages' width choices to agree). Hidden channels are
expansion x C_in, with C_in the chosen width of the block's input. Squeeze-excite is
global average pool -> 1x1 conv to round(0.25 * hidden) + ReLU -> 1x1 conv to hidden
-> hard-sigmoid gate on the hidden channels. Convs have no bias (the SE convs neither),
BatchNorm is affine with eps 1e-5 and PyTorch's momentum 0.1, padding is (k - 1) // 2
(PyTorch), so a stride-2 layer gives ceil(H / 2) rows; weights start from PyTorch's
default init. Channels at width multiplier m are int(round(c * m)), at least 1.

The search factors (`FACTORS`, in this order) are categoricals over kernel (3, 5),
expansion (3, 6), width (0.75, 1.0: a multiplier of the stage's output channels,
FBNetV2's channel search), se (off, on) and act ('relu', 'hswish': the nonlinearity of
the expand and depthwise stages). jaxnas choice: every block of a stage shares its
stage's choice of each factor (FBNetV2 searches per block; per stage keeps the
categoricals few), so an architecture is ``choices = {factor: int32 (num_stages,)}``
of option indices, 2^5 = 32 combinations per stage.

Distributions (held by the method), coarse to fine as in FP-NAS: factorized, one
categorical per (stage, factor) (`factorized_shapes`), or joint, one categorical over
the 32 combinations per stage (`joint_shapes`); a combination's index is the row-major
(C-order) index over the factors in `FACTORS` order (``np.ravel_multi_index``).
`joint_from_factorized` sums the factor logits of each combination, so the joint
softmax is the product of the factor softmaxes (the switch from coarse to fine keeps
the distribution).

`FBNetNetwork` is the weight-sharing supernet: ``apply(variables, x, choices,
train=...)`` runs one architecture (scalar indices per stage) on the whole batch and
computes only the chosen options where a choice changes which weights run:
``lax.switch`` picks the depthwise conv (one per kernel size, ``dw3`` and ``dw5``), the
nonlinearity, and whether squeeze-excite runs, so the compiled program holds
conditionals. Under ``jax.lax.map`` (or ``lax.scan``) over architectures the indices
stay scalars; under ``vmap`` they would be batched and the switches become selects that
run every branch. jaxnas choices, for static shapes: expansion and width are channel
masks at the maximum sizes (the expand conv to 6 x C_in full, the SE convs to hidden
6 x C_in and round(0.25 * 6 x C_in), the project conv to the full output width, one
BatchNorm per stage of the block at its maximum width, shared by the kernel sizes);
the channels beyond the chosen hidden size, SE size and output width are multiplied by
0 after their activation (the project after its BN), so the masked network computes
exactly the chosen one's function at the cost of the largest. In train mode the
BatchNorm running statistics of masked channels are kept as they were (not updated with
the zeros). A block's input channels beyond its chosen width are zero, so the weights
acting on them contribute nothing and get no gradient.

The supernet's variables: ``stem_conv``, ``stem_bn``; per stage ``layer_{n}`` (its first
block, 1-based block numbers) and ``layers_{n}_{m}`` (its blocks n..m, which have equal
shapes, stacked on a leading block axis and run as one ``lax.scan``, so the program holds
one block body per stage; ``layer_{n}`` if n == m), each holding ``expand`` (L, C_in,
6 C_in), ``dw3``/``dw5`` (L, k, k, 1, 6 C_in), ``se_reduce`` (L, 6 C_in, S),
``se_expand`` (L, S, 6 C_in), ``project`` (L, 6 C_in, C_out) and the BatchNorms
``expand_bn``, ``dw_bn``, ``project_bn`` (params scale, bias; batch_stats mean, var;
each (L, channels)); ``head_conv``, ``head_bn``, ``classifier``.

`FBNetEvalNetwork` trains a found architecture from scratch at its real sizes (no
masks); `multiply_adds` counts its multiply-adds from the formula (traceable, per
sampled architecture), the same number ``flops.count_macs`` finds in its trace (with
impl='xla', whose depthwise convs are convolutions there). Option indices out of range
are clamped by the switches and table look-ups, not checked, inside traced code.
"""

import functools
import json
import math
import os
from typing import Any, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxnas import genotypes
from jaxnas.ops import depthwise as depthwise_lib
from jaxnas.ops import primitives as ops
from jaxnas.spaces import darts
from jaxnas.spaces import darts_eval
from jaxnas.spaces import proxyless

# The searched factors and their options, in the order of the joint index.
FACTORS = {
    'kernel': (3, 5),            # depthwise kernel size
    'expansion': (3, 6),         # hidden = expansion x C_in
    'width': (0.75, 1.0),        # multiplier of the stage's output channels
    'se': (False, True),         # squeeze-excite after the depthwise stage
    'act': ('relu', 'hswish'),   # nonlinearity of the expand and depthwise stages
}
FACTOR_NAMES = tuple(FACTORS)
NUM_OPTIONS = tuple(len(v) for v in FACTORS.values())
NUM_COMBINATIONS = math.prod(NUM_OPTIONS)
# Stem, the 5 stages' outputs, head conv (at width multiplier 1).
CHANNELS = (8, 16, 24, 40, 80, 112, 1280)
DEPTHS = (1, 2, 2, 6, 4)       # blocks per stage
STRIDES = (1, 2, 2, 2, 2)      # of each stage's first block
BN_EPSILON = 1e-5
SE_RATIO = 0.25
ACTIVATIONS = {'relu': jax.nn.relu, 'hswish': jax.nn.hard_swish}
# What a search in this space writes to its workdir (the trainer reads it).
ARCHITECTURE_FILE = 'architecture.json'

# A frozen architecture: per stage (kernel, expansion, width, se, act) option values.
Architecture = tuple[tuple[Any, ...], ...]


# --- the macro skeleton ----------------------------------------------------------------


class Block(NamedTuple):
  """One block at full width: its 1-based number, 0-based stage, whether it is its
  stage's first, input and output channels (full widths) and stride."""
  number: int
  stage: int
  first: bool
  c_in: int
  c_out: int
  stride: int

  @property
  def may_add_input(self) -> bool:
    """Whether the block can be residual (it is where the chosen widths also agree)."""
    return self.stride == 1 and self.c_in == self.c_out


def resolve_channels(channels: Sequence[int] = CHANNELS, width_multiplier: float = 1.0
                     ) -> tuple[int, ...]:
  """The channels at ``width_multiplier``: int(round(c * m)), at least 1."""
  if width_multiplier <= 0:
    raise ValueError(f'width_multiplier must be positive; got {width_multiplier}.')
  return tuple(max(1, int(round(c * width_multiplier))) for c in channels)


def check_skeleton(channels: Sequence[int], depths: Sequence[int], strides: Sequence[int]):
  """Raises a ValueError unless the skeleton is consistent."""
  if len(depths) != len(strides) or len(channels) != len(depths) + 2:
    raise ValueError(f'channels (stem, one per stage, head conv) needs len(depths) + 2 = '
                     f'{len(depths) + 2} entries and strides one per stage '
                     f'({len(depths)}); got {len(channels)} channels and {len(strides)} '
                     'strides.')
  if not depths or min(depths) < 1:
    raise ValueError(f'depths must give every stage at least one block; got {depths}.')
  if any(s not in (1, 2) for s in strides):
    raise ValueError(f'strides must be 1 or 2; got {strides}.')
  if min(channels) < 1:
    raise ValueError(f'channels must be positive; got {channels}.')


def block_specs(channels: Sequence[int] = CHANNELS, depths: Sequence[int] = DEPTHS,
                strides: Sequence[int] = STRIDES) -> list[Block]:
  """The blocks of the skeleton (channels already resolved)."""
  check_skeleton(channels, depths, strides)
  blocks, c_in, n = [], channels[0], 1
  for stage, (depth, stride) in enumerate(zip(depths, strides)):
    c_out = channels[1 + stage]
    for i in range(depth):
      blocks.append(Block(n, stage, i == 0, c_in if i == 0 else c_out, c_out,
                          stride if i == 0 else 1))
      n += 1
    c_in = c_out
  return blocks


def stages(depths: Sequence[int] = DEPTHS) -> list[tuple[int, int]]:
  """Per stage, its (first, last) 1-based block numbers."""
  firsts = np.cumsum((1,) + tuple(depths[:-1]))
  return [(int(f), int(f) + d - 1) for f, d in zip(firsts, depths)]


def stage_widths(c_out: int) -> tuple[int, ...]:
  """The output channels of a stage of full width ``c_out`` per width option."""
  return tuple(max(1, int(round(w * c_out))) for w in FACTORS['width'])


def se_channels(hidden):
  """Squeeze-excite channels of ``hidden`` channels: round(0.25 * hidden), at least 1
  (round half to even, in Python, numpy and jnp alike; hidden may be traced)."""
  if isinstance(hidden, (int, np.integer)):
    return max(1, int(round(SE_RATIO * hidden)))
  xp = jnp if isinstance(hidden, jax.Array) else np
  return xp.maximum(1, xp.round(hidden * SE_RATIO).astype(hidden.dtype))


# --- distributions and architectures -------------------------------------------------


def factorized_shapes(depths: Sequence[int] = DEPTHS) -> dict[str, tuple[int, int]]:
  """Shapes of the factorized logits: per factor, (stages, options)."""
  return {f: (len(depths), n) for f, n in zip(FACTORS, NUM_OPTIONS)}


def joint_shapes(depths: Sequence[int] = DEPTHS) -> dict[str, tuple[int, int]]:
  """Shapes of the joint logits: per stage one categorical over the 32 combinations."""
  return {'joint': (len(depths), NUM_COMBINATIONS)}


def joint_from_factorized(logits: Mapping[str, Any]) -> dict[str, jax.Array]:
  """``{'joint': (..., stages, 32)}``: each combination's logit is the sum of its
  factors' logits, so softmax(joint) is the product of the factor softmaxes (up to
  rounding). ``logits[f]`` is (..., stages, options of f); leading axes are kept."""
  missing = [f for f in FACTORS if f not in logits]
  if missing:
    raise ValueError(f'joint_from_factorized needs logits of every factor {FACTOR_NAMES}; '
                     f'missing {missing}.')
  parts = [jnp.asarray(logits[f]) for f in FACTORS]
  lead = parts[0].shape[:-1]
  for f, p, n in zip(FACTORS, parts, NUM_OPTIONS):
    if p.shape != lead + (n,):
      raise ValueError(f'logits[{f!r}] must be {lead + (n,)} (the leading axes of '
                       f"logits['kernel'], then {n} options); got {p.shape}.")
  total = 0.0
  for i, (p, n) in enumerate(zip(parts, NUM_OPTIONS)):
    axes = (1,) * i + (n,) + (1,) * (len(NUM_OPTIONS) - 1 - i)
    total = total + p.reshape(lead + axes)
  return {'joint': jnp.reshape(total, lead + (NUM_COMBINATIONS,))}


def joint_index(choices: Mapping[str, Any]):
  """The row-major index over `FACTORS` of per-factor option indices (any equal
  shapes; numpy in, numpy out; traceable)."""
  index = 0
  for f, n in zip(FACTORS, NUM_OPTIONS):
    index = index * n + choices[f]
  return index


def factor_choices_from_joint(joint) -> dict[str, Any]:
  """The inverse of `joint_index`: ``{factor: option index}`` of joint indices (any
  shape; traceable)."""
  out = {}
  for f, n in reversed(tuple(zip(FACTORS, NUM_OPTIONS))):
    out[f] = joint % n
    joint = joint // n
  return {f: out[f] for f in FACTORS}


def random_choices(key: jax.Array, depths: Sequence[int] = DEPTHS,
                   num_samples: int | None = None) -> dict[str, jax.Array]:
  """Uniformly random architectures: ``{factor: int32 (stages,)}``, or with
  ``num_samples`` ``(num_samples, stages)``."""
  shape = (len(depths),) if num_samples is None else (num_samples, len(depths))
  keys = jax.random.split(key, len(FACTORS))
  return {f: jax.random.randint(k, shape, 0, n, jnp.int32)
          for f, k, n in zip(FACTORS, keys, NUM_OPTIONS)}


def check_choices(choices: Mapping[str, Any], depths: Sequence[int]):
  """Raises a ValueError unless ``choices`` is ``{factor: (stages,)}`` of integers
  (shapes only: the values may be traced)."""
  if not isinstance(choices, Mapping) or set(choices) != set(FACTORS):
    got = sorted(choices) if isinstance(choices, Mapping) else type(choices).__name__
    raise ValueError(f'choices must be a dict with exactly the factors {FACTOR_NAMES} '
                     f'(each an int array of option indices, one per stage); got {got}.')
  for f in FACTORS:
    value = choices[f]
    if not isinstance(value, (jax.Array, np.ndarray)):
      value = np.asarray(value)
    shape, dtype = value.shape, value.dtype
    if shape != (len(depths),) or not jnp.issubdtype(dtype, jnp.integer):
      raise ValueError(f'choices[{f!r}] must be integer option indices of shape '
                       f'({len(depths)},) (one per stage); got {dtype} {shape}.')


def _option_index(factor: str, value, where: str) -> int:
  options = FACTORS[factor]
  valid = isinstance(value, bool) if factor == 'se' else (
      isinstance(value, str) if factor == 'act' else
      isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool))
  if valid:
    for i, option in enumerate(options):
      if value == option:
        return i
  raise ValueError(f'{where}: {factor} is {value!r}; choose one of {options}.')


def freeze(architecture) -> Architecture:
  """An architecture as a hashable tuple of per-stage (kernel, expansion, width, se,
  act) option values (`FBNetEvalNetwork.architecture`), from index ``choices`` (concrete
  ints) or option values per stage (checked)."""
  if isinstance(architecture, Mapping):
    if set(architecture) != set(FACTORS):
      raise ValueError(f'choices must have exactly the factors {FACTOR_NAMES}; got '
                       f'{sorted(architecture)}.')
    idx = {f: np.asarray(architecture[f]) for f in FACTORS}
    shapes = {idx[f].shape for f in FACTORS}
    if len(shapes) != 1 or len(idx['kernel'].shape) != 1:
      raise ValueError(f'choices must hold one option index per stage for every factor '
                       f'(equal 1-D shapes); got { {f: idx[f].shape for f in FACTORS} }.')
    for f, n in zip(FACTORS, NUM_OPTIONS):
      if not np.issubdtype(idx[f].dtype, np.integer):
        raise ValueError(f'choices[{f!r}] must be integer option indices; got '
                         f'{idx[f].dtype}.')
      if ((idx[f] < 0) | (idx[f] >= n)).any():
        raise ValueError(f'choices[{f!r}] = {idx[f].tolist()}: option indices of {f} are '
                         f'0..{n - 1}.')
    return tuple(tuple(FACTORS[f][int(idx[f][s])] for f in FACTORS)
                 for s in range(len(idx['kernel'])))
  stages_ = []
  for s, values in enumerate(architecture):
    values = tuple(values)
    if len(values) != len(FACTORS):
      raise ValueError(f'stage {s}: an architecture stage is the {len(FACTORS)} values '
                       f'{FACTOR_NAMES}; got {values}.')
    stages_.append(tuple(FACTORS[f][_option_index(f, v, f'stage {s}')]
                         for f, v in zip(FACTORS, values)))
  return tuple(stages_)


def thaw(architecture) -> dict[str, np.ndarray]:
  """A frozen architecture (or choices) as index choices ``{factor: int32 (stages,)}``."""
  arch = freeze(architecture)
  return {f: np.array([FACTORS[f].index(stage[i]) for stage in arch], np.int32)
          for i, f in enumerate(FACTORS)}


def validate_architecture(architecture, depths: Sequence[int] = DEPTHS) -> Architecture:
  """The frozen architecture, or a ValueError naming what is wrong."""
  arch = freeze(architecture)
  if len(arch) != len(depths):
    raise ValueError(f'An architecture has one entry per stage: {len(depths)} for depths '
                     f'{tuple(depths)}; got {len(arch)}.')
  return arch


def to_json(architecture) -> dict:
  """The architecture (choices or frozen) as a JSON-ready dict of option values:
  ``{'stages': [{'kernel': 3, 'expansion': 6, 'width': 1.0, 'se': True, 'act':
  'hswish'}, ...]}``."""
  return {'stages': [dict(zip(FACTORS, stage)) for stage in freeze(architecture)]}


def from_json(d, depths: Sequence[int] = DEPTHS) -> dict[str, np.ndarray]:
  """`to_json`'s dict (or its JSON text) back to index choices ``{factor: int32
  (stages,)}``; a ValueError names what is wrong."""
  if isinstance(d, str):
    d = json.loads(d)
  if not isinstance(d, Mapping) or not isinstance(d.get('stages'), (list, tuple)):
    raise ValueError("An FBNet architecture is a JSON object with key 'stages': a list of "
                     f'one object per stage with keys {FACTOR_NAMES}.')
  if len(d['stages']) != len(depths):
    raise ValueError(f"'stages' needs one entry per stage: {len(depths)} for depths "
                     f"{tuple(depths)}; got {len(d['stages'])}.")
  values = []
  for s, stage in enumerate(d['stages']):
    if not isinstance(stage, Mapping):
      raise ValueError(f'stage {s}: must be an object with keys {FACTOR_NAMES}; got '
                       f'{stage!r}.')
    missing = [f for f in FACTORS if f not in stage]
    unknown = sorted(set(stage) - set(FACTORS))
    if missing or unknown:
      raise ValueError(f'stage {s}: needs exactly the keys {FACTOR_NAMES}; missing '
                       f'{missing}, unknown {unknown}.')
    values.append(tuple(stage[f] for f in FACTORS))
  return thaw(values)


def format_architecture(architecture) -> str:
  """One line, ``|`` between stages: ``k3 e6 w1.0 se hswish | k5 e3 w0.75 no-se relu``."""
  return ' | '.join(f'k{k} e{e} w{w} {"se" if se else "no-se"} {act}'
                    for k, e, w, se, act in freeze(architecture))


# --- multiply-adds ---------------------------------------------------------------------


def multiply_adds(choices: Mapping[str, Any], *, image_size, num_classes: int,
                  channels: Sequence[int] = CHANNELS, width_multiplier: float = 1.0,
                  depths: Sequence[int] = DEPTHS, strides: Sequence[int] = STRIDES,
                  in_channels: int = 3):
  """Multiply-adds of the evaluation network of ``choices`` ({factor: (..., stages)}
  option indices, leading axes kept) for one image of ``image_size`` (an int or (H,
  W)), from the formula: convs (stem, expand, depthwise, squeeze-excite, project, head)
  and the classifier at the chosen sizes; BN, activations, pools and additions not
  counted. numpy (int64) for concrete choices, int32 jnp when traced (exact up to
  2^31)."""
  channels = resolve_channels(channels, width_multiplier)
  blocks = block_specs(channels, depths, strides)
  traced = any(isinstance(choices[f], jax.core.Tracer) for f in FACTORS)
  xp = jnp if traced else np
  idx = {f: xp.asarray(choices[f]) for f in FACTORS}
  for f in FACTORS:
    if idx[f].shape[-1:] != (len(depths),):
      raise ValueError(f'choices[{f!r}] must end in one option index per stage '
                       f'({len(depths)}); got shape {idx[f].shape}.')

  def pick(table, f, stage):
    return xp.asarray(table)[idx[f][..., stage]]

  h, w = (image_size, image_size) if np.ndim(image_size) == 0 else image_size
  h, w = -(-h // 2), -(-w // 2)
  total = h * w * in_channels * 9 * channels[0]
  c_in = channels[0]
  for block in blocks:
    s = block.stage
    c_out = pick(stage_widths(block.c_out), 'width', s)
    hidden = pick(FACTORS['expansion'], 'expansion', s) * c_in
    h_out, w_out = -(-h // block.stride), -(-w // block.stride)
    kk = pick([k * k for k in FACTORS['kernel']], 'kernel', s)
    se = pick([int(v) for v in FACTORS['se']], 'se', s)
    total = (total + h * w * c_in * hidden + h_out * w_out * hidden * kk
             + se * 2 * hidden * se_channels(hidden) + h_out * w_out * hidden * c_out)
    h, w, c_in = h_out, w_out, c_out
  return total + h * w * c_in * channels[-1] + channels[-1] * num_classes


# --- the supernet's block, a pure function of explicit variables ----------------------


def _bn(params, stats, y, mask, *, train, bn_groups):
  """ops.BatchNorm (affine, eps 1e-5) of y with explicit variables. In train mode
  returns the new statistics, those of channels where ``mask`` is 0 kept unchanged."""
  bn = ops.BatchNorm(train, affine=True, epsilon=BN_EPSILON, batch_groups=bn_groups,
                     parent=None)
  variables = {'params': params, 'batch_stats': stats}
  if not train:
    return bn.apply(variables, y), stats
  y, state = bn.apply(variables, y, mutable=['batch_stats'])
  keep = mask > 0
  return y, {k: jnp.where(keep, v, stats[k]) for k, v in state['batch_stats'].items()}


def _activation(index, x):
  return lax.switch(index, [ACTIVATIONS[a] for a in FACTORS['act']], x)


def _squeeze_excite(params, h, se_mask):
  s = jax.nn.relu(jnp.dot(jnp.mean(h, axis=(1, 2)), params['se_reduce'])) * se_mask
  gate = jax.nn.hard_sigmoid(jnp.dot(s, params['se_expand']))
  return h * gate[:, None, None, :]


def supernet_block(params, stats, x, choice, c_in, c_out, *, block: Block, train: bool,
                   impl: str = 'auto', bn_groups: int = 1):
  """One block of the supernet on x (B, H, W, full C_in) for one stage choice
  (``{factor: scalar index}``), with the chosen input width ``c_in`` and output width
  ``c_out`` (scalars, may be traced). Returns the output (full width, zero beyond
  ``c_out``) and the block's statistics."""
  dtype = x.dtype
  h_max = params['expand'].shape[-1]
  hidden = jnp.asarray(FACTORS['expansion'], jnp.int32)[choice['expansion']] * c_in
  hidden_mask = (jnp.arange(h_max) < hidden).astype(dtype)
  se_max = params['se_reduce'].shape[-1]
  se_mask = (jnp.arange(se_max) < se_channels(hidden)).astype(dtype)
  out_mask = (jnp.arange(params['project'].shape[-1]) < c_out).astype(dtype)
  config = dict(train=train, bn_groups=bn_groups)
  new = {}

  h, new['expand_bn'] = _bn(params['expand_bn'], stats['expand_bn'],
                            ops.pointwise(x, params['expand']), hidden_mask, **config)
  h = _activation(choice['act'], h) * hidden_mask

  def depthwise(k, h, kernels):
    return depthwise_lib.depthwise_conv(h, kernels[f'dw{k}'][:, :, 0, :],
                                        stride=block.stride, impl=impl)

  kernels = {f'dw{k}': params[f'dw{k}'] for k in FACTORS['kernel']}
  h = lax.switch(choice['kernel'], [functools.partial(depthwise, k)
                                    for k in FACTORS['kernel']], h, kernels)
  h, new['dw_bn'] = _bn(params['dw_bn'], stats['dw_bn'], h, hidden_mask, **config)
  h = _activation(choice['act'], h) * hidden_mask

  se_params = {k: params[k] for k in ('se_reduce', 'se_expand')}
  branches = [(lambda p, h: h) if not on else
              (lambda p, h: _squeeze_excite(p, h, se_mask)) for on in FACTORS['se']]
  h = lax.switch(choice['se'], branches, se_params, h)

  y, new['project_bn'] = _bn(params['project_bn'], stats['project_bn'],
                             ops.pointwise(h, params['project']), out_mask, **config)
  y = y * out_mask
  if block.may_add_input:
    if block.first:  # residual only where the two stages chose equal widths
      y = y + x * (c_in == c_out).astype(dtype)
    else:
      y = y + x
  return y, new


# --- modules ---------------------------------------------------------------------------


class BlockVariables(nn.Module):
  """The shared weights of ``num_blocks`` blocks of equal shapes at their maximum sizes,
  stacked on a leading block axis (names in the module docstring). Calling it returns
  ``(params, stats)``; ``new_stats`` (that form) are written first."""
  num_blocks: int
  c_in: int
  c_out: int

  @nn.compact
  def __call__(self, new_stats=None):
    n, h = self.num_blocks, max(FACTORS['expansion']) * self.c_in
    se = se_channels(h)
    # fan_in of a 1x1 kernel is C_in, of a depthwise kernel k*k (the block axis is a
    # batch axis), as ops.Conv1x1 and ops.DepthwiseConv.
    shapes = {'expand': (n, self.c_in, h),
              **{f'dw{k}': (n, k, k, 1, h) for k in FACTORS['kernel']},
              'se_reduce': (n, h, se), 'se_expand': (n, se, h),
              'project': (n, h, self.c_out)}
    params = {name: self.param(name, ops.torch_init_stacked, shape)
              for name, shape in shapes.items()}
    stats = {}
    for name, c in (('expand_bn', h), ('dw_bn', h), ('project_bn', self.c_out)):
      params[name], stats[name] = proxyless.BatchNormVariables((n, c), name=name)(
          new_stats and new_stats[name])
    return params, stats


def _stem(x, train, c_stem, bn_groups):
  """3x3 stride-2 conv + BN + h-swish; inside the caller."""
  x = nn.Conv(c_stem, (3, 3), (2, 2), padding=1, use_bias=False,
              kernel_init=ops.torch_init, name='stem_conv')(x)
  return jax.nn.hard_swish(ops.BatchNorm(train, affine=True, epsilon=BN_EPSILON,
                                         batch_groups=bn_groups, name='stem_bn')(x))


def _head(x, train, c_head, num_classes, bn_groups, dropout=0.0):
  """1x1 conv + BN + h-swish, global average pool, (dropout,) linear classifier; inside
  the caller."""
  x = ops.Conv1x1(c_head, name='head_conv')(x)
  x = jax.nn.hard_swish(ops.BatchNorm(train, affine=True, epsilon=BN_EPSILON,
                                      batch_groups=bn_groups, name='head_bn')(x))
  x = jnp.mean(x, axis=(1, 2))
  if dropout:
    x = nn.Dropout(dropout, deterministic=False)(x)
  return nn.Dense(num_classes, kernel_init=ops.torch_init,
                  bias_init=darts.torch_bias_init(x.shape[-1]), name='classifier')(x)


class FBNetNetwork(nn.Module):
  """The weight-sharing supernet of the space (module docstring).

  ``apply(variables, x, choices, train=...)``: ``choices`` is ``{factor: int (stages,)}``
  (one architecture for the batch; may be traced, e.g. inside ``lax.map`` over
  architectures). In train mode apply with ``mutable=['batch_stats']`` to get the new
  statistics. ``channels`` (stem, one per stage, head conv) are scaled by
  ``width_multiplier``; ``depths`` and ``strides`` give each stage's block count and its
  first block's stride (smaller ones make a tiny version of the skeleton). ``bn_groups``
  > 1 gives every BatchNorm per-device statistics over that many slices of the batch."""
  num_classes: int = 1000
  channels: tuple[int, ...] = CHANNELS
  width_multiplier: float = 1.0
  depths: tuple[int, ...] = DEPTHS
  strides: tuple[int, ...] = STRIDES
  impl: str = 'auto'
  bn_groups: int = 1

  def factorized_shapes(self) -> dict[str, tuple[int, int]]:
    return factorized_shapes(self.depths)

  def joint_shapes(self) -> dict[str, tuple[int, int]]:
    return joint_shapes(self.depths)

  @nn.compact
  def __call__(self, x, choices, train: bool):
    channels = resolve_channels(self.channels, self.width_multiplier)
    blocks = block_specs(channels, self.depths, self.strides)
    check_choices(choices, self.depths)
    initializing = self.is_initializing()
    keep = train and not initializing
    config = dict(train=train, impl=self.impl,
                  bn_groups=1 if initializing else self.bn_groups)
    choices = {f: jnp.asarray(v, jnp.int32) for f, v in choices.items()}

    x = _stem(x, train, channels[0], self.bn_groups)
    c_prev = jnp.int32(channels[0])  # the stem has no width choice
    for stage, (first, last) in enumerate(stages(self.depths)):
      choice = {f: choices[f][stage] for f in FACTORS}
      c_out = jnp.asarray(stage_widths(channels[1 + stage]), jnp.int32)[choice['width']]
      # The stage's first block, then its other blocks (equal shapes) stacked.
      for lo, hi in ((first, first), (first + 1, last)):
        if lo > hi:
          continue
        spec = blocks[lo - 1]
        group = BlockVariables(hi - lo + 1, spec.c_in, spec.c_out, name=proxyless.group_name(lo, hi))
        params, stats = group()
        fn = functools.partial(supernet_block, choice=choice,
                               c_in=c_prev if spec.first else c_out, c_out=c_out,
                               block=spec, **config)
        if lo == hi:
          x, new = fn(proxyless.tree_at(params, 0), proxyless.tree_at(stats, 0), x)
          new = jax.tree_util.tree_map(lambda a: a[None], new)
        else:
          x, new = lax.scan(lambda x, ps, fn=fn: fn(ps[0], ps[1], x), x, (params, stats))
        if keep:
          group(new)
      c_prev = c_out
    return _head(x, train, channels[-1], self.num_classes, self.bn_groups)


class FBNetBlock(nn.Module):
  """One block at its real sizes (module docstring): expand + BN + act, kxk depthwise
  (stride) + BN + act, squeeze-excite if ``se``, project + BN, plus x where stride 1 and
  C_in == C_out."""
  features: int
  kernel_size: int
  expansion: int
  stride: int = 1
  se: bool = False
  act: str = 'relu'
  impl: str = 'auto'
  bn_groups: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    bn = functools.partial(ops.BatchNorm, train, affine=True, epsilon=BN_EPSILON,
                           batch_groups=self.bn_groups)
    act = ACTIVATIONS[self.act]
    hidden = x.shape[-1] * self.expansion
    h = act(bn(name='expand_bn')(ops.Conv1x1(hidden, name='expand')(x)))
    h = ops.DepthwiseConv(self.kernel_size, self.stride, impl=self.impl, name='dw')(h)
    h = act(bn(name='dw_bn')(h))
    if self.se:
      s = jnp.mean(h, axis=(1, 2), keepdims=True)
      s = jax.nn.relu(ops.Conv1x1(se_channels(hidden), name='se_reduce')(s))
      h = h * jax.nn.hard_sigmoid(ops.Conv1x1(hidden, name='se_expand')(s))
    y = bn(name='project_bn')(ops.Conv1x1(self.features, name='project')(h))
    return x + y if self.stride == 1 and x.shape[-1] == self.features else y


class FBNetEvalNetwork(nn.Module):
  """A found architecture alone, trained from scratch: the skeleton with each block at
  its chosen sizes (no masks), named ``layer_{n}`` (1-based).

  ``architecture`` is `freeze`'s form (per stage (kernel, expansion, width, se, act)).
  ``apply(variables, x, train=...)`` returns ``(logits, None)``, as every evaluation
  network does (the second: auxiliary logits, none here). ``dropout`` > 0 drops the
  pooled features before the classifier in train mode and needs ``rngs={'dropout':
  key}``."""
  architecture: Architecture
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
    x = _stem(x, train, channels[0], self.bn_groups)
    for block in block_specs(channels, self.depths, self.strides):
      k, e, w, se, act = arch[block.stage]
      c_out = stage_widths(block.c_out)[FACTORS['width'].index(w)]
      x = FBNetBlock(c_out, k, e, block.stride, se, act, self.impl, self.bn_groups,
                     name=f'layer_{block.number}')(x, train)
    return _head(x, train, channels[-1], self.num_classes, self.bn_groups,
                 self.dropout if train else 0.0), None


def count_params(params) -> int:
  """Number of weights of a params tree (BN scale and bias included, statistics not)."""
  return darts_eval.count_params(params, exclude=None)


# --- training a found architecture (jaxnas.train) -------------------------------------


def load_architecture(spec, depths: Sequence[int] = DEPTHS) -> Architecture:
  """The frozen architecture in ``spec``: a JSON file of `to_json`'s form or a search
  workdir (its ``architecture.json``). Raises ``genotypes.GenotypeError`` naming the
  file and what is wrong."""
  if not isinstance(spec, (str, os.PathLike)):
    raise genotypes.GenotypeError(f'cannot load an architecture from a '
                                  f'{type(spec).__name__}; name a .json file or a search '
                                  'workdir.')
  spec = os.fspath(spec)
  path = os.path.join(spec, ARCHITECTURE_FILE) if os.path.isdir(spec) else spec
  if not os.path.isfile(path):
    raise genotypes.GenotypeError(f'{path}: no such architecture file; name a .json file '
                                  'or the workdir of a finished search in this space.')
  try:
    with open(path) as f:
      d = json.load(f)
  except (OSError, ValueError) as e:
    raise genotypes.GenotypeError(f'{path}: cannot read the architecture ({e}).') from e
  try:
    return freeze(from_json(d, depths))
  except ValueError as e:
    raise genotypes.GenotypeError(f'{path}: {e}') from e


class EvalSpace:
  """Training a found architecture of this space from scratch (``jaxnas.train``). Model
  fields: ``channels``, ``width_multiplier``, ``depths``, ``strides``, ``dropout``,
  ``depthwise_impl``."""
  name = 'fbnet'
  drop_path = False  # no drop path in this network
  sources = 'an architecture .json file or an FP-NAS search workdir of this space'

  def validate(self, m, image_shape, fail):
    del image_shape  # any size: the stride-2 layers round up
    try:
      check_skeleton(resolve_channels(tuple(m.channels), m.width_multiplier),
                     tuple(m.depths), tuple(m.strides))
    except ValueError as e:
      fail('model.channels', f'(with model.width_multiplier, model.depths and '
           f'model.strides) cannot build the network: {e}')
    if not 0 <= m.dropout < 1:
      fail('model.dropout', f'must be in [0, 1), got {m.dropout}.')

  def load(self, spec, m):
    return load_architecture(spec, tuple(m.depths))

  def from_json(self, d, source, m):
    try:
      return freeze(from_json(d, tuple(m.depths)))
    except ValueError as e:
      raise genotypes.GenotypeError(f'{source}: {e}') from e

  def build(self, m, architecture, num_classes, impl=None):
    return FBNetEvalNetwork(freeze(architecture), num_classes, tuple(m.channels),
                            m.width_multiplier, tuple(m.depths), tuple(m.strides),
                            impl=impl or m.depthwise_impl, dropout=m.dropout)

  def to_json(self, architecture):
    return to_json(architecture)

  def format(self, m, architecture):
    del m
    return format_architecture(architecture)

  def count_params(self, params):
    n = count_params(params)
    return {'params': n, 'params_with_auxiliary': n}


EVAL_SPACE = EvalSpace()
