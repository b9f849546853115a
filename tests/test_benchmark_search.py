"""The search benchmark's settings and its comparison of PC-DARTS and DARTS memory."""

import argparse
import importlib.util
import os

import pytest

PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    'experiments', 'benchmark_search.py')


@pytest.fixture(scope='module')
def bench():
  spec = importlib.util.spec_from_file_location('benchmark_search', PATH)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def args(**kw):
  defaults = dict(methods='pcdarts,darts', batch_sizes='64', remat='0', settings='')
  return argparse.Namespace(**{**defaults, **kw})


def test_settings_are_the_product_of_the_flags_unless_listed(bench):
  assert bench.parse_settings(args(batch_sizes='64,256', remat='0,1')) == [
      ('pcdarts', 64, '0'), ('pcdarts', 64, '1'), ('pcdarts', 256, '0'),
      ('pcdarts', 256, '1'), ('darts', 64, '0'), ('darts', 64, '1'), ('darts', 256, '0'),
      ('darts', 256, '1')]
  assert bench.parse_settings(args(settings='pcdarts:256,pcdarts:256:1,darts:64')) == [
      ('pcdarts', 256, '0'), ('pcdarts', 256, '1'), ('darts', 64, '0')]


@pytest.mark.parametrize('bad', ['pcdarts', 'pcdarts:x', 'pcdarts:64:2', 'a:1:0:0'])
def test_a_malformed_setting_is_named(bench, bad):
  with pytest.raises(SystemExit, match=f'--settings: {bad!r} is not METHOD:BATCH'):
    bench.parse_settings(args(settings=bad))


def record(method, batch, remat, peak_gb, temp_gb, **kw):
  return dict(method=method, batch_size=batch, remat=remat, cache='cold',
              compile_mode='sequential', peak_bytes=peak_gb * 1e9,
              xla_temp_bytes=temp_gb * 1e9, **kw)


def test_memory_claim_pairs_pcdarts_256_with_darts_64(bench):
  records = [record('pcdarts', 256, False, 6.0, 4.8), record('pcdarts', 256, True, 4.2, 2.3),
             record('pcdarts', 64, False, 2.5, 1.2), record('darts', 64, False, 5.0, 4.0),
             record('darts', 256, False, 20.0, 16.0),
             {'method': 'darts', 'batch_size': 64, 'error': ['exit 1']}]
  assert bench.memory_claim(records) == [
      'PC-DARTS batch 256 (remat 0) against DARTS batch 64 (remat 0): peak 6.00 / 5.00 GB '
      '(1.20x), XLA buffers 4.80 / 4.00 GB (1.20x)',
      'PC-DARTS batch 256 (remat 1) against DARTS batch 64 (remat 0): peak 4.20 / 5.00 GB '
      '(0.84x), XLA buffers 2.30 / 4.00 GB (0.57x)']
  assert bench.memory_claim(records[:3]) == []  # no DARTS row: nothing to compare


def test_a_row_shows_the_projected_search(bench):
  r = record('pcdarts', 256, False, 6.0, 4.8, compile_s=52.0, step_s=11.0,
             images_per_s=46.5, compile_peak_bytes=3e9, flops_per_step=2.4e11,
             achieved_flops_per_s=2.2e10, fraction_of_peak=None, projected_search_h=13.4)
  cells = bench.row(r).split()
  assert len(cells) == 15 and cells[-1] == '13.4'
  assert bench.HEADER.split()[-2:] == ['search', 'h']
