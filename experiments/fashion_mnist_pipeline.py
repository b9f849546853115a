"""Searched cells against random and published cells, trained the same way (Fashion-MNIST).

The protocol a search result has to pass (Li & Talwalkar 2019; Yang et al. 2020):

1. The quick PC-DARTS search (configs/pcdarts_fashion_mnist.py) from each of
   --search_seeds; each search's final genotype is its searched cell (nothing is picked
   among them). With --perturbation_examples=N each searched cell is instead selected
   from the search's trained supernet (jaxnas.perturbation, scored on N images of its arch
   split); with --cost_penalty=λ it is re-derived from the arch params by the
   cost-aware rule (darts.derive_genotype). Neither runs a new search.
2. --num_random cells drawn uniformly from the same DARTS space
   (``genotypes.random_genotype``, seeded by --random_seed), and the published DARTS_V2
   and PC_DARTS_cifar cells.
3. Every cell trained from scratch with one config (configs/eval_fashion_mnist.py with
   the protocol's budget: --train_epochs x --train_steps_per_epoch steps of 64) from each
   of --train_seeds (the seed sets the initial weights, the data order, the augmentation
   and drop path). The last --validation_examples images of the train split are held out:
   the network trains on the rest and is scored on them after every epoch. The test split
   is scored once, after the last step, and only reported.

--search_set changes fields of the search config (``model.edge_normalization=False``), so
a remedy runs in a workdir of its own. --reference_report reads the random and published
cells' trainings from an earlier report of the same training config (they do not depend
on the search) instead of training them again; the report names it.

It prints and writes (--out, JSON, and the same name with .md) one row per cell (params,
multiply-adds, validation and test top-1 of each training seed and their mean) and one
row per group: the searched cells over search seeds, the random cells, the published
cells, each as mean +- std over its cells (a cell's value is its mean over the training
seeds), and the searched-minus-random gap.

  python experiments/fashion_mnist_pipeline.py --workdir=runs/protocol

Every stage resumes: a finished search or training is read back, not run again, so an
interrupted protocol continues where it stopped and --groups can split it over several
processes (e.g. the random cells trained while the searches run).
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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import protocol_report  # noqa: E402  (experiments/, beside this script)
from configs import eval_fashion_mnist  # noqa: E402
from configs import pcdarts_fashion_mnist  # noqa: E402
from jaxnas import checkpoint  # noqa: E402
from jaxnas import genotypes  # noqa: E402
from jaxnas import perturbation  # noqa: E402
from jaxnas import search  # noqa: E402
from jaxnas import summary as summary_lib  # noqa: E402
from jaxnas import train  # noqa: E402
from jaxnas.spaces import darts as darts_space  # noqa: E402

PUBLISHED = ('DARTS_V2', 'PC_DARTS_cifar')
GROUPS = protocol_report.GROUPS

_WORKDIR = flags.DEFINE_string('workdir', 'runs/protocol', 'Where the runs go.')
_SEARCH_SEEDS = flags.DEFINE_list('search_seeds', ['0', '1', '2'], 'Seeds of the searches.')
_NUM_RANDOM = flags.DEFINE_integer('num_random', 8, 'Random cells to train.')
_RANDOM_SEED = flags.DEFINE_integer('random_seed', 0, 'Seed of the random cells.')
_PUBLISHED = flags.DEFINE_list('published', list(PUBLISHED), 'Published cells to train.')
_TRAIN_SEEDS = flags.DEFINE_list('train_seeds', ['0', '1'], 'Seeds of every training.')
_EPOCHS = flags.DEFINE_integer('train_epochs', 2, 'Training epochs of every cell.')
_STEPS = flags.DEFINE_integer('train_steps_per_epoch', 200, 'Steps of 64 per epoch.')
_VALIDATION = flags.DEFINE_integer('validation_examples', 5000,
                                   'Train images held out for validation.')
_GROUPS = flags.DEFINE_list('groups', list(GROUPS),
                            'Which cells this process trains (the report covers all).')
_TRAIN_ARG = flags.DEFINE_string('train_variant', None,
                                 'Variant of eval_fashion_mnist.py (e.g. smoke).')
_SEARCH_ARG = flags.DEFINE_string('search_variant', None,
                                  'Variant of pcdarts_fashion_mnist.py (e.g. smoke).')
_COST = flags.DEFINE_float(
    'cost_penalty', 0.0, 'Derive each searched cell from its search\'s arch params with '
    'this cost penalty (darts.derive_genotype); 0: the search\'s own genotype.')
_PERTURB = flags.DEFINE_integer(
    'perturbation_examples', 0, 'Select each searched cell by perturbation '
    '(jaxnas.perturbation: the rise of the supernet\'s held-out loss when each op or '
    'edge is taken out) on this many arch-split images; 0: the search\'s own genotype.')
_SEARCH_SET = flags.DEFINE_list(
    'search_set', [], 'FIELD=VALUE changes of the search config (e.g. '
    'model.edge_normalization=False); a value takes its field\'s type.')
_REFERENCE = flags.DEFINE_string(
    'reference_report', None, 'An earlier report (JSON) whose random and published '
    'trainings stand for this protocol\'s (same training config and random cells).')
_DATA_DIR = flags.DEFINE_string('data_dir', None,
                                'Fashion-MNIST IDX files (default: the Debian package).')
_CACHE = flags.DEFINE_string('compilation_cache_dir', None,
                             'XLA compilation cache (default: the configs\').')
_OUT = flags.DEFINE_string('out', 'results/fashion_mnist_protocol.json', 'JSON output.')


# ----------------------------------------------------------------------------- configs


def _data_overrides(config):
  if _DATA_DIR.value:
    config.data.source, config.data.data_dir = 'idx', _DATA_DIR.value
  if _CACHE.value:
    config.compilation_cache_dir = _CACHE.value
  return config


_TRUE, _FALSE = ('1', 'true', 'yes', 'on'), ('0', 'false', 'no', 'off')


def _typed(field: str, default, text: str):
  """``text`` as a value of ``default``'s type, or a UsageError naming ``field``."""
  try:
    if isinstance(default, bool):
      if text.lower() not in _TRUE + _FALSE:
        raise ValueError
      return text.lower() in _TRUE
    if isinstance(default, (int, float)):
      return type(default)(text)
    if default is None or isinstance(default, str):
      return text
  except ValueError:
    pass
  raise app.UsageError(f'--search_set {field}={text}: {field} takes a value like '
                       f'{default!r}.')


