"""PARSEC against FP-NAS, side by side on the same offline data and budget.

Runs the quick PARSEC search (configs/parsec_fashion_mnist.py: K = 16 architectures per
step) and the quick FP-NAS search (configs/fpnas_fashion_mnist.py: the same search with
K = ceil(H / 4), at least 2) one after the other on this machine, then trains both found
cells from scratch with one evaluation config (configs/eval_fashion_mnist.py). Reports per
method: the architectures sampled in all, the search's wall time, the held-out accuracy
of the most likely architecture, the final entropy, and the trained cell's test top-1.

  python experiments/parsec_vs_fpnas.py --workdir=runs/parsec_vs_fpnas

This is jaxnas's own measurement on Fashion-MNIST in the sampled DARTS-like cell space,
not a replication of the FP-NAS paper (which measured FBNetV2-like spaces on
ImageNet-100). Every stage resumes: a finished search or training is read back, not run
again. The table is printed and written to --out (JSON) and next to it as Markdown.
"""

import json
import os
import sys

from absl import app
from absl import flags
from absl import logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import eval_fashion_mnist  # noqa: E402
from configs import fpnas_fashion_mnist  # noqa: E402
from configs import parsec_fashion_mnist  # noqa: E402
from jaxnas import genotypes  # noqa: E402
from jaxnas import search  # noqa: E402
from jaxnas import summary as summary_lib  # noqa: E402
from jaxnas import train  # noqa: E402

_WORKDIR = flags.DEFINE_string('workdir', 'runs/parsec_vs_fpnas', 'Where the runs go.')
_SEARCH_ARG = flags.DEFINE_string('search_variant', None,
                                  'Variant of the two search configs (e.g. smoke).')
_TRAIN_ARG = flags.DEFINE_string('train_variant', None,
                                 'Variant of eval_fashion_mnist.py (e.g. smoke).')
_SKIP_TRAIN = flags.DEFINE_bool('skip_train', False, 'Compare the searches only.')
_OUT = flags.DEFINE_string('out', 'results/parsec_vs_fpnas.json', 'JSON output.')

METHODS = (('parsec', parsec_fashion_mnist), ('fpnas', fpnas_fashion_mnist))


def finished(workdir):
  """The summary of a finished run in ``workdir``, or None."""
  path = os.path.join(workdir, summary_lib.SUMMARY_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    summary = json.load(f)
  return summary if 'result' in summary else None


def run_search(name, config_module, workdir):
  if finished(workdir) is None:
    search.run_search(config_module.get_config(_SEARCH_ARG.value), workdir)
  r = finished(workdir)['result']
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    ks = [rec['num_samples'] for rec in map(json.loads, f) if 'num_samples' in rec]
  return {'method': name, 'workdir': workdir, 'samples_drawn': r['samples_drawn'],
          'steps': r['steps'], 'wall_s': r['wall_s'], 'compile_s': r['compile_s'],
          'arch_split_acc': r['arch_split_acc'], 'final_entropy': r['final_entropy'],
          'first_k': ks[0] if ks else None, 'last_k': ks[-1] if ks else None,
          'genotype': genotypes.format_genotype(genotypes.from_json(r['genotype']))}


def retrain(source, workdir):
  if finished(workdir) is None:
    config = eval_fashion_mnist.get_config(_TRAIN_ARG.value)
    config.genotype = source
    train.run_train(config, workdir)
  r, m = finished(workdir)['result'], finished(workdir)['model']
  return {'test_top1': r['test_top1'], 'best_test_top1': r['best_test_top1'],
          'params': m['params'], 'train_wall_s': r['wall_s']}


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  root = _WORKDIR.value
  os.makedirs(root, exist_ok=True)
  rows = []
  for name, module in METHODS:
    row = run_search(name, module, os.path.join(root, name))
    if not _SKIP_TRAIN.value:
      row.update(retrain(row['workdir'], os.path.join(root, f'train_{name}')))
    rows.append(row)

  lines = ['| method | architectures sampled | K first / last | search wall | held-out acc. '
           '(most likely) | final entropy | retrained test top-1 |',
           '|---|---|---|---|---|---|---|']
  for r in rows:
    trained = f'{100 * r["test_top1"]:.2f}%' if 'test_top1' in r else '-'
    lines.append(f'| {r["method"]} | {r["samples_drawn"]} | {r["first_k"]:.0f} / '
                 f'{r["last_k"]:.0f} | {r["wall_s"] / 60:.1f} min | '
                 f'{100 * r["arch_split_acc"]:.2f}% | {r["final_entropy"]:.2f} nats | '
                 f'{trained} |')
  table = '\n'.join(lines)
  print('\n' + '\n'.join(f'{r["method"]}: {r["genotype"]}' for r in rows) + f'\n\n{table}',
        flush=True)
  report = {'runs': rows, 'eval_config': eval_fashion_mnist.get_config(
      _TRAIN_ARG.value).to_dict()}
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  with open(_OUT.value, 'w') as f:
    json.dump(report, f, indent=2, default=str)
  with open(os.path.splitext(_OUT.value)[0] + '.md', 'w') as f:
    f.write(table + '\n')
  print(f'wrote {_OUT.value}', flush=True)


if __name__ == '__main__':
  app.run(main)
