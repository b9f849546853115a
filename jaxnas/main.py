"""Runs a jaxnas config: ``python -m jaxnas.main --config=configs/x.py --workdir=DIR``.

A search config (``config.method`` a name in ``jaxnas.methods.METHODS``) runs a search;
an evaluation config (method 'train') trains a genotype from scratch. ``--dry_run`` builds the model from the
config alone, prints its summary (parameters, multiply-adds, genotype), writes it to
``DIR/summary.json`` and exits.
"""

import errno
import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from jaxnas import checkpoint
from jaxnas import data
from jaxnas import genotypes
from jaxnas import host_memory
from jaxnas import parallel
from jaxnas import search
from jaxnas import summary as summary_lib
from jaxnas import train

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py[:arg]).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and results.')
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'Print and write the model summary, then exit.')
flags.mark_flags_as_required(['config', 'workdir'])

# Errors a user can fix: one line, no traceback.
USER_ERRORS = (search.ConfigError, search.NonFiniteLossError, data.DatasetNotFoundError,
               data.DataFileError, genotypes.GenotypeError, checkpoint.WorkdirError,
               summary_lib.UnknownDatasetError)


# A full disk, a read-only file system, no permission, a quota.
WRITE_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT)


def out_of_memory_message(config, error: Exception) -> str:
  """One sentence for XLA's RESOURCE_EXHAUSTED: what it could not allocate, the device's
  memory, and the field to change."""
  detail = next((line.strip() for line in str(error).splitlines()
                 if 'RESOURCE_EXHAUSTED' in line), str(error).strip())
  detail = detail.split('RESOURCE_EXHAUSTED:', 1)[-1].strip().rstrip('.')[:200]
  device = jax.devices()[0]
  stats = device.memory_stats() or {}
  memory = ''
  if 'bytes_limit' in stats:
    memory = (f', with {stats.get("peak_bytes_in_use", stats.get("bytes_in_use", 0)) / 2**30:.1f}'
              f' GiB at peak of {stats["bytes_limit"] / 2**30:.1f} GiB per device')
  per_device = config.optim.batch_size // parallel.num_devices_in_use(
      config.parallel.get('num_devices', 0))
  return (f'the {device.platform.upper()} ran out of memory ({detail}{memory}); lower '
          f'optim.batch_size (now {config.optim.batch_size}, {per_device} per device) or '
          'spread it over more devices (parallel.num_devices).')


def dry_run(config, workdir: str) -> dict:
  """The model summary of ``config``, printed and written to ``workdir/summary.json``."""
  if config.method == 'train':
    summary = train.model_summary(config, train.validate_config(config))
    text = train.format_summary(summary)
  else:
    search.validate_config(config)
    method = search.method_of(config)
    summary = method.summary(config)
    text = method.format_summary(summary)
  print(text)
  if summary_lib.holds_result(workdir):
    print(f'Left {os.path.join(workdir, summary_lib.SUMMARY_FILE)} as it is: it holds the '
          "result of a run in this workdir.")
  else:
    print(f'Wrote {summary_lib.write_summary(workdir, {"model": summary})}.')
  return summary


def _lines(error: Exception) -> list[str]:
  """The non-empty lines of an error's message (at least one)."""
  return [line.strip() for line in str(error).splitlines() if line.strip()] or [repr(error)]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)
  try:
    config = _CONFIG.value
    config.get('method')  # config_flags defers a file's load error to the first use
  except (OSError, ValueError, AttributeError) as e:
    print(f'jaxnas: error: cannot load the --config file ({_lines(e)[-1]}).', file=sys.stderr)
    sys.exit(1)
  try:
    result = None
    if _DRY_RUN.value:
      dry_run(config, _WORKDIR.value)
    elif config.method == 'train':
      result = train.run_train(config, _WORKDIR.value)
    else:
      result = search.run_search(config, _WORKDIR.value)
  except USER_ERRORS as e:
    print(f'jaxnas: error: {e}', file=sys.stderr)
    sys.exit(1)
  except OSError as e:
    if e.errno not in WRITE_ERRNOS:
      raise
    print(f'jaxnas: error: cannot write {e.filename or _WORKDIR.value} ({e.strerror}); the '
          f'checkpoints in {_WORKDIR.value} are as they were: free space or choose a writable '
          '--workdir, then run the same command to resume.', file=sys.stderr)
    sys.exit(1)
  except Exception as e:  # pylint: disable=broad-except
    if 'RESOURCE_EXHAUSTED' not in str(e):
      raise
    print(f'jaxnas: error: {out_of_memory_message(config, e)}', file=sys.stderr)
    sys.exit(1)
  except KeyboardInterrupt:  # Ctrl-C before the loop's first step (the loop stops cleanly)
    print(f'jaxnas: interrupted before the first step; the checkpoints in {_WORKDIR.value} '
          'are as they were.', file=sys.stderr)
    sys.exit(130)
  if result and 'exit_code' in result:  # stopped by a signal, with a checkpoint
    sys.exit(result['exit_code'])


def parse_flags(argv):
  """absl's parser, with a bad --config override reported in one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    lines = _lines(e)  # config-file errors carry a traceback text: keep its first and last line
    text = lines[0] if len(lines) < 2 else f'{lines[0]} {lines[-1]}'
    print(f'jaxnas: error: {text}', file=sys.stderr)
    sys.exit(1)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    overrides = [a.split('=')[0] for a in argv[1:] if a.startswith('--config.')]
    print(f'jaxnas: error: cannot apply {" ".join(overrides) or "the --config flag"} '
          f'({e}); every config field is declared in its method\'s get_config '
          '(jaxnas/methods/) or in jaxnas/base_config.py.', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  host_memory.relaunch_with_huge_pages()
  app.run(main, flags_parser=parse_flags)
