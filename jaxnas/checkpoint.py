"""Orbax checkpoints of the whole search state, the workdir's resolved config, and the
lock that keeps two runs out of one workdir."""

import fcntl
import json
import os
import shutil
import socket
import sys

import jax
import orbax.checkpoint as ocp

from jaxnas import files

CONFIG_FILE = 'config.json'


class WorkdirError(ValueError):
  """The workdir holds something a run cannot continue from."""

# Fields that may change between a run and its resumption without changing the search
# ('section.field' for nested ones): a search may resume on another device count.
_RESUMABLE_FIELDS = ('log_every_steps', 'checkpoint_every_steps', 'checkpoints_to_keep',
                     'compilation_cache_dir', 'compile_mode', 'eval_batch_size',
                     'parallel.num_devices', 'parallel.multi_host',
                     'parallel.coordinator_address', 'parallel.num_processes',
                     'parallel.process_id')


# Locks this process holds, by workdir: a run resumed in the same process keeps its lock.
_LOCKS = {}


def lock_workdir(workdir: str) -> None:
  """Takes the workdir's lock for this process (one file per JAX process, so the
  processes of one multi-host run do not exclude each other), or raises WorkdirError
  naming the process that holds it. The operating system drops the lock when its
  process ends, however it ends, so a killed run never leaves a stale one."""
  path = os.path.join(os.path.abspath(workdir), f'.lock-{jax.process_index()}')
  if path in _LOCKS:
    return
  handle = open(path, 'a+')  # pylint: disable=consider-using-with
  try:
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    handle.seek(0)
    holder = handle.read().strip() or 'another process'
    handle.close()
    raise WorkdirError(f'{workdir} is in use by {holder} (lock {path}); wait for that run '
                       'to end, stop it, or use another --workdir.') from None
  handle.seek(0)
  handle.truncate()
  handle.write(f'process {os.getpid()} on {socket.gethostname()}')
  handle.flush()
  _LOCKS[path] = handle


def manager(workdir: str, max_to_keep: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), 'checkpoints'),
                               options=options)


def save(mngr: ocp.CheckpointManager, step: int, state) -> None:
  mngr.save(step, args=ocp.args.StandardSave(state))


UNREADABLE_DIR = 'checkpoints-unreadable'


def restore_newest(mngr: ocp.CheckpointManager, restore_step):
  """``(restore_step(step), step)`` for the newest checkpoint that restores, or
  ``(None, None)`` if there is none.

  Checkpoints newer than that one which failed to restore (truncated or corrupted files)
  are moved to ``WORKDIR/checkpoints-unreadable/STEP``, kept for inspection, with a
  warning: a run resumes from its last good state. If none restores, WorkdirError says
  so and nothing is moved.
  """
  directory = os.fspath(mngr.directory)
  steps = sorted(mngr.all_steps(), reverse=True)
  failed = []
  for step in steps:
    try:
      restored = restore_step(step)
    except Exception as e:  # pylint: disable=broad-except  # orbax, tensorstore, json, ...
      failed.append((step, (str(e).strip().splitlines() or [type(e).__name__])[0][:300]))
      continue
    for bad, reason in failed:
      aside = os.path.join(os.path.dirname(directory), UNREADABLE_DIR, str(bad))
      if jax.process_index() == 0:
        os.makedirs(os.path.dirname(aside), exist_ok=True)
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(os.path.join(directory, str(bad)), aside)
      print(f'jaxnas: warning: the checkpoint of step {bad} cannot be restored ({reason}); '
            f'moved it to {aside} and resumed from step {step}.', file=sys.stderr,
            flush=True)
    if failed:
      if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
        multihost_utils.sync_global_devices('jaxnas: unreadable checkpoints moved aside')
      mngr.reload()
    return restored, step
  if failed:
    step, reason = failed[-1]
    raise WorkdirError(
        f'No checkpoint in {directory} can be restored (the oldest, step {step}: {reason}); '
        'move the checkpoints directory away to start afresh.')
  return None, None


def restore_latest(mngr: ocp.CheckpointManager, state, sharding=None):
  """(restored state, True) from the newest readable checkpoint (``restore_newest``), or
  (state, False) if none.

  Each array is restored with ``sharding`` if given, else with the sharding of the
  matching leaf of ``state``: the current mesh's layout, whatever the device count of
  the run that wrote the checkpoint.
  """
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(
          x.shape, x.dtype, sharding=x.sharding if sharding is None else sharding), state)
  restored, step = restore_newest(
      mngr, lambda step: mngr.restore(step, args=ocp.args.StandardRestore(abstract)))
  return (state, False) if step is None else (restored, True)


def _comparable(config_dict: dict, prefix: str = '') -> dict:
  return {k: _comparable(v, f'{prefix}{k}.') if isinstance(v, dict) else v
          for k, v in config_dict.items() if f'{prefix}{k}' not in _RESUMABLE_FIELDS}


def check_workdir_config(workdir: str, config) -> None:
  """A workdir holds one search: resuming it with a different config would mix two runs."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return
  diff = config_differences(read_workdir_config(workdir), config)
  if diff:
    raise WorkdirError(
        f'{workdir} holds a search with a different config ({", ".join(diff[:5])} differ); '
        'use a new --workdir or the same config to resume it.')


def read_workdir_config(workdir: str) -> dict:
  """The config a workdir's run was started with (``WORKDIR/config.json``)."""
  path = os.path.join(workdir, CONFIG_FILE)
  try:
    with open(path) as f:
      old = json.load(f)
  except (OSError, ValueError) as e:
    raise WorkdirError(f'{path} is unreadable ({e}); move it away or use a new --workdir.') from e
  if not isinstance(old, dict):
    raise WorkdirError(f'{path} is not a config (a JSON object); move it away or use a new '
                       '--workdir.')
  return old


def config_differences(old: dict, config, shared_only: bool = False) -> list[str]:
  """The dotted fields in which ``config`` differs from the saved config ``old``, those
  a resumed run may change left out; with ``shared_only``, only fields both have (one
  added to jaxnas after ``old`` was written is no difference)."""
  new = json.loads(config.to_json_best_effort())
  return sorted(_diff(_comparable(old), _comparable(new), shared_only=shared_only))


_MISSING = object()  # a field one config has and the other lacks differs (even from None)


def _diff(a, b, prefix='', shared_only=False):
  for k in sorted(set(a) | set(b)):
    if shared_only and not (k in a and k in b):
      continue
    va, vb = a.get(k, _MISSING), b.get(k, _MISSING)
    if isinstance(va, dict) and isinstance(vb, dict):
      yield from _diff(va, vb, f'{prefix}{k}.', shared_only)
    elif va != vb:
      yield f'{prefix}{k}'


def write_config(workdir: str, config) -> None:
  files.write_text(os.path.join(workdir, CONFIG_FILE), config.to_json_best_effort(indent=2))
