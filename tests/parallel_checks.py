"""Sharded-vs-unsharded checks on 8 CPU devices, run by test_parallel.py in a subprocess.

The rest of the suite sees one device; the device count is fixed at JAX's first use, so
these checks run in their own process: ``python tests/parallel_checks.py CHECK [ARGS]``.
The last line of stdout is a JSON object of numbers for the test to assert on.
"""

import json
import os
import sys

import jax

jax.config.update('jax_num_cpu_devices', 8)
jax.config.update('jax_platforms', 'cpu')

import jax.numpy as jnp  # noqa: E402  pylint: disable=g-import-not-at-top
import numpy as np  # noqa: E402  pylint: disable=g-import-not-at-top

from jaxnas import checkpoint as ckpt_lib  # noqa: E402  pylint: disable=g-import-not-at-top
from jaxnas import genotypes  # noqa: E402  pylint: disable=g-import-not-at-top
from jaxnas import parallel  # noqa: E402  pylint: disable=g-import-not-at-top
from jaxnas import search  # noqa: E402  pylint: disable=g-import-not-at-top
from jaxnas.ops import native as native_lib  # noqa: E402  pylint: disable=g-import-not-at-top
from jaxnas.ops import primitives as ops  # noqa: E402  pylint: disable=g-import-not-at-top
from test_parallel import bn_reference  # noqa: E402  pylint: disable=g-import-not-at-top
from test_search import tiny_config  # noqa: E402  pylint: disable=g-import-not-at-top

IMAGE = (8, 8, 3)
BATCH = 16  # two rows per device on 8 devices


def max_diff(a, b) -> float:
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def one_step(num_devices, batch_norm, batches, remat=False):
  """State and metrics after one search step (arch + weight phase) on a fresh state."""
  config = tiny_config()
  config.model.remat = remat
  config.optim.arch_warmup_epochs = 0  # the arch phase runs at step 0
  config.parallel.batch_norm = batch_norm
  mesh = parallel.make_mesh(num_devices)
  model = search.build_model(config, 10, mesh.size)
  weight_tx, arch_tx = search.make_optimizers(config, 3)
  state = search.create_state(model, IMAGE, weight_tx, arch_tx, config.seed, mesh)
  step = search.jit_search_step(
      search.make_search_step(model, weight_tx, arch_tx, config, 3), mesh)
  train, val = (parallel.shard_batch(b, mesh) for b in batches)
  assert train['image'].sharding.num_devices == mesh.size
  compiled = step.lower(state, train, val).compile()
  state, metrics = compiled(state, train, val)
  assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(state))
  return (jax.device_get(state), {k: float(v) for k, v in jax.device_get(metrics).items()},
          kernel_batches(compiled.as_text()))


# Which of a native kernel's arrays hold samples (as [*edges, N, H, W, C]): the output
# and then its operands in order. The filters and the weight gradient do not.
_SAMPLED = {native_lib.CONV_TARGET: (True, True, False),
            native_lib.WEIGHT_GRAD_TARGET: (False, True, True)}


def kernel_batches(hlo: str) -> dict:
  """The native kernels' calls in a compiled program, the sample counts their arrays
  hold, and the program's all-gathers."""
  calls = [(t, [out, *operands]) for t, out, operands in native_lib.kernel_calls(hlo)
           if t.startswith('jaxnas_')]
  samples = {dims[-4] for target, arrays in calls
             for dims, sampled in zip(arrays, _SAMPLED.get(target, (True,) * len(arrays)))
             if sampled}
  return {'calls': len(calls), 'samples': sorted(samples),
          'all_gathers': hlo.count('all-gather(')}


