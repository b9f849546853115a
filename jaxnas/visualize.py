"""Pictures of found cells, drawn like the DARTS paper's figures.

A cell is a DAG: inputs c_{k-2}, c_{k-1} on the left, intermediate nodes 0..3,
and the output c_{k} (the concat of the intermediate nodes) on the right. Each
edge is an arrow labelled with its op and colored by op type.

SVG is written as plain text and PNG is drawn with Pillow, so neither needs
graphviz or matplotlib. Both share one layout:

* nodes are placed in columns by depth (longest path from the inputs), each
  node near the mean height of its inputs;
* every edge is a quadratic Bezier curve whose bend is picked from a few
  candidates so that it avoids node boxes, other edges and other labels;
* each label sits on its own curve at the position (along the curve) with the
  fewest collisions, on a white background.
"""

import dataclasses
import math
import zlib
from typing import Callable, Optional, Sequence
from xml.sax.saxutils import escape

import numpy as np

from jaxnas import files

# Text sizes in layout units (SVG pixels; the PNG is drawn at `scale` times this).
_NODE_FONT = 14
_EDGE_FONT = 12
_TITLE_FONT = 16
_NODE_H = 30
_COL_W = 190  # distance between node columns
_ROW_H = 80  # minimum vertical distance between nodes of one column
_MARGIN = 16

# Edge colors by op; dark enough for the label text to be read on white.
OP_COLORS = {
    'none': '#b0b0b0',
    'max_pool_3x3': '#d62728',
    'avg_pool_3x3': '#d9680b',
    'skip_connect': '#555555',
    'sep_conv_3x3': '#1f66b4',
    'sep_conv_5x5': '#7b45b8',
    'dil_conv_3x3': '#238b23',
    'dil_conv_5x5': '#8c564b',
}
_CONCAT_COLOR = '#a0a0a0'
_FALLBACK_COLORS = ('#17becf', '#bcbd22', '#e377c2', '#393b79', '#637939', '#843c39')
_NODE_FILL = {'input': '#c1e1c1', 'inter': '#add8e6', 'output': '#eee8aa'}


def op_color(op: str) -> str:
  """The color of an op's edges; ops outside the DARTS space get a stable one."""
  if op in OP_COLORS:
    return OP_COLORS[op]
  return _FALLBACK_COLORS[zlib.crc32(op.encode()) % len(_FALLBACK_COLORS)]


def _mono_width(text: str, size: float) -> float:
  # SVG labels use a monospace font: every glyph is 0.6 em wide.
  return 0.6 * size * len(text)


# ----------------------------------------------------------------------------
# Layout.
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class _Node:
  label: str
  kind: str  # 'input', 'inter' or 'output'
  x: float  # center
  y: float
  w: float
  h: float

  def box(self, pad=0.0):
    return (self.x - self.w / 2 - pad, self.y - self.h / 2 - pad,
            self.x + self.w / 2 + pad, self.y + self.h / 2 + pad)


@dataclasses.dataclass
class _Edge:
  src: int
  dst: int
  op: Optional[str]  # None for the unlabelled concat edges into c_{k}
  ctrl: tuple = ()  # (p0, p1, p2) of the curve clipped to the node borders
  label_box: Optional[tuple] = None  # (x0, y0, x1, y1)

  @property
  def color(self):
    return _CONCAT_COLOR if self.op is None else op_color(self.op)


@dataclasses.dataclass
class _Layout:
  nodes: list
  edges: list
  width: float
  height: float
  title: Optional[str]


def _bezier(p0, p1, p2, t):
  u = 1 - t
  return (u * u * p0[0] + 2 * u * t * p1[0] + t * t * p2[0],
          u * u * p0[1] + 2 * u * t * p1[1] + t * t * p2[1])


def _inside(p, box):
  return box[0] <= p[0] <= box[2] and box[1] <= p[1] <= box[3]


def _count_inside(pts, boxes):
  """How many (point, box) pairs have the point inside the box."""
  x, y = pts[:, None, 0], pts[:, None, 1]
  return int(((boxes[:, 0] <= x) & (x <= boxes[:, 2])
              & (boxes[:, 1] <= y) & (y <= boxes[:, 3])).sum())


def _overlap_areas(box, boxes):
  w = np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0])
  h = np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1])
  return np.maximum(w, 0.0) * np.maximum(h, 0.0)


def _exit_t(curve, box, t_in, t_out):
  """Bisects for where the curve crosses the border of `box` (t_in is inside)."""
  for _ in range(30):
    mid = (t_in + t_out) / 2
    if _inside(_bezier(*curve, mid), box):
      t_in = mid
    else:
      t_out = mid
  return (t_in + t_out) / 2


