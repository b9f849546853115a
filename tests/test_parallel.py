"""Sharded search: the mesh helpers, per-device BatchNorm, and sharded == unsharded.

The in-process tests see the suite's single CPU device. The sharded checks need 8
devices, which JAX fixes at first use, so they run in a subprocess
(tests/parallel_checks.py) and these tests assert on the numbers it prints.
"""

import json
import os
import subprocess
import sys

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnas import checkpoint as ckpt_lib
from jaxnas import common
from jaxnas import parallel
from jaxnas import search
from jaxnas.ops import primitives as ops
from test_search import tiny_config

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)


def bn_reference(x, groups, grouped=False, momentum=0.1, eps=1e-5):
  """BatchNorm with statistics per slice of B/groups rows, by hand in float64; with
  ``grouped`` the leading axis holds independent BNs (each recursed on).

  Returns (output, running mean, running var) after one update from mean 0, var 1.
  """
  if grouped:
    parts = [bn_reference(g, groups, False, momentum, eps) for g in x]
    return tuple(np.stack(t) for t in zip(*parts))
  x = np.asarray(x, np.float64)
  feat = x.shape[-1:]
  xg = x.reshape((groups, -1) + x.shape[1:])
  axes = tuple(range(1, xg.ndim - 1))
  mean = xg.mean(axes, keepdims=True)
  var = xg.var(axes, keepdims=True)
  y = ((xg - mean) / np.sqrt(var + eps)).reshape(x.shape)
  n = np.prod([xg.shape[a] for a in axes])
  ra_mean = momentum * mean.reshape(groups, -1).mean(0).reshape(feat)
  ra_var = (1 - momentum) + momentum * (var.reshape(groups, -1) * n / (n - 1)).mean(0)
  return y, ra_mean, ra_var.reshape(feat)


# ------------------------------------------------------------------ helpers, one device


def test_make_mesh_spans_the_devices_on_the_data_axis():
  mesh = parallel.make_mesh()
  assert mesh.axis_names == (parallel.DATA_AXIS,) == ('data',)
  assert mesh.size == jax.device_count() == parallel.make_mesh(0).size
  assert list(mesh.devices.flat) == jax.devices()
  assert parallel.make_mesh(1).size == 1
  with pytest.raises(ValueError, match='num_devices'):
    parallel.make_mesh(jax.device_count() + 1)


def test_shard_batch_and_replicate_keep_values_and_set_shardings():
  mesh = parallel.make_mesh()
  rng = np.random.default_rng(0)
  batch = {'image': rng.normal(size=(4, 3, 3, 2)).astype(np.float32),
           'label': np.arange(4, dtype=np.int32)}
  sharded = parallel.shard_batch(batch, mesh)
  for name, x in sharded.items():
    assert isinstance(x, jax.Array)
    assert x.sharding == parallel.batch_sharding(mesh)
    assert x.sharding.spec == jax.sharding.PartitionSpec('data')
    np.testing.assert_array_equal(np.asarray(x), batch[name])
  tree = {'w': jnp.arange(6.0).reshape(2, 3), 'step': jnp.zeros((), jnp.int32)}
  replicated = parallel.replicate(tree, mesh)
  chex.assert_trees_all_equal(replicated, tree)
  assert all(x.sharding == parallel.replicated(mesh) for x in jax.tree.leaves(replicated))
  assert parallel.replicated(mesh).spec == jax.sharding.PartitionSpec()


@pytest.mark.parametrize('batch, devices, padded', [(8, 8, 8), (5, 8, 8), (9, 8, 16),
                                                    (5, 1, 5), (500, 3, 501)])
def test_padded_batch_size(batch, devices, padded):
  assert parallel.padded_batch_size(batch, devices) == padded


def test_distributed_initialize_only_when_multi_host(monkeypatch):
  """multi_host=True joins the job: with the cluster's values (None: detected), or with
  the config's coordinator, process count and id; a process id out of range is the
  config's error."""
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda **kw: calls.append(kw))
  monkeypatch.setattr(jax.distributed, 'is_initialized', lambda: False)
  config = tiny_config()
  parallel.maybe_initialize_distributed(config)
  assert not calls
  config.parallel.multi_host = True
  parallel.maybe_initialize_distributed(config)
  assert calls == [dict(coordinator_address=None, num_processes=None, process_id=None)]
  config.parallel.update(coordinator_address='10.0.0.1:1234', num_processes=2, process_id=1)
  parallel.maybe_initialize_distributed(config)
  assert calls[-1] == dict(coordinator_address='10.0.0.1:1234', num_processes=2,
                           process_id=1)
  config.parallel.process_id = 2
  with pytest.raises(search.ConfigError, match=r'config.parallel.process_id = 2 must lie in '
                     r'\[0, parallel.num_processes = 2\)'):
    parallel.maybe_initialize_distributed(config, common.config_fail)
  assert len(calls) == 2


