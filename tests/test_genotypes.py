"""Tests for jaxnas.genotypes: published cells, validation, JSON files, loading."""

import json
import os

import numpy as np
import pytest

from jaxnas import genotypes
from jaxnas.genotypes import Genotype, GenotypeError


def _all_pool_genotype():
  # Every node reads both cell inputs through parameter-free ops (the collapse case).
  edges = [('max_pool_3x3', 0), ('skip_connect', 1)] * 4
  return Genotype(edges, [2, 3, 4, 5], [('avg_pool_3x3', 0), ('max_pool_3x3', 1)] * 4,
                  [2, 3, 4, 5])


def _write(path, text):
  with open(path, 'w') as f:
    f.write(text)
  return str(path)


# --- constants ----------------------------------------------------------------


def test_primitives_reference_order():
  # alphas' last axis is indexed in this order; changing it silently breaks checkpoints.
  assert genotypes.PRIMITIVES == (
      'none', 'max_pool_3x3', 'avg_pool_3x3', 'skip_connect',
      'sep_conv_3x3', 'sep_conv_5x5', 'dil_conv_3x3', 'dil_conv_5x5')
  assert genotypes.PARAMETER_FREE == ('none', 'max_pool_3x3', 'avg_pool_3x3', 'skip_connect')
  assert issubclass(GenotypeError, ValueError)


@pytest.mark.parametrize('name', ['PC_DARTS_cifar', 'PC_DARTS_image', 'DARTS_V2'])
def test_published_genotypes_validate_unchanged(name):
  g = genotypes.PUBLISHED[name]
  assert g is getattr(genotypes, name)
  assert genotypes.validate(g) == g
  assert len(g.normal) == len(g.reduce) == 8
  assert g.normal_concat == g.reduce_concat == [2, 3, 4, 5]


def test_published_values_match_reference():
  # Literal pairs from DESIGN.md (official PC-DARTS / DARTS genotypes.py).
  c = genotypes.PC_DARTS_cifar
  assert c.normal[0] == ('sep_conv_3x3', 1)
  assert c.normal[1] == ('skip_connect', 0)
  assert c.normal[6] == ('avg_pool_3x3', 0)
  assert c.normal[7] == ('dil_conv_3x3', 1)
  assert c.reduce[1] == ('max_pool_3x3', 0)
  assert c.reduce[3] == ('sep_conv_5x5', 2)
  assert c.reduce[5] == ('sep_conv_3x3', 3)
  assert [i for _, i in c.reduce] == [1, 0, 1, 2, 0, 3, 1, 2]

  im = genotypes.PC_DARTS_image
  assert im.normal == [('skip_connect', 1), ('sep_conv_3x3', 0), ('sep_conv_3x3', 0),
                       ('skip_connect', 1), ('sep_conv_3x3', 1), ('sep_conv_3x3', 3),
                       ('sep_conv_3x3', 1), ('dil_conv_5x5', 4)]
  assert im.reduce[2] == ('dil_conv_5x5', 2)
  assert im.reduce[3] == ('max_pool_3x3', 1)
  assert im.reduce[6] == ('sep_conv_5x5', 0)

  d = genotypes.DARTS_V2
  assert d.normal[5] == ('skip_connect', 0)
  assert d.normal[7] == ('dil_conv_3x3', 2)
  assert d.reduce == [('max_pool_3x3', 0), ('max_pool_3x3', 1), ('skip_connect', 2),
                      ('max_pool_3x3', 1), ('max_pool_3x3', 0), ('skip_connect', 2),
                      ('skip_connect', 2), ('max_pool_3x3', 1)]
  assert set(genotypes.PUBLISHED) == {'PC_DARTS_cifar', 'PC_DARTS_image', 'DARTS_V2'}


# --- validate -----------------------------------------------------------------


def test_validate_normalizes_lists_and_numpy_ints():
  g = genotypes.PC_DARTS_cifar
  raw = ([[op, np.int64(i)] for op, i in g.normal], range(2, 6),
         tuple(tuple(e) for e in g.reduce), (2, 3, 4, 5))
  out = genotypes.validate(raw)
  assert isinstance(out, Genotype)
  assert out == g
  assert all(type(op) is str and type(i) is int for op, i in out.normal + out.reduce)


def _with_edge(k, edge, cell='normal'):
  g = genotypes.PC_DARTS_cifar
  edges = list(getattr(g, cell))
  edges[k] = edge
  return g._replace(**{cell: edges})


def test_validate_unknown_op_lists_valid_ops():
  with pytest.raises(GenotypeError) as e:
    genotypes.validate(_with_edge(3, ('conv_7x7', 1)), source='my_cells.json')
  msg = str(e.value)
  assert msg.startswith('my_cells.json:')
  assert "normal[3]" in msg and "'conv_7x7'" in msg
  for op in genotypes.PRIMITIVES[1:]:
    assert op in msg


