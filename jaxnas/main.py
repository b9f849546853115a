"""Runs a jaxnas config: ``python -m jaxnas.main --config=configs/x.py --workdir=DIR``."""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from jaxnas import checkpoint
from jaxnas import data
from jaxnas import genotypes
from jaxnas import search

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py[:arg]).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and results.')
flags.mark_flags_as_required(['config', 'workdir'])

# Errors a user can fix: one line, no traceback.
USER_ERRORS = (search.ConfigError, search.NonFiniteLossError, data.DatasetNotFoundError,
               data.DataFileError, genotypes.GenotypeError, checkpoint.WorkdirError)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)
  try:
    search.run_search(_CONFIG.value, _WORKDIR.value)
  except USER_ERRORS as e:
    print(f'jaxnas: error: {e}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  app.run(main)