def set_fields(config, assignments):
  """``config`` with each ``FIELD=VALUE`` of ``assignments`` set (dotted fields)."""
  for item in assignments:
    field, sep, text = item.partition('=')
    node = config
    *parents, leaf = field.split('.')
    for name in parents:
      node = node.get(name) if hasattr(node, 'get') else None
    if not sep or not hasattr(node, 'get') or leaf not in node:
      raise app.UsageError(f'--search_set {item}: the search config has no field '
                           f'{field!r} (write FIELD=VALUE).')
    node[leaf] = _typed(field, node[leaf], text)
  return config


def search_config(seed: int):
  config = pcdarts_fashion_mnist.get_config(_SEARCH_ARG.value)
  config.seed = seed
  return _data_overrides(set_fields(config, _SEARCH_SET.value))


def train_config(source: str, seed: int):
  """The protocol's one training config, for the cell ``source`` and ``seed``."""
  config = eval_fashion_mnist.get_config(_TRAIN_ARG.value)
  config.genotype = source
  config.seed = seed
  config.data.validation_examples = _VALIDATION.value
  if not _TRAIN_ARG.value:  # a variant keeps its own (smaller) budget
    config.optim.epochs = _EPOCHS.value
    config.optim.steps_per_epoch = _STEPS.value
  return _data_overrides(config)


# ----------------------------------------------------------------------------- stages


def _read_json(path):
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _stop_if_signalled(result) -> None:
  """A search or training stopped by SIGTERM or Ctrl-C (checkpointed, and it said how
  to resume) stops the protocol with its exit status."""
  if result and 'exit_code' in result:
    sys.exit(result['exit_code'])


