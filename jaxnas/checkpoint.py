"""Orbax checkpoints of the whole search state, the workdir's resolved config, and the
lock that keeps two runs out of one workdir."""

import fcntl
import json
import os
import socket

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
                     'parallel.num_devices', 'parallel.multi_host')


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


def restore_latest(mngr: ocp.CheckpointManager, state, sharding=None):
  """(restored state, True) from the latest checkpoint, or (state, False) if none.

  Each array is restored with ``sharding`` if given, else with the sharding of the
  matching leaf of ``state``: the current mesh's layout, whatever the device count of
  the run that wrote the checkpoint.
  """
  step = mngr.latest_step()
  if step is None:
    return state, False
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(
          x.shape, x.dtype, sharding=x.sharding if sharding is None else sharding), state)
  return mngr.restore(step, args=ocp.args.StandardRestore(abstract)), True


def _comparable(config_dict: dict, prefix: str = '') -> dict:
  return {k: _comparable(v, f'{prefix}{k}.') if isinstance(v, dict) else v
          for k, v in config_dict.items() if f'{prefix}{k}' not in _RESUMABLE_FIELDS}


def check_workdir_config(workdir: str, config) -> None:
  """A workdir holds one search: resuming it with a different config would mix two runs."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return
  try:
    with open(path) as f:
      old = json.load(f)
  except (OSError, ValueError) as e:
    raise WorkdirError(f'{path} is unreadable ({e}); move it away or use a new --workdir.') from e
  new = json.loads(config.to_json_best_effort())
  old_c, new_c = _comparable(old), _comparable(new)
  if old_c != new_c:
    diff = sorted(_diff(old_c, new_c))
    raise WorkdirError(
        f'{workdir} holds a search with a different config ({", ".join(diff[:5])} differ); '
        'use a new --workdir or the same config to resume it.')


def _diff(a, b, prefix=''):
  for k in sorted(set(a) | set(b)):
    va, vb = a.get(k), b.get(k)
    if isinstance(va, dict) and isinstance(vb, dict):
      yield from _diff(va, vb, f'{prefix}{k}.')
    elif va != vb:
      yield f'{prefix}{k}'


def write_config(workdir: str, config) -> None:
  files.write_text(os.path.join(workdir, CONFIG_FILE), config.to_json_best_effort(indent=2))
