"""AtomNAS's space: MobileNetV2-like blocks of atoms, and the network shrunk physically.

A block (after the first) holds one branch per kernel size k in {3, 5, 7}: 1x1 expand +
BN + act -> k x k depthwise (stride) + BN + act -> 1x1 project; the branches' outputs
are summed and normalized by one BN, plus the input where the stride is 1 and the
channels stay. An *atom* is one hidden channel of one branch (its expand filter, its
depthwise filter, its row of the projection); its importance is the scale (gamma) of the
BN after the depthwise conv. The supernet gives each branch t x C_in hidden channels;
searching removes atoms, so the architecture is data: the live hidden channels per
branch per block (`Architecture`), from which `AtomNet` builds the network with arrays of
exactly those sizes. The first block (t = 1) has no expand conv: its depthwise conv reads
the stem's channels, which it cannot shed, so it is not searched.

Shrinking (`shrink_architecture`, `shrink_tree`, `shrink_batch_stats`) slices every
per-atom array (weights, BN statistics, optimizer moments, the EMA) together and drops a
branch whose atoms are all gone; a residual block with no branch left is the identity.
An atom with gamma exactly 0 emits the constant act(beta) per position, which the
projection turns into a constant added to the block's sum: removed, it leaves train-mode
outputs unchanged (the BN subtracts the batch mean) and, with the block BN's running mean
lowered by that constant (`shrink_batch_stats`; jaxnas's choice, the reference code has
this correction disabled), eval-mode outputs too.

Multiply-adds (`multiply_adds`) follow the network's convolutions and classifier (BN,
activations, sums and SE gating excluded), as ``jaxnas.flops.count_macs`` counts them on
the traced network; `atom_costs` gives each branch's multiply-adds per hidden channel,
the weights of the FLOPs-aware BN-scale penalty (`penalty`).
"""

import dataclasses
import json
import math
import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxnas import flops
from jaxnas import genotypes
from jaxnas.ops import primitives as ops
from jaxnas.spaces import darts
from jaxnas.spaces import darts_eval

# The reference's ImageNet supernet: [expansion t, channels c, blocks n, stride s].
STAGES = ((1, 16, 1, 1), (6, 24, 4, 2), (6, 40, 4, 2), (6, 80, 4, 2), (6, 96, 4, 1),
          (6, 192, 4, 2), (6, 320, 1, 1))
KERNELS = (3, 5, 7)
BN_MOMENTUM = 0.01  # PyTorch convention (new = 0.99 old + 0.01 batch)
BN_EPSILON = 1e-3
ACTIVATIONS = ('relu', 'swish')
SE_RATIO = 0.5  # squeeze-excite width: 0.5 x the block's input channels (AtomNAS+)


@dataclasses.dataclass(frozen=True)
class Block:
  """One block: its input and output channels, stride, and per branch its kernel size
  and live hidden channels (0: the branch is gone). ``expand`` False: the first block,
  whose single branch convolves the input itself (hidden == c_in, not searched)."""
  c_in: int
  c_out: int
  stride: int
  kernels: tuple[int, ...]
  hidden: tuple[int, ...]
  expand: bool = True

  @property
  def residual(self) -> bool:
    return self.stride == 1 and self.c_in == self.c_out

  @property
  def searched(self) -> bool:
    return self.expand


@dataclasses.dataclass(frozen=True)
class Architecture:
  """A network of this space: stem width and stride, the blocks, the last conv's width."""
  stem: int
  stem_stride: int
  blocks: tuple[Block, ...]
  last: int

  def atoms(self) -> int:
    """Live atoms of the searched blocks."""
    return sum(sum(b.hidden) for b in self.blocks if b.searched)