def run_search(seed: int, workdir: str) -> dict:
  wanted = search_config(seed)
  if not os.path.exists(os.path.join(workdir, genotypes.GENOTYPE_FILE)):
    _stop_if_signalled(search.run_search(wanted, workdir))
  config = checkpoint.read_workdir_config(workdir)
  # Read back only what this protocol's config would have searched.
  differ = checkpoint.config_differences(config, wanted)
  if differ:
    raise app.UsageError(f'{workdir} holds a search whose {", ".join(differ)} differ '
                         'from this protocol\'s (--search_set); use another --workdir.')
  meta = _read_json(os.path.join(workdir, genotypes.GENOTYPE_FILE))
  primitives = config['model']['primitives']
  return {'seed': seed, 'workdir': workdir, 'wall_s': meta.get('wall_s'),
          'arch_split_acc': meta.get('arch_split_acc'), 'config': config,
          'genotype': genotypes.format_genotype(genotypes.load(workdir)),
          'arch_weights': protocol_report.arch_weights(meta, primitives)}


def cost_aware_cell(search_workdir: str, path: str, penalty: float) -> str:
  """Writes (once) the cell that ``penalty`` derives from a finished search's arch
  params to ``path``; returns ``path``."""
  if not os.path.exists(path):
    m = _read_json(os.path.join(search_workdir, 'config.json'))['model']
    with np.load(os.path.join(search_workdir, 'arch.npz')) as arch:
      genotype = darts_space.derive_genotype(
          dict(arch), m['steps'], tuple(m['primitives']), cost_penalty=penalty, C=m['C'])
    genotypes.save(genotype, path, cost_penalty=penalty, search=search_workdir)
  return path


def perturbation_cell(seed: int, search_workdir: str, path: str) -> str:
  """Writes (once) the cell that perturbation selects from a finished search to
  ``path``; returns ``path``."""
  if not os.path.exists(path):
    genotype, scores = perturbation.select(search_config(seed), search_workdir,
                                           _PERTURB.value)
    genotypes.save(genotype, path, perturbation_examples=scores['num_examples'],
                   search=search_workdir)
  return path


def finished_training(workdir: str):
  summary = _read_json(os.path.join(workdir, summary_lib.SUMMARY_FILE))
  return summary if summary and 'result' in summary else None


def retrain(cell: dict, seed: int, workdir: str, run: bool) -> dict | None:
  """One training of ``cell`` (trained here if ``run`` and not finished); its record, or
  None if it has not finished."""
  done = finished_training(workdir)
  if done is None and run:
    _stop_if_signalled(train.run_train(train_config(cell['source'], seed), workdir))
    done = finished_training(workdir)
  if done is None:
    return None
  r, m = done['result'], done['model']
  return {'cell': cell['name'], 'group': cell['group'], 'train_seed': seed,
          'params': m['params'], 'multiply_adds': m['multiply_adds'],
          'val_top1': r['val_top1'], 'test_top1': r['test_top1'], 'wall_s': r['wall_s'],
          'compile_s': r['compile_s'], 'workdir': workdir,
          'genotype': genotypes.format_genotype(genotypes.from_json(m['genotype']))}


