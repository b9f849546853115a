"""The searched-against-random protocol (experiments/fashion_mnist_pipeline.py): its
aggregation on given numbers, and end to end on smoke settings."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxnas import genotypes
from jaxnas import perturbation
from jaxnas.spaces import darts
from test_data import write_fashion_mnist
from test_search import run_until_signal

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'experiments'))
import protocol_report as pipeline  # noqa: E402  pylint: disable=g-import-not-at-top


def _run(cell, group, seed, val, test, params=1000, madds=2e6):
  return {'cell': cell, 'group': group, 'train_seed': seed, 'params': params,
          'multiply_adds': madds, 'val_top1': val, 'test_top1': test, 'wall_s': 1.0,
          'genotype': cell}


def test_aggregate_means_stds_gap_and_table():
  runs = [_run('searched_seed0', 'searched', 0, 0.80, 0.79),
          _run('searched_seed0', 'searched', 1, 0.82, 0.81),
          _run('searched_seed1', 'searched', 1, 0.86, 0.85),
          _run('searched_seed1', 'searched', 0, 0.84, 0.83),
          _run('random_0', 'random', 0, 0.83, 0.80, params=3000),
          _run('random_0', 'random', 1, 0.83, 0.82, params=3000),
          _run('random_1', 'random', 0, 0.79, 0.78),
          _run('random_1', 'random', 1, 0.81, 0.78),
          _run('DARTS_V2', 'published', 0, 0.88, 0.87)]
  report = pipeline.aggregate(runs)
  cells = {c['cell']: c for c in report['cells']}
  # A cell's value is its mean over the training seeds; runs are listed by seed.
  assert cells['searched_seed1']['val_top1'] == pytest.approx(0.85)
  assert [r['train_seed'] for r in cells['searched_seed1']['runs']] == [0, 1]
  assert cells['random_1']['val_seed_std'] == pytest.approx(np.std([0.79, 0.81], ddof=1))
  assert cells['DARTS_V2']['val_seed_std'] is None
  searched, random = report['groups']['searched'], report['groups']['random']
  assert searched['val_top1']['n'] == 2
  assert searched['val_top1']['mean'] == pytest.approx(0.83)
  assert searched['val_top1']['std'] == pytest.approx(np.std([0.81, 0.85], ddof=1))
  assert random['test_top1']['mean'] == pytest.approx(0.795)
  assert random['params']['min'] == 1000 and random['params']['max'] == 3000
  assert report['groups']['published']['val_top1']['std'] is None
  gap = report['searched_minus_random']
  assert gap['val_top1'] == pytest.approx(0.83 - 0.815)
  assert gap['test_top1'] == pytest.approx(0.82 - 0.795)
  # By validation: seed 0's cell (0.81) beats random_1 (0.80) only; seed 1's beats both.
  assert gap['searched_val_beats_random'] == {'searched_seed0': '1/2', 'searched_seed1': '2/2'}
  text = pipeline.table(report).splitlines()
  assert len(text) == 2 + 5 + 3 + 1  # header, cells, groups, gap
  assert '| searched_seed0 | searched | 1,000 | 2.0 | 80.00 / 82.00 | 81.00 % |' in text[2]
  assert text[-2].startswith('| **published** (N=1 cells)')
  assert '| **searched** (N=2 cells) | | 1,000-1,000 | 2.0-2.0 | | 83.00 ± 2.83 % |' in text[7]
  assert text[-1] == ('| **searched − random** | | | | | +1.50 points | | '
                      '+2.50 points |')


@pytest.fixture(scope='module')
def smoke_protocol(tmp_path_factory):
  # The data, the search and the searched cell's training of the quick start notebook and
  # tests/test_plots.py: with the default compilation cache, their programs are compiled
  # once for all three. The published cells are left out (the random cell stands for them).
  idx = tmp_path_factory.mktemp('fmnist_idx')
  write_fashion_mnist(str(idx), np.random.default_rng(0), n_train=256, n_test=64)
  root = tmp_path_factory.mktemp('protocol')
  out = root / 'report.json'
  args = [sys.executable, os.path.join(REPO, 'experiments', 'fashion_mnist_pipeline.py'),
          f'--workdir={root}', '--search_seeds=0', '--num_random=1', '--published=',
          '--train_seeds=0,1', '--search_variant=smoke', '--train_variant=smoke',
          '--validation_examples=64', f'--data_dir={idx}', f'--out={out}']
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  with open(out) as f:
    return root, json.load(f), done.stdout, args, env


def test_smoke_protocol_trains_every_cell_and_seed(smoke_protocol):
  root, report, stdout, _, _ = smoke_protocol
  assert report['missing'] == []
  assert [c['cell'] for c in report['cells']] == ['searched_seed0', 'random_0']
  assert set(report['groups']) == {'searched', 'random'}
  assert report['searches'][0]['seed'] == 0
  # The searched cell is the search's genotype; the random cell is draw 0 of seed 0.
  searched = genotypes.load(str(root / 'search_seed0'))
  random_0 = genotypes.random_genotype(np.random.default_rng(0))
  for cell, genotype in (('searched_seed0', searched), ('random_0', random_0)):
    (c,) = [c for c in report['cells'] if c['cell'] == cell]
    assert c['genotype'] == genotypes.format_genotype(genotype)
  for c in report['cells']:
    assert [r['train_seed'] for r in c['runs']] == [0, 1]
    for r in c['runs']:
      with open(root / f'train_{c["cell"]}_seed{r["train_seed"]}' / 'summary.json') as f:
        result = json.load(f)['result']
      # 64 held-out train images scored each epoch; the test images once, at the end.
      assert result['val_examples'] == 64 and result['test_examples'] == 64
      assert (r['val_top1'], r['test_top1']) == (result['val_top1'], result['test_top1'])
    assert c['val_top1'] == pytest.approx(np.mean([r['val_top1'] for r in c['runs']]))
  # Each seed its own training: its config, and a different first loss.
  first_losses = []
  for seed in (0, 1):
    workdir = root / f'train_random_0_seed{seed}'
    with open(workdir / 'config.json') as f:
      assert json.load(f)['seed'] == seed
    with open(workdir / 'metrics.jsonl') as f:
      first_losses.append(next(json.loads(line)['train_loss'] for line in f
                               if json.loads(line)['kind'] == 'train'))
  assert first_losses[0] != first_losses[1]
  assert report['train_config']['data']['validation_examples'] == 64
  with open(root / 'report.md') as f:
    assert f.read().strip() == pipeline.table(report)
  assert pipeline.table(report) in stdout


def test_smoke_protocol_reads_finished_runs_back(smoke_protocol):
  root, report, _, args, env = smoke_protocol
  again = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert again.returncode == 0, again.stderr[-3000:]
  with open(root / 'report.json') as f:
    second = json.load(f)
  assert second['cells'] == report['cells']
  assert 'Training done' not in again.stdout and 'Compiled' not in again.stdout


def test_smoke_protocol_derives_cost_aware_cells_from_the_arch_params(smoke_protocol):
  # --cost_penalty re-derives each searched cell from its search's arch params (no new
  # search); only the random group runs, so the new cell's trainings are listed missing.
  root, _, _, args, env = smoke_protocol
  args = [a for a in args if not a.startswith(('--out=', '--train_seeds='))] + [
      '--cost_penalty=100', '--groups=random', '--train_seeds=0',
      f'--out={root / "cost.json"}']
  done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  with open(root / 'search_seed0' / 'config.json') as f:
    m = json.load(f)['model']
  with np.load(root / 'search_seed0' / 'arch.npz') as arch:
    expected = darts.derive_genotype(dict(arch), m['steps'], tuple(m['primitives']),
                                     cost_penalty=100.0, C=m['C'])
  assert genotypes.load(str(root / 'searched_cost100_seed0.json')) == expected
  # A penalty of 100 leaves only weight-free ops.
  assert all(op in ('max_pool_3x3', 'avg_pool_3x3', 'skip_connect')
             for op, _ in expected.normal)
  with open(root / 'cost.json') as f:
    report = json.load(f)
  assert report['missing'] == [str(root / 'train_searched_cost100_seed0_seed0')]
  assert [c['cell'] for c in report['cells']] == ['random_0']


def test_perturbation_selects_a_cell_from_the_smoke_search(smoke_protocol):
  # The selection scores the search's last checkpoint (in this process); the protocol's
  # --perturbation_examples then reads the scores back and writes the cell.
  root, _, _, args, env = smoke_protocol
  from configs import pcdarts_fashion_mnist  # pylint: disable=g-import-not-at-top
  config = pcdarts_fashion_mnist.get_config('smoke')
  config.seed = 0
  config.data.source = 'idx'
  config.data.data_dir = next(a.split('=', 1)[1] for a in args if a.startswith('--data_dir='))
  work = str(root / 'search_seed0')
  genotype, scores = perturbation.select(config, work, 64, progress=False)
  assert (scores['num_examples'], scores['batch_size'], scores['step']) == (64, 64, 6)
  primitives = scores['primitives']
  none = primitives.index('none')
  ops, edges = {}, {}
  for kind in ('normal', 'reduce'):
    ops[kind] = np.array(scores['op_loss_rise'][kind], dtype=float)
    edges[kind] = np.array(scores['edge_loss_rise'][kind])
    assert ops[kind].shape == (darts.num_edges(2), len(primitives))
    assert np.isnan(ops[kind][:, none]).all()  # 'none' is never taken out or chosen
    scored = np.delete(ops[kind], none, axis=1)
    assert np.isfinite(scored).all() and np.abs(scored).max() > 0
    assert np.isfinite(edges[kind]).all() and np.abs(edges[kind]).max() > 0
  assert genotype == darts.genotype_from_scores(ops, 2, primitives, edges)
  assert genotypes.to_json(genotype) == scores['genotype']
  # The command line: the scores read back, the cell written where --out says; a config
  # other than the search's is refused in one sentence.
  cli = [sys.executable, '-m', 'jaxnas.perturbation',
         f'--config={os.path.join(REPO, "configs", "pcdarts_fashion_mnist.py")}:smoke',
         '--config.seed=0', '--config.data.source=idx',
         f'--config.data.data_dir={config.data.data_dir}', f'--workdir={work}',
         '--num_examples=64', f'--out={root / "cli_pt.json"}']
  done = subprocess.run(cli, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert 'removals scored' not in done.stdout
  assert genotypes.load(str(root / 'cli_pt.json')) == genotype
  done = subprocess.run(cli[:4] + ['--config.seed=1'] + cli[5:], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 1
  assert done.stderr.strip().splitlines()[-1].startswith('jaxnas: error: ')
  assert 'seed differ' in done.stderr

  args = [a for a in args if not a.startswith(('--out=', '--train_seeds='))] + [
      '--perturbation_examples=64', '--groups=random', '--train_seeds=0',
      f'--out={root / "pt.json"}']
  done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert 'removals scored' not in done.stdout  # read back, not scored again
  assert genotypes.load(str(root / 'searched_pt64_seed0.json')) == genotype
  with open(root / 'pt.json') as f:
    assert json.load(f)['missing'] == [str(root / 'train_searched_pt64_seed0_seed0')]


def test_reference_report_stands_for_the_random_and_published_trainings(smoke_protocol):
  # The searched cell's trainings are read back from this root; the random cell's come
  # from the report (nothing trains, so --groups may name them).
  root, report, _, args, env = smoke_protocol
  args = [a for a in args if not a.startswith('--out=')]
  ref = [f'--reference_report={root / "report.json"}', f'--out={root / "ref.json"}']
  done = subprocess.run(args + ref, cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert 'Training done' not in done.stdout
  with open(root / 'ref.json') as f:
    again = json.load(f)
  assert again['cells'] == report['cells']
  assert again['reference_report'] == str(root / 'report.json')
  assert again['searches'][0]['config']['model']['edge_normalization'] is True
  # Refused in one sentence, before anything runs: a report trained otherwise, a
  # finished search of another config, a field the search config lacks or a bad value.
  for extra, words in (
      (['--validation_examples=32'], 'trained with other data.validation_examples'),
      (['--train_seeds=0,2'], 'has no training of random_0 with seed 2'),
      (['--search_set=model.edge_normalization=False'],
       'whose model.edge_normalization differ'),
      (['--search_set=model.edge_norm=False'], "has no field 'model.edge_norm'"),
      (['--search_set=model.k=two'], 'model.k takes a value like')):
    done = subprocess.run(args + ref + extra, cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 1, done.stdout[-2000:]
    assert words in done.stderr, done.stderr[-2000:]


def test_sigterm_in_a_search_stops_the_protocol_with_the_search_exit_status(
    smoke_protocol, tmp_path):
  """The search checkpoints and says how to resume; the protocol then exits 143 with no
  traceback and no report (it used to go on and read a genotype that was not there)."""
  import signal  # pylint: disable=g-import-not-at-top
  _, _, _, args, env = smoke_protocol
  args = [a for a in args if not a.startswith(('--workdir=', '--out='))] + [
      f'--workdir={tmp_path}', f'--out={tmp_path / "report.json"}', '--groups=searched',
      # many steps on a small supernet: quick to compile, still running at the signal
      '--search_set=optim.epochs=40,model.C=4,model.layers=3']
  first_step = 'epoch 1/40 | step 1/3'
  code, out, err = run_until_signal(args, env, first_step, first_step, signal.SIGTERM)
  assert code == 128 + signal.SIGTERM, err[-2000:]
  assert 'Traceback' not in err, err[-2000:]
  assert 'Run the same command to resume' in out
  assert os.listdir(tmp_path / 'search_seed0' / 'checkpoints')
  assert not os.path.exists(tmp_path / 'search_seed0' / genotypes.GENOTYPE_FILE)
  assert not os.path.exists(tmp_path / 'report.json')


def test_arch_weights_report_mean_weights_and_the_argmax_margin():
  a = np.zeros((14, len(genotypes.PRIMITIVES)))
  a[:, genotypes.PRIMITIVES.index('sep_conv_5x5')] = 0.3
  a[:, genotypes.PRIMITIVES.index('max_pool_3x3')] = 0.1
  a[:, genotypes.PRIMITIVES.index('none')] = 0.5  # 'none' never counts in the margin
  a[:7, genotypes.PRIMITIVES.index('max_pool_3x3')] = 0.25  # half the edges: lead 0.05
  out = pipeline.arch_weights({'alphas_normal': a, 'alphas_reduce': a[::-1]},
                              genotypes.PRIMITIVES)
  for kind in ('normal', 'reduce'):
    assert out[kind]['median_margin'] == pytest.approx((0.05 + 0.2) / 2)
    w = out[kind]['mean_weight']
    assert sum(w.values()) == pytest.approx(1.0, abs=1e-3)
    # none, sep_conv_5x5, max_pool_3x3 and five ops at 0.
    total = lambda pool: np.exp(0.5) + np.exp(0.3) + np.exp(pool) + 5  # noqa: E731
    expected = (np.exp(0.3) / total(0.1) + np.exp(0.3) / total(0.25)) / 2
    assert w['sep_conv_5x5'] == pytest.approx(expected, abs=1e-4)