def test_validate_rejects_none_op():
  with pytest.raises(GenotypeError, match=r"genotype: reduce\[0\] uses op 'none'"):
    genotypes.validate(_with_edge(0, ('none', 1), cell='reduce'))


@pytest.mark.parametrize('k,index,allowed', [
    (0, 2, '0..1'),   # node 2 cannot read itself
    (3, 3, '0..2'),   # node 3 cannot read node 3
    (7, 6, '0..4'),   # node 5 cannot read a node that does not exist
    (2, -1, '0..2'),
])
def test_validate_input_index_out_of_range(k, index, allowed):
  with pytest.raises(GenotypeError) as e:
    genotypes.validate(_with_edge(k, ('sep_conv_3x3', index)), source='cell.json')
  msg = str(e.value)
  assert msg.startswith('cell.json:')
  assert f'normal[{k}]' in msg and f'inputs {allowed}' in msg


def test_validate_largest_legal_index_passes():
  g = _with_edge(7, ('sep_conv_3x3', 4))  # node 5 may read node 4
  assert genotypes.validate(g).normal[7] == ('sep_conv_3x3', 4)


def test_validate_wrong_edge_count():
  g = genotypes.PC_DARTS_cifar._replace(reduce=genotypes.PC_DARTS_cifar.reduce[:7])
  with pytest.raises(GenotypeError, match=r'reduce has 7 edges .* exactly 8'):
    genotypes.validate(g)
  # A 5-step cell needs 10 edges; the published ones have 8.
  with pytest.raises(GenotypeError, match=r'normal has 8 edges .* exactly 10'):
    genotypes.validate(genotypes.DARTS_V2, steps=5)


@pytest.mark.parametrize('concat', [[2, 3, 4, 6], [1, 2, 3, 4], [2, 2, 3], []])
def test_validate_bad_concat(concat):
  with pytest.raises(GenotypeError, match=r'^g\.json: normal_concat'):
    genotypes.validate(genotypes.DARTS_V2._replace(normal_concat=concat), source='g.json')


def test_validate_rejects_non_pairs_and_bool_index():
  with pytest.raises(GenotypeError, match=r"normal\[1\] = 'skip_connect' is not"):
    genotypes.validate(_with_edge(1, 'skip_connect'))
  with pytest.raises(GenotypeError, match=r'normal\[1\]'):
    genotypes.validate(_with_edge(1, ('skip_connect', True)))


# --- JSON ---------------------------------------------------------------------


@pytest.mark.parametrize('name', sorted(genotypes.PUBLISHED))
def test_json_round_trip(name):
  g = genotypes.PUBLISHED[name]
  d = genotypes.to_json(g)
  assert set(d) == {'normal', 'normal_concat', 'reduce', 'reduce_concat'}
  # Through real JSON text: tuples become lists and must come back as pairs.
  back = genotypes.from_json(json.loads(json.dumps(d)))
  assert back == g
  assert d['normal'][0] == list(g.normal[0])


def test_save_with_metadata_and_load_file(tmp_path):
  alphas = np.arange(14 * 8, dtype=np.float32).reshape(14, 8) / 100
  path = genotypes.save(genotypes.PC_DARTS_cifar, tmp_path / 'sub' / 'g.json',
                        alphas_normal=alphas, epoch=np.int64(49))
  assert path == str(tmp_path / 'sub' / 'g.json')
  with open(path) as f:
    d = json.load(f)
  assert d['epoch'] == 49
  assert np.array(d['alphas_normal']).shape == (14, 8)
  assert d['alphas_normal'][1][2] == pytest.approx(0.10)
  assert d['reduce'][1] == ['max_pool_3x3', 0]
  assert genotypes.load(path) == genotypes.PC_DARTS_cifar
  # No temporary file is left next to the result.
  assert os.listdir(tmp_path / 'sub') == ['g.json']


def test_save_rejects_metadata_clashing_with_genotype(tmp_path):
  with pytest.raises(GenotypeError, match='normal'):
    genotypes.save(genotypes.DARTS_V2, tmp_path / 'g.json', normal=[])


def test_save_and_load_workdir(tmp_path):
  path = genotypes.save(genotypes.PC_DARTS_image, tmp_path)
  assert path == str(tmp_path / 'genotype.json')
  assert genotypes.load(str(tmp_path)) == genotypes.PC_DARTS_image
  assert genotypes.load(tmp_path) == genotypes.PC_DARTS_image  # os.PathLike


# --- load ---------------------------------------------------------------------


def test_load_by_name_returns_copy():
  g = genotypes.load('PC_DARTS_cifar')
  assert g == genotypes.PC_DARTS_cifar
  g.normal.append(('skip_connect', 0))  # must not change the module constant
  assert len(genotypes.PC_DARTS_cifar.normal) == 8
  assert genotypes.load('DARTS_V2').reduce[2] == ('skip_connect', 2)