def check_stages(stages: Sequence[Sequence[int]], kernels: Sequence[int] = KERNELS) -> None:
  """ValueError unless ``stages`` is a list of [t, c, n, s] with positive entries and a
  first stage of one block at expansion 1, and ``kernels`` odd sizes."""
  if not stages:
    raise ValueError('the stage list is empty.')
  for i, stage in enumerate(stages):
    if len(stage) != 4 or any(int(v) <= 0 for v in stage):
      raise ValueError(f'stage {i} is {list(stage)}; each stage is [t, c, n, s] of positive '
                       'integers.')
  t, _, n, _ = stages[0]
  if t != 1 or n != 1:
    raise ValueError(f'the first stage must be one block at expansion 1 ([1, c, 1, s]), got '
                     f'{list(stages[0])}.')
  if not kernels or any(k <= 0 or k % 2 == 0 for k in kernels) or len(set(kernels)) < len(kernels):
    raise ValueError(f'kernel sizes must be distinct positive odd numbers, got {list(kernels)}.')


def supernet(stages: Sequence[Sequence[int]] = STAGES, stem: int = 16, stem_stride: int = 2,
             last: int = 1280, kernels: Sequence[int] = KERNELS) -> Architecture:
  """The unshrunk network: every branch with t x C_in hidden channels."""
  check_stages(stages, kernels)
  blocks, c_in = [], stem
  for i, (t, c, n, s) in enumerate(stages):
    for j in range(n):
      stride = s if j == 0 else 1
      if i == 0:
        blocks.append(Block(c_in, c, stride, (3,), (c_in,), expand=False))
      else:
        ks = tuple(int(k) for k in kernels)
        blocks.append(Block(c_in, c, stride, ks, (t * c_in,) * len(ks)))
      c_in = c
  return Architecture(stem, stem_stride, tuple(blocks), last)


def spatial_sizes(arch: Architecture, image_size: int) -> list[tuple[int, int]]:
  """(input, output) side of every block for a square image of ``image_size``."""
  side = math.ceil(image_size / arch.stem_stride)
  out = []
  for b in arch.blocks:
    new = math.ceil(side / b.stride)
    out.append((side, new))
    side = new
  return out


def _act(name):
  return jax.nn.relu if name == 'relu' else jax.nn.swish


def _bn(train, bn_groups, name):
  return ops.BatchNorm(train, affine=True, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                       batch_groups=bn_groups, name=name)


def branch_names(k: int) -> dict[str, str]:
  """The variable names of branch k inside its block."""
  return {'expand': f'k{k}_expand', 'expand_bn': f'k{k}_expand_bn', 'dw': f'k{k}_dw',
          'dw_bn': f'k{k}_dw_bn', 'se_reduce': f'k{k}_se_reduce',
          'se_expand': f'k{k}_se_expand', 'project': f'k{k}_project'}


class AtomBlock(nn.Module):
  """A block of atoms (`Block`); returns its input unchanged if no branch is left."""
  block: Block
  act: str = 'relu'
  se: bool = False
  impl: str = 'auto'
  bn_groups: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    b, act = self.block, _act(self.act)
    outs = []
    for k, h in zip(b.kernels, b.hidden):
      if h == 0:
        continue
      n = branch_names(k)
      y = x
      if b.expand:
        y = ops.Conv1x1(h, name=n['expand'])(y)
        y = act(_bn(train, self.bn_groups, n['expand_bn'])(y))
      y = ops.DepthwiseConv(k, b.stride, impl=self.impl, name=n['dw'])(y)
      y = act(_bn(train, self.bn_groups, n['dw_bn'])(y))
      if self.se:
        s = jnp.mean(y, axis=(1, 2))
        s = act(nn.Dense(max(1, int(SE_RATIO * b.c_in)), kernel_init=ops.torch_init,
                         name=n['se_reduce'])(s))
        s = nn.Dense(h, kernel_init=ops.torch_init, name=n['se_expand'])(s)
        y = y * jax.nn.sigmoid(s)[:, None, None, :]
      outs.append(ops.Conv1x1(b.c_out, name=n['project'])(y))
    if not outs:
      if not b.residual:
        raise ValueError(f'a block from {b.c_in} to {b.c_out} channels at stride {b.stride} '
                         'has no branch left and cannot be the identity.')
      return x
    y = _bn(train, self.bn_groups, 'bn')(sum(outs[1:], outs[0]))
    return x + y if b.residual else y


