"""Genotypes: the discrete cells that a DARTS-style search derives.

A genotype lists, for each of the `steps` intermediate nodes of a cell, the two
incoming edges that survived the search as (op_name, input_index) pairs. Input
indices follow the reference code: 0 and 1 are the cell's two inputs
(c_{k-2}, c_{k-1}), 2.. are earlier intermediate nodes, so intermediate node i
(0-based) may read inputs 0..i+1. `*_concat` lists the nodes whose outputs are
concatenated into the cell output (2..steps+1 in DARTS and PC-DARTS).

The published genotypes are copied from the official DARTS and PC-DARTS code.
Genotypes are stored as JSON (`save`, `load`) so that a search workdir, a file
or a published name can all be handed to the evaluation network.
"""

import collections
import json
import operator
import os
from typing import Any, Mapping

from jaxnas import files

# Reference order (DARTS / PC-DARTS `genotypes.py`); alphas' last axis follows it.
PRIMITIVES = (
    'none',
    'max_pool_3x3',
    'avg_pool_3x3',
    'skip_connect',
    'sep_conv_3x3',
    'sep_conv_5x5',
    'dil_conv_3x3',
    'dil_conv_5x5',
)

# Ops a derived cell may use: the DARTS primitives but 'none', and the sep_conv_7x7 of
# the UNAS cell space (jaxnas.spaces.sampled_darts). PRIMITIVES keeps the DARTS search
# space's op order; this tuple only widens what a genotype may name.
GENOTYPE_OPS = PRIMITIVES[1:] + ('sep_conv_7x7',)

# Ops without weights; a cell made only of these is the "collapse" failure mode.
PARAMETER_FREE = ('none', 'max_pool_3x3', 'avg_pool_3x3', 'skip_connect')

Genotype = collections.namedtuple('Genotype', 'normal normal_concat reduce reduce_concat')

# File name of the derived genotype inside a search workdir.
GENOTYPE_FILE = 'genotype.json'

_FIELDS = Genotype._fields


class GenotypeError(ValueError):
  """A genotype (or the file holding it) is malformed."""


# ----------------------------------------------------------------------------
# Published genotypes.
# ----------------------------------------------------------------------------

# PC-DARTS (Xu et al. 2019), searched on CIFAR-10.
PC_DARTS_cifar = Genotype(
    normal=[('sep_conv_3x3', 1), ('skip_connect', 0), ('sep_conv_3x3', 0),
            ('dil_conv_3x3', 1), ('sep_conv_5x5', 0), ('sep_conv_3x3', 1),
            ('avg_pool_3x3', 0), ('dil_conv_3x3', 1)],
    normal_concat=[2, 3, 4, 5],
    reduce=[('sep_conv_5x5', 1), ('max_pool_3x3', 0), ('sep_conv_5x5', 1),
            ('sep_conv_5x5', 2), ('sep_conv_3x3', 0), ('sep_conv_3x3', 3),
            ('sep_conv_3x3', 1), ('sep_conv_3x3', 2)],
    reduce_concat=[2, 3, 4, 5],
)

# PC-DARTS searched directly on ImageNet.
PC_DARTS_image = Genotype(
    normal=[('skip_connect', 1), ('sep_conv_3x3', 0), ('sep_conv_3x3', 0),
            ('skip_connect', 1), ('sep_conv_3x3', 1), ('sep_conv_3x3', 3),
            ('sep_conv_3x3', 1), ('dil_conv_5x5', 4)],
    normal_concat=[2, 3, 4, 5],
    reduce=[('sep_conv_3x3', 0), ('skip_connect', 1), ('dil_conv_5x5', 2),
            ('max_pool_3x3', 1), ('sep_conv_3x3', 2), ('sep_conv_3x3', 1),
            ('sep_conv_5x5', 0), ('sep_conv_3x3', 3)],
    reduce_concat=[2, 3, 4, 5],
)

