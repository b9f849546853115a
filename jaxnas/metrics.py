"""Metrics a person can plot (JSON lines + TensorBoard) and a progress line."""

import json
import os
import sys
import time

import numpy as np

from jaxnas import files


def drop_after(path: str, step: int) -> None:
  """Keeps the lines of the JSON-lines file ``path`` up to ``step`` (replaced whole): a
  resumed run repeats the steps after its checkpoint, and a killed one may have left a
  part of a line."""
  if not files.is_writer() or not os.path.exists(path):
    return
  kept, dropped = [], False
  with open(path) as f:
    for line in f:
      try:
        keep = int(json.loads(line)['step']) <= step
      except (ValueError, KeyError, TypeError):
        keep = False
      kept += [line] if keep else []
      dropped = dropped or not keep
  if dropped:
    files.write_text(path, ''.join(kept))


class MetricWriter:
  """Writes scalars to ``metrics.jsonl`` and to TensorBoard event files in ``tb/``
  (process 0 of a multi-process run; the others write nothing). ``start_step``: the
  step a run resumes from; the lines after it are dropped first."""

  def __init__(self, workdir: str, start_step: int | None = None):
    self._jsonl = self._tb = None
    if not files.is_writer():
      return
    if start_step is not None:
      drop_after(os.path.join(workdir, 'metrics.jsonl'), start_step)
    self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
    try:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, 'tb'))
    except ImportError:  # TensorBoard events are optional; the JSON lines are not.
      self._tb = None

  def write(self, step: int, scalars: dict, kind: str = 'train'):
    if self._jsonl is None:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({'kind': kind, 'step': int(step), **scalars}) + '\n')
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(f'{kind}/{k}', v, step)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def close(self):
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def format_seconds(s: float) -> str:
  s = int(max(s, 0))
  h, rem = divmod(s, 3600)
  m, sec = divmod(rem, 60)
  return f'{h}h{m:02d}m{sec:02d}s' if h else f'{m}m{sec:02d}s'


class Progress:
  """One line per ``every`` steps: epoch, step, loss, accuracy, images/s, ETA."""

  def __init__(self, total_steps: int, steps_per_epoch: int, start_step: int = 0,
               stream=sys.stdout):
    self.total, self.per_epoch = total_steps, steps_per_epoch
    self.stream = stream
    self._t0, self._s0 = time.perf_counter(), start_step
    self._window = (self._t0, 0)

  def images_per_s(self, images_so_far: int) -> float:
    """Images processed per second since the previous call."""
    t, n = self._window
    now = time.perf_counter()
    self._window = (now, images_so_far)
    return (images_so_far - n) / max(now - t, 1e-9)

  def line(self, step: int, metrics: dict, images_per_s: float) -> str:
    done = step - self._s0
    elapsed = time.perf_counter() - self._t0
    eta = elapsed / max(done, 1) * (self.total - step)
    epoch = (step - 1) // self.per_epoch + 1
    in_epoch = (step - 1) % self.per_epoch + 1
    parts = [f'epoch {epoch}/{self.total // self.per_epoch}',
             f'step {in_epoch}/{self.per_epoch}',
             f"loss {metrics['train_loss']:.4f}", f"acc {100 * metrics['train_acc']:.2f}%"]
    if not np.isnan(metrics.get('val_loss', np.nan)):
      parts += [f"arch-batch loss {metrics['val_loss']:.4f}"]
    if 'num_samples' in metrics:  # PARSEC / FP-NAS: architectures sampled, their entropy
      phase = ''  # coarse-to-fine: which distribution the samples come from
      if 'fine' in metrics:
        phase = ', joint' if metrics['fine'] else ', factorized'
      parts += [f"K {metrics['num_samples']:.0f} (entropy {metrics['entropy']:.1f}{phase})"]
    parts += [f'{images_per_s:.1f} img/s', f'ETA {format_seconds(eta)}']
    text = ' | '.join(parts)
    print(text, file=self.stream, flush=True)
    return text