class AtomNet(nn.Module):
  """The network of an `Architecture`: 3x3 stem conv + BN + act, the blocks (named
  ``block_{i}``), 1x1 conv to ``arch.last`` + BN + act, global average pool, dropout,
  classifier. ``apply(variables, x, train=...)`` returns ``(logits, None)``, as every
  evaluation network does; dropout > 0 needs ``rngs={'dropout': key}`` in train mode."""
  arch: Architecture
  num_classes: int = 1000
  act: str = 'relu'
  se: bool = False
  dropout: float = 0.0
  impl: str = 'auto'
  bn_groups: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    a, act = self.arch, _act(self.act)
    x = nn.Conv(a.stem, (3, 3), (a.stem_stride,) * 2, padding=1, use_bias=False,
                kernel_init=ops.torch_init, name='stem_conv')(x)
    x = act(_bn(train, self.bn_groups, 'stem_bn')(x))
    for i, b in enumerate(a.blocks):
      x = AtomBlock(b, self.act, self.se, self.impl, self.bn_groups, name=f'block_{i}')(x, train)
    x = ops.Conv1x1(a.last, name='head_conv')(x)
    x = act(_bn(train, self.bn_groups, 'head_bn')(x))
    x = jnp.mean(x, axis=(1, 2))
    if self.dropout and train:
      x = nn.Dropout(self.dropout, deterministic=False)(x)
    return nn.Dense(self.num_classes, kernel_init=ops.torch_init,
                    bias_init=darts.torch_bias_init(x.shape[-1]), name='classifier')(x), None


# ----------------------------------------------------------------------------- costs


def branch_cost(b: Block, k: int, side_in: int, side_out: int, se: bool = False) -> int:
  """Multiply-adds per hidden channel of branch k of block b: its share of the expand
  conv, the depthwise conv and the projection (and of the SE layers)."""
  cost = side_out * side_out * (k * k + b.c_out)
  if b.expand:
    cost += side_in * side_in * b.c_in
  if se:
    cost += 2 * max(1, int(SE_RATIO * b.c_in))
  return cost


def atom_costs(arch: Architecture, image_size: int) -> dict[tuple[int, int], int]:
  """{(block index, kernel): multiply-adds per atom} of the searched blocks' branches."""
  costs = {}
  for i, (b, (s_in, s_out)) in enumerate(zip(arch.blocks, spatial_sizes(arch, image_size))):
    if b.searched:
      for k in b.kernels:
        costs[(i, k)] = branch_cost(b, k, s_in, s_out)
  return costs


def penalty_weights(arch: Architecture, image_size: int) -> dict[tuple[int, int], float]:
  """p_b = c_b / (sum_b n_b c_b / sum_b n_b): each branch's cost per atom over the
  atom-weighted mean cost of ``arch`` (the initial supernet, once per run)."""
  costs = atom_costs(arch, image_size)
  counts = {(i, k): h for i, b in enumerate(arch.blocks) if b.searched
            for k, h in zip(b.kernels, b.hidden)}
  mean = sum(counts[key] * c for key, c in costs.items()) / max(sum(counts.values()), 1)
  return {key: c / mean for key, c in costs.items()}


def gammas(params, arch: Architecture) -> dict[tuple[int, int], jax.Array]:
  """{(block, kernel): the dw BN's scale} of the live searched branches."""
  return {(i, k): params[f'block_{i}'][branch_names(k)['dw_bn']]['scale']
          for i, b in enumerate(arch.blocks) if b.searched
          for k, h in zip(b.kernels, b.hidden) if h}


def penalty(params, arch: Architecture, weights: Mapping[tuple[int, int], float]) -> jax.Array:
  """sum over searched branches b of p_b * sum |gamma_b| (rho not applied)."""
  terms = [weights[key] * jnp.sum(jnp.abs(g)) for key, g in gammas(params, arch).items()]
  return sum(terms[1:], terms[0]) if terms else jnp.zeros(())