# DARTS (second order), Liu et al. 2019.
DARTS_V2 = Genotype(
    normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0),
            ('sep_conv_3x3', 1), ('sep_conv_3x3', 1), ('skip_connect', 0),
            ('skip_connect', 0), ('dil_conv_3x3', 2)],
    normal_concat=[2, 3, 4, 5],
    reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1), ('skip_connect', 2),
            ('max_pool_3x3', 1), ('max_pool_3x3', 0), ('skip_connect', 2),
            ('skip_connect', 2), ('max_pool_3x3', 1)],
    reduce_concat=[2, 3, 4, 5],
)

PUBLISHED = {
    'PC_DARTS_cifar': PC_DARTS_cifar,
    'PC_DARTS_image': PC_DARTS_image,
    'DARTS_V2': DARTS_V2,
}


# ----------------------------------------------------------------------------
# Validation.
# ----------------------------------------------------------------------------


def _as_index(x):
  """x as a Python int (numpy / jax integers from an argmax included), else None."""
  # bool is an int subclass; True/False as an input index is a typo, not a node.
  if isinstance(x, bool) or getattr(x, 'dtype', None) == bool:
    return None
  try:
    return operator.index(x)
  except TypeError:
    return None


def _validate_cell(name, edges, concat, steps, source):
  """Checks one cell's edges and concat list; returns normalized copies."""
  if isinstance(edges, (str, bytes)) or not isinstance(edges, (list, tuple)):
    raise GenotypeError(
        f'{source}: {name} must be a list of (op, input_index) pairs, '
        f'got {type(edges).__name__}.')
  if len(edges) != 2 * steps:
    raise GenotypeError(
        f'{source}: {name} has {len(edges)} edges but a cell with {steps} '
        f'intermediate nodes needs exactly {2 * steps} (two per node).')
  out_edges = []
  for k, edge in enumerate(edges):
    if (isinstance(edge, (str, bytes)) or not isinstance(edge, (list, tuple))
        or len(edge) != 2):
      raise GenotypeError(
          f'{source}: {name}[{k}] = {edge!r} is not an (op, input_index) pair.')
    op, index = edge
    if op == 'none':
      raise GenotypeError(
          f"{source}: {name}[{k}] uses op 'none', which a derived cell never "
          f'keeps; pick one of {", ".join(GENOTYPE_OPS)}.')
    if not isinstance(op, str) or op not in GENOTYPE_OPS:
      raise GenotypeError(
          f'{source}: {name}[{k}] uses unknown op {op!r}; valid ops are '
          f'{", ".join(GENOTYPE_OPS)}.')
    node = 2 + k // 2  # the node this edge feeds, numbered like concat indices
    i = _as_index(index)
    if i is None or not 0 <= i <= node - 1:
      raise GenotypeError(
          f'{source}: {name}[{k}] = ({op!r}, {index!r}) feeds node {node}, '
          f'which may only read inputs 0..{node - 1}.')
    out_edges.append((str(op), i))

  if isinstance(concat, (str, bytes)) or not isinstance(concat, (list, tuple, range)):
    raise GenotypeError(
        f'{source}: {name}_concat must be a list of node indices, '
        f'got {type(concat).__name__}.')
  concat = list(concat)
  if not concat:
    raise GenotypeError(f'{source}: {name}_concat is empty; list the nodes '
                        f'2..{steps + 1} that form the cell output.')
  out_concat = []
  for c in concat:
    i = _as_index(c)
    if i is None or not 2 <= i <= steps + 1:
      raise GenotypeError(
          f'{source}: {name}_concat contains {c!r}, but only intermediate '
          f'nodes 2..{steps + 1} can be concatenated.')
    out_concat.append(i)
  if len(set(out_concat)) != len(out_concat):
    raise GenotypeError(
        f'{source}: {name}_concat {out_concat} lists a node more than once.')
  return out_edges, out_concat


def _infer_steps(normal, normal_concat, reduce) -> int:
  """Node count of a genotype: half its edge count when both cells agree on an even
  count, else the last node its normal_concat names (validation then says what is off)."""
  try:
    n, m = len(normal), len(reduce)
  except TypeError:
    n = m = -1
  if n == m and n > 0 and n % 2 == 0:
    return n // 2
  try:
    return max(int(i) for i in normal_concat) - 1
  except (TypeError, ValueError):
    return max(n, 0) // 2


