"""The notebooks in notebooks/ run end to end in a real Jupyter kernel on CPU, with their
smoke settings (JAXNAS_NOTEBOOK_SMOKE=1) on a tiny synthetic Fashion-MNIST (and TFDS mock
data for CIFAR-10), and a bad parameter stops a notebook in one sentence."""

import base64
import io
import json
import os
import sys
import time

import nbclient
import nbformat
import numpy as np
from PIL import Image
import pytest

from test_data import write_fashion_mnist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(REPO, 'notebooks')
KERNEL = 'jaxnas-tests'
CELL_TIMEOUT_S = 300  # per cell; the slowest, a cold search, took under 90 s on 2 cores


@pytest.fixture(scope='module')
def kernel_dir(tmp_path_factory):
  """A kernel spec that runs this interpreter (the venv's), found through JUPYTER_PATH."""
  root = tmp_path_factory.mktemp('jupyter')
  spec = root / 'kernels' / KERNEL
  spec.mkdir(parents=True)
  (spec / 'kernel.json').write_text(json.dumps({
      'argv': [sys.executable, '-m', 'ipykernel_launcher', '-f', '{connection_file}'],
      'display_name': 'jaxnas tests', 'language': 'python'}))
  return str(root)


@pytest.fixture(scope='module')
def idx_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp('fmnist_idx')
  write_fashion_mnist(str(directory), np.random.default_rng(0), n_train=256, n_test=64)
  return str(directory)


@pytest.fixture
def notebook_env(monkeypatch, kernel_dir):
  """Sets the kernel spec path and JAXNAS_NOTEBOOK_* (the kernel inherits them)."""
  monkeypatch.setenv('JUPYTER_PATH', kernel_dir)
  for name in [n for n in os.environ if n.startswith('JAXNAS_NOTEBOOK_')]:
    monkeypatch.delenv(name)

  def set_params(**params):
    for name, value in params.items():
      monkeypatch.setenv(f'JAXNAS_NOTEBOOK_{name.upper()}', str(value))

  return set_params


def execute(name: str):
  """Runs notebooks/<name>.ipynb in a fresh kernel; returns the executed notebook and
  its wall time."""
  nb = nbformat.read(os.path.join(NOTEBOOKS, f'{name}.ipynb'), as_version=4)
  t = time.perf_counter()
  nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=CELL_TIMEOUT_S,
                          resources={'metadata': {'path': NOTEBOOKS}}).execute()
  wall = time.perf_counter() - t
  print(f'{name}.ipynb ran in {wall:.1f} s')
  return nb, wall


def code_cells(nb):
  return [c for c in nb.cells if c.cell_type == 'code']


def text_of(nb) -> str:
  return ''.join(o.get('text', '') for c in code_cells(nb) for o in c.outputs)


def check_figures(nb):
  """Every cell that ends in a plot shows one picture, of a plausible size."""
  plot_cells = [c for c in code_cells(nb) if c.source.startswith('plots.')]
  assert plot_cells
  for cell in plot_cells:
    pictures = [o for o in cell.outputs if 'image/png' in o.get('data', {})]
    assert len(pictures) == 1, cell.source
    image = Image.open(io.BytesIO(base64.b64decode(pictures[0]['data']['image/png'])))
    assert min(image.size) > 150, (cell.source, image.size)


def epochs_logged(workdir) -> list[int]:
  with open(os.path.join(workdir, 'genotypes.jsonl')) as f:
    return [json.loads(line)['epoch'] for line in f]


def test_notebooks_are_committed_without_outputs():
  names = sorted(n for n in os.listdir(NOTEBOOKS) if n.endswith('.ipynb'))
  assert names == ['atomnas.ipynb', 'fpnas.ipynb', 'pcdarts_tpu.ipynb', 'quickstart.ipynb',
                   'unas.ipynb']
  for name in names:
    nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    nbformat.validate(nb)
    cells = code_cells(nb)
    assert cells[0].metadata.get('tags') == ['parameters'], name
    assert 'notebook_params(' in cells[0].source, name
    for cell in cells:
      assert cell.outputs == [] and cell.execution_count is None, (name, cell.source[:40])


