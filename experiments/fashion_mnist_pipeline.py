"""Search, then retrain: the Fashion-MNIST pipeline against random and published cells.

Runs the quick PC-DARTS search (configs/pcdarts_fashion_mnist.py), then trains from
scratch, with one and the same budget (configs/eval_fashion_mnist.py): the searched cell,
--num_random cells drawn uniformly from the DARTS space (the random-search baseline), and
the published DARTS_V2 and PC_DARTS_cifar cells. Reports each cell's test accuracy and
wall time, and the searched cell against the random cells' mean and spread.

  python experiments/fashion_mnist_pipeline.py --workdir=runs/pipeline --num_random=3

Every stage resumes: a finished search or training is read back, not run again. The
table is printed and written to --out (JSON) and next to it as Markdown.

Measured on a 2-core AMD EPYC VM (CPU), --num_random=3, with the search already done:
six trainings of 4-12 min each, 38 min in all. Test top-1: searched 81.40 %, DARTS_V2
85.08 %, PC_DARTS_cifar 85.25 %, random 85.32 +- 0.74 % (84.80, 86.17, 85.00).
"""

import json
import os
import sys
import time

from absl import app
from absl import flags
from absl import logging
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import eval_fashion_mnist  # noqa: E402
from configs import pcdarts_fashion_mnist  # noqa: E402
from jaxnas import genotypes  # noqa: E402
from jaxnas import search  # noqa: E402
from jaxnas import summary as summary_lib  # noqa: E402
from jaxnas import train  # noqa: E402

_WORKDIR = flags.DEFINE_string('workdir', 'runs/pipeline', 'Where the runs go.')
_SEARCH = flags.DEFINE_string('search_workdir', None,
                              'A search workdir to use (default: WORKDIR/search).')
_NUM_RANDOM = flags.DEFINE_integer('num_random', 3, 'Random cells to train.')
_RANDOM_SEED = flags.DEFINE_integer('random_seed', 0, 'Seed of the random cells.')
_TRAIN_ARG = flags.DEFINE_string('train_variant', None,
                                 'Variant of eval_fashion_mnist.py (e.g. smoke).')
_SEARCH_ARG = flags.DEFINE_string('search_variant', None,
                                  'Variant of pcdarts_fashion_mnist.py (e.g. smoke).')
_OUT = flags.DEFINE_string('out', 'results/fashion_mnist_pipeline.json', 'JSON output.')


def _finished(workdir):
  path = os.path.join(workdir, summary_lib.SUMMARY_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    summary = json.load(f)
  return summary if 'result' in summary else None


def run_search(workdir):
  if not os.path.exists(os.path.join(workdir, genotypes.GENOTYPE_FILE)):
    t0 = time.perf_counter()
    search.run_search(pcdarts_fashion_mnist.get_config(_SEARCH_ARG.value), workdir)
    print(f'search took {time.perf_counter() - t0:.0f} s', flush=True)
  with open(os.path.join(workdir, genotypes.GENOTYPE_FILE)) as f:
    meta = json.load(f)
  return {'workdir': workdir, 'wall_s': meta.get('wall_s'),
          'arch_split_acc': meta.get('arch_split_acc'),
          'genotype': genotypes.format_genotype(genotypes.load(workdir))}


def retrain(name, source, workdir):
  done = _finished(workdir)
  if done is None:
    config = eval_fashion_mnist.get_config(_TRAIN_ARG.value)
    config.genotype = source
    train.run_train(config, workdir)
    done = _finished(workdir)
  r, m = done['result'], done['model']
  return {'name': name, 'genotype_source': source, 'params': m['params'],
          'multiply_adds': m['multiply_adds'], 'test_top1': r['test_top1'],
          'test_top5': r['test_top5'], 'best_test_top1': r['best_test_top1'],
          'wall_s': r['wall_s'], 'compile_s': r['compile_s'],
          'genotype': genotypes.format_genotype(genotypes.from_json(m['genotype']))}


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  root = _WORKDIR.value
  os.makedirs(root, exist_ok=True)
  search_dir = _SEARCH.value or os.path.join(root, 'search')
  found = run_search(search_dir)

  cells = [('searched', search_dir), ('DARTS_V2', 'DARTS_V2'),
           ('PC_DARTS_cifar', 'PC_DARTS_cifar')]
  rng = np.random.default_rng(_RANDOM_SEED.value)
  for i in range(_NUM_RANDOM.value):
    path = os.path.join(root, f'random_{i}.json')
    genotypes.save(genotypes.random_genotype(rng), path)
    cells.append((f'random_{i}', path))
  runs = [retrain(name, source, os.path.join(root, f'train_{name}'))
          for name, source in cells]

  randoms = [r['test_top1'] for r in runs if r['name'].startswith('random_')]
  searched = runs[0]['test_top1']
  report = {'search': found, 'runs': runs,
            'random': {'n': len(randoms), 'mean': float(np.mean(randoms)) if randoms else None,
                       'std': float(np.std(randoms, ddof=1)) if len(randoms) > 1 else None,
                       'min': min(randoms, default=None), 'max': max(randoms, default=None)},
            'searched_minus_random_mean': searched - float(np.mean(randoms)) if randoms else None,
            'train_config': eval_fashion_mnist.get_config(_TRAIN_ARG.value).to_dict()}

  lines = ['| cell | params | M mult-adds | test top-1 | test top-5 | wall |',
           '|---|---|---|---|---|---|']
  for r in runs:
    lines.append(f'| {r["name"]} | {r["params"] / 1e6:.3f}M | {r["multiply_adds"] / 1e6:.1f} | '
                 f'{100 * r["test_top1"]:.2f}% | {100 * r["test_top5"]:.2f}% | '
                 f'{r["wall_s"] / 60:.1f} min |')
  if randoms:
    spread = (f' ± {100 * report["random"]["std"]:.2f}' if len(randoms) > 1 else '')
    lines.append(f'| random mean (N={len(randoms)}) | | | {100 * np.mean(randoms):.2f}%'
                 f'{spread} (min {100 * min(randoms):.2f}, max {100 * max(randoms):.2f}) | | |')
  table = '\n'.join(lines)
  print(f'\nsearch: {found["genotype"]}\n\n{table}', flush=True)
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  with open(_OUT.value, 'w') as f:
    json.dump(report, f, indent=2)
  with open(os.path.splitext(_OUT.value)[0] + '.md', 'w') as f:
    f.write(table + '\n')
  print(f'wrote {_OUT.value}', flush=True)


if __name__ == '__main__':
  app.run(main)