def validate(genotype, *, steps: int | None = None,
             source: str = 'genotype') -> Genotype:
  """Checks a genotype and returns it normalized.

  Args:
    genotype: a `Genotype` or any 4-sequence (normal, normal_concat, reduce,
      reduce_concat) whose edges are (op_name, input_index) pairs.
    steps: number of intermediate nodes per cell; None takes it from the
      genotype itself (see `_infer_steps`).
    source: where the genotype came from (file path or name); every error
      message starts with it.

  Returns:
    A new `Genotype` whose edges are lists of (str, int) tuples and whose concat
    fields are lists of ints, equal to the reference code's genotypes.

  Raises:
    GenotypeError: unknown op, 'none' op, input index out of range for its node,
      wrong number of edges, or concat index out of range.
  """
  source = os.fspath(source) if isinstance(source, os.PathLike) else str(source)
  if isinstance(genotype, (str, bytes)) or not isinstance(genotype, (list, tuple)) \
      or len(genotype) != 4:
    raise GenotypeError(
        f'{source}: expected a Genotype(normal, normal_concat, reduce, '
        f'reduce_concat), got {type(genotype).__name__}.')
  normal, normal_concat, reduce, reduce_concat = genotype
  if steps is None:
    steps = _infer_steps(normal, normal_concat, reduce)
    if steps < 1:
      raise GenotypeError(
          f'{source}: normal has no edges; a cell needs two per intermediate node.')
  normal, normal_concat = _validate_cell('normal', normal, normal_concat, steps, source)
  reduce, reduce_concat = _validate_cell('reduce', reduce, reduce_concat, steps, source)
  return Genotype(normal=normal, normal_concat=normal_concat,
                  reduce=reduce, reduce_concat=reduce_concat)


# ----------------------------------------------------------------------------
# JSON.
# ----------------------------------------------------------------------------


def to_json(genotype) -> dict:
  """The genotype as a JSON-ready dict (edges become [op, index] lists)."""
  g = validate(genotype)
  return {
      'normal': [[op, i] for op, i in g.normal],
      'normal_concat': list(g.normal_concat),
      'reduce': [[op, i] for op, i in g.reduce],
      'reduce_concat': list(g.reduce_concat),
  }


def from_json(d: Mapping[str, Any], source: str = 'genotype', *,
              steps: int | None = None) -> Genotype:
  """Builds a validated genotype from `to_json`'s dict; extra keys are ignored."""
  if not isinstance(d, Mapping):
    raise GenotypeError(
        f'{source}: expected a JSON object with keys {", ".join(_FIELDS)}, '
        f'got {type(d).__name__}.')
  missing = [k for k in _FIELDS if k not in d]
  if missing:
    raise GenotypeError(
        f'{source}: missing key(s) {", ".join(missing)}; a genotype file needs '
        f'{", ".join(_FIELDS)}.')
  return validate(tuple(d[k] for k in _FIELDS), steps=steps, source=source)


def _json_default(x):
  # numpy / jax arrays and scalars (e.g. alphas saved next to the genotype).
  if hasattr(x, 'tolist'):
    return x.tolist()
  if hasattr(x, 'item'):
    return x.item()
  raise TypeError(f'{type(x).__name__} is not JSON serializable')


def save(genotype, path, **extra) -> str:
  """Writes the genotype (plus metadata such as alphas or epoch) as JSON.

  Args:
    genotype: the genotype to write; it is validated first.
    path: a `.json` file path, or an existing directory (a search workdir), in
      which case the file is `<dir>/genotype.json` so that `load(dir)` finds it.
    **extra: JSON-serializable metadata stored next to the genotype keys;
      arrays are written as nested lists.

  Returns:
    The path written.
  """
  clash = sorted(set(extra) & set(_FIELDS))
  if clash:
    raise GenotypeError(
        f'{os.fspath(path)}: extra metadata key(s) {", ".join(clash)} would '
        f'overwrite the genotype; rename them.')
  path = os.fspath(path)
  if os.path.isdir(path):
    path = os.path.join(path, GENOTYPE_FILE)
  data = to_json(genotype)
  data.update(extra)
  # Replaced whole: a reader polling a live search never sees a partial file.
  return files.write_json(path, data, default=_json_default)


