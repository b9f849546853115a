"""Plots of a run's workdir with matplotlib, for scripts and notebooks, and the
notebooks' parameters.

Each plot reads the files a run writes (README: ``metrics.jsonl``, ``genotypes.jsonl``,
``architecture.json``, ``cells.png``), so it works on a finished run, on one still
running and on a copy of its workdir. A plot returns a ``matplotlib.figure.Figure``
drawn on the Agg canvas (no display and no pyplot state: a notebook shows the returned
figure once, a script saves it), and writes it to ``path`` when one is given.

  from jaxnas import plots
  plots.plot_alphas('runs/fmnist', path='alphas.png')
  plots.plot_metrics('runs/fmnist', keys=['arch_split_acc'])
  plots.plot_run('runs/fmnist', directory='runs/fmnist/plots')

matplotlib is an extra (``pip install 'jaxnas[notebooks]'``): jaxnas imports without it,
and a plot without it stops with one sentence saying so.
"""

import io
import json
import math
import os
import re
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from jaxnas import files
from jaxnas import visualize

METRICS_FILE = 'metrics.jsonl'
ARCH_HISTORY_FILE = 'genotypes.jsonl'
CELLS_FILE = 'cells.png'
ARCHITECTURE_FILE = 'architecture.json'
CONFIG_FILE = 'config.json'
INSTALL_HINT = "pip install 'jaxnas[notebooks]'"
ENV_PREFIX = 'JAXNAS_NOTEBOOK_'


# ----------------------------------------------------------------------------- files


def _workdir(workdir) -> str:
  workdir = os.fspath(workdir)
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f'The workdir {workdir} does not exist; run a search or a '
                            'training there first (python -m jaxnas.main --config=... '
                            f'--workdir={workdir}).')
  return workdir


def _file(workdir, name: str, why: str) -> str:
  """The path of ``name`` in ``workdir``; a FileNotFoundError names it if it is missing."""
  path = os.path.join(_workdir(workdir), name)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} does not exist: {why}.')
  return path


def _read_jsonl(path: str) -> list[dict]:
  """The records of a JSON lines file; a last line cut short by a running writer is
  skipped."""
  records = []
  with open(path) as f:
    lines = f.read().splitlines()
  for n, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      if n == len(lines) - 1:
        break
      raise ValueError(f'{path} line {n + 1} is not JSON; the file is damaged.') from None
  return records


def _config(workdir: str) -> dict:
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    return json.load(f)


def load_metrics(workdir) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
  """The scalars of ``workdir/metrics.jsonl``: ``{kind: {name: (steps, values)}}``, kind
  'train' (per logged step), 'epoch', 'compile', 'shrink' (AtomNAS). A step logged twice
  (a resumed run repeats the steps after its last checkpoint) keeps its last value."""
  path = _file(workdir, METRICS_FILE, 'the run has not started logging yet, or this is '
               'not a jaxnas workdir')
  rows: dict[str, dict[int, dict]] = {}
  for r in _read_jsonl(path):
    rows.setdefault(r.get('kind', 'train'), {})[int(r['step'])] = r
  out = {}
  for kind, by_step in rows.items():
    series: dict[str, tuple[list, list]] = {}
    for step in sorted(by_step):
      for name, value in by_step[step].items():
        if name not in ('kind', 'step') and isinstance(value, (int, float)):
          steps, values = series.setdefault(name, ([], []))
          steps.append(step)
          values.append(float(value))
    out[kind] = {k: (np.asarray(s), np.asarray(v)) for k, (s, v) in series.items()}
  return out


def _is_arch_array(value) -> bool:
  # Arch params are lists of floats; the genotype's own entries hold names or integers.
  if not isinstance(value, list) or not value:
    return False
  try:
    return np.asarray(value).dtype.kind == 'f'
  except ValueError:  # ragged
    return False


