"""The search step, the loop, checkpoints/resume and the user-facing errors."""

import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnas import genotypes
from jaxnas import parallel
from jaxnas import search
from jaxnas.methods import darts as darts_method
from jaxnas.methods import pcdarts
from jaxnas.spaces import darts
from test_data import write_fashion_mnist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Four of the eight ops (one of each kind) keep the compiled programs small; every op is
# checked on its own in test_primitives.py and test_search_space.py.
TINY_PRIMITIVES = ('none', 'max_pool_3x3', 'skip_connect', 'sep_conv_3x3')


def tiny_config(**model):
  """A supernet small enough to compile quickly: 3 cells of 2 nodes, C=4."""
  c = pcdarts.METHOD.apply_variant(pcdarts.get_config(), 'smoke', 'pcdarts')
  c.model.update(dict(C=4, layers=3, steps=2, multiplier=2, k=2,
                      primitives=TINY_PRIMITIVES), **model)
  c.optim.batch_size = 4
  c.eval_batch_size = 8
  c.eval_max_examples = 8
  c.compilation_cache_dir = ''
  return c


def random_batch(rng, n, shape, classes=10):
  return {'image': jnp.asarray(rng.normal(size=(n,) + shape), jnp.float32),
          'label': jnp.asarray(rng.integers(0, classes, n), jnp.int32)}


@pytest.fixture(scope='module')
def phase_setup():
  config = tiny_config()
  model = search.build_model(config, 10)
  weight_tx, arch_tx = search.make_optimizers(config, steps_per_epoch=3)
  state = search.create_state(model, (8, 8, 3), weight_tx, arch_tx, seed=0)
  arch_step, weight_step = darts_method.make_phase_steps(model, weight_tx, arch_tx, config, 3)
  rng = np.random.default_rng(0)
  batches = random_batch(rng, 4, (8, 8, 3)), random_batch(rng, 4, (8, 8, 3))
  return state, jax.jit(arch_step), jax.jit(weight_step), batches


def test_initial_state_is_a_function_of_the_seed_with_independent_arrays():
  config = tiny_config()
  model = search.build_model(config, 10)
  weight_tx, arch_tx = search.make_optimizers(config, steps_per_epoch=3)
  make = lambda seed: search.create_state(model, (8, 8, 3), weight_tx, arch_tx, seed=seed)
  a, again, other = make(0), make(0), make(1)
  chex.assert_trees_all_equal(a.params, again.params)
  chex.assert_trees_all_equal(a.arch, again.arch)
  drawn = [np.std(leaf) > 0 for leaf in jax.tree.leaves(a.params)]  # not BN's ones/zeros
  assert sum(drawn) > 10
  assert all(c for c, d in zip(_changed(a.params, other.params), drawn) if d)
  # Each array draws from its own key: no two arrays of one shape start alike, across
  # cells and across the edges stacked in one array (a vmapped edge group's leading axis).
  arrays = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(a.params):
    leaf, name = np.asarray(leaf), jax.tree_util.keystr(path)
    # At 64+ values, independent draws correlate above 0.6 with odds of about 1e-7.
    if leaf.size >= 64 and np.std(leaf) > 0:
      arrays.setdefault(leaf.shape, []).append((name, leaf.ravel()))
      if 'edges_from' in name and leaf.shape[0] > 1 and leaf[0].size >= 64:
        arrays.setdefault(('edge',) + leaf.shape[1:], []).extend(
            (f'{name}[{e}]', part.ravel()) for e, part in enumerate(leaf))
  pairs = 0
  for group in arrays.values():
    for i, (name_i, x) in enumerate(group):
      for name_j, y in group[i + 1:]:
        assert abs(np.corrcoef(x, y)[0, 1]) < 0.6, (name_i, name_j)
        pairs += 1
  assert pairs > 10