def multiply_adds(arch: Architecture, image_size: int, num_classes: int, in_channels: int = 3,
                  se: bool = False) -> int:
  """Multiply-adds of one image through `AtomNet` (convs, SE layers, classifier)."""
  side = math.ceil(image_size / arch.stem_stride)
  total = side * side * 9 * in_channels * arch.stem
  c = arch.stem
  for b, (s_in, s_out) in zip(arch.blocks, spatial_sizes(arch, image_size)):
    total += sum(h * branch_cost(b, k, s_in, s_out, se) for k, h in zip(b.kernels, b.hidden))
    c, side = (c if not any(b.hidden) else b.c_out), s_out
  total += side * side * c * arch.last + arch.last * num_classes
  return int(total)


def architecture_cost(arch: Architecture, *, image_size: int, num_classes: int,
                      in_channels: int = 3, act: str = 'relu', se: bool = False) -> dict:
  """{'params', 'multiply_adds'} of `AtomNet(arch)`: params from the traced variables,
  multiply-adds counted on the traced network (``jaxnas.flops``)."""
  model = AtomNet(arch, num_classes, act, se, impl='xla')
  x = jnp.zeros((1, image_size, image_size, in_channels), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  macs = flops.count_macs(lambda v, x: model.apply(v, x, train=False)[0], variables, x)
  return {'params': count_params(variables['params']), 'multiply_adds': int(macs)}


def count_params(params) -> int:
  return darts_eval.count_params(params, exclude=None)


# ----------------------------------------------------------------------------- shrinking


# Per variable of a branch: the axis that indexes its hidden channels.
_ATOM_AXES = {'expand': {'kernel': 1}, 'expand_bn': {'scale': 0, 'bias': 0, 'mean': 0, 'var': 0},
              'dw': {'kernel': 3}, 'dw_bn': {'scale': 0, 'bias': 0, 'mean': 0, 'var': 0},
              'se_reduce': {'kernel': 0}, 'se_expand': {'kernel': 1, 'bias': 0},
              'project': {'kernel': 0}}


def dead_atoms(params, arch: Architecture, threshold: float, ema_params=None
               ) -> dict[tuple[int, int], np.ndarray]:
  """{(block, kernel): bool per live atom}: |gamma| <= threshold (in ``params`` and, if
  given, in ``ema_params`` too)."""
  dead = {key: np.abs(np.asarray(g)) <= threshold for key, g in gammas(params, arch).items()}
  if ema_params is not None:
    for key, g in gammas(ema_params, arch).items():
      dead[key] &= np.abs(np.asarray(g)) <= threshold
  return dead


def keep_masks(arch: Architecture, dead: Mapping[tuple[int, int], np.ndarray],
               importance: Mapping[tuple[int, int], Any] | None = None
               ) -> dict[tuple[int, int], np.ndarray]:
  """{(block, kernel): bool per live atom to keep}. A block that cannot be the identity
  (stride 2 or new channels) keeps at least its most important atom (``importance``:
  |gamma| per atom; the first atom without it)."""
  keep = {key: ~np.asarray(d, bool) for key, d in dead.items()}
  for i, b in enumerate(arch.blocks):
    keys = [(i, k) for k, h in zip(b.kernels, b.hidden) if h and (i, k) in keep]
    if not keys or b.residual or any(keep[key].any() for key in keys):
      continue
    if importance is None:
      keep[keys[0]][0] = True
    else:
      best = max(keys, key=lambda key: float(np.max(np.abs(importance[key]))))
      keep[best][int(np.argmax(np.abs(importance[best])))] = True
  return keep


def shrink_architecture(arch: Architecture, keep: Mapping[tuple[int, int], np.ndarray]
                        ) -> Architecture:
  blocks = []
  for i, b in enumerate(arch.blocks):
    hidden = tuple(int(np.sum(keep[(i, k)])) if (i, k) in keep else h
                   for k, h in zip(b.kernels, b.hidden))
    blocks.append(dataclasses.replace(b, hidden=hidden))
  return dataclasses.replace(arch, blocks=tuple(blocks))


def _shrink_block(tree: Mapping[str, Any], b: Block, i: int, keep) -> dict:
  """A block's variables (params or statistics) without the removed atoms; a branch
  with none left, and the block BN of a block with no branch left, dropped."""
  out = dict(tree)
  for k, h in zip(b.kernels, b.hidden):
    if not h or (i, k) not in keep:
      continue
    idx = np.flatnonzero(keep[(i, k)])
    for part, name in branch_names(k).items():
      if name not in out:
        continue
      if idx.size == 0:
        del out[name]
      else:
        out[name] = {leaf: jnp.take(v, idx, axis=_ATOM_AXES[part][leaf])
                     for leaf, v in out[name].items()}
  if not any(n.startswith('k') for n in out):
    out.pop('bn', None)
  return out


def shrink_tree(tree: Mapping[str, Any], arch: Architecture,
                keep: Mapping[tuple[int, int], np.ndarray]) -> dict:
  """A params- or batch_stats-shaped tree of ``AtomNet(arch)`` without the removed
  atoms (``keep`` from `keep_masks`)."""
  return {name: _shrink_block(sub, arch.blocks[int(name[6:])], int(name[6:]), keep)
          if name.startswith('block_') else sub for name, sub in tree.items()}


def shrink_params_like(tree, arch: Architecture, keep, params_keys) -> Any:
  """``tree`` (an optimizer state, ...) with every params-shaped dict in it (one whose
  keys are ``params_keys``) shrunk by `shrink_tree`."""
  params_keys = set(params_keys)
  is_params = lambda x: isinstance(x, Mapping) and set(x) == params_keys  # noqa: E731
  return jax.tree.map(lambda x: shrink_tree(x, arch, keep) if is_params(x) else x, tree,
                      is_leaf=is_params)


def removed_constant(params, arch: Architecture, keep, act: str = 'relu'
                     ) -> dict[int, jax.Array]:
  """{block: the constant its removed atoms added to the branch sum were their gamma 0}:
  sum over removed atoms j of act(beta_j) * project[j, :]."""
  f, out = _act(act), {}
  for i, b in enumerate(arch.blocks):
    total = None
    for k, h in zip(b.kernels, b.hidden):
      if not h or (i, k) not in keep or keep[(i, k)].all():
        continue
      n, gone = branch_names(k), np.flatnonzero(~keep[(i, k)])
      p = params[f'block_{i}']
      c = f(jnp.take(p[n['dw_bn']]['bias'], gone)) @ jnp.take(p[n['project']]['kernel'], gone,
                                                                axis=0)
      total = c if total is None else total + c
    if total is not None:
      out[i] = total
  return out


def shrink_batch_stats(batch_stats, params, arch: Architecture, keep, act: str = 'relu'):
  """`shrink_tree` of the BN statistics, each block BN's running mean lowered by the
  constant its removed atoms contributed (`removed_constant`, from ``params``: the
  weights the statistics belong to, before shrinking)."""
  new = shrink_tree(batch_stats, arch, keep)
  for i, c in removed_constant(params, arch, keep, act).items():
    block = new[f'block_{i}']
    if 'bn' in block:
      block['bn'] = {**block['bn'], 'mean': block['bn']['mean'] - c}
  return new


# ----------------------------------------------------------------------------- as data


def to_json(arch: Architecture) -> dict:
  return {'stem': arch.stem, 'stem_stride': arch.stem_stride, 'last': arch.last,
          'blocks': [{'c_in': b.c_in, 'c_out': b.c_out, 'stride': b.stride,
                      'kernels': list(b.kernels), 'hidden': list(b.hidden),
                      'expand': b.expand} for b in arch.blocks]}


def from_json(d: Mapping[str, Any]) -> Architecture:
  """The architecture of `to_json`'s form; ValueError naming what is wrong."""
  try:
    blocks = tuple(Block(int(b['c_in']), int(b['c_out']), int(b['stride']),
                         tuple(int(k) for k in b['kernels']),
                         tuple(int(h) for h in b['hidden']), bool(b.get('expand', True)))
                   for b in d['blocks'])
    arch = Architecture(int(d['stem']), int(d['stem_stride']), blocks, int(d['last']))
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f'not an AtomNAS architecture (stem, stem_stride, last, blocks of c_in, '
                     f'c_out, stride, kernels, hidden): {e!r}.') from e
  c = arch.stem
  for i, b in enumerate(blocks):
    if b.c_in != c:
      raise ValueError(f'block {i} reads {b.c_in} channels where the previous layer gives {c}.')
    if len(b.kernels) != len(b.hidden) or any(h < 0 for h in b.hidden):
      raise ValueError(f'block {i} needs one hidden width >= 0 per kernel.')
    if not any(b.hidden) and not b.residual:
      raise ValueError(f'block {i} has no branch left but cannot be the identity.')
    c = b.c_out
  return arch


