"""What a search method is to the shared loop (jaxnas/search.py).

A method owns its config fields and their validation, its model, its optimizers, its
state, the programs of its step (one per phase), its held-out evaluation and how the
final architecture is derived and written. The loop owns the rest: data, progress,
checkpoints, the NaN stop, outputs and sharding. A new method is one file that
subclasses ``Method``, one line in ``jaxnas/methods/__init__.py`` and one config.
"""

import os
from typing import Any, Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxnas import base_config
from jaxnas import common
from jaxnas import files
from jaxnas import parallel
from jaxnas import summary as summary_lib
from jaxnas.ops import depthwise

# A phase: (state, train_batch, val_batch) -> (state, metrics). The loop compiles each
# phase as a program of its own and runs them in order: one search step.
Phase = Callable[..., tuple[Any, dict[str, jax.Array]]]


class SearchState(flax.struct.PyTreeNode):
  """Everything a resumed search needs: what a method changes lives here."""
  step: jax.Array
  params: Any
  batch_stats: Any
  arch: Any
  weight_opt_state: Any
  arch_opt_state: Any
  key: jax.Array  # raw uint32[2] key: the run's seed stream
  # Method-owned extras (a moving baseline, control-variate parameters and their
  # optimizer state, ...); empty for DARTS and PC-DARTS.
  extra: Any = flax.struct.field(default_factory=dict)


class Method:
  """A search method. Subclasses override what differs; the defaults fit a supernet
  whose ``apply(variables, x, train=...)`` reads its arch params from the ``arch``
  collection (DARTS, PC-DARTS)."""

  name: str = ''
  # An epoch is a pass over the weight split, the arch split's batches cycling (a
  # small validation split); False: an epoch ends with the smaller split (DARTS).
  cycle_arch_split: bool = False
  # True: the method runs a loop of its own (``run``), as one-stage AtomNAS does, whose
  # network changes shape as it shrinks; it checks its config in ``validate`` alone.
  own_loop: bool = False

  # ------------------------------------------------------------------- config

  def get_config(self) -> ml_collections.ConfigDict:
    """Every field the method and the shared loop read, with the method's defaults."""
    raise NotImplementedError

  def variants(self) -> dict[str, Callable]:
    """Config variants by name (``configs/x.py:smoke``)."""
    return {}

  def apply_variant(self, config, arg, config_name: str):
    """``config`` changed by the variant ``arg`` (the text after the config path's
    colon), if any; an unknown variant is a ValueError naming the known ones."""
    return base_config.apply_variant(config, arg, config_name, self.variants())

  def validate(self, config, fail: Callable[[str, str], None]) -> None:
    """Calls ``fail(field, message)`` for a field the method cannot run with."""

  # ------------------------------------------------------------------- model and state

  def build_model(self, config, num_classes: int, num_devices: int = 1):
    raise NotImplementedError

  def make_optimizers(self, config, steps_per_epoch: int):
    """(weight optimizer, arch optimizer): separate optax transformations."""
    raise NotImplementedError

  def init_variables(self, model, x, key, config):
    """The model's variables (``params``, ``arch``, ``batch_stats``) from one key."""
    return model.init({'params': key, 'channels': key}, x, train=True)

  def init_extra(self, config, arch) -> dict:
    """The method's extra state (``SearchState.extra``) at step 0."""
    return {}

  def create_state(self, model, input_shape, weight_tx, arch_tx, config,
                   mesh: jax.sharding.Mesh | None = None) -> SearchState:
    """The initial state, a pure function of ``config.seed``; replicated over ``mesh``."""
    return create_state(model, input_shape, weight_tx, arch_tx, config.seed, mesh,
                        init_variables=lambda m, x, k: self.init_variables(m, x, k, config),
                        init_extra=lambda arch: self.init_extra(config, arch))

  # ------------------------------------------------------------------- steps

  def make_phases(self, model, weight_tx, arch_tx, config,
                  steps_per_epoch: int) -> Sequence[Phase]:
    """The phases of one search step; the last one advances ``state.step``."""
    raise NotImplementedError

  def arch_active(self, config, step: int, steps_per_epoch: int) -> bool:
    """Whether step ``step`` (1-based) updated the arch on a batch of the arch split:
    its images count, and its ``val_loss`` must be finite."""
    return True

  def prepare(self, config, workdir: str, model, state, batch, mesh):
    """Work before compiling the step (e.g. measuring a latency model); returns the
    config the run goes on with (the same one by default). ``batch`` is a train batch."""
    return config

  def finish(self, config, workdir: str, model, state, batch, architecture) -> dict:
    """Extra result fields after the last step (e.g. the final architecture's latency)."""
    return {}

  def make_eval_step(self, model, config):
    """``eval_step(state, batch)`` -> masked sums of loss, correct and count on held-out
    data (the reference's ``infer``)."""
    return make_eval_step(model)

  # ------------------------------------------------------------------- outputs

  def derive(self, config, arch: dict[str, np.ndarray]):
    """The final architecture from the arch params (a genotype for cell spaces)."""
    raise NotImplementedError

  def to_json(self, architecture) -> dict:
    raise NotImplementedError

  def format(self, config, architecture) -> str:
    """One or two lines that show the architecture in the progress output."""
    return str(architecture)

  def is_degenerate(self, config, architecture) -> bool:
    return False

  def write_outputs(self, workdir: str, config, architecture, arch: dict[str, np.ndarray],
                    **result) -> str:
    """Writes the final architecture and the arch params (and pictures) to ``workdir``;
    returns what it wrote, for the closing line of the run."""
    path = os.path.join(workdir, 'arch.npz')
    files.write_npz(path, **arch)
    return f'arch params written to {path}'


  def run(self, config, workdir: str, stop_at_step: int | None = None) -> dict:
    """The whole run of an ``own_loop`` method (the shared loop otherwise)."""
    raise NotImplementedError

  def summary(self, config) -> dict:
    """The model's size from the config alone (``--dry_run``, ``summary.json``)."""
    return summary_lib.supernet_summary(config, self.build_model)

  def format_summary(self, summary: dict) -> str:
    return summary_lib.format_summary(summary)


