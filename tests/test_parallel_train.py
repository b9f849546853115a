"""Runs on 8 CPU devices against 1 (a subprocess: tests/parallel_checks.py): one training
step of an evaluation network, AtomNAS's whole one-stage run, FP-NAS's whole search."""

import numpy as np
import pytest

from test_data import write_fashion_mnist
from test_parallel import run_checks

@pytest.fixture(scope='module')
def train_checks(tmp_path_factory):
  idx_dir = tmp_path_factory.mktemp('fmnist_idx_train')
  write_fashion_mnist(str(idx_dir), np.random.default_rng(0), n_train=48, n_test=8)
  return run_checks('train_step', str(idx_dir), str(tmp_path_factory.mktemp('train_runs')))


def test_sharded_training_step_equals_the_one_device_step(train_checks):
  r = train_checks
  assert r['drop_rate'] == pytest.approx(0.25)  # drop path is drawn, so the masks must agree
  # Float32 sums in another order (per device, then across devices) under batch-statistics
  # BN: on an Intel Xeon VM with AVX-512 the largest difference after the step is 1.4e-5
  # (in weights of size 0.2-0.5, spread over many leaves); elsewhere it stayed under 1e-6.
  assert r['params_diff'] < 1e-4
  assert r['batch_stats_diff'] < 1e-5
  np.testing.assert_allclose(r['loss_8'], r['loss_1'], rtol=1e-6)


def test_sharded_atomnas_run_equals_the_one_device_run(train_checks):
  """AtomNAS on 8 devices through its loop (steps, EMA evaluation with recomputed BN
  statistics, shrinks and recompiles): the same architecture and model as on 1."""
  r = train_checks
  assert r['atomnas_8_shrinks'] == r['atomnas_1_shrinks'] >= 2
  assert r['atomnas_8_architecture'] == r['atomnas_1_architecture']
  assert r['atomnas_variables_diff'] < 1e-4
  np.testing.assert_allclose(r['atomnas_8_test_loss'], r['atomnas_1_test_loss'], rtol=1e-4)


def test_sharded_fpnas_search_equals_the_one_device_search(train_checks):
  """FP-NAS through the shared loop on 8 devices: each architecture drawn from its own
  key and scored on the global batch, so the search is the one-device search."""
  r = train_checks
  assert r['fpnas_search_arch_moved'] > 1e-4
  assert r['fpnas_8_genotype'] == r['fpnas_1_genotype']
  assert r['fpnas_8_samples_drawn'] == r['fpnas_1_samples_drawn'] > 0
  # Float sums in another order (per device, then across devices) in the importance
  # weights; Adam divides each logit's step by its gradient's running RMS, so a logit
  # whose gradient is near 0 carries the rounding at full size (9.8e-5 on the Xeon VM,
  # the arch lr being 1e-2).
  assert r['fpnas_search_arch_diff'] < 5e-4
  # The weights follow the importance weights' rounding too: 4.1e-5 apart at most seen.
  np.testing.assert_allclose(r['fpnas_8_arch_split_loss'], r['fpnas_1_arch_split_loss'],
                             rtol=2e-4)
