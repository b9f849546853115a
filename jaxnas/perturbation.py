"""Perturbation-based cell selection from a finished DARTS / PC-DARTS search.

The reference derives a cell from the arch params alone (the argmax rule of
``darts.derive_genotype``). Perturbation-based selection (Wang et al. 2021, "Rethinking
architecture selection in differentiable NAS", DARTS-PT) asks the trained supernet
instead: an op is worth what the supernet loses on held-out data when that op alone is
taken out of its edge, and an edge what it loses when the whole edge is taken out.

Here every op and every edge is scored against the same trained supernet (one shot:
DARTS-PT discretizes one edge at a time and re-tunes the supernet in between). An op is
taken out by setting its logit to -inf, so its edge's other ops share the weight; an
edge by setting its edge-normalization logit (beta) to -inf. The score is the rise of
the mean cross-entropy on held-out images of the search's arch split (the loss, not
DARTS-PT's accuracy: it does not come in steps of one image). BatchNorm uses the
statistics of each eval batch, as in the search step, so a removal is not judged
against running statistics gathered with the op in place; the channel draw of partial
connections is one fixed key for all evaluations, so every score is a paired
difference.

  python -m jaxnas.perturbation --config=configs/pcdarts_fashion_mnist.py \
      --workdir=/tmp/fmnist --out=/tmp/fmnist_pt.json

scores the finished search in --workdir (run with that --config) and writes the cell to
--out, for an evaluation config's ``genotype``.
"""

import json
import os
import sys
from typing import Any

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags
import optax

from jaxnas import checkpoint as ckpt_lib
from jaxnas import data as data_lib
from jaxnas import files
from jaxnas import genotypes
from jaxnas import parallel
from jaxnas import search
from jaxnas.spaces import darts as darts_space

SCORES_FILE = 'perturbation.json'


def removals(arch: dict[str, np.ndarray], primitives, kinds=('normal', 'reduce')):
  """``(kind, edge, op or None, arch)`` for every non-'none' op and, with betas, every
  edge: the arch params with that op's logit (op None: that edge's beta) at -inf."""
  out = []
  candidates = [k for k, p in enumerate(primitives) if p != 'none']
  for kind in kinds:
    alphas = np.asarray(arch[f'alphas_{kind}'])
    for e in range(alphas.shape[0]):
      for k in candidates:
        a = {n: np.array(v) for n, v in arch.items()}
        a[f'alphas_{kind}'][e, k] = -np.inf
        out.append((kind, e, k, a))
      if f'betas_{kind}' in arch:
        a = {n: np.array(v) for n, v in arch.items()}
        a[f'betas_{kind}'][e] = -np.inf
        out.append((kind, e, None, a))
  return out


def check_search_config(workdir: str, config) -> None:
  """Refuses, in one sentence, a config that differs from the one the search in
  ``workdir`` ran with in a field both have (a field that jaxnas gained after the search
  ran is not a difference; nor are those a resumed run may change)."""
  path = os.path.join(workdir, ckpt_lib.CONFIG_FILE)
  if not os.path.exists(path):
    raise ckpt_lib.WorkdirError(f'{path} cannot be read (there is no such file); --workdir '
                                'must be a search workdir.')
  diff = ckpt_lib.config_differences(ckpt_lib.read_workdir_config(workdir), config,
                                     shared_only=True)
  if diff:
    raise ckpt_lib.WorkdirError(
        f'{workdir} holds a search run with a different config ({", ".join(diff[:5])} '
        'differ); give the config the search ran with.')


def make_loss_sums(model):
  """``sums(params, batch_stats, arch, batch, key)`` -> summed cross-entropy and correct
  predictions of the supernet with batch-statistics BN (its updates dropped)."""

  @jax.jit
  def sums(params, batch_stats, arch, batch, key):
    logits, _ = model.apply({'params': params, 'arch': arch, 'batch_stats': batch_stats},
                            batch['image'], train=True, rngs={'channels': key},
                            mutable=['batch_stats'])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label'])
    return jnp.sum(loss), jnp.sum(jnp.argmax(logits, -1) == batch['label'])

  return sums