def _changed(a, b):
  return [not np.allclose(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]


def test_weight_step_leaves_arch_params_unchanged(phase_setup):
  state, _, weight_step, (train, _) = phase_setup
  new, metrics = weight_step(state, train, jax.random.PRNGKey(1))
  chex.assert_trees_all_equal(new.arch, state.arch)
  chex.assert_trees_all_equal(new.arch_opt_state, state.arch_opt_state)
  assert all(_changed(new.params, state.params)), 'every weight should move'
  assert np.isfinite(metrics['train_loss'])


def test_arch_step_leaves_weights_unchanged(phase_setup):
  state, arch_step, _, (train, val) = phase_setup
  new, loss, _ = arch_step(state, train, val, (jax.random.PRNGKey(1), jax.random.PRNGKey(2)))
  chex.assert_trees_all_equal(new.params, state.params)
  chex.assert_trees_all_equal(new.weight_opt_state, state.weight_opt_state)
  assert all(_changed(new.arch, state.arch)), 'alphas and betas should move'
  assert np.isfinite(loss)


def test_compiled_search_step_equals_the_jitted_step():
  # compile_search_step's step (the arch and weight phases as two executables, compiled
  # side by side or one at a time, with the CPU compiler options) must give, over two
  # steps, the state and metrics of the step jitted as one function with XLA's default
  # options (warm-up 1 step: a skipped, then a run arch phase).
  config = tiny_config()
  config.optim.arch_warmup_epochs = 1
  model = search.build_model(config, 10)
  weight_tx, arch_tx = search.make_optimizers(config, steps_per_epoch=1)
  mesh = parallel.make_mesh(1)
  fresh = lambda: search.create_state(model, (8, 8, 3), weight_tx, arch_tx, seed=0,  # noqa: E731
                                      mesh=mesh)
  rng = np.random.default_rng(0)
  batches = [(random_batch(rng, 4, (8, 8, 3)), random_batch(rng, 4, (8, 8, 3)))
             for _ in range(2)]
  rep, rows = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  steps = {'default': jax.jit(search.make_search_step(model, weight_tx, arch_tx, config, 1),
                              in_shardings=(rep, rows, rows), out_shardings=(rep, rep))}
  for mode in ('concurrent', 'sequential'):
    config.compile_mode = mode
    steps[mode], = search.compile_search_step(model, weight_tx, arch_tx, config, 1, mesh,
                                              fresh(), *batches[0])
    assert len(steps[mode].phases) == 2
  runs = {}
  for name, step in steps.items():
    state, history = fresh(), []
    for train, val in batches:
      state, metrics = step(state, train, val)
      history.append(jax.device_get(metrics))
    runs[name] = (jax.device_get(state), history)
  state_one, history_one = runs['default']
  for mode in ('concurrent', 'sequential'):
    state_two, history_two = runs[mode]
    assert np.isnan(history_two[0]['val_loss']) and np.isfinite(history_two[1]['val_loss'])
    assert int(state_two.step) == 2
    assert all(_changed(state_two.arch, fresh().arch)), 'the second arch phase ran'
    chex.assert_trees_all_close(state_two, state_one, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(history_two, history_one, rtol=1e-5, atol=1e-6)


def test_second_order_hypergradient_matches_finite_differences():
  """d/d(alpha) L_val(w - lr*(mu*m + dL_train/dw + wd*w), alpha), checked along a random
  direction with central differences in float64."""
  with jax.enable_x64(True):
    model = darts.SearchNetwork(num_classes=3, C=2, layers=1, steps=2, multiplier=2, k=1,
                                primitives=TINY_PRIMITIVES, impl='xla')
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 4, 4, 1)))
    variables = model.init({'params': jax.random.PRNGKey(0)}, x, train=True)
    params = jax.tree.map(lambda a: a.astype(jnp.float64), variables['params'])
    arch = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape)), variables['arch'])
    buffer = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape)) * 0.1, params)
    train = {'image': x, 'label': jnp.array([0, 2])}
    val = {'image': jnp.asarray(rng.normal(size=(2, 4, 4, 1))), 'label': jnp.array([1, 0])}
    bs = variables['batch_stats']
    keys = (jax.random.PRNGKey(1), jax.random.PRNGKey(2))
    loss_fn = lambda *a: darts_method.loss_fn(model, *a)  # noqa: E731
    hyper = lambda a: darts_method.unrolled_arch_grad(  # noqa: E731
        loss_fn, params, a, bs, train, val, buffer, 0.5, 0.9, 3e-4, keys)
    hyper = jax.jit(hyper)  # one program serves the gradient and the differences
    (_, _), grad = hyper(arch)
    direction = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape)), arch)
    eps = 1e-5
    plus = hyper(jax.tree.map(lambda a, d: a + eps * d, arch, direction))[0][0]
    minus = hyper(jax.tree.map(lambda a, d: a - eps * d, arch, direction))[0][0]
    numeric = (plus - minus) / (2 * eps)
    analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grad),
                                                   jax.tree.leaves(direction)))
    assert abs(float(analytic)) > 1e-4, 'the hypergradient should not vanish here'
    np.testing.assert_allclose(float(analytic), float(numeric), rtol=1e-6)
    # The unrolled term matters: the first-order gradient differs.
    first = jax.grad(lambda a: loss_fn(params, a, bs, val, keys[1])[0])(arch)
    first_dir = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(first),
                                                    jax.tree.leaves(direction)))
    assert abs(float(first_dir) - float(analytic)) > 1e-6


