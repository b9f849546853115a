"""Model summaries from a config alone: parameter counts and multiply-adds.

``python -m jaxnas.main --config=... --workdir=DIR --dry_run`` prints one and writes it to
``DIR/summary.json``; every real run writes the same at its start and adds its result at
its end. Shapes are traced with ``jax.eval_shape``; nothing is run or compiled.
"""

import json
import os

import jax
import jax.numpy as jnp

from jaxnas import data as data_lib
from jaxnas import files
from jaxnas import flops
from jaxnas.spaces import darts_eval

SUMMARY_FILE = 'summary.json'


class UnknownDatasetError(ValueError):
  """config.data.name names no dataset jaxnas knows."""


def input_spec(config) -> tuple[tuple[int, int, int], int]:
  """(image shape, number of classes) of the configured dataset, without reading it."""
  name = config.data.name
  if name not in data_lib.DATASETS:
    raise UnknownDatasetError(f'config.data.name is {name!r}; choose one of '
                              f'{tuple(data_lib.DATASETS)}.')
  spec = data_lib.DATASETS[name]
  h, w, c = spec.image_shape
  if h is None:
    h = w = config.data.image_size or spec.default_image_size
  return (h, w, c), spec.num_classes


def supernet_summary(config, build_model) -> dict:
  """Weights, architecture parameters and multiply-adds (all candidate ops of every
  edge, on the partial channels) of a search config's supernet."""
  shape, num_classes = input_spec(config)
  x = jnp.zeros((1,) + shape, jnp.float32)
  traced = config.copy_and_resolve_references()
  with traced.unlocked():
    traced.model.depthwise_impl = 'xla'  # so the depthwise convs are counted
  model = build_model(traced, num_classes)
  rngs = {'params': jax.random.key(0), 'channels': jax.random.key(0)}
  variables = jax.eval_shape(lambda: model.init(rngs, x, train=True))
  macs = flops.count_macs(
      lambda v, x: model.apply(v, x, train=False, rngs={'channels': jax.random.key(0)}),
      variables, x)
  m = config.model
  return {'method': config.method, 'dataset': config.data.name, 'input_shape': list(shape),
          'num_classes': num_classes, 'C': m.C, 'layers': m.layers, 'k': m.k,
          'primitives': list(m.primitives), 'params': darts_eval.count_params(variables['params'], exclude=None),
          'arch_params': darts_eval.count_params(variables['arch'], exclude=None), 'multiply_adds': macs}


def format_summary(s: dict) -> str:
  size = 'x'.join(map(str, s['input_shape']))
  return (f'{s["method"]} supernet on {s["dataset"]} {size}: C={s["C"]}, {s["layers"]} cells, '
          f'K={s["k"]}, {len(s["primitives"])} candidate ops, {s["params"] / 1e6:.3f}M weights, '
          f'{s["arch_params"]} arch params, {s["multiply_adds"] / 1e6:.1f}M multiply-adds '
          'per image')


def holds_result(workdir: str) -> bool:
  """Whether ``workdir/summary.json`` holds a run's result (a dry run must not erase it)."""
  try:
    with open(os.path.join(workdir, SUMMARY_FILE)) as f:
      return 'result' in json.load(f)
  except (OSError, ValueError):
    return False


def write_summary(workdir: str, summary: dict) -> str:
  return files.write_json(os.path.join(workdir, SUMMARY_FILE), summary)