@pytest.mark.parametrize('cpus, user_flags, expected', [
    (2, '', '--xla_cpu_parallel_codegen_split_count=1 --xla_gpu_enable_triton_gemm=false'),
    (16, '', '--xla_gpu_enable_triton_gemm=false'),
    (2, '--xla_gpu_enable_triton_gemm=true --xla_cpu_parallel_codegen_split_count=4',
     '--xla_gpu_enable_triton_gemm=true --xla_cpu_parallel_codegen_split_count=4'),
])
def test_compilation_flags_are_added_unless_the_user_set_them(monkeypatch, cpus, user_flags,
                                                              expected):
  import jaxnas  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(os, 'cpu_count', lambda: cpus)
  monkeypatch.setenv('XLA_FLAGS', user_flags)
  jaxnas._tune_compilation()  # pylint: disable=protected-access
  assert os.environ['XLA_FLAGS'] == expected

@pytest.mark.parametrize('groups, grouped', [(1, False), (4, False), (2, True)])
def test_batch_norm_per_group_statistics_match_the_formula(groups, grouped):
  x = np.random.default_rng(groups).normal(1.0, 2.0, size=(2, 8, 3, 3, 5)).astype(np.float32)
  if not grouped:
    x = x.reshape(16, 3, 3, 5)
  bn = ops.BatchNorm(train=True, grouped=grouped, batch_groups=groups)
  variables = bn.init(jax.random.key(0), x[:, :1] if grouped else x[:1])
  y, updates = bn.apply(variables, x, mutable=['batch_stats'])
  ref_y, ref_mean, ref_var = bn_reference(x, groups, grouped)
  np.testing.assert_allclose(y, ref_y, atol=2e-5)
  np.testing.assert_allclose(updates['batch_stats']['mean'], ref_mean, atol=1e-6)
  np.testing.assert_allclose(updates['batch_stats']['var'], ref_var, rtol=1e-5)
  if groups > 1:  # the grouping changes the output
    assert np.abs(ref_y - bn_reference(x, 1, grouped)[0]).max() > 0.1


def test_batch_norm_groups_must_divide_the_batch():
  bn = ops.BatchNorm(train=True, batch_groups=3)
  x = jnp.ones((4, 2))
  variables = bn.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match='divisible by 3'):
    bn.apply(variables, x, mutable=['batch_stats'])


def test_per_device_batch_norm_reaches_every_batch_norm_of_the_supernet():
  config = tiny_config()
  config.parallel.batch_norm = 'per_device'
  model = search.build_model(config, 10, num_devices=4)
  assert model.bn_groups == 4
  config.parallel.batch_norm = 'sync'
  assert search.build_model(config, 10, num_devices=4).bn_groups == 1
  # Every BatchNorm the supernet builds carries the group count.
  seen = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, ops.BatchNorm) and context.method_name == '__call__':
      seen.append(context.module.batch_groups)
    return next_fun(*args, **kwargs)

  x = jnp.zeros((4, 8, 8, 3))
  with nn.intercept_methods(record):
    jax.eval_shape(lambda: model.init({'params': jax.random.key(0)}, x, train=True))
  assert len(seen) > 20 and set(seen) == {4}


@pytest.mark.parametrize('field, value, words', [
    ('batch_norm', 'ghost', r'parallel\.batch_norm'),
    ('num_devices', -1, r'parallel\.num_devices'),
    ('num_devices', 2, r'parallel\.num_devices = 2 must lie in \[0, 1\]'),
])
def test_bad_parallel_fields_are_named(field, value, words):
  c = tiny_config()
  c.parallel[field] = value
  with pytest.raises(search.ConfigError, match=words):
    search.validate_config(c)


