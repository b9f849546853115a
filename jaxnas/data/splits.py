"""The search split: train images for the weights, held-out ones for the alphas."""

import math

import numpy as np


def search_split(dataset, train_portion, *, seed, per_class_fractions=None):
  """Splits a train set into weight and architecture (alpha) indices.

  Without `per_class_fractions` this is the PC-DARTS / DARTS CIFAR split: the
  first floor(train_portion * N) examples train the weights, the rest the
  architecture, in file order (the reference code does not shuffle here).

  With `per_class_fractions=(fw, fa)` (PC-DARTS ImageNet: 10% / 2.5%), each
  class's indices are shuffled with `np.random.default_rng(seed)` (classes in
  order) and the first floor(fw * n_c) go to the weights, the next
  floor(fa * n_c) to the architecture; `train_portion` is then unused.

  Returns:
    (weight_idx, arch_idx): sorted, disjoint int64 index arrays.
  """
  n = len(dataset)
  if per_class_fractions is None:
    if not 0 < train_portion < 1:
      raise ValueError('config field data.train_portion must lie strictly '
                       f'between 0 and 1, not {train_portion!r}.')
    split = int(math.floor(train_portion * n))
    if split == 0 or split == n:
      raise ValueError(f'config field data.train_portion={train_portion} '
                       f'leaves one side of the split of {n} examples empty; '
                       'use more examples or a portion nearer 0.5.')
    return np.arange(split, dtype=np.int64), np.arange(split, n, dtype=np.int64)

  fw, fa = per_class_fractions
  if not (fw > 0 and fa > 0 and fw + fa <= 1):
    raise ValueError('config field data.per_class_fractions must be two '
                     'positive fractions summing to at most 1, not '
                     f'{tuple(per_class_fractions)!r}.')
  labels = np.asarray(dataset.labels)
  rng = np.random.default_rng(seed)
  weight, arch = [], []
  for c in range(dataset.num_classes):
    members = rng.permutation(np.flatnonzero(labels == c))
    n_w = int(math.floor(fw * len(members)))
    n_a = int(math.floor(fa * len(members)))
    weight.append(members[:n_w])
    arch.append(members[n_w:n_w + n_a])
  weight_idx = np.sort(np.concatenate(weight)).astype(np.int64)
  arch_idx = np.sort(np.concatenate(arch)).astype(np.int64)
  if not len(weight_idx) or not len(arch_idx):
    raise ValueError(f'config field data.per_class_fractions={fw, fa} '
                     f'selects no examples from {n}; use larger fractions or '
                     'more examples.')
  return weight_idx, arch_idx