# ------------------------------------------------------------------ end to end


@pytest.fixture(scope='module')
def idx_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp('fmnist_idx')
  write_fashion_mnist(str(directory), np.random.default_rng(0), n_train=64, n_test=8)
  return str(directory)


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('xla_cache'))


def idx_config(idx_dir, cache_dir):
  c = tiny_config()
  c.data.name = 'fashion_mnist'
  c.data.source = 'idx'
  c.data.data_dir = idx_dir
  c.data.max_examples = None
  c.optim.epochs = 2
  c.optim.steps_per_epoch = 3
  c.optim.arch_warmup_epochs = 1
  c.checkpoint_every_steps = 2
  c.compilation_cache_dir = cache_dir
  return c


def test_search_end_to_end_on_idx_files(tmp_path, idx_dir, cache_dir):
  workdir = str(tmp_path / 'run')
  result = search.run_search(idx_config(idx_dir, cache_dir), workdir)
  for name in ('config.json', 'metrics.jsonl', 'genotypes.jsonl', 'genotype.json', 'arch.npz',
               'cells.svg', 'cells.png', 'summary.json'):
    assert os.path.exists(os.path.join(workdir, name)), name
  assert os.listdir(os.path.join(workdir, 'tb'))
  loaded = genotypes.load(workdir)
  assert loaded == genotypes.validate(result['genotype'])
  with open(os.path.join(workdir, 'genotypes.jsonl')) as f:
    epochs = [json.loads(line) for line in f]
  assert [e['epoch'] for e in epochs] == [1, 2]
  # The arch params moved only in epoch 2 (warm-up of one epoch), and match arch.npz.
  arch = np.load(os.path.join(workdir, 'arch.npz'))
  np.testing.assert_allclose(arch['alphas_normal'], epochs[-1]['alphas_normal'], rtol=1e-6)
  assert not np.allclose(epochs[0]['alphas_normal'], epochs[1]['alphas_normal'])
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  kinds = {r['kind'] for r in records}
  assert {'compile', 'train', 'epoch'} <= kinds
  assert all(np.isfinite(r['train_loss']) for r in records if r['kind'] == 'train')
  assert 0.0 <= result['arch_split_acc'] <= 1.0


def test_resume_gives_the_same_search(tmp_path, idx_dir, cache_dir):
  config = idx_config(idx_dir, cache_dir)
  full = search.run_search(config, str(tmp_path / 'full'))
  interrupted = str(tmp_path / 'interrupted')
  # Killed after step 5: the last checkpoint is step 4, so step 5 is redone on resume.
  assert search.run_search(config, interrupted, stop_at_step=5) == {'stopped_at_step': 5}
  assert sorted(os.listdir(os.path.join(interrupted, 'checkpoints'))) == ['3', '4']
  resumed = search.run_search(config, interrupted)
  assert resumed['genotype'] == full['genotype']
  a = np.load(os.path.join(tmp_path / 'full', 'arch.npz'))
  b = np.load(os.path.join(interrupted, 'arch.npz'))
  for name in a.files:
    np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-7)


