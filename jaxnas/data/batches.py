"""Host-side batches: search batches (weights + alphas), evaluation batches.

Batch order and augmentation are pure functions of (seed, step), so a resumed
run recomputes exactly the batches it would have seen, and two runs with the
same seed see the same data. Random streams (numpy SeedSequence entropy):
  [seed, epoch, 0] / [seed, epoch, 1]: order of the weight / arch split
  [seed, step, 2] / [seed, step, 3]: augmentation of the train / val batch
"""

import queue
import threading

import numpy as np


def normalize(images, mean, std):
  """uint8 [..., C] -> float32 (x / 255 - mean) / std."""
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)
  return (images.astype(np.float32) / np.float32(255) - mean) / std


def pad_crop_flip(images, offsets, flips, padding):
  """Random crop after zero padding, then horizontal flip (CIFAR recipe).

  Args:
    images: uint8 [n, H, W, C].
    offsets: int [n, 2], each crop's top-left corner in the padded image,
      in [0, 2 * padding].
    flips: bool [n], which images to mirror left-right.
    padding: zero pixels added on each side before cropping.

  Returns:
    uint8 [n, H, W, C].
  """
  n, h, w, _ = images.shape
  if padding:
    padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding),
                             (0, 0)))
    rows = offsets[:, 0, None] + np.arange(h)  # [n, H]
    cols = offsets[:, 1, None] + np.arange(w)  # [n, W]
    images = padded[np.arange(n)[:, None, None], rows[:, :, None],
                    cols[:, None, :]]
  return np.where(flips[:, None, None, None], images[:, :, ::-1], images)