def format_architecture(arch: Architecture) -> str:
  """One line: per block its live hidden channels per kernel (k3/k5/k7)."""
  parts = []
  for b in arch.blocks:
    widths = '/'.join(str(h) for h in b.hidden)
    parts.append(f'{widths}' + ('' if any(b.hidden) else '(id)'))
  ks = '/'.join(f'k{k}' for k in arch.blocks[-1].kernels) if arch.blocks else ''
  return f'hidden channels per block ({ks}): ' + ' '.join(parts)


ARCHITECTURE_FILE = 'architecture.json'


def load_architecture(spec) -> Architecture:
  """The architecture ``spec`` names: a .json file of `to_json`'s form or an AtomNAS
  workdir (its ``architecture.json``); GenotypeError naming the source otherwise."""
  if not isinstance(spec, (str, os.PathLike)):
    raise genotypes.GenotypeError(f'cannot load an AtomNAS architecture from a '
                                  f'{type(spec).__name__}; name a .json file or a workdir.')
  spec = os.fspath(spec)
  path = os.path.join(spec, ARCHITECTURE_FILE) if os.path.isdir(spec) else spec
  if not os.path.isfile(path):
    raise genotypes.GenotypeError(f'{path}: no such architecture file; name an AtomNAS '
                                  'architecture .json file or the workdir of an AtomNAS run.')
  try:
    with open(path) as f:
      d = json.load(f)
    return from_json(d.get('architecture', d))
  except (OSError, ValueError, AttributeError) as e:
    raise genotypes.GenotypeError(f'{path}: {e}') from e


