"""One process of a jaxnas run, for test_distributed_and_faults.py.

``python tests/multiprocess_run.py DEVICES RECORD [--stop_at_step=N] [--fault=F] --
JAXNAS_ARGS...`` runs ``python -m jaxnas.main JAXNAS_ARGS`` on DEVICES CPU devices (for a
multi-process run the coordinator, the process count and id come in JAXNAS_ARGS as
``--config.parallel.*``) and writes to the JSON file RECORD what the test checks: this
process's index and count, the rows it read of each step's batches (labels and per-row
pixel sums, by step), the arch params of the search's last derivation, and the run's
result. ``--fault`` makes the run fail at one point, as a machine would:

  kill_step:N        SIGKILL once step N is done, before its checkpoint
  kill_checkpoint:N  SIGKILL while the checkpoint of step N is written (its files are
                     there, the rename that commits them is not done)
  kill_write:NAME    SIGKILL while the output file NAME is written (half of it written)
  enospc_checkpoint:N  the disk is full when the checkpoint of step N is written
  erofs_write:NAME   the workdir is read-only when NAME is written
  oom_step:N         the device runs out of memory in step N
"""

import errno
import json
import os
import signal
import sys

import jax

jax.config.update('jax_platforms', 'cpu')
jax.config.update('jax_num_cpu_devices', int(sys.argv[1]))

from absl import app  # noqa: E402  pylint: disable=g-import-not-at-top
import numpy as np  # noqa: E402  pylint: disable=g-import-not-at-top

from jaxnas import data as data_lib  # noqa: E402  pylint: disable=g-import-not-at-top
from jaxnas import main as main_lib  # noqa: E402  pylint: disable=g-import-not-at-top
from jaxnas import search  # noqa: E402  pylint: disable=g-import-not-at-top
from jaxnas import train  # noqa: E402  pylint: disable=g-import-not-at-top

RECORD = {'rows': {}, 'arch': None, 'result': None}


def _rows(batch):
  return {'labels': np.asarray(batch['label']).tolist(),
          'pixels': np.asarray(batch['image'], np.float64).reshape(
              len(batch['label']), -1).sum(1).tolist()}


def _record_rows(batch_fn):
  def wrapped(self, step):
    batch = batch_fn(self, step)
    parts = batch if isinstance(batch, tuple) else (batch,)
    RECORD['rows'][str(step)] = [_rows(b) for b in parts]
    return batch
  return wrapped


def _record_arch(arch_arrays):
  def wrapped(state):
    arch = arch_arrays(state)
    RECORD['arch'] = {k: np.asarray(v).tolist() for k, v in arch.items()}
    return arch
  return wrapped


def _stopping_at(run, stop_at_step):
  def wrapped(config, workdir):
    result = run(config, workdir, stop_at_step=stop_at_step)
    RECORD['result'] = {k: v for k, v in result.items() if k != 'genotype'}
    return result
  return wrapped


def _kill():
  sys.stdout.flush()
  os.kill(os.getpid(), signal.SIGKILL)


def _inject(fault):
  """Installs ``fault`` (see the module docstring)."""
  from jaxnas import common  # pylint: disable=g-import-not-at-top
  from jaxnas import files  # pylint: disable=g-import-not-at-top
  kind, arg = fault.split(':')
  if kind in ('kill_step', 'kill_checkpoint', 'enospc_checkpoint'):
    from orbax.checkpoint._src.path import atomicity  # pylint: disable=g-import-not-at-top
    save, committing = common.save_if_finite, []

    def save_if_finite(manager, step, *args):
      if step == int(arg):
        if kind == 'kill_step':
          _kill()
        if kind == 'enospc_checkpoint':
          raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC),
                        os.path.join(manager.directory, str(step)))
        committing.append(step)
      return save(manager, step, *args)
    common.save_if_finite = save_if_finite
    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def killing_finalize(self, *args, **kwargs):
      if committing:
        _kill()
      return await finalize(self, *args, **kwargs)
    atomicity.AtomicRenameTemporaryPath.finalize = killing_finalize
  elif kind in ('kill_write', 'erofs_write'):
    replace = files._replace  # pylint: disable=protected-access

    def failing_replace(path, data):
      if os.path.basename(path) == arg:
        if kind == 'erofs_write':
          raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
        with open(f'{path}.tmp{os.getpid()}', 'wb') as f:
          f.write(data[:len(data) // 2])
        _kill()
      return replace(path, data)
    files._replace = failing_replace  # pylint: disable=protected-access
  elif kind == 'oom_step':
    compile_search_step = search.compile_search_step

    def compile_failing(*args, **kwargs):
      step_fn, eval_fn = compile_search_step(*args, **kwargs)

      def failing(state, *batches):
        if int(state.step) + 1 == int(arg):
          raise jax.errors.JaxRuntimeError(
              'RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9663676416 bytes.')
        return step_fn(state, *batches)
      return failing, eval_fn
    search.compile_search_step = compile_failing
  else:
    raise ValueError(f'unknown fault {fault}')


def main():
  record_path = sys.argv[2]
  rest = sys.argv[3:]
  stop_at_step = None
  if rest and rest[0].startswith('--stop_at_step='):
    stop_at_step = int(rest.pop(0).split('=')[1])
  if rest and rest[0].startswith('--fault='):
    _inject(rest.pop(0).split('=')[1])
  assert rest[0] == '--'
  for cls in (data_lib.SearchBatches, data_lib.TrainBatches):
    cls.batch = _record_rows(cls.batch)
  search.arch_arrays = _record_arch(search.arch_arrays)
  search.run_search = _stopping_at(search.run_search, stop_at_step)
  train.run_train = _stopping_at(train.run_train, stop_at_step)
  try:
    app.run(main_lib.main, argv=['jaxnas.main', *rest[1:]], flags_parser=main_lib.parse_flags)
  except SystemExit as e:
    code = e.code
  else:
    code = 0
  RECORD.update(process_index=jax.process_index(), process_count=jax.process_count(),
                device_count=jax.device_count(), exit_code=code)
  with open(record_path, 'w') as f:
    json.dump(RECORD, f)
  sys.exit(code)


if __name__ == '__main__':
  main()
