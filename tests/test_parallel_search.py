"""Whole searches on 8 CPU devices against 1 (a subprocess: tests/parallel_checks.py),
and a checkpoint written on 8 devices restored on 1 and 4."""

import numpy as np
import pytest

from test_data import write_fashion_mnist
from test_parallel import run_checks

@pytest.fixture(scope='module')
def search_checks(tmp_path_factory):
  idx_dir = tmp_path_factory.mktemp('fmnist_idx')
  write_fashion_mnist(str(idx_dir), np.random.default_rng(0), n_train=64, n_test=8)
  return run_checks('search', str(idx_dir), str(tmp_path_factory.mktemp('runs')))


def test_sharded_search_finds_the_unsharded_genotype(search_checks):
  r = search_checks
  assert r['full_8_steps'] == r['full_1_steps'] == 4
  assert r['full_8_genotype'] == r['full_1_genotype']
  assert r['arch_moved'] > 1e-3
  # Adam's first steps are about lr * sign(gradient) (6e-4 here), which magnifies float
  # noise in near-zero gradients; a real difference (other BN statistics, other batches)
  # moves the arch params by whole steps.
  assert r['full_1_arch_diff'] < 1e-4
  # The held-out loss: 12 examples in masked, padded batches of 8 (sharded) or 5 (not).
  np.testing.assert_allclose(r['full_8_arch_split_loss'], r['full_1_arch_split_loss'],
                             rtol=1e-5)


def test_sharded_unas_search_finds_the_unsharded_architecture(search_checks):
  """UNAS draws one architecture per example of the global batch: on 8 devices each
  device scores its rows' samples, and the whole search (warm-up, arch and weight
  steps, held-out loss) is the one-device search."""
  r = search_checks
  assert r['unas_8_steps'] == r['unas_1_steps'] == 6
  assert r['unas_8_genotype'] == r['unas_1_genotype']
  assert r['unas_arch_moved'] > 1e-3
  assert r['unas_arch_diff'] < 1e-4  # float noise, magnified by Adam as above
  np.testing.assert_allclose(r['unas_8_arch_split_loss'], r['unas_1_arch_split_loss'],
                             rtol=1e-5)


def test_checkpoint_written_on_8_devices_restores_on_1_and_4(search_checks):
  r = search_checks
  assert r['checkpoints_before_resume'] == [2, 3]
  for n in (1, 4, 8):
    assert r[f'restore_{n}_ok'] and r[f'restore_{n}_step'] == 3
    assert r[f'restore_{n}_devices'] == [n]  # every leaf lies on the new mesh
    assert r[f'restore_{n}_diff'] == 0.0
  # Resumed on 1 device (a program of its own, from the 8-device checkpoint).
  assert r['resumed_on_1_start_steps'] == [0, 3]  # the second run started from step 3
  assert r['resumed_on_1_genotype'] == r['full_8_genotype']
  assert r['resumed_on_1_arch_diff'] < 1e-5
  np.testing.assert_allclose(r['resumed_on_1_arch_split_loss'], r['full_8_arch_split_loss'],
                             rtol=1e-5)