def test_search_end_to_end_on_tfds_mock_data(tmp_path, cache_dir):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  c = tiny_config()
  c.data.name = 'cifar10'
  c.data.source = 'tfds'
  c.data.max_examples = None
  c.optim.epochs = 1
  c.optim.arch_warmup_epochs = 0
  c.compilation_cache_dir = cache_dir
  with tfds.testing.mock_data(num_examples=32, policy=tfds.testing.MockPolicy.USE_CODE):
    result = search.run_search(c, str(tmp_path / 'run'))
  assert result['steps'] == 3 and result['dataset'] == 'cifar10'
  assert np.isfinite(result['arch_split_loss'])
  genotypes.load(str(tmp_path / 'run'))


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize('field, value, words', [
    ('model.k', 3, 'model.k'),
    ('optim.epochs', 0, 'optim.epochs'),
    ('optim.batch_size', -8, 'optim.batch_size'),
    ('model.channel_sampling', 'mask', 'model.channel_sampling'),
    ('data.train_portion', 1.5, 'data.train_portion'),
    ('optim.order', 3, 'optim.order'),
    ('compile_mode', 'fast', 'compile_mode'),
])
def test_bad_config_fields_are_named(field, value, words):
  c = tiny_config()
  *sections, name = field.split('.')
  target = c
  for section in sections:
    target = target[section]
  target[name] = value
  with pytest.raises(search.ConfigError, match=words.replace('.', r'\.')):
    search.validate_config(c)


def test_batch_not_divisible_by_devices(monkeypatch):
  monkeypatch.setattr(jax, 'device_count', lambda: 8)
  c = tiny_config()
  c.optim.batch_size = 12
  with pytest.raises(search.ConfigError, match=r'optim\.batch_size = 12 .* 8 devices'):
    search.validate_config(c)


def test_workdir_of_another_search_is_refused(tmp_path, idx_dir, cache_dir):
  config = idx_config(idx_dir, cache_dir)
  search.run_search(config, str(tmp_path), stop_at_step=0)
  config.model.C = 8
  with pytest.raises(ValueError, match=r'model\.C'):
    search.run_search(config, str(tmp_path))


def run_main(*args):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-m', 'jaxnas.main', *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120)


def test_cli_unknown_field_fails_at_parsing(tmp_path):
  out = run_main('--config=configs/pcdarts_fashion_mnist.py:smoke', f'--workdir={tmp_path}',
                 '--config.optim.lr=0.1')
  assert out.returncode != 0
  assert 'lr' in out.stderr and 'Traceback' not in out.stderr


def test_cli_missing_dataset_is_one_clear_line(tmp_path):
  out = run_main('--config=configs/pcdarts_fashion_mnist.py:smoke', f'--workdir={tmp_path}',
                 '--config.data.source=idx', f'--config.data.data_dir={tmp_path}/nowhere')
  assert out.returncode == 1
  assert 'Traceback' not in out.stderr
  lines = [line for line in out.stderr.splitlines() if line.startswith('jaxnas: error')]
  assert len(lines) == 1 and 'fashion_mnist' in lines[0] and 'nowhere' in lines[0]
  assert not os.path.exists(tmp_path / 'checkpoints')


def test_cli_bad_k_is_one_clear_line(tmp_path):
  out = run_main('--config=configs/pcdarts_cifar.py:smoke', f'--workdir={tmp_path}',
                 '--config.model.k=3')
  assert out.returncode == 1 and 'Traceback' not in out.stderr
  assert 'config.model.k = 3 must divide' in out.stderr