def check_step() -> dict:
  rng = np.random.default_rng(0)
  batches = tuple({'image': rng.normal(size=(BATCH,) + IMAGE).astype(np.float32),
                   'label': rng.integers(0, 10, BATCH).astype(np.int32)} for _ in range(2))
  one, m_one, kernels_1 = one_step(1, 'sync', batches)
  eight, m_eight, kernels_8 = one_step(8, 'sync', batches)
  per_device, m_per_device, _ = one_step(8, 'per_device', batches)
  remat, _, _ = one_step(8, 'sync', batches, remat=True)
  out = {
      'devices': jax.device_count(),
      'kernels_1': kernels_1, 'kernels_8': kernels_8,
      'sync_params_diff': max_diff(one.params, eight.params),
      'sync_arch_diff': max_diff(one.arch, eight.arch),
      'sync_batch_stats_diff': max_diff(one.batch_stats, eight.batch_stats),
      'sync_opt_diff': max_diff((one.weight_opt_state, one.arch_opt_state),
                                (eight.weight_opt_state, eight.arch_opt_state)),
      'arch_moved': max_diff(one.arch, jax.tree.map(jnp.zeros_like, one.arch)),
      'loss_1': m_one['train_loss'], 'loss_8': m_eight['train_loss'],
      'val_loss_1': m_one['val_loss'], 'val_loss_8': m_eight['val_loss'],
      'per_device_loss_8': m_per_device['train_loss'],
      'per_device_batch_stats_diff': max_diff(per_device.batch_stats, eight.batch_stats),
      'per_device_params_diff': max_diff(per_device.params, eight.params),
      'remat_params_diff': max_diff(remat.params, one.params),
      'remat_arch_diff': max_diff(remat.arch, one.arch),
      'remat_batch_stats_diff': max_diff(remat.batch_stats, one.batch_stats),
  }

  # One BN layer with per-device statistics, sharded over 8 devices, against the formula.
  x = rng.normal(1.0, 2.0, size=(BATCH, 4, 4, 6)).astype(np.float32)
  mesh = parallel.make_mesh(8)
  rows = parallel.batch_sharding(mesh)
  for groups, name in ((8, 'per_device'), (1, 'sync')):
    bn = ops.BatchNorm(train=True, batch_groups=groups)
    variables = bn.init(jax.random.key(0), x[:1])
    fn = jax.jit(lambda v, x, bn=bn: bn.apply(v, x, mutable=['batch_stats']),
                 in_shardings=(parallel.replicated(mesh), rows))
    y, updates = fn(variables, parallel.shard_batch({'x': x}, mesh)['x'])
    ref_y, ref_mean, ref_var = bn_reference(x, groups)
    out[f'bn_{name}_y_diff'] = max_diff(y, ref_y)
    out[f'bn_{name}_mean_diff'] = max_diff(updates['batch_stats']['mean'], ref_mean)
    out[f'bn_{name}_var_diff'] = max_diff(updates['batch_stats']['var'], ref_var)
    # The normalized output alone: per-device statistics need no cross-device reduction.
    forward = jax.jit(lambda v, x, bn=bn: bn.apply(v, x, mutable=['batch_stats'])[0],
                      in_shardings=(parallel.replicated(mesh), rows), out_shardings=rows)
    hlo = forward.lower(variables, x).compile().as_text()
    out[f'bn_{name}_all_reduces'] = hlo.count('all-reduce(')
  out['bn_per_device_vs_sync_diff'] = max_diff(bn_reference(x, 8)[0], bn_reference(x, 1)[0])
  return out


def search_config(idx_dir, cache_dir, num_devices):
  config = tiny_config()
  config.data.name = 'fashion_mnist'
  config.data.source = 'idx'
  config.data.data_dir = idx_dir
  config.data.max_examples = None
  config.optim.batch_size = 8
  config.optim.epochs = 2
  config.optim.steps_per_epoch = 2
  config.optim.arch_warmup_epochs = 1
  config.checkpoint_every_steps = 1
  # 12 held-out examples in batches of 5, padded to 8 on 4 and 8 devices (masked rows).
  config.eval_batch_size = 5
  config.eval_max_examples = 12
  config.compilation_cache_dir = cache_dir
  # XLA's depthwise convolutions: the native kernels' custom partitioning keeps an
  # 8-device program out of the persistent cache, and the stopped search would compile
  # full_8's program again (the kernels' sharding is check_step's).
  config.model.depthwise_impl = 'xla'
  config.parallel.num_devices = num_devices
  return config