def load_arch_history(workdir) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """The architecture parameters after every epoch, from ``workdir/genotypes.jsonl``:
  ``(epochs, {name: array (epochs, *shape)})`` with the names of ``arch.npz``
  (alphas_normal, betas_normal, ...). An epoch written twice keeps its last record."""
  path = _file(workdir, ARCH_HISTORY_FILE, 'a search writes it after its first epoch '
               '(AtomNAS has no architecture parameters: see plot_atoms)')
  by_epoch = {int(r['epoch']): r for r in _read_jsonl(path)}
  if not by_epoch:
    raise ValueError(f'{path} holds no epoch yet; plot it after the first epoch ends.')
  epochs = sorted(by_epoch)
  names = [k for k, v in by_epoch[epochs[-1]].items() if _is_arch_array(v)]
  arrays = {k: np.asarray([by_epoch[e][k] for e in epochs], np.float64) for k in names}
  return np.asarray(epochs), arrays


# ----------------------------------------------------------------------------- figures


def _matplotlib():
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(f'jaxnas.plots needs matplotlib; install it with `{INSTALL_HINT}`.'
                      ) from None
  return matplotlib


def _figure(width: float, height: float):
  """A Figure on the Agg canvas: drawn without a display and outside pyplot, so nothing
  shows it but the caller."""
  _matplotlib()
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(width, height), layout='constrained')
  FigureCanvasAgg(fig)
  return fig


def save(fig, path, dpi: int = 120) -> str:
  """Writes ``fig`` to ``path`` in the format of its extension (png, svg, pdf, ...),
  replaced whole (``jaxnas.files``: drawn into memory, written beside it, renamed over
  it; asking which process writes starts no JAX backend). Returns the path."""
  path = os.fspath(path)
  ext = os.path.splitext(path)[1].lstrip('.').lower() or 'png'
  buffer = io.BytesIO()
  fig.savefig(buffer, format=ext, dpi=dpi)
  return files.write_bytes(path, buffer.getvalue())


def _finish(fig, path):
  if path is not None:
    save(fig, path)
  return fig


# ----------------------------------------------------------------------------- alphas


def _softmax(logits: np.ndarray, valid: np.ndarray) -> np.ndarray:
  """Softmax over the last axis of the valid entries (the others are NaN: not drawn)."""
  x = np.where(valid, logits, -np.inf)
  x = np.exp(x - x.max(axis=-1, keepdims=True))
  return np.where(valid, x / x.sum(axis=-1, keepdims=True), np.nan)


def _darts_steps(num_edges: int) -> int:
  """Nodes of a DARTS cell with ``num_edges`` edges (node i reads i + 2 states)."""
  steps = int(round((math.sqrt(9 + 8 * num_edges) - 3) / 2))
  if steps * (steps + 3) // 2 != num_edges:
    raise ValueError(f'{num_edges} edges are not a DARTS cell (2 + 3 + ... per node).')
  return steps


def _edges(steps: int) -> list[tuple[int, int]]:
  """(node, source) per edge in the order of the alphas' rows; nodes count from 2, as
  the states of the genotype (0 and 1 are the cell's inputs)."""
  return [(i + 2, j) for i in range(steps) for j in range(i + 2)]


def _option_labels(name: str, n: int, config: Mapping[str, Any]) -> list[str]:
  model = config.get('model', {})
  if name.startswith(('alphas_', 'ops')):
    primitives = list(model.get('primitives') or [])
    if len(primitives) == n:
      return primitives
  if name.startswith(('betas_', 'inputs_')):
    return [f'from {j}' for j in range(n)]
  if config.get('space') == 'fbnet' and name != 'joint':
    from jaxnas.spaces import fbnet  # pylint: disable=g-import-not-at-top
    if name in fbnet.FACTORS and len(fbnet.FACTORS[name]) == n:
      return [f'{name} {v}' for v in fbnet.FACTORS[name]]
  return [str(k) for k in range(n)]


