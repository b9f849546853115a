"""Top-1 / top-5 accuracy of a trained model on a dataset split.

  python -m jaxnas.evaluate --model=runs/eval_fmnist [--which=last] [--split=test]

``--model`` is a training workdir (``--which`` picks export/best or export/last) or an
export directory. The dataset is the one the model was trained on (``--data_dir`` points
elsewhere). Prints the accuracies and writes them to ``<model dir>/eval_<split>.json``.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

from jaxnas import data as data_lib
from jaxnas import export
from jaxnas import files
from jaxnas import train

_MODEL = flags.DEFINE_string('model', None, 'Training workdir or export directory.')
_WHICH = flags.DEFINE_enum('which', 'best', ['best', 'last'], 'Which exported model.')
_SPLIT = flags.DEFINE_string('split', 'test', 'Dataset split.')
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'Where the dataset is (default: as trained).')
_BATCH = flags.DEFINE_integer('batch_size', 500, 'Evaluation batch size.')
_MAX = flags.DEFINE_integer('max_examples', 0, 'Evaluate the first N examples (0: all).')
flags.mark_flags_as_required(['model'])


def evaluate_model(model: export.Model, dataset, batch_size: int = 500,
                   max_examples: int = 0) -> dict:
  """Top-1, top-5 and loss of ``model`` over ``dataset`` (the first ``max_examples``)."""
  indices = np.arange(len(dataset))[:max_examples or None]
  eval_step = jax.jit(train.make_eval_step(model.module))
  return train.evaluate(eval_step, model.variables['params'], model.variables['batch_stats'],
                        dataset, indices, batch_size)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)
  try:
    directory = export.model_dir(_MODEL.value, _WHICH.value)
    model = export.load_model(directory)
    data_config = model.config.data
    if _DATA_DIR.value:
      data_config.data_dir = _DATA_DIR.value
    data_config.max_examples = None  # max_examples limited the training images only
    dataset = data_lib.load_dataset(data_config, split=_SPLIT.value)
  except (export.ModelNotFoundError, data_lib.DatasetNotFoundError,
          data_lib.DataFileError, ValueError) as e:
    print(f'jaxnas: error: {e}', file=sys.stderr)
    sys.exit(1)
  result = evaluate_model(model, dataset, _BATCH.value, _MAX.value)
  result = {'model': directory, 'split': _SPLIT.value, **result}
  print(f'{directory} on {dataset.name} {_SPLIT.value!r} ({result["examples"]} images): '
        f'top-1 {100 * result["top1"]:.2f}%, top-5 {100 * result["top5"]:.2f}%, '
        f'loss {result["loss"]:.4f}')
  path = os.path.join(directory, f'eval_{_SPLIT.value}.json')
  files.write_json(path, result)
  print(f'Wrote {path}.')


if __name__ == '__main__':
  app.run(main)