def select(config, workdir: str, num_examples: int = 500, batch_size: int | None = None,
           progress: bool = True) -> tuple[genotypes.Genotype, dict[str, Any]]:
  """Scores every op and edge of the finished search in ``workdir`` (run with
  ``config``) and returns the selected genotype and the scores; both are written to
  ``workdir/perturbation.json`` and read back from there by later calls with the same
  ``num_examples`` and ``batch_size``.

  The held-out images are the first ``num_examples`` of the search's arch split, in
  whole batches of ``batch_size`` (default: 250 or fewer; the statistics of a padded
  batch would count the padding).
  """
  batch_size = batch_size or min(250, num_examples)
  if config.method not in ('darts', 'pcdarts'):
    raise ValueError(f'method is {config.method!r}; perturbation selection scores the '
                     'cells of a DARTS or PC-DARTS supernet.')
  if num_examples < batch_size or batch_size < 2:
    raise ValueError(f'num_examples ({num_examples}) must hold at least one batch of '
                     f'batch_size ({batch_size}) >= 2 images.')
  path = os.path.join(workdir, SCORES_FILE)
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    if (saved['requested_examples'], saved['batch_size']) == (num_examples, batch_size):
      return genotypes.from_json(saved['genotype']), saved
  if not os.path.exists(os.path.join(workdir, genotypes.GENOTYPE_FILE)):
    raise FileNotFoundError(f'{workdir} holds no finished search ({genotypes.GENOTYPE_FILE} '
                            'is missing); finish it before selecting a cell from it.')

  method = search.method_of(config)
  dataset = data_lib.load_dataset(config.data, split='train')
  _, arch_idx = data_lib.search_split(dataset, config.data.train_portion, seed=config.seed,
                                      per_class_fractions=config.data.per_class_fractions)
  n = min(num_examples, len(arch_idx)) // batch_size * batch_size
  batches = list(data_lib.eval_batches(dataset, arch_idx[:n], batch_size, 0, 1))

  mesh = parallel.make_mesh(1)
  model = method.build_model(config, dataset.num_classes, 1)
  weight_tx, arch_tx = method.make_optimizers(config, 1)
  template = jax.eval_shape(lambda: method.create_state(
      model, dataset.image_shape, weight_tx, arch_tx, config))
  manager = ckpt_lib.manager(workdir, config.checkpoints_to_keep)
  state, ok = ckpt_lib.restore_latest(manager, template, parallel.replicated(mesh))
  manager.close()
  if not ok:
    raise FileNotFoundError(f'{workdir} holds no checkpoint to score the supernet with.')

  sums = make_loss_sums(model)
  key = jax.random.key(config.seed)

  def loss_of(arch):
    loss = correct = 0.0
    for b in batches:
      l, c = sums(state.params, state.batch_stats, arch, b, key)
      loss, correct = loss + float(l), correct + float(c)
    return loss / n, correct / n

  arch = {k: np.asarray(v) for k, v in jax.device_get(state.arch).items()}
  base_loss, base_acc = loss_of(arch)
  primitives = tuple(config.model.primitives)
  e = darts_space.num_edges(config.model.steps)
  op_scores = {kind: np.full((e, len(primitives)), np.nan) for kind in ('normal', 'reduce')}
  op_acc = {kind: np.full((e, len(primitives)), np.nan) for kind in ('normal', 'reduce')}
  edge_scores, edge_acc = {}, {}
  todo = removals(arch, primitives)
  for i, (kind, edge, op, a) in enumerate(todo):
    loss, acc = loss_of(a)
    if op is None:
      edge_scores.setdefault(kind, np.zeros(e))[edge] = loss - base_loss
      edge_acc.setdefault(kind, np.zeros(e))[edge] = base_acc - acc
    else:
      op_scores[kind][edge, op] = loss - base_loss
      op_acc[kind][edge, op] = base_acc - acc
    if progress and (i + 1) % 25 == 0:
      print(f'perturbation: {i + 1}/{len(todo)} removals scored', flush=True)

  genotype = darts_space.genotype_from_scores(op_scores, config.model.steps, primitives,
                                              edge_scores)
  tolist = lambda d: {k: np.where(np.isnan(v), None, v).tolist() for k, v in d.items()}  # noqa: E731
  result = {'genotype': genotypes.to_json(genotype), 'num_examples': n,
            'requested_examples': num_examples,
            'batch_size': batch_size, 'step': int(state.step), 'base_loss': base_loss,
            'base_acc': base_acc, 'primitives': list(primitives),
            'op_loss_rise': tolist(op_scores), 'op_acc_drop': tolist(op_acc),
            'edge_loss_rise': tolist(edge_scores), 'edge_acc_drop': tolist(edge_acc)}
  files.write_text(path, json.dumps(result, indent=1))
  return genotype, result


def main():
  """The command line (flags defined here: the module is also imported by scripts with
  flags of their own)."""
  config_flag = config_flags.DEFINE_config_file('config', None, 'The search\'s config file.',
                                                lock_config=True)
  workdir_flag = flags.DEFINE_string('workdir', None, 'The finished search\'s workdir.')
  examples = flags.DEFINE_integer('num_examples', 500, 'Held-out arch-split images.')
  out_flag = flags.DEFINE_string('out', None, 'Where the selected genotype goes (JSON); '
                                 'default WORKDIR/perturbation_genotype.json.')
  flags.mark_flags_as_required(['config', 'workdir'])

  def run(argv):
    del argv
    config, workdir = config_flag.value, workdir_flag.value
    try:
      check_search_config(workdir, config)
      genotype, scores = select(config, workdir, examples.value)
    except (ValueError, FileNotFoundError, ckpt_lib.WorkdirError) as e:
      print(f'jaxnas: error: {e}', file=sys.stderr, flush=True)
      sys.exit(1)
    out = out_flag.value or os.path.join(workdir, 'perturbation_genotype.json')
    genotypes.save(genotype, out, perturbation_examples=scores['num_examples'],
                   search=workdir)
    print(f'{genotypes.format_genotype(genotype)}\nselected by perturbation on '
          f'{scores["num_examples"]} images; written to {out}', flush=True)

  app.run(run)


if __name__ == '__main__':
  main()