def test_batch_size_must_divide_by_the_devices_in_use(monkeypatch):
  monkeypatch.setattr(jax, 'device_count', lambda: 8)
  c = tiny_config()
  c.optim.batch_size = 12
  c.parallel.num_devices = 4
  search.validate_config(c)  # 12 rows split over 4 of the 8 devices
  c.parallel.num_devices = 8
  with pytest.raises(search.ConfigError, match=r'optim\.batch_size = 12 .* 8 devices in use'):
    search.validate_config(c)


def test_a_search_resumes_on_another_device_count_but_not_another_bn_mode(tmp_path):
  config = tiny_config()
  ckpt_lib.write_config(str(tmp_path), config)
  config.parallel.num_devices = 4
  ckpt_lib.check_workdir_config(str(tmp_path), config)
  config.parallel.batch_norm = 'per_device'
  with pytest.raises(ckpt_lib.WorkdirError, match=r'parallel\.batch_norm'):
    ckpt_lib.check_workdir_config(str(tmp_path), config)


# ------------------------------------------------------------------ 8 devices, subprocess


def run_checks(*args) -> dict:
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=os.pathsep.join(
      [REPO, TESTS, os.environ.get('PYTHONPATH', '')]))
  out = subprocess.run([sys.executable, os.path.join(TESTS, 'parallel_checks.py'), *args],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result['devices'] == 8
  return result


@pytest.fixture(scope='module')
def step_checks():
  return run_checks('step')


def test_sharded_step_equals_the_one_device_step(step_checks):
  r = step_checks
  assert r['arch_moved'] > 1e-3  # the arch phase ran, so its equality means something
  assert r['sync_params_diff'] < 1e-6
  assert r['sync_arch_diff'] < 1e-8
  assert r['sync_batch_stats_diff'] < 1e-5
  assert r['sync_opt_diff'] < 1e-5
  np.testing.assert_allclose(r['loss_8'], r['loss_1'], rtol=1e-6)
  # Rematerialized cells, sharded: the same step as plain autodiff on one device.
  assert r['remat_params_diff'] < 1e-6
  assert r['remat_arch_diff'] < 1e-7
  assert r['remat_batch_stats_diff'] < 1e-5
  np.testing.assert_allclose(r['val_loss_8'], r['val_loss_1'], rtol=1e-6)


def test_native_kernels_run_on_each_devices_own_samples(step_checks):
  # The program's convs and pools are the native kernels; sharded over 8 devices each
  # call sees its device's 2 of the 16 samples, and nothing is gathered across devices
  # (without a partitioning rule XLA gathered the batch and every device ran it whole).
  one, eight = step_checks['kernels_1'], step_checks['kernels_8']
  assert one['calls'] == eight['calls'] > 50
  assert one['samples'] == [16]
  assert eight['samples'] == [2]
  assert eight['all_gathers'] == 0


def test_per_device_batch_norm_differs_from_sync(step_checks):
  r = step_checks
  assert abs(r['per_device_loss_8'] - r['loss_8']) > 1e-3
  assert r['per_device_batch_stats_diff'] > 1e-3
  assert r['per_device_params_diff'] > 1e-3


def test_sharded_batch_norm_layer_matches_the_formula(step_checks):
  r = step_checks
  assert r['bn_per_device_vs_sync_diff'] > 0.1  # the two references differ
  for mode in ('per_device', 'sync'):
    assert r[f'bn_{mode}_y_diff'] < 2e-5
    assert r[f'bn_{mode}_mean_diff'] < 1e-6
    assert r[f'bn_{mode}_var_diff'] < 1e-5
  # Per-device statistics stay on each device; the global ones need a reduction.
  assert r['bn_per_device_all_reduces'] == 0
  assert r['bn_sync_all_reduces'] >= 1


def test_cpu_compiler_options_apply_and_fall_back_when_unknown(monkeypatch):
  mesh = parallel.make_mesh()
  assert parallel.compiler_options(mesh) == parallel.CPU_COMPILER_OPTIONS
  # A jaxlib that does not know an option gets none rather than a compile error.
  monkeypatch.setattr(parallel, 'CPU_COMPILER_OPTIONS', {'xla_no_such_option': 'x'})
  parallel._cpu_options_supported.cache_clear()
  try:
    assert parallel.compiler_options(mesh) == {}
  finally:
    parallel._cpu_options_supported.cache_clear()