def _subcurve(p0, p1, p2, a, b):
  # Blossoming: the part of a quadratic Bezier on [a, b] is again quadratic.
  def blossom(s, t):
    w0, w1, w2 = (1 - s) * (1 - t), (1 - s) * t + s * (1 - t), s * t
    return (w0 * p0[0] + w1 * p1[0] + w2 * p2[0], w0 * p0[1] + w1 * p1[1] + w2 * p2[1])
  return blossom(a, a), blossom(a, b), blossom(b, b)


def _node_positions(edges, concat, steps):
  """Column and height of every node: 0, 1 inputs, 2.. intermediate, last output."""
  depth = [0, 0]
  for i in range(steps):
    depth.append(1 + max(depth[j] for _, j in edges[2 * i:2 * i + 2]))
  depth.append(1 + max(depth[2:]))
  # The inputs span the tallest column, so edges fan out instead of bunching.
  tallest = max(depth.count(d) for d in range(1, max(depth)))
  gap = max(2, tallest - 1) * _ROW_H
  inputs = [[]] * 2 + [[j for _, j in edges[2 * i:2 * i + 2]] for i in range(steps)] + [concat]
  y = [0.0, float(gap)] + [0.0] * (steps + 1)  # c_{k-2} above c_{k-1}
  # Column by column: each node at the mean height of its (already placed)
  # inputs, then the column is spread apart keeping its order and mean height.
  for d in range(1, max(depth) + 1):
    col = [n for n in range(len(depth)) if depth[n] == d]
    for n in col:
      y[n] = sum(y[j] for j in inputs[n]) / len(inputs[n])
    col.sort(key=lambda n: (y[n], n))
    want = [y[n] for n in col]
    for k in range(1, len(want)):
      want[k] = max(want[k], want[k - 1] + _ROW_H)
    shift = (sum(y[n] for n in col) - sum(want)) / len(col)
    for n, v in zip(col, want):
      y[n] = v + shift
  # Columns are further apart where more labelled edges cross the gap, so each
  # label finds a free spot along its curve.
  x = [0.0]
  for d in range(max(depth)):
    crossing = sum(1 for k, (_, j) in enumerate(edges)
                   if depth[j] <= d < depth[2 + k // 2])
    x.append(x[-1] + _COL_W + 18 * max(0, crossing - 3))
  return [x[d] for d in depth], y


def _layout(edges: Sequence, concat: Sequence[int], title: Optional[str],
            text_width: Callable[[str, float], float]) -> _Layout:
  edges = [(str(op), int(j)) for op, j in edges]
  if not edges or len(edges) % 2:
    raise ValueError(f'a cell needs two edges per intermediate node, got {len(edges)} edges.')
  steps = len(edges) // 2
  for k, (op, j) in enumerate(edges):
    if not 0 <= j <= k // 2 + 1:
      raise ValueError(f'edge {k} ({op}, {j}) reads input {j}, but node {k // 2 + 2} '
                       f'may only read inputs 0..{k // 2 + 1}.')
  concat = [int(c) for c in concat]
  for c in concat:
    if not 2 <= c <= steps + 1:
      raise ValueError(f'concat index {c} is not an intermediate node (2..{steps + 1}).')
  if not concat:
    raise ValueError('concat is empty; the cell output would read no node.')

  xs, ys = _node_positions(edges, concat, steps)
  labels = ['c_{k-2}', 'c_{k-1}'] + [str(i) for i in range(steps)] + ['c_{k}']
  kinds = ['input', 'input'] + ['inter'] * steps + ['output']
  nodes = []
  for n, label in enumerate(labels):
    w = max(_NODE_H + 4, text_width(label, _NODE_FONT) + 20)
    nodes.append(_Node(label, kinds[n], xs[n], ys[n], w, _NODE_H))
  out = len(nodes) - 1

  all_edges = [_Edge(j, 2 + k // 2, op) for k, (op, j) in enumerate(edges)]
  all_edges += [_Edge(c, out, None) for c in concat]

  # Route labelled edges first (short ones get the straight lines), concat last.
  def span(e):
    return (e.op is None, abs(nodes[e.dst].x - nodes[e.src].x), e.dst, e.src)
  order = sorted(range(len(all_edges)), key=lambda i: span(all_edges[i]))

  samples_t = [i / 40 for i in range(41)]
  ts = np.asarray(samples_t)[:, None]
  placed_pts = np.zeros((0, 2))  # curve samples of routed edges, for crowding costs
  placed_labels = np.zeros((0, 4))
  offsets = [0, 22, -22, 44, -44, 66, -66, 90, -90, 120, -120, 150, -150, 190, -190]
  label_ts = [0.5, 0.42, 0.58, 0.34, 0.66, 0.27, 0.73, 0.2, 0.8]
  node_boxes = np.array([node.box(pad=8) for node in nodes])

  for idx in order:
    e = all_edges[idx]
    a, b = nodes[e.src], nodes[e.dst]
    p0, p2 = (a.x, a.y), (b.x, b.y)
    dx, dy = p2[0] - p0[0], p2[1] - p0[1]
    length = math.hypot(dx, dy) or 1.0
    normal = (-dy / length, dx / length)
    lw = text_width(e.op, _EDGE_FONT) + 8 if e.op else 0
    lh = _EDGE_FONT + 6
    others = np.array([n not in (e.src, e.dst) for n in range(len(nodes))])
    far_boxes = np.array([node.box(pad=18) for node in nodes])[others]
    best = None
    for off in offsets:
      mid = ((p0[0] + p2[0]) / 2 + normal[0] * off * 2, (p0[1] + p2[1]) / 2 + normal[1] * off * 2)
      curve = (p0, mid, p2)
      pts = (1 - ts) ** 2 * np.asarray(p0) + 2 * (1 - ts) * ts * np.asarray(mid) \
          + ts ** 2 * np.asarray(p2)
      cost = 0.25 * abs(off)
      # Never through another node's box.
      cost += 1000 * _count_inside(pts, node_boxes[others])
      # Keep apart from earlier edges (ignoring the ends, where edges meet anyway).
      inner = pts[6:-6]
      near = np.abs(inner[:, None, :] - placed_pts[None, :, :]).max(axis=-1) < 9
      cost += 6 * near.sum()
      cost += 40 * _count_inside(inner, placed_labels)
      label_box = None
      if e.op:
        label_cost = None
        for rank, t in enumerate(label_ts):
          cx, cy = _bezier(*curve, t)
          box = (cx - lw / 2, cy - lh / 2, cx + lw / 2, cy + lh / 2)
          c = 1.0 * rank
          # Wider clearance from nodes the edge does not touch: a label there
          # reads as belonging to that node.
          for boxes in (placed_labels, node_boxes, far_boxes):
            area = _overlap_areas(box, boxes)
            c += (50 + area[area > 0]).sum()
          # Hiding other edges behind the white label background.
          c += 8 * _count_inside(placed_pts, np.array([box]))
          if label_cost is None or c < label_cost:
            label_cost, label_box = c, box
        cost += label_cost
      if best is None or cost < best[0]:
        best = (cost, curve, pts, label_box)
    _, curve, pts, label_box = best
    placed_pts = np.concatenate([placed_pts, pts[4:-4]])
    if label_box is not None:
      placed_labels = np.concatenate([placed_labels, [label_box]])
    # Clip the curve to the borders of its two node boxes.
    t0 = _exit_t(curve, a.box(pad=1), 0.0, 0.5)
    t1 = _exit_t(curve, b.box(pad=1), 1.0, 0.5)
    e.ctrl = _subcurve(*curve, t0, t1)
    e.label_box = label_box

  # Translate everything so that the drawing starts at the margin.
  xs, ys_ = [], []
  for node in nodes:
    x0, y0, x1, y1 = node.box()
    xs += [x0, x1]
    ys_ += [y0, y1]
  for e in all_edges:
    for t in samples_t:
      p = _bezier(*e.ctrl, t)
      xs.append(p[0])
      ys_.append(p[1])
    if e.label_box:
      xs += [e.label_box[0], e.label_box[2]]
      ys_ += [e.label_box[1], e.label_box[3]]
  top = _MARGIN + (_TITLE_FONT + 12 if title else 0)
  sx, sy = _MARGIN - min(xs), top - min(ys_)
  for node in nodes:
    node.x += sx
    node.y += sy
  for e in all_edges:
    e.ctrl = tuple((p[0] + sx, p[1] + sy) for p in e.ctrl)
    if e.label_box:
      b = e.label_box
      e.label_box = (b[0] + sx, b[1] + sy, b[2] + sx, b[3] + sy)
  width = max(xs) - min(xs) + 2 * _MARGIN
  if title:
    width = max(width, text_width(title, _TITLE_FONT) + 2 * _MARGIN)
  height = max(ys_) - min(ys_) + top + _MARGIN
  return _Layout(nodes, all_edges, width, height, title)


def _arrow(e: _Edge, length=9.0, half_width=4.0):
  """End of the line and the arrowhead triangle at the end of the edge."""
  p0, p1, p2 = e.ctrl
  dx, dy = p2[0] - p1[0], p2[1] - p1[1]
  if math.hypot(dx, dy) < 1e-6:
    dx, dy = p2[0] - p0[0], p2[1] - p0[1]
  n = math.hypot(dx, dy) or 1.0
  dx, dy = dx / n, dy / n
  base = (p2[0] - dx * length, p2[1] - dy * length)
  tri = [p2, (base[0] - dy * half_width, base[1] + dx * half_width),
         (base[0] + dy * half_width, base[1] - dx * half_width)]
  line_end = (p2[0] - dx * length * 0.7, p2[1] - dy * length * 0.7)
  return line_end, tri


# ----------------------------------------------------------------------------
# SVG.
# ----------------------------------------------------------------------------


def _f(v):
  return f'{v:.1f}'


def _svg_cell(layout: _Layout, dy: float = 0.0) -> list:
  out = [f'<g transform="translate(0,{_f(dy)})">']
  if layout.title:
    out.append(f'<text x="{_f(_MARGIN)}" y="{_f(_MARGIN + _TITLE_FONT)}" '
               f'font-family="Helvetica, Arial, sans-serif" font-size="{_TITLE_FONT}" '
               f'font-weight="bold" fill="#222">{escape(layout.title)}</text>')
  for e in layout.edges:
    p0, p1, _ = e.ctrl
    end, tri = _arrow(e)
    # Control point of the curve shortened to `end` (keeps the shape).
    dash = ' stroke-dasharray="5,3"' if e.op == 'none' else ''
    width = 1.4 if e.op is None else 1.8
    out.append(f'<path d="M{_f(p0[0])},{_f(p0[1])} Q{_f(p1[0])},{_f(p1[1])} '
               f'{_f(end[0])},{_f(end[1])}" fill="none" stroke="{e.color}" '
               f'stroke-width="{width}"{dash}/>')
    out.append('<polygon points="' + ' '.join(f'{_f(x)},{_f(y)}' for x, y in tri)
               + f'" fill="{e.color}"/>')
  for e in layout.edges:
    if e.label_box is None:
      continue
    x0, y0, x1, y1 = e.label_box
    out.append(f'<rect x="{_f(x0)}" y="{_f(y0)}" width="{_f(x1 - x0)}" '
               f'height="{_f(y1 - y0)}" rx="3" fill="white" fill-opacity="0.92"/>')
    out.append(f'<text x="{_f((x0 + x1) / 2)}" y="{_f((y0 + y1) / 2)}" '
               f'text-anchor="middle" dominant-baseline="central" '
               f'font-family="DejaVu Sans Mono, Menlo, Consolas, monospace" '
               f'font-size="{_EDGE_FONT}" fill="{e.color}">{escape(e.op)}</text>')
  for node in layout.nodes:
    x0, y0, x1, y1 = node.box()
    out.append(f'<rect x="{_f(x0)}" y="{_f(y0)}" width="{_f(x1 - x0)}" '
               f'height="{_f(y1 - y0)}" rx="8" fill="{_NODE_FILL[node.kind]}" '
               f'stroke="#333" stroke-width="1.2"/>')
    out.append(f'<text x="{_f(node.x)}" y="{_f(node.y)}" text-anchor="middle" '
               f'dominant-baseline="central" '
               f'font-family="DejaVu Sans Mono, Menlo, Consolas, monospace" '
               f'font-size="{_NODE_FONT}" fill="#111">{escape(node.label)}</text>')
  out.append('</g>')
  return out


def _svg_document(parts: list, width: float, height: float) -> str:
  head = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{math.ceil(width)}" '
          f'height="{math.ceil(height)}" viewBox="0 0 {math.ceil(width)} '
          f'{math.ceil(height)}">')
  background = f'<rect width="{math.ceil(width)}" height="{math.ceil(height)}" fill="white"/>'
  return '\n'.join([head, background] + parts + ['</svg>']) + '\n'


def cell_svg(edges, concat, title: Optional[str] = None) -> str:
  """An SVG document drawing one cell.

  Args:
    edges: (op_name, input_index) pairs, two per intermediate node (a
      genotype's `normal` or `reduce`).
    concat: the intermediate nodes (2..) concatenated into the output.
    title: optional caption drawn above the cell.

  Returns:
    The SVG text.
  """
  layout = _layout(edges, concat, title, _mono_width)
  return _svg_document(_svg_cell(layout), layout.width, layout.height)


def _genotype_layouts(genotype, text_width):
  return [_layout(genotype.normal, genotype.normal_concat, 'normal cell', text_width),
          _layout(genotype.reduce, genotype.reduce_concat, 'reduction cell', text_width)]


def genotype_svg(genotype) -> str:
  """One SVG document with the normal cell above the reduction cell."""
  layouts = _genotype_layouts(genotype, _mono_width)
  parts, dy = [], 0.0
  for layout in layouts:
    parts += _svg_cell(layout, dy)
    dy += layout.height
  return _svg_document(parts, max(l.width for l in layouts), dy)


def save_genotype_svg(genotype, path) -> str:
  """Writes `genotype_svg(genotype)` to `path`; returns the path."""
  return files.write_text(path, genotype_svg(genotype))


# ----------------------------------------------------------------------------
# PNG (Pillow only).
# ----------------------------------------------------------------------------


def _hex_rgb(color: str):
  color = color.lstrip('#')
  return tuple(int(color[i:i + 2], 16) for i in (0, 2, 4))


def _font(size: float):
  from PIL import ImageFont
  try:
    return ImageFont.load_default(size=size)
  except (TypeError, ImportError, OSError):  # Pillow without FreeType: fixed bitmap font
    return ImageFont.load_default()


def _draw_cell(draw, layout: _Layout, s: float, dy: float, fonts):
  def pt(p):
    return (p[0] * s, (p[1] + dy) * s)
  if layout.title:
    draw.text(pt((_MARGIN, _MARGIN)), layout.title, fill=(34, 34, 34), font=fonts['title'])
  for e in layout.edges:
    color = _hex_rgb(e.color)
    end, tri = _arrow(e)
    p0, p1, _ = e.ctrl
    pts = [pt(_bezier(p0, p1, end, i / 32)) for i in range(33)]
    width = max(1, round((1.4 if e.op is None else 1.8) * s))
    if e.op == 'none':
      pts = [q for k, q in enumerate(pts) if (k // 2) % 2 == 0]
    draw.line(pts, fill=color, width=width, joint='curve')
    draw.polygon([pt(q) for q in tri], fill=color)
  for e in layout.edges:
    if e.label_box is None:
      continue
    x0, y0, x1, y1 = e.label_box
    draw.rounded_rectangle([pt((x0, y0)), pt((x1, y1))], radius=3 * s, fill=(255, 255, 255))
    draw.text(pt(((x0 + x1) / 2, (y0 + y1) / 2)), e.op, fill=_hex_rgb(e.color),
              font=fonts['edge'], anchor='mm')
  for node in layout.nodes:
    x0, y0, x1, y1 = node.box()
    draw.rounded_rectangle([pt((x0, y0)), pt((x1, y1))], radius=8 * s,
                           fill=_hex_rgb(_NODE_FILL[node.kind]), outline=(51, 51, 51),
                           width=max(1, round(1.2 * s)))
    draw.text(pt((node.x, node.y)), node.label, fill=(17, 17, 17), font=fonts['node'],
              anchor='mm')


def save_genotype_png(genotype, path, *, scale: float = 2.0) -> str:
  """Draws the normal and reduction cells into one PNG with Pillow; returns the path.

  Args:
    genotype: the genotype to draw.
    path: the PNG file to write.
    scale: pixels per layout unit (the SVG's pixel); 2 gives a sharp image.
  """
  from PIL import Image, ImageDraw
  supersample = 2  # draw large and shrink: smooth lines without antialiasing support
  s = scale * supersample
  fonts = {'title': _font(_TITLE_FONT * s), 'edge': _font(_EDGE_FONT * s),
           'node': _font(_NODE_FONT * s)}

  # Lay out with the real font's widths (in layout units) so labels fit their boxes.
  def text_width(text, size):
    font = fonts['edge'] if size == _EDGE_FONT else fonts['node'] if size == _NODE_FONT \
        else fonts['title']
    return font.getlength(text) / s

  layouts = _genotype_layouts(genotype, text_width)
  width = max(l.width for l in layouts)
  height = sum(l.height for l in layouts)
  image = Image.new('RGB', (math.ceil(width * s), math.ceil(height * s)), 'white')
  draw = ImageDraw.Draw(image)
  dy = 0.0
  for layout in layouts:
    _draw_cell(draw, layout, s, dy, fonts)
    dy += layout.height
  image = image.reduce(supersample)  # box filter: each pixel averages its 2x2 block
  return files.write_image(path, image)