def test_non_finite_loss_stops_with_the_last_good_checkpoint(tmp_path, idx_dir, cache_dir,
                                                            monkeypatch):
  from jaxnas import checkpoint as ckpt_lib
  from jaxnas import data as data_lib
  batch = data_lib.SearchBatches.batch

  def poisoned(self, step):  # the batch of loop step 5 holds a NaN pixel
    train, val = batch(self, step)
    if step == 4:
      train['image'][0, 0, 0, 0] = np.nan
    return train, val

  monkeypatch.setattr(data_lib.SearchBatches, 'batch', poisoned)
  config = idx_config(idx_dir, cache_dir)
  config.checkpoint_every_steps = 1
  with pytest.raises(search.NonFiniteLossError, match='at step 5; .*last good state'):
    search.run_search(config, str(tmp_path))
  manager = ckpt_lib.manager(str(tmp_path), 2)
  assert manager.latest_step() == 4
  model = search.build_model(config, 10)
  weight_tx, arch_tx = search.make_optimizers(config, 3)
  state = search.create_state(model, (28, 28, 1), weight_tx, arch_tx, config.seed)
  restored, ok = ckpt_lib.restore_latest(manager, state)
  assert ok and int(restored.step) == 4
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(restored.params))


def test_cli_missing_config_file_is_one_clear_line(tmp_path):
  out = run_main('--config=configs/no_such_config.py', f'--workdir={tmp_path}')
  assert out.returncode == 1 and 'Traceback' not in out.stderr
  assert 'no_such_config.py' in out.stderr


def test_reference_configs_run_the_reference_learning_rate_timing():
  """PC-DARTS's train_search.py calls scheduler.step() at the top of each epoch, so
  epoch e trains at eta(e + 1): 0.099901 at epoch 0 and 0 at epoch 49 of 50 (lr 0.1,
  min 0); the ImageNet search warms up at eta(e + 1) (e + 1) / 5."""
  from configs import pcdarts_cifar, pcdarts_imagenet  # pylint: disable=g-import-not-at-top
  config = pcdarts_cifar.get_config()
  assert config.optim.lr_timing == 'reference'
  schedule = darts_method.lr_schedule(config, steps_per_epoch=7)
  lrs = np.array([float(schedule(jnp.int32(7 * e + 6))) for e in range(50)])
  eta = lambda e, top: top * 0.5 * (1 + np.cos(np.pi * e / 50))  # noqa: E731
  np.testing.assert_allclose(lrs, [eta(e + 1, 0.1) for e in range(50)], rtol=1e-5, atol=1e-9)
  np.testing.assert_allclose(lrs[[0, 49]], [0.099901, 0.0], atol=1e-6)
  config.optim.lr_timing = 'jaxnas'
  schedule = darts_method.lr_schedule(config, steps_per_epoch=7)
  np.testing.assert_allclose([float(schedule(jnp.int32(7 * e))) for e in (0, 49)],
                             [0.1, eta(49, 0.1)], rtol=1e-5)
  config = pcdarts_imagenet.get_config()
  top, warm = config.optim.learning_rate, config.optim.warmup_epochs
  schedule = darts_method.lr_schedule(config, steps_per_epoch=7)
  np.testing.assert_allclose(
      [float(schedule(jnp.int32(7 * e))) for e in range(8)],
      [eta(e + 1, top) * ((e + 1) / warm if e < warm else 1) for e in range(8)], rtol=1e-5)
  config.optim.lr_timing = 'nope'
  with pytest.raises(search.ConfigError, match='config.optim.lr_timing'):
    search.validate_config(config)