def cutout(images, centers, length):
  """Zeroes a length x length square (clipped at the borders) around each center.

  Applied to normalized images, as the reference's Cutout (DeVries & Taylor 2017), so
  the square holds the dataset mean.

  Args:
    images: float [n, H, W, C].
    centers: int [n, 2], each square's center (row, column) in [0, H) x [0, W).
    length: the square's side.
  """
  _, h, w, _ = images.shape
  top = np.clip(centers[:, 0] - length // 2, 0, h)[:, None]
  bottom = np.clip(centers[:, 0] + length // 2, 0, h)[:, None]
  left = np.clip(centers[:, 1] - length // 2, 0, w)[:, None]
  right = np.clip(centers[:, 1] + length // 2, 0, w)[:, None]
  rows, cols = np.arange(h)[None], np.arange(w)[None]
  in_rows = (rows >= top) & (rows < bottom)  # [n, H]
  in_cols = (cols >= left) & (cols < right)  # [n, W]
  square = in_rows[:, :, None] & in_cols[:, None, :]
  return np.where(square[..., None], np.zeros((), images.dtype), images)


def augmented_batch(dataset, indices, rng_entropy, *, batch_size, lo, hi, augment,
                    crop_padding, cutout_length=0):
  """This process's rows [lo, hi) of the global batch `indices`, normalized.

  The random crop, flip and cutout are drawn for the whole global batch from
  `rng_entropy` and then sliced, so every process agrees on them.
  """
  images, labels = dataset.get(indices[lo:hi])
  rng = np.random.default_rng(rng_entropy)
  if augment:
    padding = (crop_padding if dataset.augmentation == 'pad_crop_flip' else 0)
    offsets = rng.integers(0, 2 * padding + 1, size=(batch_size, 2))
    flips = rng.random(batch_size) < 0.5
    images = pad_crop_flip(images, offsets[lo:hi], flips[lo:hi], padding)
  images = normalize(images, dataset.mean, dataset.std)
  if cutout_length:
    h, w = images.shape[1:3]
    centers = np.stack([rng.integers(0, h, batch_size), rng.integers(0, w, batch_size)], 1)
    images = cutout(images, centers[lo:hi], cutout_length)
  return {'image': images, 'label': labels.astype(np.int32)}


def _process_defaults(process_index, process_count):
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else (
        process_index)
    process_count = jax.process_count() if process_count is None else (
        process_count)
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} must lie in '
                     f'[0, process_count={process_count}).')
  return process_index, process_count


def _local_batch_size(batch_size, process_count):
  if not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
    raise ValueError('config field batch_size must be a positive integer, '
                     f'not {batch_size!r}.')
  if batch_size % process_count:
    raise ValueError(f'config field batch_size={batch_size} is the global '
                     f'batch and must divide evenly over {process_count} '
                     'processes.')
  return batch_size // process_count


class _StepBatches:
  """What both batchers share: the seed, this process's slice of the global batch, and
  prefetched iteration over `batch(step)`."""

  def __init__(self, dataset, batch_size, seed, augment, crop_padding, process_index,
               process_count):
    self.dataset = dataset
    if not isinstance(seed, (int, np.integer)) or seed < 0:
      raise ValueError(f'config field seed must be a non-negative integer, '
                       f'not {seed!r}.')
    self.seed = int(seed)
    self.augment = bool(augment)
    self.crop_padding = int(crop_padding)
    self.process_index, self.process_count = _process_defaults(
        process_index, process_count)
    self.local_batch_size = _local_batch_size(batch_size, self.process_count)
    self.batch_size = int(batch_size)

  def _make(self, indices, rng_entropy, cutout_length=0):
    lo = self.process_index * self.local_batch_size
    return augmented_batch(self.dataset, indices, rng_entropy, batch_size=self.batch_size,
                           lo=lo, hi=lo + self.local_batch_size, augment=self.augment,
                           crop_padding=self.crop_padding, cutout_length=cutout_length)

  def batch(self, step):
    raise NotImplementedError

  def iterate(self, start_step=0, num_steps=None, prefetch=2):
    """Iterates over `batch(s)` for s = start_step, ... in a background thread.

    Args:
      start_step: the first step (a resumed run passes its restored step).
      num_steps: how many batches; None for no end.
      prefetch: how many batches the thread prepares ahead.

    Returns:
      A `Prefetcher`; call `close()` (or use it in a `with`) to stop early.
    """
    def steps():
      step = start_step
      while num_steps is None or step < start_step + num_steps:
        yield self.batch(step)
        step += 1
    return Prefetcher(steps(), prefetch)


class SearchBatches(_StepBatches):
  """Paired batches for bilevel search: weights on one split, alphas on another.

  `batch(step)` returns (train_batch, val_batch): the train batch comes from
  `weight_idx` (the weight step), the val batch from `arch_idx` (the
  architecture step). Each is {'image': float32 [b, H, W, C] normalized,
  'label': int32 [b]}, where b is this process's share of the global
  `batch_size`: process i gets rows [i * b, (i + 1) * b) of the global batch.
  An epoch is min(len(weight_idx), len(arch_idx)) // batch_size steps
  (remainder dropped) and draws a fresh permutation of each split. With
  `cycle_arch` an epoch is a pass over the weight split instead, and the val
  batches cycle through passes of their own over the (smaller) arch split, each
  in a fresh order (UNAS: a validation split of 10 %).
  """

  def __init__(self, dataset, weight_idx, arch_idx, batch_size, seed, augment,
               crop_padding=4, process_index=None, process_count=None,
               cycle_arch=False):
    super().__init__(dataset, batch_size, seed, augment, crop_padding, process_index,
                     process_count)
    self.weight_idx = np.asarray(weight_idx, np.int64)
    self.arch_idx = np.asarray(arch_idx, np.int64)
    self.cycle_arch = cycle_arch
    self.arch_steps_per_pass = len(self.arch_idx) // self.batch_size
    self.steps_per_epoch = (min(len(self.weight_idx), len(self.arch_idx))
                            // self.batch_size)
    if cycle_arch and self.arch_steps_per_pass:
      self.steps_per_epoch = len(self.weight_idx) // self.batch_size
    if self.steps_per_epoch == 0:
      raise ValueError(
          f'config field batch_size={batch_size} is larger than the smaller '
          f'search split ({len(self.weight_idx)} weight / '
          f'{len(self.arch_idx)} arch examples), so an epoch has no steps; '
          'lower batch_size or use more examples.')
    self._order_cache = (None, None)

  def _epoch_order(self, epoch):
    cached_epoch, order = self._order_cache
    if cached_epoch != epoch:
      order = tuple(
          np.random.default_rng([self.seed, epoch, stream]).permutation(
              len(split))
          for stream, split in ((0, self.weight_idx), (1, self.arch_idx)))
      self._order_cache = (epoch, order)
    return order

  def indices(self, step):
    """Dataset indices of the global (train, val) batch at `step`."""
    if step < 0:
      raise ValueError(f'step must be non-negative, not {step}.')
    epoch, position = divmod(int(step), self.steps_per_epoch)
    weight_order, arch_order = self._epoch_order(epoch)
    rows = slice(position * self.batch_size, (position + 1) * self.batch_size)
    if not self.cycle_arch:
      return (self.weight_idx[weight_order[rows]],
              self.arch_idx[arch_order[rows]])
    arch_pass, arch_position = divmod(int(step), self.arch_steps_per_pass)
    arch_order = np.random.default_rng([self.seed, arch_pass, 4]).permutation(
        len(self.arch_idx))
    arch_rows = slice(arch_position * self.batch_size,
                      (arch_position + 1) * self.batch_size)
    return (self.weight_idx[weight_order[rows]],
            self.arch_idx[arch_order[arch_rows]])

  def batch(self, step):
    """(train_batch, val_batch) of `step`; see the class docstring."""
    train_idx, val_idx = self.indices(step)
    return (self._make(train_idx, [self.seed, int(step), 2]),
            self._make(val_idx, [self.seed, int(step), 3]))


class TrainBatches(_StepBatches):
  """Batches of one split for training a network from scratch.

  `batch(step)` is {'image', 'label'} of this process's share of the global batch at
  `step`: a fresh permutation of `indices` per epoch (stream [seed, epoch, 4]), then crop
  + flip and cutout drawn from [seed, step, 5]. An epoch is len(indices) // batch_size
  steps (remainder dropped), so every step has the full batch.
  """

  def __init__(self, dataset, indices, batch_size, seed, augment, crop_padding=4,
               cutout_length=0, process_index=None, process_count=None):
    super().__init__(dataset, batch_size, seed, augment, crop_padding, process_index,
                     process_count)
    self.indices = np.asarray(indices, np.int64)
    self.cutout_length = int(cutout_length)
    self.steps_per_epoch = len(self.indices) // self.batch_size
    if self.steps_per_epoch == 0:
      raise ValueError(
          f'config field batch_size={batch_size} is larger than the '
          f'{len(self.indices)} training examples, so an epoch has no steps; '
          'lower batch_size or use more examples.')
    self._order_cache = (None, None)

  def _epoch_order(self, epoch):
    cached_epoch, order = self._order_cache
    if cached_epoch != epoch:
      order = np.random.default_rng([self.seed, epoch, 4]).permutation(len(self.indices))
      self._order_cache = (epoch, order)
    return order

  def batch(self, step):
    if step < 0:
      raise ValueError(f'step must be non-negative, not {step}.')
    epoch, position = divmod(int(step), self.steps_per_epoch)
    rows = slice(position * self.batch_size, (position + 1) * self.batch_size)
    indices = self.indices[self._epoch_order(epoch)[rows]]
    return self._make(indices, [self.seed, int(step), 5], self.cutout_length)


class Prefetcher:
  """Runs an iterator in a daemon thread, `size` items ahead of the consumer.

  Items arrive in the source's order; an exception in the source is raised
  by `next()` in the consumer. `close()` (also on `with` exit and garbage
  collection) stops the thread without waiting for the source to finish.
  """

  _END = object()

  def __init__(self, iterator, size=2):
    if size < 1:
      raise ValueError(f'prefetch size must be at least 1, not {size}.')
    self._queue = queue.Queue(maxsize=size)
    self._stop = threading.Event()
    self._done = False
    # The thread holds no reference to self, so dropping self closes it.
    self._thread = threading.Thread(
        target=_produce, args=(iterator, self._queue, self._stop, self._END),
        daemon=True)
    self._thread.start()

  def __iter__(self):
    return self

  def __next__(self):
    if self._done:
      raise StopIteration
    item, error = self._queue.get()
    if error is not None:
      self.close()
      raise error
    if item is self._END:
      self.close()
      raise StopIteration
    return item

  def close(self):
    self._done = True
    self._stop.set()
    # Unblock a producer waiting on a full queue.
    while True:
      try:
        self._queue.get_nowait()
      except queue.Empty:
        break

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def __del__(self):
    if hasattr(self, '_stop'):
      self.close()


def _produce(iterator, out, stop, end):
  def put(entry):
    while not stop.is_set():
      try:
        out.put(entry, timeout=0.05)
        return True
      except queue.Full:
        pass
    return False

  try:
    for item in iterator:
      if not put((item, None)):
        return
    put((end, None))
  except BaseException as e:  # pylint: disable=broad-except
    put((None, e))


def eval_batches(dataset, indices, batch_size, process_index=None,
                 process_count=None):
  """Yields normalized, un-augmented batches covering `indices` in order.

  Every batch has the global `batch_size` rows (this process's share of them
  on multi-host); the last one is padded with zero images, and its 'mask'
  (float32, 1 real / 0 padding) says which rows count, so shapes stay static
  under jit.
  """
  process_index, process_count = _process_defaults(process_index,
                                                   process_count)
  local = _local_batch_size(batch_size, process_count)
  indices = np.asarray(indices, np.int64)
  lo = process_index * local
  for start in range(0, len(indices), batch_size):
    chunk = indices[start:start + batch_size][lo:lo + local]
    n = len(chunk)
    images = np.zeros((local,) + tuple(dataset.image_shape), np.float32)
    labels = np.zeros((local,), np.int32)
    mask = np.zeros((local,), np.float32)
    if n:
      real_images, real_labels = dataset.get(chunk)
      images[:n] = normalize(real_images, dataset.mean, dataset.std)
      labels[:n] = real_labels
      mask[:n] = 1.0
    yield {'image': images, 'label': labels, 'mask': mask}
