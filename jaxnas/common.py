"""What the search and training loops share: config errors, data checks, keys,
compilation, eval sums and checkpoints that refuse NaNs.

Both loops import this module; neither imports the other.
"""

from concurrent import futures
import os
import signal
import sys
import threading

import jax
import jax.numpy as jnp

from jaxnas import checkpoint as ckpt_lib
from jaxnas import data as data_lib
from jaxnas import parallel


class ConfigError(ValueError):
  """A config field has a value the run cannot use."""


def config_fail(field: str, message: str):
  """Raises ConfigError for ``config.FIELD MESSAGE``."""
  raise ConfigError(f'config.{field} {message}')


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or inf."""


def check_data(config, split: str = 'train') -> None:
  """Checks that the split's data is there (DatasetNotFoundError / DataFileError), a bad
  data.* field becoming a ConfigError; cheap, so it runs before any compute."""
  try:
    data_lib.check_dataset(config.data, split=split)
  except (data_lib.DatasetNotFoundError, data_lib.DataFileError):
    raise
  except ValueError as e:
    raise ConfigError(str(e)) from e


def init_keys(seed: int, impl: str = 'unsafe_rbg') -> tuple[jax.Array, jax.Array]:
  """(initialization key, the run's raw key) from the seed; both pure functions of it.

  The initialization key is an 'unsafe_rbg' key by default. Flax derives each
  parameter's key from it with one ``fold_in`` of a hash of the parameter's path, then
  draws the values with ``rng_bit_generator``. For threefry and 'rbg' keys that
  ``fold_in`` is a threefry hash, which XLA:CPU compiles as a loop per parameter (the
  CIFAR-10 supernet's init then takes about 45 s to compile and run on a 2-core CPU); for
  'unsafe_rbg' it is an XOR with bits drawn from the path's hash (about 22 s). Its weaker
  guarantee, for keys split or folded from one another many times over, does not arise
  here: every path is folded in once, into the one key.
  """
  init_key, run_key = jax.random.split(jax.random.PRNGKey(seed))
  seed_bits = jax.random.randint(init_key, (), 0, 2**31 - 1)
  return jax.random.key(seed_bits, impl=impl), run_key


def setup_compilation_cache(path: str) -> None:
  if not path:
    return
  jax.config.update('jax_compilation_cache_dir', os.path.expanduser(path))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


def concurrent_compile(mode: str) -> bool:
  """Whether ``config.compile_mode`` compiles side by side: 'auto' does except on the
  CPU backend, where the compilers' host memory sets the search's peak."""
  return mode == 'concurrent' or (mode == 'auto' and jax.default_backend() != 'cpu')


def compile_all(*jobs, concurrent: bool = True):
  """Compiles each ``(jitted, args)`` job; returns the executables in order.

  The jobs are lowered one after another on this thread (tracing holds the GIL), and
  each lowered program is handed at once to a compiling thread, so XLA compiles while
  the next job is traced: with ``concurrent`` each job has a thread of its own and the
  compilations run side by side, on as many cores; without, one thread compiles them in
  turn and holds one compilation's working memory at a time."""
  with futures.ThreadPoolExecutor(max_workers=len(jobs) if concurrent else 1) as pool:
    pending = [pool.submit(jitted.lower(*args).compile) for jitted, args in jobs]
    return [job.result() for job in pending]


def sum_over_batches(eval_step, dataset, indices, batch_size,
                     mesh: jax.sharding.Mesh | None = None) -> dict[str, float]:
  """Sums each output of ``eval_step(batch)`` over masked eval batches of ``indices``,
  each split over ``mesh`` if given (``batch_size`` must then divide by it)."""
  totals = {}
  for batch in data_lib.eval_batches(dataset, indices, batch_size, jax.process_index(),
                                     jax.process_count()):
    if mesh is not None:
      batch = parallel.shard_batch(batch, mesh)
    for k, v in jax.device_get(eval_step(batch)).items():
      totals[k] = totals.get(k, 0.0) + float(v)
  return totals


@jax.jit
def all_finite(tree) -> jax.Array:
  """True if every leaf of ``tree`` is free of NaN and inf."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def save_if_finite(manager, step: int, state, checked, what: str, workdir: str) -> None:
  """Checkpoints ``state`` unless ``checked`` (part of it) holds NaN or inf, which raises
  NonFiniteLossError instead: a good checkpoint is never replaced by a bad one."""
  if not bool(all_finite(checked)):
    raise NonFiniteLossError(
        f'The {what} became NaN/inf at step {step}; stopped without saving, so the last '
        f'checkpoint in {workdir} is the last good state.')
  ckpt_lib.save(manager, step, state)


class StopRequest:
  """SIGTERM and SIGINT (Ctrl-C) as a request that a loop sees between steps, so a run
  stops with a checkpoint of the step it finished rather than wherever the signal
  lands. A second signal of the same kind acts at once (its previous handler). On any
  thread but the main one (where Python cannot install handlers) it does nothing."""

  def __init__(self):
    self.signum = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for s in (signal.SIGTERM, signal.SIGINT):
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc):
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous = {}

  def _handle(self, signum, frame):
    if self.signum is not None:  # asked twice: the default action, now
      signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
      os.kill(os.getpid(), signum)
      return
    self.signum = signum
    print(f'{signal.Signals(signum).name} received: stopping after this step with a '
          'checkpoint (send it again to stop at once).', file=sys.stderr, flush=True)

  @property
  def requested(self) -> bool:
    """Whether a signal came, to this process or (multi-process: a collective, asked by
    every process after the same step) to any, so that all stop at one step."""
    return parallel.any_process(self.signum is not None)

  def finish(self, manager, step: int, workdir: str, save) -> dict:
    """Checkpoints step ``step`` (``save()``, unless that step is saved already), waits
    for the write and says how to resume; returns the loop's result."""
    if manager.latest_step() != step:
      save()
    manager.wait_until_finished()
    name = signal.Signals(self.signum or signal.SIGTERM).name  # another process's signal
    print(f'Stopped by {name} after step {step}; the checkpoint of that step is in '
          f'{os.path.join(workdir, "checkpoints")}. Run the same command to resume.',
          flush=True)
    return {'stopped_at_step': step, 'signal': name,
            'exit_code': 128 + (self.signum or signal.SIGTERM)}
