"""The protocol's report (experiments/fashion_mnist_pipeline.py): per-cell and per-group
statistics and the Markdown table, from the records of its trainings. No flags, so tests
and notebooks can import it."""

import numpy as np

GROUPS = ('searched', 'random', 'published')


def _stats(values):
  values = [float(v) for v in values]
  return {'n': len(values), 'mean': float(np.mean(values)) if values else None,
          'std': float(np.std(values, ddof=1)) if len(values) > 1 else None,
          'min': min(values, default=None), 'max': max(values, default=None)}


def aggregate(runs: list[dict]) -> dict:
  """Per cell: its trainings and their means; per group: mean +- std (ddof 1) over its
  cells' means; the searched-minus-random gaps; where each searched cell ranks among the
  random cells (by validation top-1)."""
  cells = {}
  for r in runs:
    c = cells.setdefault(r['cell'], {'cell': r['cell'], 'group': r['group'],
                                     'params': r['params'],
                                     'multiply_adds': r['multiply_adds'],
                                     'genotype': r['genotype'], 'runs': []})
    c['runs'].append({k: r[k] for k in ('train_seed', 'val_top1', 'test_top1', 'wall_s')})
  for c in cells.values():
    c['runs'].sort(key=lambda r: r['train_seed'])
    for key in ('val_top1', 'test_top1'):
      c[key] = float(np.mean([r[key] for r in c['runs']]))
    # Spread over the training seeds alone: the noise floor of one cell.
    c['val_seed_std'] = _stats([r['val_top1'] for r in c['runs']])['std']
  groups = {}
  for group in GROUPS:
    members = [c for c in cells.values() if c['group'] == group]
    if members:
      groups[group] = {key: _stats([c[key] for c in members])
                       for key in ('val_top1', 'test_top1', 'params', 'multiply_adds')}
  gap = {}
  if 'searched' in groups and 'random' in groups:
    for key in ('val_top1', 'test_top1'):
      gap[key] = groups['searched'][key]['mean'] - groups['random'][key]['mean']
    randoms = sorted(c['val_top1'] for c in cells.values() if c['group'] == 'random')
    gap['searched_val_beats_random'] = {
        c['cell']: f'{sum(c["val_top1"] > v for v in randoms)}/{len(randoms)}'
        for c in cells.values() if c['group'] == 'searched'}
  return {'cells': list(cells.values()), 'groups': groups, 'searched_minus_random': gap}


def _pct(x, digits=2):
  return '-' if x is None else f'{100 * x:.{digits}f}'


def _mean_std(s):
  if s['std'] is None:
    return f'{_pct(s["mean"])} %'
  return f'{_pct(s["mean"])} ± {_pct(s["std"])} %'


def table(report: dict) -> str:
  """The protocol's Markdown table: one row per cell, then one per group."""
  lines = ['| cell | group | params | M mult-adds | validation top-1 (per seed) | '
           'validation mean | test top-1 (per seed) | test mean |',
           '|---|---|---|---|---|---|---|---|']
  for c in report['cells']:
    val = ' / '.join(_pct(r['val_top1']) for r in c['runs'])
    test = ' / '.join(_pct(r['test_top1']) for r in c['runs'])
    lines.append(f'| {c["cell"]} | {c["group"]} | {c["params"]:,} | '
                 f'{c["multiply_adds"] / 1e6:.1f} | {val} | {_pct(c["val_top1"])} % | '
                 f'{test} | {_pct(c["test_top1"])} % |')
  for group, g in report['groups'].items():
    params = f'{g["params"]["min"]:,.0f}-{g["params"]["max"]:,.0f}'
    madds = (f'{g["multiply_adds"]["min"] / 1e6:.1f}-'
             f'{g["multiply_adds"]["max"] / 1e6:.1f}')
    lines.append(f'| **{group}** (N={g["val_top1"]["n"]} cells) | | {params} | {madds} | | '
                 f'{_mean_std(g["val_top1"])} | | {_mean_std(g["test_top1"])} |')
  gap = report['searched_minus_random']
  if gap:
    lines.append(f'| **searched − random** | | | | | {100 * gap["val_top1"]:+.2f} points | | '
                 f'{100 * gap["test_top1"]:+.2f} points |')
  return '\n'.join(lines)


def arch_weights(arch: dict, primitives) -> dict:
  """How decided a DARTS search's arch params are, per cell kind: each op's mean softmax
  weight over the edges, and the median over edges of the logit lead of the strongest
  non-'none' op over the second (the margin the final per-edge argmax rests on)."""
  out = {}
  keep = [k for k, p in enumerate(primitives) if p != 'none']
  for kind in ('normal', 'reduce'):
    a = np.asarray(arch[f'alphas_{kind}'], np.float64)
    w = np.exp(a - a.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    top2 = np.sort(a[:, keep], axis=-1)[:, -2:]
    out[kind] = {'mean_weight': dict(zip(primitives, w.mean(0).round(4).tolist())),
                 'median_margin': float(np.median(top2[:, 1] - top2[:, 0]))}
  return out