def check_search(idx_dir, workdir) -> dict:
  """Full searches on 8 and 1 devices; a search stopped on 8 restored onto 8, 4 and 1
  devices and resumed on 1."""
  cache = os.path.join(workdir, 'xla_cache')
  run = lambda n, name, **kw: search.run_search(  # noqa: E731
      search_config(idx_dir, cache, n), os.path.join(workdir, name), **kw)
  results = {'full_8': run(8, 'full_8'), 'full_1': run(1, 'full_1')}
  run(8, 'stopped', stop_at_step=3)
  checkpoints = sorted(int(s) for s in os.listdir(os.path.join(workdir, 'stopped',
                                                               'checkpoints')))
  out = {'devices': jax.device_count(), 'checkpoints_before_resume': checkpoints}

  # The latest checkpoint (step 3, written on 8 devices) restored onto 1, 4 and 8.
  config = search_config(idx_dir, cache, 0)
  model = search.build_model(config, 10)
  weight_tx, arch_tx = search.make_optimizers(config, 2)
  template = jax.eval_shape(lambda: search.create_state(model, (28, 28, 1), weight_tx,
                                                        arch_tx, config.seed))
  manager = ckpt_lib.manager(os.path.join(workdir, 'stopped'), 2)
  restored = {}
  for n in (8, 4, 1):
    state, ok = ckpt_lib.restore_latest(manager, template,
                                        parallel.replicated(parallel.make_mesh(n)))
    out[f'restore_{n}_ok'] = ok
    out[f'restore_{n}_step'] = int(state.step)
    out[f'restore_{n}_devices'] = sorted({len(x.sharding.device_set)
                                          for x in jax.tree.leaves(state)})
    restored[n] = jax.device_get(state)
    out[f'restore_{n}_diff'] = max_diff(restored[n], restored[8])
  manager.close()

  results['resumed_on_1'] = run(1, 'stopped')
  arch = {name: dict(np.load(os.path.join(workdir, d, 'arch.npz')))
          for name, d in (('full_8', 'full_8'), ('full_1', 'full_1'),
                          ('resumed_on_1', 'stopped'))}
  out['arch_moved'] = max_diff(arch['full_8'], jax.tree.map(np.zeros_like, arch['full_8']))
  for name, result in results.items():
    out[f'{name}_genotype'] = genotypes.to_json(result['genotype'])
    out[f'{name}_steps'] = result['steps']
    out[f'{name}_arch_diff'] = max_diff(arch[name], arch['full_8'])
    out[f'{name}_arch_split_loss'] = result['arch_split_loss']
  with open(os.path.join(workdir, 'stopped', 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  # Each run writes a 'compile' record at its first step: 0, then 3 for the resumed one.
  out['resumed_on_1_start_steps'] = [r['step'] for r in records if r['kind'] == 'compile']
  out.update(check_unas_search(idx_dir, workdir))
  return out


def check_unas_search(idx_dir, workdir) -> dict:
  """UNAS's whole search (a warm-up epoch, then arch + weight steps, one architecture
  per example, REBAR, gen-gap) through the shared loop on 8 devices and on 1."""
  from test_unas import loop_config as unas_loop_config  # pylint: disable=g-import-not-at-top
  out, arch = {}, {}
  for n in (8, 1):
    config = unas_loop_config(idx_dir, os.path.join(workdir, 'xla_cache'))
    config.data.train_portion = 0.75  # 48 / 16 of the 64 examples: full batches of 8
    config.optim.batch_size = 8
    config.eval_batch_size, config.eval_max_examples = 5, 12
    config.parallel.num_devices = n
    result = search.run_search(config, os.path.join(workdir, f'unas_{n}'))
    arch[n] = dict(np.load(os.path.join(workdir, f'unas_{n}', 'arch.npz')))
    out[f'unas_{n}_genotype'] = genotypes.to_json(result['genotype'])
    out[f'unas_{n}_steps'] = result['steps']
    out[f'unas_{n}_arch_split_loss'] = result['arch_split_loss']
  out['unas_arch_diff'] = max_diff(arch[8], arch[1])
  out['unas_arch_moved'] = max_diff(arch[8], jax.tree.map(np.zeros_like, arch[8]))
  return out


def train_step(num_devices, batch):
  """State and metrics after one training step of an evaluation network (auxiliary
  head, drop path at a non-zero rate) on a fresh state."""
  from jaxnas import base_config  # pylint: disable=g-import-not-at-top
  from jaxnas import train  # pylint: disable=g-import-not-at-top
  config = base_config.train_smoke(base_config.train_config())
  config.model.update(C=4, layers=3, drop_path=0.5)
  config.optim.epochs = 2
  mesh = parallel.make_mesh(num_devices)
  model = train.build_model(config, genotypes.PC_DARTS_cifar, 10)
  tx = train.make_optimizer(config, 1)
  state = train.create_state(model, (32, 32, 3), tx, config.seed, mesh)
  state = state.replace(step=jnp.int32(1))  # epoch 1 of 2: drop rate 0.25
  rep, rows = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  step = jax.jit(train.make_train_step(model, tx, config, 1), in_shardings=(rep, rows),
                 out_shardings=(rep, rep))
  state, metrics = step(state, parallel.shard_batch(batch, mesh))
  return jax.device_get(state), {k: float(v) for k, v in jax.device_get(metrics).items()}


def check_train_step(idx_dir, workdir) -> dict:
  rng = np.random.default_rng(1)
  batch = {'image': rng.normal(size=(BATCH, 32, 32, 3)).astype(np.float32),
           'label': rng.integers(0, 10, BATCH).astype(np.int32)}
  one, m_one = train_step(1, batch)
  eight, m_eight = train_step(8, batch)
  return {'devices': jax.device_count(), 'drop_rate': m_eight['drop_rate'],
          'params_diff': max_diff(one.params, eight.params),
          'batch_stats_diff': max_diff(one.batch_stats, eight.batch_stats),
          'loss_1': m_one['train_total_loss'], 'loss_8': m_eight['train_total_loss'],
          **check_atomnas(idx_dir, workdir), **check_fpnas_search(idx_dir, workdir)}


def check_fpnas_search(idx_dir, workdir) -> dict:
  """FP-NAS's whole search (a warm-up epoch, then K = ceil(H / 4) sampled architectures
  per step, importance-weighted weight and arch steps) through the shared loop on 8
  devices and on 1."""
  from test_fpnas import tiny_config as fpnas_tiny_config  # pylint: disable=g-import-not-at-top
  out, arch = {}, {}
  for n in (8, 1):
    config = fpnas_tiny_config(adaptive=True)
    config.data.update(name='fashion_mnist', source='idx', data_dir=idx_dir,
                       max_examples=None)
    config.optim.update(batch_size=8, epochs=2, steps_per_epoch=3, warmup_epochs=1)
    config.compilation_cache_dir = os.path.join(workdir, 'xla_cache')
    config.parallel.num_devices = n
    result = search.run_search(config, os.path.join(workdir, f'fpnas_{n}'))
    arch[n] = dict(np.load(os.path.join(workdir, f'fpnas_{n}', 'arch.npz')))
    out[f'fpnas_{n}_genotype'] = genotypes.to_json(result['genotype'])
    out[f'fpnas_{n}_samples_drawn'] = result['samples_drawn']
    out[f'fpnas_{n}_arch_split_loss'] = result['arch_split_loss']
  out['fpnas_search_arch_diff'] = max_diff(arch[8], arch[1])
  out['fpnas_search_arch_moved'] = max_diff(arch[8], jax.tree.map(np.zeros_like, arch[8]))
  return out


def check_atomnas(idx_dir, workdir) -> dict:
  """AtomNAS's whole one-stage run (shrinks and recompiles included) on 8 devices and
  on 1: the architectures it ends with and the exported (EMA, shrunk) models."""
  import jaxnas  # pylint: disable=g-import-not-at-top
  from jaxnas.spaces import atomnas as atom_space  # pylint: disable=g-import-not-at-top
  from test_atomnas import run_config  # pylint: disable=g-import-not-at-top
  out, models = {}, {}
  for n in (8, 1):
    config = run_config(idx_dir, os.path.join(workdir, 'xla_cache'))
    config.parallel.num_devices = n
    result = search.run_search(config, os.path.join(workdir, f'atomnas_{n}'))
    out[f'atomnas_{n}_architecture'] = atom_space.to_json(result['architecture'])
    out[f'atomnas_{n}_shrinks'] = len(result['recompiles'])
    out[f'atomnas_{n}_test_loss'] = result['test_loss']
    models[n] = jaxnas.load_model(os.path.join(workdir, f'atomnas_{n}'), 'last').variables
  if out['atomnas_8_architecture'] == out['atomnas_1_architecture']:
    out['atomnas_variables_diff'] = max_diff(models[8], models[1])
  return out


if __name__ == '__main__':
  name, args = sys.argv[1], sys.argv[2:]
  result = {'step': check_step, 'search': check_search,
            'train_step': check_train_step}[name](*args)
  print(json.dumps(result))
