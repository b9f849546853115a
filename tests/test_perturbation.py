"""Perturbation-based cell selection (jaxnas/perturbation.py): the removals and the rule
on given scores. The whole selection from a finished search runs in
tests/test_pipeline.py, on the smoke protocol's search."""

import numpy as np
import pytest

from jaxnas import genotypes
from jaxnas import perturbation
from jaxnas.spaces import darts

PRIMS = genotypes.PRIMITIVES


def test_removals_take_out_one_op_or_one_edge_each():
  rng = np.random.default_rng(0)
  arch = {f'alphas_{k}': rng.normal(size=(14, 8)) for k in ('normal', 'reduce')}
  arch.update({f'betas_{k}': rng.normal(size=(14,)) for k in ('normal', 'reduce')})
  out = perturbation.removals(arch, PRIMS)
  # 7 ops ('none' is never a choice) and the edge itself, on 14 edges of two cells.
  assert len(out) == 2 * 14 * (7 + 1)
  for kind, edge, op, a in out:
    for name, value in a.items():
      changed = np.argwhere(value != arch[name])
      if name == (f'alphas_{kind}' if op is not None else f'betas_{kind}'):
        expected = [[edge, op]] if op is not None else [[edge]]
        assert changed.tolist() == expected and np.isneginf(value[tuple(changed[0])])
      else:
        assert changed.size == 0
  assert arch['alphas_normal'].min() > -10  # the input is left as it was
  # Without betas, ops only.
  plain = perturbation.removals({k: v for k, v in arch.items() if 'alphas' in k}, PRIMS)
  assert len(plain) == 2 * 14 * 7 and all(op is not None for _, _, op, _ in plain)


def test_genotype_from_scores_keeps_the_costliest_edges_and_ops():
  steps, e = 4, darts.num_edges(4)
  ops = np.full((e, len(PRIMS)), 0.01)
  ops[:, PRIMS.index('none')] = np.nan
  edges = np.zeros(e)
  # Node 0 (edges 0, 1): both kept. Node 1 (edges 2-4): edges 4 and 2 cost most.
  edges[[0, 1, 2, 3, 4]] = [0.1, 0.2, 0.5, 0.05, 0.7]
  ops[0, PRIMS.index('skip_connect')] = 0.3
  ops[1, PRIMS.index('avg_pool_3x3')] = 0.4
  ops[2, PRIMS.index('dil_conv_3x3')] = 0.2
  ops[4, PRIMS.index('sep_conv_3x3')] = 0.6
  # Node 2 (edges 5-8): a large op score does not keep an edge whose removal is cheap.
  edges[5:9] = [0.3, 0.0, 0.4, 0.1]
  ops[6, PRIMS.index('sep_conv_5x5')] = 5.0
  # Node 3 (edges 9-13): edges 13 and 9.
  edges[9:14] = [0.3, 0.1, 0.1, 0.1, 0.6]
  g = darts.genotype_from_scores({'normal': ops, 'reduce': ops}, steps, PRIMS,
                                 {'normal': edges, 'reduce': edges})
  assert g.normal[:4] == [('avg_pool_3x3', 1), ('skip_connect', 0),
                          ('sep_conv_3x3', 2), ('dil_conv_3x3', 0)]
  assert [j for _, j in g.normal[4:]] == [2, 0, 4, 0]
  assert g.reduce == g.normal and g.normal_concat == [2, 3, 4, 5]
  # Without edge scores (no betas), an edge is as strong as its best op.
  g = darts.genotype_from_scores({'normal': ops, 'reduce': ops}, steps, PRIMS)
  assert g.normal[4:6] == [('sep_conv_5x5', 1), ('max_pool_3x3', 0)]


def test_select_refuses_a_search_of_another_method(tmp_path):
  from jaxnas.methods import unas  # pylint: disable=g-import-not-at-top
  config = unas.get_config()
  with pytest.raises(ValueError, match='method'):
    perturbation.select(config, str(tmp_path))


def test_the_search_config_check_ignores_fields_added_since(tmp_path):
  import json  # pylint: disable=g-import-not-at-top
  from jaxnas import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from jaxnas.methods import pcdarts  # pylint: disable=g-import-not-at-top
  config = pcdarts.get_config()
  saved = json.loads(config.to_json_best_effort())
  del saved['model']['cell_form']  # a search from before the field existed
  (tmp_path / 'config.json').write_text(json.dumps(saved))
  perturbation.check_search_config(str(tmp_path), config)
  config.seed = 3
  with pytest.raises(ckpt_lib.WorkdirError, match=r'\(seed differ\)'):
    perturbation.check_search_config(str(tmp_path), config)
  with pytest.raises(ckpt_lib.WorkdirError, match='cannot be read'):
    perturbation.check_search_config(str(tmp_path / 'nowhere'), config)
