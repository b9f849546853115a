"""jaxnas.plots: figures drawn from real smoke runs' workdirs (PC-DARTS, AtomNAS) and from
hand-written files of the other spaces, the one-sentence errors, and the notebooks'
parameters."""

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from configs import atomnas_fashion_mnist
from configs import pcdarts_fashion_mnist
from jaxnas import plots
from jaxnas import search
from jaxnas.spaces import proxyless
from test_data import write_fashion_mnist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRIMITIVES = ('none', 'max_pool_3x3', 'avg_pool_3x3', 'skip_connect', 'sep_conv_3x3',
              'sep_conv_5x5', 'dil_conv_3x3', 'dil_conv_5x5')


@pytest.fixture(scope='module')
def idx_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp('fmnist_idx')
  write_fashion_mnist(str(directory), np.random.default_rng(0), n_train=256, n_test=64)
  return str(directory)


# The runs below use the default compilation cache, as the notebooks do: the same
# configs on the same synthetic data compile once for both test files.


@pytest.fixture(scope='module')
def pcdarts_run(tmp_path_factory, idx_dir):
  """configs/pcdarts_fashion_mnist.py:smoke: 2 epochs of 3 steps, 2 nodes per cell."""
  config = pcdarts_fashion_mnist.get_config('smoke')
  config.data.data_dir = idx_dir
  workdir = str(tmp_path_factory.mktemp('pcdarts'))
  search.run_search(config, workdir)
  return workdir


@pytest.fixture(scope='module')
def atomnas_run(tmp_path_factory, idx_dir):
  config = atomnas_fashion_mnist.get_config('smoke')
  config.data.data_dir = idx_dir
  workdir = str(tmp_path_factory.mktemp('atomnas'))
  search.run_search(config, workdir)
  return workdir