def _valid(name: str, shape: tuple[int, ...], config: Mapping[str, Any]) -> np.ndarray:
  """Where the categorical of ``name`` (shape without the epoch axis) may choose: a node
  of the sampled cells reads only the states before it (spaces/sampled_darts.py), a
  channel-changing ProxylessNAS layer cannot be 'zero' (spaces/proxyless.py)."""
  valid = np.ones(shape, bool)
  if name.startswith('inputs_') and len(shape) == 3:
    valid &= np.arange(shape[-1])[None, None, :] <= np.arange(shape[0])[:, None, None] + 1
  if name == 'ops' and config.get('space') == 'proxyless':
    from jaxnas.spaces import proxyless  # pylint: disable=g-import-not-at-top
    model = config.get('model', {})
    valid &= proxyless.valid_masks(tuple(model['depths']), tuple(model['primitives']))['ops']
  return valid


def _arch_panels(name: str, values: np.ndarray, config: Mapping[str, Any]):
  """[(title, probabilities (epochs, options)), ...] and the option labels of one arch
  array (epochs, *shape)."""
  kind = name.split('_', 1)[1] if '_' in name else ''
  shape = values.shape[1:]
  if name.startswith('betas_') and len(shape) == 1:
    # Edge normalization (PC-DARTS): a softmax over each node's incoming edges.
    steps = _darts_steps(shape[0])
    panels, start = [], 0
    for i in range(steps):
      n = i + 2
      probs = _softmax(values[:, start:start + n], np.ones(n, bool))
      panels.append((f'{kind}: edges into node {i + 2}', probs))
      start += n
    return panels, _option_labels(name, steps + 1, config)
  probs = _softmax(values, _valid(name, shape, config)[None])
  labels = _option_labels(name, shape[-1], config)
  if name.startswith('alphas_') and len(shape) == 2:
    edges = _edges(_darts_steps(shape[0]))
    return [(f'{kind}: {j}→{i}', probs[:, e]) for e, (i, j) in enumerate(edges)], labels
  if name.startswith(('inputs_', 'ops_')) and len(shape) == 3:
    what = 'source' if name.startswith('inputs_') else 'op'
    return [(f'{kind}: node {i + 2} input {s + 1} {what}', probs[:, i, s])
            for i in range(shape[0]) for s in range(shape[1])], labels
  unit = {'ops': 'layer'}.get(name, 'stage' if config.get('space') == 'fbnet' else 'row')
  flat = probs.reshape(probs.shape[0], -1, shape[-1])
  index = list(np.ndindex(*shape[:-1])) or [()]
  return [(f'{name}: {unit} ' + ','.join(str(k + 1) for k in idx) if idx else name,
           flat[:, n]) for n, idx in enumerate(index)], labels