def test_a_workdir_in_use_by_another_run_is_refused_in_one_line(tmp_path):
  """Another process holds the workdir's lock: the CLI stops in one line naming it,
  before writing anything; once that process has ended (here: killed) the lock is free."""
  workdir = str(tmp_path / 'run')
  os.makedirs(workdir)
  holder = subprocess.Popen(
      [sys.executable, '-c', 'import sys, time; from jaxnas import checkpoint; '
       'checkpoint.lock_workdir(sys.argv[1]); print("locked", flush=True); time.sleep(120)',
       workdir], cwd=REPO, env=dict(os.environ, JAX_PLATFORMS='cpu'), stdout=subprocess.PIPE,
      text=True)
  try:
    assert holder.stdout.readline().strip() == 'locked'
    out = run_main('--config=configs/pcdarts_fashion_mnist.py:smoke', f'--workdir={workdir}')
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and 'Traceback' not in out.stderr, out.stderr
    assert f'is in use by process {holder.pid} on' in lines[0] and '--workdir' in lines[0]
    assert sorted(os.listdir(workdir)) == ['.lock-0']  # nothing written
  finally:
    holder.kill()
    holder.wait()
  from jaxnas import checkpoint  # pylint: disable=g-import-not-at-top
  checkpoint.lock_workdir(workdir)  # free again after the holder's end


def run_until_signal(args, env, marker, prefix, signum):
  """Runs the command ``args`` from the repository root; sends ``signum`` at the first
  stdout line that starts with ``prefix``, at or after the first line holding ``marker``.
  Returns (exit code, stdout, stderr)."""
  proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  lines, seen = [], False
  for line in proc.stdout:
    lines.append(line)
    seen = seen or marker in line
    if seen and line.startswith(prefix):
      proc.send_signal(signum)
      break
  out, err = proc.communicate(timeout=300)
  return proc.returncode, ''.join(lines) + out, err


def test_sigterm_and_ctrl_c_stop_with_a_checkpoint_and_say_how_to_resume(tmp_path):
  """SIGTERM after a few steps: the run checkpoints the step it finished and exits 143
  with a message; the same command resumes from that step, and Ctrl-C (SIGINT) there
  stops it the same way (exit 130)."""
  import signal  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / 'run')
  args = [sys.executable, '-m', 'jaxnas.main', '--config=configs/pcdarts_fashion_mnist.py:smoke',
          f'--workdir={workdir}', '--config.optim.epochs=40', '--config.checkpoint_every_steps=50',
          '--config.model.C=4', '--config.model.layers=3',  # small programs: quick to compile
          f'--config.compilation_cache_dir={tmp_path / "cache"}']

  env = dict(os.environ, JAX_PLATFORMS='cpu')

  def run_until(marker, signum):
    return run_until_signal(args, env, marker, 'epoch ', signum)

  code, out, err = run_until('step 1/3', signal.SIGTERM)
  assert code == 128 + signal.SIGTERM, err[-2000:]
  assert 'SIGTERM received' in err and 'Traceback' not in err
  stopped = [line for line in out.splitlines() if line.startswith('Stopped by SIGTERM')]
  assert len(stopped) == 1 and 'Run the same command to resume' in stopped[0]
  step = int(stopped[0].split('after step ')[1].split(';')[0])
  assert step >= 1 and step % 50  # not a regular checkpoint step: saved for the stop
  assert str(step) in os.listdir(os.path.join(workdir, 'checkpoints'))

  code, out, err = run_until(f'Resuming from step {step}', signal.SIGINT)
  assert code == 128 + signal.SIGINT, err[-2000:]
  assert 'Stopped by SIGINT after step' in out and 'Traceback' not in err


def test_an_epoch_record_keeps_the_description_and_the_arch_params_apart():
  """genotypes.jsonl: the description beside the arch params, or under 'architecture'
  where a name is in both (UNAS's ProxylessNAS space calls both 'ops')."""
  record = search.epoch_record(2, 6, {'ops': ['mb3_k3', 'zero']}, {'ops': np.zeros((2, 3))})
  assert record == {'epoch': 2, 'step': 6, 'architecture': {'ops': ['mb3_k3', 'zero']},
                    'ops': [[0.0] * 3] * 2}
  record = search.epoch_record(1, 3, {'normal': [['skip_connect', 0]]},
                               {'alphas_normal': np.ones((1, 2))})
  assert record == {'epoch': 1, 'step': 3, 'normal': [['skip_connect', 0]],
                    'alphas_normal': [[1.0, 1.0]]}