def softmax(x):
  e = np.exp(x - np.max(x, axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def panels(fig) -> dict:
  """The figure's plot panels by title (the legend column has none)."""
  return {ax.get_title(): ax for ax in fig.axes if ax.get_title()}


def write_history(workdir, config, records):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump(config, f)
  with open(os.path.join(workdir, 'genotypes.jsonl'), 'w') as f:
    for epoch, arrays in enumerate(records, 1):
      f.write(json.dumps({'epoch': epoch, 'step': 3 * epoch, 'normal_concat': [2, 3],
                          **{k: np.asarray(v).tolist() for k, v in arrays.items()}}) + '\n')
  return str(workdir)


# ----------------------------------------------------------------------------- alphas


def test_alphas_of_a_pcdarts_run(pcdarts_run):
  fig = plots.plot_alphas(pcdarts_run)
  by_title = panels(fig)
  edges = ['0→2', '1→2', '0→3', '1→3', '2→3']
  assert sorted(by_title) == sorted(
      [f'{kind}: {e}' for kind in ('normal', 'reduce') for e in edges] +
      [f'{kind}: edges into node {n}' for kind in ('normal', 'reduce') for n in (2, 3)])
  final = np.load(os.path.join(pcdarts_run, 'arch.npz'))
  for kind in ('normal', 'reduce'):
    for e, edge in enumerate(edges):
      lines = by_title[f'{kind}: {edge}'].get_lines()
      assert [l.get_label() for l in lines] == list(PRIMITIVES)  # a line per op
      for line in lines:
        np.testing.assert_array_equal(line.get_xdata(), [1, 2])  # a point per epoch
      y = np.array([l.get_ydata() for l in lines])
      np.testing.assert_allclose(y.sum(0), 1.0, rtol=1e-6)
      np.testing.assert_allclose(y[:, -1], softmax(final[f'alphas_{kind}'][e]), rtol=1e-5)
    betas = final[f'betas_{kind}']
    for node, (start, n) in ((2, (0, 2)), (3, (2, 3))):
      lines = by_title[f'{kind}: edges into node {node}'].get_lines()
      assert [l.get_label() for l in lines] == [f'from {j}' for j in range(n)]
      np.testing.assert_allclose([l.get_ydata()[-1] for l in lines],
                                 softmax(betas[start:start + n]), rtol=1e-5)


def test_alphas_of_some_keys_and_an_unknown_one(pcdarts_run):
  fig = plots.plot_alphas(pcdarts_run, keys=['alphas_reduce'], columns=2)
  assert len(panels(fig)) == 5
  assert all(t.startswith('reduce: ') for t in panels(fig))
  with pytest.raises(ValueError, match=r"genotypes\.jsonl holds no \['alphas_wide'\]; it "
                     r"holds \['alphas_normal'"):
    plots.plot_alphas(pcdarts_run, keys=['alphas_wide'])


@pytest.mark.parametrize('ext, magic', [('png', b'\x89PNG'), ('svg', b'<?xml'),
                                        ('pdf', b'%PDF')])
def test_a_figure_is_saved_in_the_format_of_its_path(pcdarts_run, tmp_path, ext, magic):
  path = str(tmp_path / 'plots' / f'alphas.{ext}')
  fig = plots.plot_alphas(pcdarts_run, path=path)
  assert fig.axes
  with open(path, 'rb') as f:
    assert f.read(5).startswith(magic)
  assert os.listdir(tmp_path / 'plots') == [f'alphas.{ext}']  # no temporary left


def test_sampled_cells_draw_only_the_sources_a_node_reads(tmp_path):
  rng = np.random.default_rng(0)
  ops = ('skip_connect', 'sep_conv_3x3', 'max_pool_3x3')
  records = [{'inputs_normal': rng.normal(size=(2, 2, 3)), 'ops_normal': rng.normal(size=(2, 2, 3))}
             for _ in range(3)]
  workdir = write_history(tmp_path / 'unas', {'space': 'unas_darts',
                                               'model': {'primitives': list(ops)}}, records)
  by_title = panels(plots.plot_alphas(workdir))
  assert len(by_title) == 8
  node2 = by_title['normal: node 2 input 2 source'].get_lines()
  assert [l.get_label() for l in node2] == ['from 0', 'from 1']  # not the later node 3
  np.testing.assert_allclose([l.get_ydata()[-1] for l in node2],
                             softmax(records[-1]['inputs_normal'][0, 1, :2]), rtol=1e-6)
  assert len(by_title['normal: node 3 input 1 source'].get_lines()) == 3
  op_lines = by_title['normal: node 3 input 2 op'].get_lines()
  assert [l.get_label() for l in op_lines] == list(ops)
  np.testing.assert_array_equal(op_lines[0].get_xdata(), [1, 2, 3])


def test_proxyless_layers_leave_out_zero_where_the_width_changes(tmp_path):
  depths = (2, 1)
  logits = np.zeros((3, len(proxyless.PROXYLESS_OPS)))
  workdir = write_history(tmp_path / 'proxyless', {
      'space': 'proxyless', 'model': {'depths': list(depths),
                                      'primitives': list(proxyless.PROXYLESS_OPS)}},
                          [{'ops': logits}])
  by_title = panels(plots.plot_alphas(workdir))
  assert sorted(by_title) == ['ops: layer 1', 'ops: layer 2', 'ops: layer 3']
  n = len(proxyless.PROXYLESS_OPS)
  for title, options in (('ops: layer 1', n - 1), ('ops: layer 2', n), ('ops: layer 3', n - 1)):
    lines = by_title[title].get_lines()
    assert len(lines) == options
    np.testing.assert_allclose(lines[0].get_ydata(), [1.0 / options])


def test_fbnet_factors_are_drawn_per_stage_with_their_options(tmp_path):
  rng = np.random.default_rng(1)
  workdir = write_history(tmp_path / 'fbnet', {'space': 'fbnet'},
                          [{'kernel': rng.normal(size=(2, 2)), 'joint': np.zeros((2, 32))}
                           for _ in range(2)])
  by_title = panels(plots.plot_alphas(workdir))
  assert sorted(by_title) == ['joint: stage 1', 'joint: stage 2', 'kernel: stage 1',
                              'kernel: stage 2']
  assert [l.get_label() for l in by_title['kernel: stage 2'].get_lines()] == ['kernel 3',
                                                                            'kernel 5']
  assert len(by_title['joint: stage 1'].get_lines()) == 32


# ----------------------------------------------------------------------------- metrics


def test_metrics_of_a_pcdarts_run(pcdarts_run):
  fig = plots.plot_metrics(pcdarts_run)
  by_title = panels(fig)
  assert sorted(by_title) == ['accuracy', 'loss']
  lines = {l.get_label(): l for l in by_title['loss'].get_lines()}
  assert sorted(lines) == ['arch_split_loss (epoch)', 'train_loss', 'train_loss (epoch)',
                           'val_loss']
  np.testing.assert_array_equal(lines['train_loss'].get_xdata(), [1, 2, 3, 4, 5, 6])
  np.testing.assert_array_equal(lines['val_loss'].get_xdata(), [4, 5, 6])  # arch steps
  np.testing.assert_array_equal(lines['arch_split_loss (epoch)'].get_xdata(), [3, 6])
  with open(os.path.join(pcdarts_run, 'summary.json')) as f:
    result = json.load(f)['result']
  acc = plots.plot_metrics(pcdarts_run, keys=['epoch/arch_split_acc'])
  [line] = acc.axes[0].get_lines()
  assert line.get_ydata()[-1] == pytest.approx(result['arch_split_acc'])


def test_metrics_of_an_unknown_key(pcdarts_run):
  with pytest.raises(ValueError, match=r"metrics\.jsonl holds no metric 'epoch/val_acc'; "
                     r"it holds \[.*'train/val_acc'"):
    plots.plot_metrics(pcdarts_run, keys=['epoch/val_acc'])


def test_a_resumed_run_keeps_the_last_record_of_a_step(tmp_path):
  rows = [{'kind': 'train', 'step': s, 'train_loss': float(s)} for s in (1, 2, 3)]
  rows += [{'kind': 'train', 'step': s, 'train_loss': 10.0 + s} for s in (2, 3, 4)]
  os.makedirs(tmp_path / 'run')
  with open(tmp_path / 'run' / 'metrics.jsonl', 'w') as f:
    f.write(''.join(json.dumps(r) + '\n' for r in rows) + '{"kind": "train", "st')
  steps, values = plots.load_metrics(tmp_path / 'run')['train']['train_loss']
  np.testing.assert_array_equal(steps, [1, 2, 3, 4])
  np.testing.assert_array_equal(values, [1.0, 12.0, 13.0, 14.0])


# ----------------------------------------------------------------------------- pictures


def test_cells_picture_and_plot_run(pcdarts_run, tmp_path):
  picture = plots.cells_picture(pcdarts_run)
  with Image.open(os.path.join(pcdarts_run, 'cells.png')) as expected:
    assert picture.size == expected.size
    np.testing.assert_array_equal(np.asarray(picture), np.asarray(expected))
  out = plots.plot_run(pcdarts_run, directory=str(tmp_path / 'plots'))
  assert sorted(out) == ['alphas', 'cells', 'metrics']
  assert sorted(os.listdir(tmp_path / 'plots')) == ['alphas.png', 'metrics.png']


def test_atoms_of_an_atomnas_run(atomnas_run):
  with open(os.path.join(atomnas_run, 'architecture.json')) as f:
    blocks = json.load(f)['architecture']['blocks']
  fig = plots.plot_atoms(atomnas_run)
  [ax] = fig.axes
  bars = {}
  for container in ax.containers:
    bars[container.get_label()] = [b.get_height() for b in container]
  assert sorted(bars) == ['k3', 'k5', 'k7']
  for k in (3, 5, 7):
    assert bars[f'k{k}'] == [dict(zip(b['kernels'], b['hidden'])).get(k, 0) for b in blocks]
  with open(os.path.join(atomnas_run, 'summary.json')) as f:
    atoms = json.load(f)['result']['atoms']  # the run's count: the searched blocks' atoms
  assert ax.get_title() == f'{atoms} atoms in {len(blocks) - 1} searched blocks'
  out = plots.plot_run(atomnas_run)
  assert sorted(out) == ['atoms', 'metrics']
  accuracy = panels(out['metrics'])['accuracy']
  assert 'test_top1 (epoch)' in [l.get_label() for l in accuracy.get_lines()]


def test_plotting_starts_no_jax_backend(pcdarts_run, tmp_path):
  # A plot of a run on a GPU host must not take the GPU's memory from the run.
  code = ('import sys; from jaxnas import plots; from jax._src import xla_bridge; '
          'plots.plot_run(sys.argv[1], directory=sys.argv[2]); '
          'print(xla_bridge.backends_are_initialized())')
  out = subprocess.run([sys.executable, '-c', code, pcdarts_run, str(tmp_path)],
                       capture_output=True, text=True, cwd=REPO, check=True)
  assert out.stdout.strip() == 'False'
  assert sorted(os.listdir(tmp_path)) == ['alphas.png', 'metrics.png']


# ----------------------------------------------------------------------------- errors


def one_sentence(e) -> str:
  text = str(e.value)
  assert '\n' not in text and text.endswith('.'), text
  return text


def test_a_missing_workdir_is_named(tmp_path):
  missing = str(tmp_path / 'nowhere')
  for plot in (plots.plot_alphas, plots.plot_metrics, plots.cells_picture, plots.plot_atoms,
               plots.plot_run):
    with pytest.raises(FileNotFoundError) as e:
      plot(missing)
    assert one_sentence(e).startswith(f'The workdir {missing} does not exist; ')


@pytest.mark.parametrize('plot, name', [
    (plots.plot_alphas, 'genotypes.jsonl'), (plots.plot_metrics, 'metrics.jsonl'),
    (plots.cells_picture, 'cells.png'), (plots.plot_atoms, 'architecture.json')])
def test_a_missing_file_is_named(tmp_path, plot, name):
  with pytest.raises(FileNotFoundError) as e:
    plot(str(tmp_path))
  assert one_sentence(e).startswith(f'{os.path.join(str(tmp_path), name)} does not exist: ')


def test_an_atomnas_run_has_no_alphas_or_cells(atomnas_run):
  with pytest.raises(FileNotFoundError, match='genotypes.jsonl does not exist: .*AtomNAS'):
    plots.plot_alphas(atomnas_run)
  with pytest.raises(FileNotFoundError, match='cells.png does not exist'):
    plots.cells_picture(atomnas_run)


def test_an_empty_workdir_has_nothing_to_plot(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    plots.plot_run(str(tmp_path))
  assert 'nothing to plot yet' in one_sentence(e)


def test_without_matplotlib_a_plot_says_how_to_install_it(pcdarts_run, monkeypatch):
  monkeypatch.setitem(sys.modules, 'matplotlib', None)
  with pytest.raises(ImportError) as e:
    plots.plot_alphas(pcdarts_run)
  assert one_sentence(e) == ("jaxnas.plots needs matplotlib; install it with "
                             "`pip install 'jaxnas[notebooks]'`.")


def test_jaxnas_imports_without_matplotlib():
  code = ("import sys; sys.modules['matplotlib'] = None; import jaxnas; from jaxnas import "
          "plots; print(plots.notebook_params({'epochs': 1}, environ={}).epochs)")
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                       cwd=REPO, check=True)
  assert out.stdout.strip() == '1'


# ----------------------------------------------------------------------------- notebooks


DEFAULTS = {'workdir': 'runs/x', 'epochs': 0, 'rate': 0.5, 'measure': True}


def test_notebook_params_defaults_smoke_and_overrides():
  p = plots.notebook_params(DEFAULTS, smoke={'epochs': 2, 'measure': False}, environ={})
  assert p.to_dict() == {'smoke': False, **DEFAULTS}
  p = plots.notebook_params(DEFAULTS, smoke={'epochs': 2, 'measure': False},
                            environ={'JAXNAS_NOTEBOOK_SMOKE': '1',
                                     'JAXNAS_NOTEBOOK_WORKDIR': '/tmp/w',
                                     'JAXNAS_NOTEBOOK_RATE': '1e-3',
                                     'JAXNAS_NOTEBOOK_MEASURE': 'yes'})
  assert p.to_dict() == {'smoke': True, 'workdir': '/tmp/w', 'epochs': 2, 'rate': 1e-3,
                         'measure': True}
  p = plots.notebook_params(DEFAULTS, smoke={'epochs': 2},
                            environ={'JAXNAS_NOTEBOOK_SMOKE': 'false',
                                     'JAXNAS_NOTEBOOK_EPOCHS': '7'})
  assert (p.smoke, p.epochs) == (False, 7)
  with pytest.raises(AttributeError):
    p.epoch = 3  # locked: a misspelled parameter is not a new one


@pytest.mark.parametrize('var, value, message', [
    ('EPOCHS', 'two', "JAXNAS_NOTEBOOK_EPOCHS is 'two', but the notebook parameter epochs "
     'must be a non-negative integer.'),
    ('EPOCHS', '-1', "JAXNAS_NOTEBOOK_EPOCHS is '-1', but the notebook parameter epochs "
     'must be a non-negative integer.'),
    ('EPOCHS', '2.5', "JAXNAS_NOTEBOOK_EPOCHS is '2.5', but the notebook parameter epochs "
     'must be a non-negative integer.'),
    ('SMOKE', 'maybe', "JAXNAS_NOTEBOOK_SMOKE is 'maybe', but the notebook parameter smoke "
     'must be a boolean (1 or 0, true or false).'),
    ('RATE', 'nan', "JAXNAS_NOTEBOOK_RATE is 'nan', but the notebook parameter rate must be "
     'a finite number.'),
    ('WORKDIR', '', "JAXNAS_NOTEBOOK_WORKDIR is '', but the notebook parameter workdir must "
     'be a non-empty string.'),
    ('EPOCS', '3', 'JAXNAS_NOTEBOOK_EPOCS names no parameter of this notebook; its '
     'parameters are JAXNAS_NOTEBOOK_SMOKE, JAXNAS_NOTEBOOK_WORKDIR, JAXNAS_NOTEBOOK_EPOCHS, '
     'JAXNAS_NOTEBOOK_RATE, JAXNAS_NOTEBOOK_MEASURE.'),
])
def test_a_bad_notebook_param_is_named_in_one_sentence(var, value, message):
  with pytest.raises(plots.NotebookParamError) as e:
    plots.notebook_params(DEFAULTS, environ={f'JAXNAS_NOTEBOOK_{var}': value})
  assert one_sentence(e) == message


def test_notebook_params_defaults_must_be_simple_values():
  with pytest.raises(TypeError, match="'depths'"):
    plots.notebook_params({'depths': (1, 2)}, environ={})
  with pytest.raises(TypeError, match=r"\['epoch'\]"):
    plots.notebook_params({'epochs': 1}, smoke={'epoch': 2}, environ={})