def reference_runs(path: str, cells: list[dict]) -> dict:
  """The trainings of ``cells`` (random and published) in the report at ``path``, by
  (cell, training seed), after checking that it trained them as this protocol would."""
  report = _read_json(path)
  if not isinstance(report, dict) or not {'cells', 'train_config'} <= set(report):
    raise app.UsageError(f'--reference_report {path} is not a protocol report (JSON).')
  differ = checkpoint.config_differences(report['train_config'], train_config('<cell>', 0))
  if differ:
    raise app.UsageError(f'--reference_report {path} trained with other '
                         f'{", ".join(differ)}; train those cells here instead.')
  recorded = {c['cell']: c for c in report['cells']}
  runs = {}
  for cell in cells:
    name = cell['name']
    genotype = genotypes.format_genotype(genotypes.load(cell['source']))  # file or name
    if name not in recorded or recorded[name]['genotype'] != genotype:
      raise app.UsageError(f'--reference_report {path} has no training of {name} as '
                           'drawn here (another --random_seed?).')
    c = recorded[name]
    for r in c['runs']:
      runs[name, r['train_seed']] = {
          'cell': name, 'group': cell['group'], 'train_seed': r['train_seed'],
          'params': c['params'], 'multiply_adds': c['multiply_adds'],
          'val_top1': r['val_top1'], 'test_top1': r['test_top1'], 'wall_s': r['wall_s'],
          'compile_s': None, 'workdir': path, 'genotype': genotype}
    for seed in map(int, _TRAIN_SEEDS.value):
      if (name, seed) not in runs:
        raise app.UsageError(f'--reference_report {path} has no training of {name} with '
                             f'seed {seed}.')
  return runs


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  unknown = set(_GROUPS.value) - set(GROUPS)
  if unknown:
    raise app.UsageError(f'--groups has {sorted(unknown)}; choose from {GROUPS}.')
  if _COST.value and _PERTURB.value:
    raise app.UsageError('--cost_penalty and --perturbation_examples are two ways to '
                         'select a searched cell; give one.')
  search_config(0)  # a bad --search_set stops here, before anything runs
  t_start = time.perf_counter()
  root = _WORKDIR.value
  os.makedirs(root, exist_ok=True)

  others = [{'name': name, 'group': 'published', 'source': name}
            for name in _PUBLISHED.value]
  rng = np.random.default_rng(_RANDOM_SEED.value)
  for i in range(_NUM_RANDOM.value):
    path = os.path.join(root, f'random_{i}.json')
    # Drawn in order from one generator: cell i is the same for every process.
    genotype = genotypes.random_genotype(rng)
    if not os.path.exists(path):
      genotypes.save(genotype, path)
    others.append({'name': f'random_{i}', 'group': 'random', 'source': path})

  reference = {}
  if _REFERENCE.value:
    reference = reference_runs(_REFERENCE.value, others)  # checked before any search
  cells, searches = [], []  # the searched cells first, then the others
  for seed in map(int, _SEARCH_SEEDS.value):
    workdir = os.path.join(root, f'search_seed{seed}')
    if 'searched' in _GROUPS.value:
      searches.append(run_search(seed, workdir))
    name, source = f'searched_seed{seed}', workdir
    finished = os.path.exists(os.path.join(workdir, genotypes.GENOTYPE_FILE))
    if _COST.value:
      name = f'searched_cost{_COST.value:g}_seed{seed}'
      if finished:
        source = cost_aware_cell(workdir, os.path.join(root, f'{name}.json'), _COST.value)
    elif _PERTURB.value:
      name = f'searched_pt{_PERTURB.value}_seed{seed}'
      if finished:
        source = perturbation_cell(seed, workdir, os.path.join(root, f'{name}.json'))
    # A search not finished yet stays its workdir: its trainings wait and are listed missing.
    cells.append({'name': name, 'group': 'searched', 'source': source})
  cells += others

  runs, missing = [], []
  for cell in cells:
    for seed in map(int, _TRAIN_SEEDS.value):
      if cell['group'] != 'searched' and reference:
        runs.append(reference[cell['name'], seed])
        continue
      workdir = os.path.join(root, f'train_{cell["name"]}_seed{seed}')
      run = cell['group'] in _GROUPS.value
      if os.path.isdir(cell['source']) and not os.path.exists(
          os.path.join(cell['source'], genotypes.GENOTYPE_FILE)):
        run = False  # its search has not finished (another process runs it)
      record = retrain(cell, seed, workdir, run)
      if record is None:
        missing.append(workdir)
      else:
        runs.append(record)

  report = protocol_report.aggregate(runs)
  report.update(searches=searches, missing=missing, reference_report=_REFERENCE.value,
                search_set=_SEARCH_SET.value,
                wall_s_this_process=time.perf_counter() - t_start,
                train_config=train_config('<cell>', 0).to_dict(),
                search_config=search_config(0).to_dict())
  text = protocol_report.table(report)
  if _SEARCH_SET.value:
    text += f'\n\nSearch config changed: {", ".join(_SEARCH_SET.value)}.'
  if reference:
    text += (f'\n\nRandom and published cells: their trainings are read from '
             f'{_REFERENCE.value}.')
  print(f'\n{text}', flush=True)
  if missing:
    print(f'{len(missing)} trainings have not finished yet: {", ".join(missing)}', flush=True)
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  with open(_OUT.value, 'w') as f:
    json.dump(report, f, indent=2)
  with open(os.path.splitext(_OUT.value)[0] + '.md', 'w') as f:
    f.write(text + '\n')
  print(f'wrote {_OUT.value}', flush=True)


if __name__ == '__main__':
  app.run(main)