def _read_json_file(path: str) -> Genotype:
  try:
    with open(path) as f:
      text = f.read()
  except OSError as e:
    raise GenotypeError(
        f'{path}: cannot read genotype file ({e.strerror or e}).') from e
  try:
    d = json.loads(text)
  except json.JSONDecodeError as e:
    raise GenotypeError(
        f'{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}).'
    ) from e
  return from_json(d, source=path)


def load(spec) -> Genotype:
  """Returns the genotype named by `spec`.

  Args:
    spec: a published name (see `PUBLISHED`), a path to a `.json` file written
      by `save`, a directory containing `genotype.json` (a search workdir), or
      a `Genotype` (validated and returned).

  Raises:
    GenotypeError: the file is missing, unreadable, not JSON, or holds an
      invalid genotype; or `spec` is neither a published name nor a path.
  """
  if isinstance(spec, Genotype):
    return validate(spec)
  if not isinstance(spec, (str, os.PathLike)):
    raise GenotypeError(
        f'cannot load a genotype from a {type(spec).__name__}; pass a published '
        f'name ({", ".join(PUBLISHED)}), a .json file or a search workdir.')
  spec = os.fspath(spec)
  if spec in PUBLISHED:
    return validate(PUBLISHED[spec], source=spec)
  if os.path.isdir(spec):
    path = os.path.join(spec, GENOTYPE_FILE)
    if not os.path.isfile(path):
      raise GenotypeError(
          f'{spec}: directory has no {GENOTYPE_FILE}; point to a search workdir '
          f'whose search has finished, or to a .json file.')
    return _read_json_file(path)
  looks_like_path = (os.path.exists(spec) or spec.endswith('.json')
                     or os.sep in spec or (os.altsep and os.altsep in spec))
  if looks_like_path and not spec.endswith('.json') and not os.path.exists(spec):
    raise GenotypeError(
        f'{spec}: no such search workdir or genotype file; run the search first, or name '
        f'a .json file or a published genotype ({", ".join(PUBLISHED)}).')
  if looks_like_path:
    return _read_json_file(spec)
  raise GenotypeError(
      f'{spec!r} is not a published genotype ({", ".join(PUBLISHED)}) nor an '
      f'existing .json file or search workdir.')


def random_genotype(rng, steps: int = 4, primitives=PRIMITIVES) -> Genotype:
  """A genotype drawn uniformly from the DARTS space (the random-search baseline): each
  node reads two distinct earlier states, each through an op drawn from the non-'none'
  primitives; normal and reduction cells independently.

  Args:
    rng: a `numpy.random.Generator` (its seed makes the draw reproducible).
  """
  ops = [p for p in primitives if p != 'none']

  def cell():
    edges = []
    for node in range(steps):
      for source in sorted(rng.choice(node + 2, size=2, replace=False)):
        edges.append((ops[int(rng.integers(len(ops)))], int(source)))
    return edges

  concat = list(range(2, steps + 2))
  return validate(Genotype(cell(), concat, cell(), concat), steps=steps)


# ----------------------------------------------------------------------------
# Inspection.
# ----------------------------------------------------------------------------


def is_degenerate(genotype) -> bool:
  """True if every op of both cells is parameter-free (skip/pool collapse)."""
  return all(op in PARAMETER_FREE
             for op, _ in list(genotype.normal) + list(genotype.reduce))


def _format_cell(edges, concat) -> str:
  steps = len(edges) // 2
  nodes = []
  for i in range(0, len(edges), 2):
    nodes.append(' '.join(f'{op}({j})' for op, j in edges[i:i + 2]))
  text = ' | '.join(nodes)
  if list(concat) != list(range(2, steps + 2)):
    text += f' concat={list(concat)}'
  return text


def format_genotype(genotype) -> str:
  """One line: `normal: op(in) op(in) | ... ; reduce: ...` (one `|` per node).

  The concat list is shown only when it differs from the default 2..steps+1.
  """
  return (f'normal: {_format_cell(genotype.normal, genotype.normal_concat)} ; '
          f'reduce: {_format_cell(genotype.reduce, genotype.reduce_concat)}')
