"""Training a genotype from scratch end to end: outputs, resume, export, CLI."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnas
from jaxnas import base_config
from jaxnas import data
from jaxnas import export
from jaxnas import genotypes
from jaxnas import train
from test_data import write_fashion_mnist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One op of each kind keeps the compiled program small.
TINY_GENOTYPE = genotypes.Genotype(
    normal=[('sep_conv_3x3', 0), ('skip_connect', 1), ('max_pool_3x3', 0),
            ('dil_conv_3x3', 2)] * 2,
    normal_concat=[2, 3, 4, 5],
    reduce=[('max_pool_3x3', 0), ('sep_conv_3x3', 1), ('skip_connect', 2),
            ('avg_pool_3x3', 1)] * 2,
    reduce_concat=[2, 3, 4, 5])


@pytest.fixture(scope='module')
def idx_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp('fmnist_idx')
  write_fashion_mnist(str(directory), np.random.default_rng(0), n_train=48, n_test=20)
  return str(directory)


@pytest.fixture(scope='module')
def genotype_file(tmp_path_factory):
  return genotypes.save(TINY_GENOTYPE, tmp_path_factory.mktemp('g') / 'genotype.json')


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('xla_cache'))


def tiny_config(idx_dir, genotype_file, cache_dir):
  c = base_config.train_smoke(base_config.train_config())
  c.genotype = genotype_file
  c.data.update(name='fashion_mnist', source='idx', data_dir=idx_dir, max_examples=None,
                cutout=8)
  c.model.update(C=4, layers=3, drop_path=0.2)
  c.optim.update(batch_size=8, epochs=2, steps_per_epoch=3)
  c.eval_batch_size = 8
  c.eval_max_examples = 0
  c.checkpoint_every_steps = 2
  c.compilation_cache_dir = cache_dir
  return c


@pytest.fixture(scope='module')
def trained(tmp_path_factory, idx_dir, genotype_file, cache_dir):
  workdir = str(tmp_path_factory.mktemp('train'))
  result = train.run_train(tiny_config(idx_dir, genotype_file, cache_dir), workdir)
  return workdir, result


def test_training_writes_its_outputs(trained):
  workdir, result = trained
  for name in ('config.json', 'summary.json', 'metrics.jsonl', 'checkpoints',
               'export/best/model.json', 'export/last/variables'):
    assert os.path.exists(os.path.join(workdir, name)), name
  with open(os.path.join(workdir, 'summary.json')) as f:
    summary = json.load(f)
  assert summary['model']['params'] < summary['model']['params_with_auxiliary']
  assert genotypes.from_json(summary['model']['genotype']) == TINY_GENOTYPE
  assert summary['result']['epoch'] == 2 and summary['result']['test_examples'] == 20
  assert 0 <= summary['result']['test_top1'] <= summary['result']['test_top5'] <= 1
  assert summary['result']['best_test_top1'] >= summary['result']['test_top1']
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  drop = [r['drop_rate'] for r in records if r['kind'] == 'train']
  # Drop path ramps per epoch: 0 in epoch 1, 0.2 * 1/2 in epoch 2.
  np.testing.assert_allclose(drop, [0, 0, 0, 0.1, 0.1, 0.1], rtol=1e-6)
  assert result['test_top1'] == summary['result']['test_top1']


def test_exported_model_scores_as_reported(trained, idx_dir):
  workdir, result = trained
  from jaxnas import evaluate  # pylint: disable=g-import-not-at-top
  model = jaxnas.load_model(workdir, which='last')
  assert model.genotype == TINY_GENOTYPE and model.num_classes == 10
  test_set = data.load_dataset(model.config.data, split='test')
  scores = evaluate.evaluate_model(model, test_set, batch_size=8)
  assert scores['top1'] == pytest.approx(result['test_top1'])
  assert scores['top5'] == pytest.approx(result['test_top5'])


def test_export_round_trip_gives_identical_logits(tmp_path, idx_dir, genotype_file, cache_dir):
  config = tiny_config(idx_dir, genotype_file, cache_dir)
  model = train.build_model(config, TINY_GENOTYPE, 10)
  x = jax.random.uniform(jax.random.key(0), (5, 28, 28, 1), maxval=255.0)
  variables = model.init({'params': jax.random.key(1), 'drop_path': jax.random.key(2)},
                         x, train=True)
  # Non-trivial BN statistics, so a lost collection would show in the logits.
  stats = jax.tree.map(lambda v: v + 0.3, variables['batch_stats'])
  mean, std = np.float32([0.2860]), np.float32([0.3530])
  export.save_model(str(tmp_path / 'm'), variables['params'], stats, genotype=TINY_GENOTYPE,
                    config=config, num_classes=10, image_shape=(28, 28, 1), mean=mean, std=std)
  loaded = export.load_model(str(tmp_path / 'm'))
  normalized = (np.asarray(x) / np.float32(255) - mean) / std
  expected = jax.jit(lambda v, x: model.apply(v, x, train=False)[0])(
      {'params': variables['params'], 'batch_stats': stats}, normalized)
  np.testing.assert_array_equal(np.asarray(loaded(np.asarray(x))), np.asarray(expected))
  # A second save replaces the first in place.
  export.save_model(str(tmp_path / 'm'), variables['params'], variables['batch_stats'],
                    genotype=TINY_GENOTYPE, config=config, num_classes=10,
                    image_shape=(28, 28, 1), mean=mean, std=std)
  again = export.load_model(str(tmp_path / 'm'))
  assert not np.allclose(again(np.asarray(x)), expected)
  assert sorted(os.listdir(tmp_path)) == ['m']


def test_interrupted_training_resumes_to_the_same_model(tmp_path, trained, idx_dir,
                                                        genotype_file, cache_dir):
  workdir, result = trained
  config = tiny_config(idx_dir, genotype_file, cache_dir)
  stopped = train.run_train(config, str(tmp_path), stop_at_step=5)
  assert stopped == {'stopped_at_step': 5}  # last checkpoint at step 4: step 5 is redone
  resumed = train.run_train(config, str(tmp_path))
  assert resumed['test_top1'] == result['test_top1']
  a = export.load_model(workdir, 'last').variables
  b = export.load_model(str(tmp_path), 'last').variables
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


def test_validation_split_is_held_out_and_test_is_scored_once(tmp_path, idx_dir,
                                                             genotype_file, cache_dir):
  config = tiny_config(idx_dir, genotype_file, cache_dir)
  config.data.validation_examples = 16
  train_idx, val_idx = train.split_train(config, 48)
  np.testing.assert_array_equal(train_idx, np.arange(32))
  np.testing.assert_array_equal(val_idx, np.arange(32, 48))
  result = train.run_train(config, str(tmp_path))
  assert result['val_examples'] == 16 and result['test_examples'] == 20
  assert result['best_val_top1'] >= result['val_top1'] and 'best_test_top1' not in result
  with open(tmp_path / 'metrics.jsonl') as f:
    records = [json.loads(line) for line in f]
  epochs = [r for r in records if r['kind'] == 'epoch']
  assert len(epochs) == 2 and all('val_top1' in r and 'test_top1' not in r for r in epochs)
  (test,) = [r for r in records if r['kind'] == 'test']
  assert test['test_top1'] == result['test_top1'] and test['step'] == 6
  # The exported final model scores the held-out rows as the run reported.
  model = jaxnas.load_model(str(tmp_path), which='last')
  train_set = data.load_dataset(model.config.data, split='train')
  held_out = train.evaluate(jax.jit(train.make_eval_step(model.module)),
                            model.variables['params'], model.variables['batch_stats'],
                            train_set, val_idx, 8)
  assert held_out['top1'] == pytest.approx(result['val_top1'])
  # Reading the finished run back adds no second test line.
  train.run_train(config, str(tmp_path))
  with open(tmp_path / 'metrics.jsonl') as f:
    assert sum(json.loads(line)['kind'] == 'test' for line in f) == 1
  config.data.validation_examples = 48
  with pytest.raises(train.ConfigError, match='data.validation_examples is 48'):
    train.split_train(config, 48)


def run_module(module, *args):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-m', module, *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def test_cli_dry_run_writes_the_summary(tmp_path):
  out = run_module('jaxnas.main', '--config=configs/eval_cifar.py', f'--workdir={tmp_path}',
                   '--dry_run', '--config.genotype=DARTS_V2')
  assert out.returncode == 0, out.stderr
  assert '3.349M params' in out.stdout
  with open(tmp_path / 'summary.json') as f:
    summary = json.load(f)['model']
  assert abs(summary['params'] - 3.349e6) / 3.349e6 < 0.002
  assert genotypes.from_json(summary['genotype']) == genotypes.DARTS_V2
  assert not os.path.exists(tmp_path / 'checkpoints')


def test_cli_dry_run_keeps_a_finished_runs_summary(trained):
  workdir, _ = trained
  with open(os.path.join(workdir, 'summary.json')) as f:
    before = f.read()
  out = run_module('jaxnas.main', '--config=configs/eval_cifar.py', f'--workdir={workdir}',
                   '--dry_run')
  assert out.returncode == 0, out.stderr
  assert 'Left' in out.stdout and '3.635M params' in out.stdout
  with open(os.path.join(workdir, 'summary.json')) as f:
    assert f.read() == before


def test_cli_dry_run_of_a_search_config(tmp_path):
  out = run_module('jaxnas.main', '--config=configs/pcdarts_cifar.py:smoke',
                   f'--workdir={tmp_path}', '--dry_run')
  assert out.returncode == 0, out.stderr
  with open(tmp_path / 'summary.json') as f:
    summary = json.load(f)['model']
  # steps=2: 5 edges per cell; alphas (5, 8) and betas (5,) for normal and reduce cells.
  assert summary['arch_params'] == 2 * (5 * 8 + 5)
  assert summary['params'] > 0 and summary['multiply_adds'] > 0


def test_cli_malformed_genotype_is_one_clear_line(tmp_path):
  d = genotypes.to_json(genotypes.DARTS_V2)
  d['normal'][3] = ['sep_conv_3x3', 4]
  (tmp_path / 'g.json').write_text(json.dumps(d))
  out = run_module('jaxnas.main', '--config=configs/eval_fashion_mnist.py:smoke',
                   f'--workdir={tmp_path}/w', f'--config.genotype={tmp_path}/g.json')
  assert out.returncode == 1 and 'Traceback' not in out.stderr
  lines = [line for line in out.stderr.splitlines() if line.startswith('jaxnas: error')]
  assert len(lines) == 1 and 'g.json' in lines[0] and 'normal[3]' in lines[0]
  assert not os.path.exists(tmp_path / 'w' / 'checkpoints')


def test_cli_evaluate_prints_top1_and_top5(trained, idx_dir):
  workdir, result = trained
  out = run_module('jaxnas.evaluate', f'--model={workdir}', '--which=last',
                   f'--data_dir={idx_dir}')
  assert out.returncode == 0, out.stderr
  assert f'top-1 {100 * result["test_top1"]:.2f}%' in out.stdout
  with open(os.path.join(workdir, 'export', 'last', 'eval_test.json')) as f:
    assert json.load(f)['top5'] == pytest.approx(result['test_top5'])
  missing = run_module('jaxnas.evaluate', f'--model={workdir}/nothing')
  assert missing.returncode == 1 and 'holds no exported model' in missing.stderr


def test_drop_path_rate_is_traced_so_one_program_serves_all_epochs(idx_dir, genotype_file,
                                                                   cache_dir):
  config = tiny_config(idx_dir, genotype_file, cache_dir)
  model = train.build_model(config, TINY_GENOTYPE, 10)
  x = jnp.zeros((2, 28, 28, 1))
  variables = jax.eval_shape(lambda: model.init(
      {'params': jax.random.key(0), 'drop_path': jax.random.key(0)}, x, train=True))
  del variables
  tx = train.make_optimizer(config, 3)
  step = train.make_train_step(model, tx, config, steps_per_epoch=3)
  state = train.create_state(model, (28, 28, 1), tx, seed=0)
  batch = {'image': jnp.zeros((8, 28, 28, 1)), 'label': jnp.zeros((8,), jnp.int32)}
  jitted = jax.jit(step)
  _, m0 = jitted(state, batch)
  _, m1 = jitted(state.replace(step=jnp.int32(4)), batch)
  assert float(m0['drop_rate']) == 0.0 and float(m1['drop_rate']) == pytest.approx(0.1)
  assert jitted._cache_size() == 1


@pytest.mark.parametrize('name', ['eval_cifar', 'eval_imagenet', 'eval_fashion_mnist',
                                  'eval_proxyless_imagenet'])
def test_every_eval_config_and_its_smoke_variant_builds(name):
  import importlib  # pylint: disable=g-import-not-at-top
  module = importlib.import_module(f'configs.{name}')
  for arg in (None, 'smoke'):
    config = module.get_config(arg)
    if name == 'eval_fashion_mnist' and arg is None:
      config.genotype = 'PC_DARTS_cifar'  # its default is the quick search's workdir
    summary = train.model_summary(config, train.validate_config(config))
    assert summary['params'] > 0 and summary['multiply_adds'] > 0