# ----------------------------------------------------------------------------- shared parts


def create_state(model, input_shape, weight_tx, arch_tx, seed: int,
                 mesh: jax.sharding.Mesh | None = None, init_variables=None,
                 init_extra=None) -> SearchState:
  """The initial state, a pure function of ``seed``; replicated over ``mesh`` if given.
  ``init_variables(model, x, key)`` defaults to ``model.init`` with the ``params`` and
  ``channels`` streams on one key and ``train=True``."""
  rbg, run_key = common.init_keys(seed)
  x = jnp.zeros((1,) + tuple(input_shape), jnp.float32)
  if init_variables is None:
    init_variables = lambda m, x, k: m.init({'params': k, 'channels': k}, x, train=True)  # noqa: E731

  def init(rbg_key):
    variables = init_variables(model, x, rbg_key)
    params, arch = variables['params'], variables['arch']
    return SearchState(
        step=jnp.zeros((), jnp.int32), params=params,
        batch_stats=variables.get('batch_stats', {}), arch=arch,
        weight_opt_state=weight_tx.init(params), arch_opt_state=arch_tx.init(arch),
        key=run_key, extra=init_extra(arch) if init_extra else {})

  # Created in place on every device of the mesh (no host round trip).
  shardings = {'out_shardings': parallel.replicated(mesh)} if mesh else {}
  return jax.jit(init, **shardings)(rbg)


def make_eval_step(model):
  """Supernet accuracy with BN running statistics (the reference's ``infer``)."""

  def eval_step(state: SearchState, batch):
    logits = model.apply(
        {'params': state.params, 'arch': state.arch, 'batch_stats': state.batch_stats},
        batch['image'], train=False, rngs={'channels': state.key})
    return masked_sums(logits, batch)

  return eval_step


def masked_sums(logits, batch) -> dict[str, jax.Array]:
  """Sums of the cross-entropy, the correct predictions and the real rows of a padded
  eval batch."""
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label'])
  correct = jnp.argmax(logits, -1) == batch['label']
  mask = batch['mask']
  return {'loss': jnp.sum(loss * mask), 'correct': jnp.sum(correct * mask),
          'count': jnp.sum(mask)}


def positive_fields(config, fail, *fields: str) -> None:
  """``fail`` for each dotted field of ``config`` that is not a positive integer."""
  for field in fields:
    value = config
    for part in field.split('.'):
      value = value[part]
    if int(value) <= 0:
      fail(field, f'must be a positive integer, got {value}.')


def check_depthwise_impl(m, fail) -> None:
  """``fail`` unless ``m.depthwise_impl`` (``config.model``) names a depthwise form."""
  if m.depthwise_impl not in depthwise.IMPLS:
    fail('model.depthwise_impl', f'is {m.depthwise_impl!r}; choose one of {depthwise.IMPLS}.')