def test_kernel_runs_this_interpreter(notebook_env, tmp_path):
  nb = nbformat.v4.new_notebook()
  nb.cells = [nbformat.v4.new_code_cell('import sys\nprint(sys.executable)')]
  nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=60,
                          resources={'metadata': {'path': str(tmp_path)}}).execute()
  assert nb.cells[0].outputs[0]['text'].strip() == sys.executable


def test_quickstart(notebook_env, idx_dir, tmp_path):
  workdir = str(tmp_path / 'quickstart')
  notebook_env(smoke=1, workdir=workdir, data_dir=idx_dir)
  nb, _ = execute('quickstart')
  for name in ('genotype.json', 'arch.npz', 'cells.png', 'summary.json', 'metrics.jsonl'):
    assert os.path.isfile(os.path.join(workdir, name)), name
  assert epochs_logged(workdir) == [1, 2]
  retrain = workdir + '_retrain'
  with open(os.path.join(retrain, 'config.json')) as f:
    assert json.load(f)['genotype'] == workdir  # the found cell, not the smoke default
  assert os.path.isfile(os.path.join(retrain, 'export', 'best', 'model.json'))
  text = text_of(nb)
  assert 'backend: cpu' in text and 'Search done' in text and 'Training done' in text
  assert 'predicted:' in text
  check_figures(nb)


def test_pcdarts_tpu_on_mock_data(notebook_env, tmp_path):
  workdir = str(tmp_path / 'pcdarts_tpu')
  notebook_env(smoke=1, workdir=workdir)
  nb, _ = execute('pcdarts_tpu')
  assert os.path.isfile(os.path.join(workdir, 'genotype.json'))
  with open(os.path.join(workdir, 'summary.json')) as f:
    assert json.load(f)['result']['dataset'] == 'cifar10'
  text = text_of(nb)
  assert 'Data: TFDS mock data' in text
  assert 'global batch 16 = 1 device(s) x 16 images' in text
  assert 'no memory statistics on cpu' in text and 'images/s over 1 device(s)' in text
  check_figures(nb)


@pytest.mark.parametrize('name, outputs', [
    ('unas', ('genotype.json', 'cells.png')),
    ('fpnas', ('genotype.json', 'cells.png')),
    ('atomnas', ('architecture.json', 'export/best/model.json')),
])
def test_method_notebook(notebook_env, idx_dir, tmp_path, name, outputs):
  workdir = str(tmp_path / name)
  notebook_env(smoke=1, workdir=workdir, data_dir=idx_dir)
  nb, _ = execute(name)
  for output in outputs:
    assert os.path.isfile(os.path.join(workdir, output)), output
  if name != 'atomnas':
    assert epochs_logged(workdir) == [1, 2]
  if name != 'atomnas':  # the notebooks' smoke settings reached the config
    with open(os.path.join(workdir, 'config.json')) as f:
      model = json.load(f)['model']
    assert model['primitives'] == ['skip_connect', 'sep_conv_3x3', 'max_pool_3x3']
    assert model['layers'] == 3
  check_figures(nb)


def test_bad_parameter_stops_the_notebook_in_one_sentence(notebook_env, tmp_path):
  workdir = str(tmp_path / 'never')
  notebook_env(smoke=1, workdir=workdir, epochs='two')
  with pytest.raises(nbclient.exceptions.CellExecutionError) as e:
    execute('quickstart')
  assert e.value.ename == 'NotebookParamError'
  assert e.value.evalue == ("JAXNAS_NOTEBOOK_EPOCHS is 'two', but the notebook parameter "
                            'epochs must be a non-negative integer.')
  assert not os.path.exists(workdir)