class EvalSpace:
  """An AtomNAS architecture as an evaluation network (``jaxnas.load_model`` of an
  AtomNAS run's export; training one again from scratch, e.g. with SE and Swish as the
  '+' models). Model fields: ``act``, ``se``, ``dropout``, ``depthwise_impl``."""
  name = 'atomnas'
  drop_path = False
  sources = 'an AtomNAS architecture .json file or the workdir of an AtomNAS run'

  def validate(self, m, image_shape, fail):
    del image_shape
    if m.get('act', 'relu') not in ACTIVATIONS:
      fail('model.act', f'is {m.act!r}; choose one of {ACTIVATIONS}.')
    if not 0 <= m.get('dropout', 0.0) < 1:
      fail('model.dropout', f'must be in [0, 1), got {m.dropout}.')

  def load(self, spec, m):
    del m
    return load_architecture(spec)

  def from_json(self, d, source, m):
    del m
    try:
      return from_json(d)
    except ValueError as e:
      raise genotypes.GenotypeError(f'{source}: {e}') from e

  def build(self, m, architecture, num_classes, impl=None):
    return AtomNet(architecture, num_classes, m.get('act', 'relu'), m.get('se', False),
                   m.get('dropout', 0.0), impl or m.get('depthwise_impl', 'auto'))

  def to_json(self, architecture):
    return to_json(architecture)

  def format(self, m, architecture):
    del m
    return format_architecture(architecture)

  def count_params(self, params):
    n = count_params(params)
    return {'params': n, 'params_with_auxiliary': n}


EVAL_SPACE = EvalSpace()