def test_load_unknown_name_lists_published():
  with pytest.raises(GenotypeError) as e:
    genotypes.load('PC_DARTS_cifar10')
  msg = str(e.value)
  assert "'PC_DARTS_cifar10'" in msg
  for name in genotypes.PUBLISHED:
    assert name in msg


def test_load_missing_file_names_it(tmp_path):
  path = str(tmp_path / 'nope.json')
  with pytest.raises(GenotypeError, match=r'nope\.json: cannot read') as e:
    genotypes.load(path)
  assert path in str(e.value)


def test_load_workdir_without_genotype(tmp_path):
  with pytest.raises(GenotypeError, match='has no genotype.json') as e:
    genotypes.load(tmp_path)
  assert str(tmp_path) in str(e.value)


def test_load_bad_json_names_file(tmp_path):
  path = _write(tmp_path / 'broken.json', '{"normal": [["sep_conv_3x3", 1],')
  with pytest.raises(GenotypeError, match='not valid JSON') as e:
    genotypes.load(path)
  assert str(e.value).startswith(path + ':')


def test_load_invalid_genotype_file_names_file(tmp_path):
  d = genotypes.to_json(genotypes.DARTS_V2)
  d['reduce'][4] = ['sep_conv_9x9', 0]
  path = _write(tmp_path / 'g.json', json.dumps(d))
  with pytest.raises(GenotypeError, match=r"reduce\[4\] uses unknown op 'sep_conv_9x9'") as e:
    genotypes.load(path)
  assert str(e.value).startswith(path + ':')

  d = genotypes.to_json(genotypes.DARTS_V2)
  d['normal'][5] = ['skip_connect', 4]  # node 4 may read 0..3
  _write(tmp_path / 'genotype.json', json.dumps(d))
  with pytest.raises(GenotypeError, match=r'normal\[5\].*inputs 0\.\.3') as e:
    genotypes.load(tmp_path)
  assert 'genotype.json' in str(e.value)


def test_load_wrong_edge_count_and_missing_key(tmp_path):
  d = genotypes.to_json(genotypes.DARTS_V2)
  d['normal'] = d['normal'][:6]
  path = _write(tmp_path / 'short.json', json.dumps(d))
  with pytest.raises(GenotypeError, match=r'short\.json: normal has 6 edges'):
    genotypes.load(path)
  del d['reduce_concat']
  path = _write(tmp_path / 'nokey.json', json.dumps(d))
  with pytest.raises(GenotypeError, match=r'nokey\.json: missing key\(s\) reduce_concat'):
    genotypes.load(path)
  path = _write(tmp_path / 'list.json', '[1, 2]')
  with pytest.raises(GenotypeError, match=r'list\.json: expected a JSON object'):
    genotypes.load(path)


# --- inspection ---------------------------------------------------------------


def test_is_degenerate():
  assert genotypes.is_degenerate(_all_pool_genotype())
  assert not genotypes.is_degenerate(genotypes.PC_DARTS_cifar)
  # DARTS_V2's reduce cell is all pools and skips, but its normal cell is not.
  assert not genotypes.is_degenerate(genotypes.DARTS_V2)
  one_conv = _all_pool_genotype()._replace(
      reduce=[('sep_conv_3x3', 0)] + _all_pool_genotype().reduce[1:])
  assert not genotypes.is_degenerate(one_conv)


def test_format_genotype():
  s = genotypes.format_genotype(genotypes.PC_DARTS_cifar)
  assert s == (
      'normal: sep_conv_3x3(1) skip_connect(0) | sep_conv_3x3(0) dil_conv_3x3(1) | '
      'sep_conv_5x5(0) sep_conv_3x3(1) | avg_pool_3x3(0) dil_conv_3x3(1) ; '
      'reduce: sep_conv_5x5(1) max_pool_3x3(0) | sep_conv_5x5(1) sep_conv_5x5(2) | '
      'sep_conv_3x3(0) sep_conv_3x3(3) | sep_conv_3x3(1) sep_conv_3x3(2)')
  assert '\n' not in s
  # A non-default concat is shown, the default one is not.
  s = genotypes.format_genotype(genotypes.DARTS_V2._replace(reduce_concat=[4, 5]))
  assert s.endswith('concat=[4, 5]') and s.count('concat') == 1


def test_load_missing_workdir_says_to_run_the_search(tmp_path):
  with pytest.raises(GenotypeError, match='no such search workdir') as e:
    genotypes.load(str(tmp_path / 'runs' / 'fmnist'))
  assert 'run the search first' in str(e.value) and 'DARTS_V2' in str(e.value)
