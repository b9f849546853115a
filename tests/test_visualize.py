"""Tests for jaxnas.visualize: SVG structure and legibility, PNG output."""

import collections
import itertools
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from PIL import Image

from jaxnas import genotypes, visualize

NS = '{http://www.w3.org/2000/svg}'
NODE_LABELS = {'c_{k-2}', 'c_{k-1}', '0', '1', '2', '3', 'c_{k}'}


def _texts(root):
  return [t.text for t in root.iter(NS + 'text')]


def _boxes(root):
  """(label backgrounds, node boxes) as (x0, y0, x1, y1); labels sit on white rects."""
  labels, nodes = [], []
  for r in root.iter(NS + 'rect'):
    if 'x' not in r.attrib:  # the page background
      continue
    x, y, w, h = (float(r.get(k)) for k in ('x', 'y', 'width', 'height'))
    (labels if r.get('fill') == 'white' else nodes).append((x, y, x + w, y + h))
  return labels, nodes


def _overlap(a, b):
  return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])


@pytest.mark.parametrize('name', sorted(genotypes.PUBLISHED))
@pytest.mark.parametrize('cell', ['normal', 'reduce'])
def test_cell_svg_has_every_op_and_node(name, cell):
  g = genotypes.PUBLISHED[name]
  edges, concat = getattr(g, cell), getattr(g, cell + '_concat')
  root = ET.fromstring(visualize.cell_svg(edges, concat, title='a cell'))
  assert root.tag == NS + 'svg'
  assert float(root.get('width')) > 300 and float(root.get('height')) > 150
  texts = _texts(root)
  # Exactly one label per edge, plus the 7 node names and the title.
  labels = collections.Counter(t for t in texts if t not in NODE_LABELS | {'a cell'})
  assert labels == collections.Counter(op for op, _ in edges)
  assert NODE_LABELS <= set(texts)
  assert len(texts) == len(edges) + len(NODE_LABELS) + 1
  # One arrowhead per op edge and per concat edge into c_{k}.
  assert len(list(root.iter(NS + 'polygon'))) == len(edges) + len(concat)


@pytest.mark.parametrize('name', sorted(genotypes.PUBLISHED))
def test_labels_do_not_overlap(name):
  g = genotypes.PUBLISHED[name]
  for edges, concat in [(g.normal, g.normal_concat), (g.reduce, g.reduce_concat)]:
    labels, nodes = _boxes(ET.fromstring(visualize.cell_svg(edges, concat)))
    assert len(labels) == 8 and len(nodes) == 7
    for a, b in itertools.combinations(labels, 2):
      assert not _overlap(a, b), (a, b)
    for a in labels:
      for b in nodes:
        assert not _overlap(a, b), (a, b)


def test_labels_and_edges_colored_by_op():
  g = genotypes.PC_DARTS_cifar
  root = ET.fromstring(visualize.cell_svg(g.normal, g.normal_concat))
  for t in root.iter(NS + 'text'):
    if t.text in genotypes.PRIMITIVES:
      assert t.get('fill') == visualize.OP_COLORS[t.text]
  strokes = {p.get('stroke') for p in root.iter(NS + 'path')}
  expected = {visualize.OP_COLORS[op] for op, _ in g.normal}
  assert expected <= strokes and len(strokes) == len(expected) + 1  # + concat gray
  assert len(set(visualize.OP_COLORS.values())) == len(visualize.OP_COLORS)


def test_parallel_edges_get_distinct_curves():
  # Node 2 reads input 1 twice: the two arrows must not be drawn on top of each other.
  edges = [('sep_conv_3x3', 1), ('skip_connect', 1)] + list(genotypes.DARTS_V2.normal[2:])
  root = ET.fromstring(visualize.cell_svg(edges, [2, 3, 4, 5]))
  paths = [p.get('d') for p in root.iter(NS + 'path')]
  assert len(paths) == 12 and len(set(paths)) == 12
  labels, _ = _boxes(root)
  for a, b in itertools.combinations(labels, 2):
    assert not _overlap(a, b)


def test_cell_svg_escapes_and_accepts_other_ops():
  # Ops from other search spaces are drawn too; markup characters are escaped.
  edges = [('mb<3>&k5', 0), ('skip_connect', 1)] * 2
  root = ET.fromstring(visualize.cell_svg(edges, [2, 3]))
  texts = _texts(root)
  assert texts.count('mb<3>&k5') == 2
  assert {'c_{k-2}', 'c_{k-1}', '0', '1', 'c_{k}'} <= set(texts)
  assert '2' not in texts  # a 2-step cell has nodes 0 and 1 only


def test_cell_svg_rejects_bad_cells():
  with pytest.raises(ValueError, match='two edges per intermediate node'):
    visualize.cell_svg([('sep_conv_3x3', 0)] * 3, [2])
  with pytest.raises(ValueError, match='inputs 0..2'):
    visualize.cell_svg([('sep_conv_3x3', 0)] * 3 + [('sep_conv_3x3', 3)], [2, 3])
  with pytest.raises(ValueError, match='concat index 6'):
    visualize.cell_svg(genotypes.DARTS_V2.normal, [2, 6])


def test_save_genotype_svg(tmp_path):
  g = genotypes.PC_DARTS_image
  path = visualize.save_genotype_svg(g, tmp_path / 'cells' / 'g.svg')
  root = ET.parse(path).getroot()
  texts = _texts(root)
  assert 'normal cell' in texts and 'reduction cell' in texts
  assert texts.index('normal cell') < texts.index('reduction cell')
  ops = collections.Counter(t for t in texts if t in genotypes.PRIMITIVES)
  assert ops == collections.Counter(op for op, _ in g.normal + g.reduce)
  assert collections.Counter(t for t in texts if t in NODE_LABELS) == \
      collections.Counter({label: 2 for label in NODE_LABELS})
  # The reduction cell is drawn below the normal cell, not on top of it.
  groups = list(root.iter(NS + 'g'))
  assert len(groups) == 2
  offset = float(groups[1].get('transform').split(',')[1].rstrip(')'))
  _, normal_nodes = _boxes(groups[0])
  assert offset >= max(b[3] for b in normal_nodes)
  assert float(root.get('height')) > offset


def test_save_genotype_png(tmp_path):
  g = genotypes.DARTS_V2
  path = visualize.save_genotype_png(g, tmp_path / 'g.png')
  image = Image.open(path)
  assert image.format == 'PNG' and image.mode == 'RGB'
  w, h = image.size
  assert 800 <= w <= 4000 and 800 <= h <= 4000
  pixels = np.asarray(image).astype(np.float32)
  assert pixels.var() > 0
  assert (pixels[0, 0] == 255).all()  # white background
  # Edges and labels are drawn in their op colors (max_pool red dominates the reduce cell).
  for op in ('max_pool_3x3', 'sep_conv_3x3', 'skip_connect'):
    rgb = np.array(visualize._hex_rgb(visualize.OP_COLORS[op]), np.float32)
    near = (np.abs(pixels - rgb).max(axis=-1) < 30).sum()
    assert near > 200, op
  # The node fill colors are there: inputs, intermediate nodes, output.
  for kind in ('input', 'inter', 'output'):
    rgb = np.array(visualize._hex_rgb(visualize._NODE_FILL[kind]), np.float32)
    assert (np.abs(pixels - rgb).max(axis=-1) < 4).sum() > 500, kind

  small = Image.open(visualize.save_genotype_png(g, tmp_path / 's.png', scale=1))
  assert abs(small.size[0] * 2 - w) <= 2 and abs(small.size[1] * 2 - h) <= 2