def plot_alphas(workdir, keys: Optional[Sequence[str]] = None, path=None,
                columns: int = 6):
  """The softmax of the architecture parameters after each epoch, one small panel per
  categorical: per edge for the DARTS alphas (a line per op), per node for the PC-DARTS
  betas (a line per incoming edge), per node input for the sampled cells' sources and
  ops (UNAS, PARSEC, FP-NAS), per layer or stage otherwise. Ops keep the colors of the
  cell pictures.

  Args:
    workdir: a search's workdir (reads genotypes.jsonl and config.json).
    keys: the arrays to plot (names of arch.npz, e.g. ['alphas_normal']); all by default.
    path: where to save the figure (png, svg, pdf, ...), if anywhere.
    columns: panels per row; each array starts a row of its own.
  Returns:
    The Figure.
  """
  workdir = _workdir(workdir)
  epochs, arrays = load_arch_history(workdir)
  config = _config(workdir)
  if keys is not None:
    unknown = [k for k in keys if k not in arrays]
    if unknown:
      raise ValueError(f'{os.path.join(workdir, ARCH_HISTORY_FILE)} holds no {unknown}; it '
                       f'holds {sorted(arrays)}.')
    arrays = {k: arrays[k] for k in keys}
  groups = [(name, *_arch_panels(name, values, config)) for name, values in arrays.items()]
  columns = max(1, min(columns, max(len(panels) for _, panels, _ in groups)))
  rows = sum(math.ceil(len(panels) / columns) for _, panels, _ in groups)
  fig = _figure(2.3 * columns + 1.6, 1.75 * rows + 0.3)
  grid = fig.add_gridspec(rows, columns + 1, width_ratios=[1.0] * columns + [0.6])
  from matplotlib.lines import Line2D  # pylint: disable=g-import-not-at-top
  row = 0
  for name, panels, labels in groups:
    colors = [visualize.OP_COLORS.get(label, f'C{k % 10}') for k, label in enumerate(labels)]
    group_rows = math.ceil(len(panels) / columns)
    for p, (title, probs) in enumerate(panels):
      ax = fig.add_subplot(grid[row + p // columns, p % columns])
      for k in range(probs.shape[1]):
        if not np.all(np.isnan(probs[:, k])):  # NaN: a choice this categorical cannot make
          ax.plot(epochs, probs[:, k], marker='o', markersize=2.5, linewidth=1.2,
                  color=colors[k], label=labels[k])
      ax.set_title(title, fontsize=8)
      ax.set_ylim(0.0, 1.0)
      if len(epochs) <= 10:
        ax.set_xticks(epochs)
      ax.tick_params(labelsize=7)
      if p % columns == 0:
        ax.set_ylabel(f'softmax({name})', fontsize=7)
      if p // columns == group_rows - 1:
        ax.set_xlabel('epoch', fontsize=7)
    legend = fig.add_subplot(grid[row, columns])  # the last column holds the legends
    legend.set_axis_off()
    legend.legend([Line2D([], [], color=c, marker='o', markersize=2.5) for c in colors],
                  labels, loc='upper left', fontsize=6, frameon=False)
    row += group_rows
  fig.suptitle(f'architecture parameters per epoch: {workdir}', fontsize=9)
  return _finish(fig, path)


# ----------------------------------------------------------------------------- metrics


def _is_loss(name: str) -> bool:
  return name.endswith('loss')


def _is_accuracy(name: str) -> bool:
  return 'acc' in name or 'top1' in name or 'top5' in name


def plot_metrics(workdir, keys: Optional[Sequence] = None, path=None):
  """Scalars of ``workdir/metrics.jsonl`` over the steps: one panel per entry of
  ``keys``, a line per series, those logged per step as lines and the epoch summaries
  as points at their epoch's last step.

  Args:
    workdir: a search's or a training's workdir.
    keys: panels; each a metric name or a tuple of names drawn together. A name matches
      that scalar of every kind that logs it (train_loss: per step and per epoch); with
      a kind, only that one (``'epoch/arch_split_acc'``). By default two panels: every
      loss, every accuracy (train, arch batch, held-out split, test top-1 / top-5).
    path: where to save the figure, if anywhere.
  Returns:
    The Figure.
  """
  workdir = _workdir(workdir)
  metrics = load_metrics(workdir)
  names = sorted({n for kind, series in metrics.items() if kind in ('train', 'epoch')
                  for n in series})
  if keys is None:
    keys = [tuple(n for n in names if f(n)) for f in (_is_loss, _is_accuracy)]
    keys = [k for k in keys if k]
    if not keys:
      raise ValueError(f'{os.path.join(workdir, METRICS_FILE)} holds no loss or accuracy '
                       'yet; plot it after the first logged step.')
  panels = []
  for key in keys:
    series = []
    for name in ([key] if isinstance(key, str) else list(key)):
      kind, _, metric = name.rpartition('/')
      found = [(k, metric) for k in metrics if (k == kind or not kind) and metric in metrics[k]]
      if not found:
        available = sorted({f'{k}/{n}' for k, s in metrics.items() for n in s})
        raise ValueError(f'{os.path.join(workdir, METRICS_FILE)} holds no metric {name!r}; '
                         f'it holds {available}.')
      series += found
    panels.append((key, series))
  columns = min(len(panels), 3)
  rows = math.ceil(len(panels) / columns)
  fig = _figure(4.2 * columns + 0.8, 2.8 * rows + 0.3)
  for p, (key, series) in enumerate(panels):
    ax = fig.add_subplot(rows, columns, p + 1)
    for kind, name in series:
      steps, values = metrics[kind][name]
      label = name if kind == 'train' else f'{name} ({kind})'
      if kind == 'train':
        ax.plot(steps, values, linewidth=1.0, label=label)
      else:
        ax.plot(steps, values, marker='o', markersize=4, linewidth=1.0, linestyle='--',
                label=label)
    title = key if isinstance(key, str) else (
        'loss' if all(_is_loss(n) for _, n in series) else
        'accuracy' if all(_is_accuracy(n) for _, n in series) else ', '.join(key))
    ax.set_title(title, fontsize=9)
    ax.set_xlabel('step', fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)
  fig.suptitle(f'metrics: {workdir}', fontsize=9)
  return _finish(fig, path)


# ----------------------------------------------------------------------------- pictures


def cells_picture(workdir):
  """The picture of the found normal and reduction cells (``workdir/cells.png``) as a
  Pillow image, which a notebook shows as it is."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  path = _file(workdir, CELLS_FILE, 'a cell search (PC-DARTS, DARTS, UNAS, PARSEC, FP-NAS '
               'in the cell space) writes it when it ends')
  with Image.open(path) as image:
    image.load()
    return image


def plot_atoms(workdir, path=None):
  """AtomNAS's found network (``workdir/architecture.json``): the live hidden channels
  (atoms) of each block, a bar per kernel size."""
  path_in = _file(workdir, ARCHITECTURE_FILE, 'an AtomNAS run writes it when it ends')
  with open(path_in) as f:
    architecture = json.load(f)
  blocks = architecture.get('architecture', {}).get('blocks')
  if not blocks:
    raise ValueError(f'{path_in} holds no AtomNAS blocks (architecture.blocks); plot_atoms '
                     'draws an AtomNAS run.')
  kernels = sorted({k for b in blocks for k in b['kernels']})
  fig = _figure(max(4.0, 0.7 * len(blocks) + 2.0), 3.0)
  ax = fig.add_subplot()
  width = 0.8 / len(kernels)
  x = np.arange(len(blocks))
  for n, k in enumerate(kernels):
    hidden = [dict(zip(b['kernels'], b['hidden'])).get(k, 0) for b in blocks]
    ax.bar(x + (n - (len(kernels) - 1) / 2) * width, hidden, width, label=f'k{k}')
  ax.set_xticks(x, [f'{n + 1}' + (' s2' if b['stride'] == 2 else '') +
                    ('' if b.get('expand', True) else ' fixed') for n, b in enumerate(blocks)],
                fontsize=7)
  ax.set_xlabel('block (s2: stride 2; fixed: not searched)', fontsize=8)
  ax.set_ylabel('live hidden channels', fontsize=8)
  # Atoms are the hidden channels of the searched blocks (those with an expand conv).
  searched = [b for b in blocks if b.get('expand', True)]
  atoms = sum(sum(b['hidden']) for b in searched)
  ax.set_title(f'{atoms} atoms in {len(searched)} searched blocks', fontsize=9)
  ax.legend(fontsize=7)
  return _finish(fig, path)


def plot_run(workdir, directory=None) -> dict:
  """Every plot the workdir's files allow: ``{'cells': Pillow image, 'alphas': Figure,
  'metrics': Figure, 'atoms': Figure}``, each where its file is there. With
  ``directory``, the figures are saved there too as ``<name>.png``."""
  workdir = _workdir(workdir)
  out = {}
  if os.path.isfile(os.path.join(workdir, CELLS_FILE)):
    out['cells'] = cells_picture(workdir)
  if os.path.isfile(os.path.join(workdir, ARCH_HISTORY_FILE)):
    out['alphas'] = plot_alphas(workdir)
  if os.path.isfile(os.path.join(workdir, METRICS_FILE)):
    out['metrics'] = plot_metrics(workdir)
  if os.path.isfile(os.path.join(workdir, ARCHITECTURE_FILE)):
    with open(os.path.join(workdir, ARCHITECTURE_FILE)) as f:
      if 'blocks' in json.load(f).get('architecture', {}):
        out['atoms'] = plot_atoms(workdir)
  if not out:
    raise FileNotFoundError(f'{workdir} holds none of {METRICS_FILE}, {ARCH_HISTORY_FILE}, '
                            f'{CELLS_FILE}, {ARCHITECTURE_FILE}: nothing to plot yet.')
  if directory is not None:
    for name, fig in out.items():
      if name != 'cells':
        save(fig, os.path.join(directory, f'{name}.png'))
  return out


# ----------------------------------------------------------------------------- notebooks


class NotebookParamError(ValueError):
  """A notebook parameter set to a value it cannot take."""


_TRUE, _FALSE = ('1', 'true', 'yes', 'on'), ('0', 'false', 'no', 'off')


def _parse(name: str, default, text: str):
  var = ENV_PREFIX + name.upper()
  value = text.strip()
  if isinstance(default, bool):
    if value.lower() in _TRUE + _FALSE:
      return value.lower() in _TRUE
    need = 'a boolean (1 or 0, true or false)'
  elif isinstance(default, int):
    if re.fullmatch(r'\+?\d+', value):
      return int(value)
    need = 'a non-negative integer'
  elif isinstance(default, float):
    try:
      number = float(value)
    except ValueError:
      number = math.nan
    if math.isfinite(number):
      return number
    need = 'a finite number'
  else:
    if value:
      return text
    need = 'a non-empty string'
  raise NotebookParamError(f'{var} is {text!r}, but the notebook parameter {name} must be '
                           f'{need}.')


def notebook_params(defaults: Mapping[str, Any], smoke: Optional[Mapping[str, Any]] = None,
                    environ: Optional[Mapping[str, str]] = None):
  """A notebook's parameters, read like a config: ``defaults``, then ``smoke``'s values
  over them when JAXNAS_NOTEBOOK_SMOKE is set (a quick check of the notebook end to
  end), then each overridden by its environment variable JAXNAS_NOTEBOOK_<NAME>.

  A value takes its default's type: bool (1/0, true/false, yes/no, on/off), int (a
  non-negative integer), float or str (non-empty). A value that does not parse, or a
  JAXNAS_NOTEBOOK_ variable that names no parameter, raises NotebookParamError in one
  sentence naming it, before the notebook computes anything.

  Args:
    defaults: parameter names (lower case) and their values for a full run; 'smoke'
      (False) is added.
    smoke: the values that differ in a smoke run.
    environ: the environment to read (os.environ by default).
  Returns:
    A locked ml_collections.ConfigDict of the parameters (``params.epochs``).
  """
  import ml_collections  # pylint: disable=g-import-not-at-top
  environ = os.environ if environ is None else environ
  defaults = {'smoke': False, **defaults}
  smoke = dict(smoke or {})
  for name, value in defaults.items():
    if not isinstance(value, (bool, int, float, str)) or name != name.lower():
      raise TypeError(f'Notebook parameter {name!r} must be lower case with a bool, int, '
                      f'float or str default, not {value!r}.')
  unknown = [n for n in smoke if n not in defaults]
  if unknown:
    raise TypeError(f'smoke sets {unknown}, which are not in defaults.')
  known = {ENV_PREFIX + n.upper(): n for n in defaults}
  stray = sorted(v for v in environ if v.startswith(ENV_PREFIX) and v not in known)
  if stray:
    raise NotebookParamError(f'{stray[0]} names no parameter of this notebook; its '
                             f'parameters are {", ".join(known)}.')
  params = dict(defaults)
  if ENV_PREFIX + 'SMOKE' in environ:
    params['smoke'] = _parse('smoke', False, environ[ENV_PREFIX + 'SMOKE'])
  if params['smoke']:
    params.update(smoke)
  for var, name in known.items():
    if var in environ and name != 'smoke':
      params[name] = _parse(name, defaults[name], environ[var])
  config = ml_collections.ConfigDict(params)
  config.lock()
  return config
