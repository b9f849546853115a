"""Trained models on disk: save one, load it back as a function from images to logits.

A model directory holds ``variables/`` (the params and BN statistics, an orbax
checkpoint) and ``model.json`` (the space and its architecture, the training config, the
dataset's normalization and how the model scored). A training workdir keeps two: ``export/best``
and ``export/last``.

  model = jaxnas.load_model('runs/eval_fmnist')   # export/best
  logits = model(images)                          # uint8 [N, H, W, C] pixels
"""

import dataclasses
import json
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from jaxnas import spaces

MODEL_FILE = 'model.json'
VARIABLES_DIR = 'variables'
EXPORT_DIR = 'export'


class ModelNotFoundError(FileNotFoundError):
  """No exported model where one was asked for."""


def save_model(path: str, params, batch_stats, *, genotype, config, num_classes: int,
               image_shape, mean, std, space: str = 'darts', **info) -> str:
  """Writes a model directory at ``path``, replacing an older one only once the new one
  is complete (so a crash mid-write never loses the previous best model). In a
  multi-process run process 0 writes it alone (the variables are replicated)."""
  path = os.path.abspath(path)
  if jax.process_index() != 0:
    return path
  params, batch_stats = jax.device_get((params, batch_stats))
  tmp, old = f'{path}.tmp', f'{path}.old'
  for p in (tmp, old):
    shutil.rmtree(p, ignore_errors=True)
  os.makedirs(tmp)
  checkpointer = ocp.StandardCheckpointer(  # on this process alone
      multiprocessing_options=ocp.options.MultiprocessingOptions(
          primary_host=jax.process_index(), active_processes={jax.process_index()}))
  checkpointer.save(os.path.join(tmp, VARIABLES_DIR),
                    {'params': params, 'batch_stats': batch_stats})
  checkpointer.wait_until_finished()
  meta = {'space': space, 'genotype': spaces.EVAL_SPACES[space].to_json(genotype),
          'config': json.loads(config.to_json_best_effort()),
          'num_classes': int(num_classes), 'image_shape': [int(d) for d in image_shape],
          'mean': [float(m) for m in np.ravel(mean)], 'std': [float(s) for s in np.ravel(std)],
          **info}
  with open(os.path.join(tmp, MODEL_FILE), 'w') as f:
    json.dump(meta, f, indent=2)
  if os.path.exists(path):
    os.replace(path, old)
  os.replace(tmp, path)
  shutil.rmtree(old, ignore_errors=True)
  return path


@dataclasses.dataclass
class Model:
  """A trained evaluation network. ``model(images)`` returns logits [N, num_classes] for
  images [N, H, W, C] with pixel values 0..255 (uint8 or float), normalized here with the
  training data's mean and std. ``genotype`` is the architecture of ``space`` (a DARTS
  genotype, or a ProxylessNAS op per layer)."""
  module: Any
  variables: Any
  genotype: Any
  config: ml_collections.ConfigDict
  num_classes: int
  image_shape: tuple[int, ...]
  mean: np.ndarray
  std: np.ndarray
  info: dict
  space: str = 'darts'

  def __post_init__(self):
    self._logits = jax.jit(
        lambda variables, x: self.module.apply(variables, x, train=False)[0])

  def logits_from_normalized(self, x) -> jax.Array:
    return self._logits(self.variables, jnp.asarray(x, jnp.float32))

  def __call__(self, images) -> jax.Array:
    images = np.asarray(images)
    if images.ndim == 3:  # a single-channel batch without its channel axis
      images = images[..., None]
    if tuple(images.shape[1:]) != tuple(self.image_shape):
      raise ValueError(f'images have shape {images.shape[1:]} per example; this model '
                       f'takes {tuple(self.image_shape)}.')
    x = (images.astype(np.float32) / 255.0 - self.mean) / self.std
    return self.logits_from_normalized(x)


def model_dir(path: str, which: str = 'best') -> str:
  """The model directory ``path`` names: itself, or a training workdir's export/<which>."""
  if os.path.isfile(os.path.join(path, MODEL_FILE)):
    return path
  candidate = os.path.join(path, EXPORT_DIR, which)
  if os.path.isfile(os.path.join(candidate, MODEL_FILE)):
    return candidate
  raise ModelNotFoundError(
      f'{path} holds no exported model ({MODEL_FILE} neither there nor in '
      f'{EXPORT_DIR}/{which}/); point to a training workdir or an export directory.')


def load_model(path: str, which: str = 'best') -> Model:
  """Loads a model saved by training: ``path`` is a training workdir (``which`` picks
  export/best or export/last) or a model directory."""
  if which not in ('best', 'last'):
    raise ValueError(f"which must be 'best' or 'last', got {which!r}.")
  directory = model_dir(path, which)
  with open(os.path.join(directory, MODEL_FILE)) as f:
    meta = json.load(f)
  config = ml_collections.ConfigDict(meta['config'])
  space = meta.get('space', 'darts')
  adapter = spaces.EVAL_SPACES[space]
  genotype = adapter.from_json(meta['genotype'], os.path.join(directory, MODEL_FILE),
                               config.model)
  module = adapter.build(config.model, genotype, meta['num_classes'])
  variables = ocp.StandardCheckpointer().restore(
      os.path.abspath(os.path.join(directory, VARIABLES_DIR)))
  info = {k: v for k, v in meta.items()
          if k not in ('space', 'genotype', 'config', 'num_classes', 'image_shape', 'mean',
                       'std')}
  return Model(module, variables, genotype, config, meta['num_classes'],
               tuple(meta['image_shape']), np.asarray(meta['mean'], np.float32),
               np.asarray(meta['std'], np.float32), info, space)
