"""Datasets by name: where to find them and how to read one split.

Fashion-MNIST reads the Debian IDX files (or TFDS); CIFAR-10 and ImageNet read a
prepared TFDS dataset through `tfds.data_source` (array_record, no TensorFlow).
Small datasets are loaded into memory once as uint8; ImageNet is decoded on demand.
"""

import dataclasses
import glob
import os

import numpy as np
from PIL import Image

from jaxnas.data import idx
from jaxnas.data.idx import DataFileError

DEFAULT_IDX_DIR = '/usr/share/datasets/fashion-mnist'
SOURCES = ('auto', 'idx', 'tfds')


class DatasetNotFoundError(FileNotFoundError):
  """A dataset is not where the config says (or where the defaults look)."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What jaxnas knows about a dataset before reading it."""
  num_classes: int
  image_shape: tuple  # (H, W, C); H and W are None where `image_size` decides.
  mean: tuple  # Per channel, for inputs scaled to [0, 1].
  std: tuple
  sources: tuple  # Sources besides 'auto', the first tried first.
  tfds_name: str
  splits: dict  # jaxnas split name -> TFDS split name.
  augmentation: str  # 'pad_crop_flip' (CIFAR recipe) or 'flip'.
  in_memory: bool
  default_image_size: int | None = None
  idx_files: dict | None = None  # split -> (images stem, labels stem).


DATASETS = {
    'fashion_mnist': DatasetSpec(
        num_classes=10,
        image_shape=(28, 28, 1),
        mean=(0.2860,),
        std=(0.3530,),
        sources=('idx', 'tfds'),
        tfds_name='fashion_mnist',
        splits={'train': 'train', 'test': 'test'},
        augmentation='pad_crop_flip',
        in_memory=True,
        idx_files={
            'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
            'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
        },
    ),
    'cifar10': DatasetSpec(
        num_classes=10,
        image_shape=(32, 32, 3),
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        sources=('tfds',),
        tfds_name='cifar10',
        splits={'train': 'train', 'test': 'test'},
        augmentation='pad_crop_flip',
        in_memory=True,
    ),
    # ImageNet's TFDS 'test' split has no labels, so jaxnas's 'test' is 'validation'.
    'imagenet2012': DatasetSpec(
        num_classes=1000,
        image_shape=(None, None, 3),
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        sources=('tfds',),
        tfds_name='imagenet2012',
        splits={'train': 'train', 'test': 'validation',
                'validation': 'validation'},
        augmentation='flip',
        in_memory=False,
        default_image_size=224,
    ),
}


class Dataset:
  """One split of a dataset: uint8 images [N, H, W, C] and int32 labels [N].

  Attributes:
    name: the registry name.
    split: 'train' or 'test' (ImageNet also 'validation').
    num_classes: number of classes.
    image_shape: (H, W, C) of the images `get` returns.
    mean, std: float32 [C], per-channel normalization for inputs in [0, 1].
    augmentation: the recipe the batcher applies ('pad_crop_flip' or 'flip').
    labels: int32 [N], all labels of the split.
  """

  def __init__(self, name, split, spec, image_shape):
    self.name = name
    self.split = split
    self.num_classes = spec.num_classes
    self.image_shape = tuple(image_shape)
    self.mean = np.asarray(spec.mean, np.float32)
    self.std = np.asarray(spec.std, np.float32)
    self.augmentation = spec.augmentation

  def __len__(self):
    raise NotImplementedError

  @property
  def labels(self):
    raise NotImplementedError

  def get(self, indices):
    """Returns (uint8 images [n, H, W, C], int32 labels [n]) for `indices`."""
    raise NotImplementedError

  def __repr__(self):
    return (f'{type(self).__name__}(name={self.name!r}, split={self.split!r}, '
            f'examples={len(self)}, image_shape={self.image_shape})')


class InMemoryDataset(Dataset):
  """A split held as one uint8 array (Fashion-MNIST, CIFAR-10)."""

  def __init__(self, name, split, spec, images, labels):
    super().__init__(name, split, spec, images.shape[1:])
    self.images = images
    self._labels = labels.astype(np.int32)

  def __len__(self):
    return len(self._labels)

  @property
  def labels(self):
    return self._labels

  def get(self, indices):
    indices = np.asarray(indices, np.int64)
    return self.images[indices], self._labels[indices]


class TfdsDataset(Dataset):
  """A split read from a TFDS data source and decoded on demand (ImageNet).

  Images are resized (shorter side to `image_size`) and center-cropped to
  `image_size` x `image_size`; random-resized crops belong to the batcher.
  """

  def __init__(self, name, split, spec, source, image_size, num_examples,
               label_source=None):
    super().__init__(name, split, spec,
                     (image_size, image_size, spec.image_shape[2]))
    self.source = source
    self.image_size = image_size
    self._num_examples = num_examples
    self._label_source = label_source
    self._labels = None

  def __len__(self):
    return self._num_examples

  @property
  def labels(self):
    # Reads every record once (images left encoded); cached afterwards.
    if self._labels is None:
      source = self._label_source() if self._label_source else self.source
      self._labels = np.fromiter(
          (int(source[i]['label']) for i in range(self._num_examples)),
          dtype=np.int32, count=self._num_examples)
    return self._labels

  def get(self, indices):
    indices = np.asarray(indices, np.int64)
    if indices.size and (indices.min() < 0 or
                         indices.max() >= self._num_examples):
      raise IndexError(f'indices must lie in [0, {self._num_examples}) for '
                       f'{self.name} {self.split!r}.')
    images = np.empty((len(indices),) + self.image_shape, np.uint8)
    labels = np.empty((len(indices),), np.int32)
    for j, i in enumerate(indices):
      example = self.source[int(i)]
      images[j] = resize_center_crop(example['image'], self.image_size)
      labels[j] = int(example['label'])
    return images, labels


def resize_center_crop(image, size):
  """Resizes the shorter side of an RGB uint8 image to `size`, center-crops."""
  image = np.asarray(image)
  if image.ndim == 2 or image.shape[-1] == 1:
    image = np.repeat(image.reshape(image.shape[:2] + (1,)), 3, axis=-1)
  h, w = image.shape[:2]
  scale = size / min(h, w)
  new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
  if (new_h, new_w) != (h, w):
    image = np.asarray(Image.fromarray(image).resize(
        (new_w, new_h), Image.BILINEAR))
  top, left = (new_h - size) // 2, (new_w - size) // 2
  return image[top:top + size, left:left + size]


# --------------------------------------------------------------------- config


def _field(cfg, name, default=None):
  value = getattr(cfg, name, default)
  return default if value is None else value


def _resolve(cfg, split):
  """Validates the config fields; returns (name, spec, source, data_dir)."""
  name = _field(cfg, 'name')
  if name not in DATASETS:
    raise ValueError(f'config field data.name is {name!r}; choose one of '
                     f'{sorted(DATASETS)}.')
  spec = DATASETS[name]
  source = _field(cfg, 'source', 'auto')
  if source not in SOURCES:
    raise ValueError(f'config field data.source is {source!r}; choose one of '
                     f'{list(SOURCES)}.')
  if source != 'auto' and source not in spec.sources:
    raise ValueError(f'config field data.source is {source!r} but {name} can '
                     f'be read only from {["auto", *spec.sources]}.')
  if split not in spec.splits:
    raise ValueError(f'split {split!r} does not exist for {name}; choose one '
                     f'of {sorted(spec.splits)}.')
  max_examples = _field(cfg, 'max_examples')
  if max_examples is not None and (
      not isinstance(max_examples, (int, np.integer)) or max_examples <= 0):
    raise ValueError('config field data.max_examples must be None or a '
                     f'positive integer, not {max_examples!r}.')
  image_size = _field(cfg, 'image_size')
  if image_size is not None and (
      not isinstance(image_size, (int, np.integer)) or image_size <= 0):
    raise ValueError('config field data.image_size must be None or a '
                     f'positive integer, not {image_size!r}.')
  if image_size is not None and spec.default_image_size is None and (
      image_size != spec.image_shape[0]):
    raise ValueError(f'config field data.image_size is {image_size} but '
                     f'{name} images are {spec.image_shape[0]} pixels and are '
                     'not resized; set it to None.')
  data_dir = _field(cfg, 'data_dir')
  if data_dir is not None:
    data_dir = os.path.expanduser(os.fspath(data_dir))
  return name, spec, source, data_dir


def _tfds_dir(data_dir):
  return data_dir or os.environ.get(
      'TFDS_DATA_DIR', os.path.join(os.path.expanduser('~'),
                                    'tensorflow_datasets'))


def _how_to_get(name, data_dir):
  d = _tfds_dir(data_dir)
  if name == 'fashion_mnist':
    return ('install the IDX files with `apt-get install -y '
            'dataset-fashion-mnist`, set `config.data.data_dir` to a directory '
            "holding the four IDX files, or prepare it with `pip install "
            f"'jaxnas[prepare]'` then `tfds build fashion_mnist --data_dir={d} "
            '--file_format=array_record`')
  if name == 'imagenet2012':
    return ('download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar '
            f'from https://image-net.org into {d}/downloads/manual, run `pip '
            "install 'jaxnas[prepare]'` then `tfds build imagenet2012 "
            f'--data_dir={d} --file_format=array_record`, and pass '
            f'`--config.data.data_dir={d}`')
  return (f"run `pip install 'jaxnas[prepare]'` then `tfds build {name} "
          f'--data_dir={d} --file_format=array_record`, and pass '
          f'`--config.data.data_dir={d}`')


# ------------------------------------------------------------------ IDX source


def _idx_paths(name, spec, split, data_dir):
  """Returns (images path, labels path) or raises DatasetNotFoundError."""
  directory = data_dir or DEFAULT_IDX_DIR
  stems = spec.idx_files[split]
  if not os.path.isdir(directory):
    raise DatasetNotFoundError(
        f'{name} IDX directory {directory} does not exist; '
        f'{_how_to_get(name, data_dir)}.')
  paths = [idx.find_idx_file(directory, stem) for stem in stems]
  missing = [stem for stem, path in zip(stems, paths) if path is None]
  if missing:
    raise DatasetNotFoundError(
        f'{name} IDX file(s) {", ".join(s + "[.gz]" for s in missing)} are '
        f'missing from {directory}; {_how_to_get(name, data_dir)}.')
  return paths


def _check_idx_pair(name, spec, images_shape, labels_shape, images_path):
  if images_shape[1:] != spec.image_shape[:2]:
    raise DataFileError(
        f'IDX file {images_path} holds {images_shape[1:]} images but {name} '
        f'images are {spec.image_shape[:2]}; point config.data.data_dir at '
        f'the {name} files.')
  if images_shape[0] != labels_shape[0]:
    raise DataFileError(
        f'IDX file {images_path} holds {images_shape[0]} images but its label '
        f'file holds {labels_shape[0]} labels; download both again.')


def _load_idx(name, spec, split, data_dir, max_examples):
  images_path, labels_path = _idx_paths(name, spec, split, data_dir)
  images = idx.read_idx(images_path, 3, max_examples)
  labels = idx.read_idx(labels_path, 1, max_examples)
  _check_idx_pair(name, spec, images.shape, labels.shape, images_path)
  if labels.size and labels.max() >= spec.num_classes:
    raise DataFileError(
        f'IDX file {labels_path} has label {labels.max()} but {name} has '
        f'{spec.num_classes} classes; download it again.')
  return InMemoryDataset(name, split, spec, images[..., None], labels)


def _check_idx(name, spec, split, data_dir):
  images_path, labels_path = _idx_paths(name, spec, split, data_dir)
  images_shape = idx.read_idx_shape(images_path, 3)
  labels_shape = idx.read_idx_shape(labels_path, 1)
  _check_idx_pair(name, spec, images_shape, labels_shape, images_path)
  return images_shape[0], os.path.dirname(images_path)


# ----------------------------------------------------------------- TFDS source


def _open_tfds(name, spec, split, data_dir, decoders=None):
  """Opens a prepared TFDS dataset as a random-access data source."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    # download=False: preparing needs TensorFlow and the network; fail instead.
    source = tfds.data_source(spec.tfds_name, split=spec.splits[split],
                              data_dir=data_dir, download=False,
                              decoders=decoders)
    num_examples = len(source)
  except Exception as e:  # pylint: disable=broad-except
    tfds_dir = _tfds_dir(data_dir)
    prepared = glob.glob(os.path.join(tfds_dir, spec.tfds_name, '*',
                                      'dataset_info.json'))
    if prepared:
      cause = (str(e).strip().splitlines() or [''])[0][:160]
      raise DatasetNotFoundError(
          f'{name} split {spec.splits[split]!r} is prepared in '
          f'{os.path.dirname(prepared[0])} but cannot be read as an '
          f'array_record data source ({type(e).__name__}: {cause}); '
          f'{_how_to_get(name, data_dir)}.') from e
    raise DatasetNotFoundError(
        f'{name} is not a prepared TFDS dataset in {tfds_dir}; '
        f'{_how_to_get(name, data_dir)}.') from e
  if num_examples == 0:
    raise DatasetNotFoundError(
        f'{name} split {spec.splits[split]!r} in {_tfds_dir(data_dir)} has no '
        f'examples; {_how_to_get(name, data_dir)}.')
  return source


def _load_tfds(name, spec, split, data_dir, max_examples, image_size):
  source = _open_tfds(name, spec, split, data_dir)
  n = len(source) if max_examples is None else min(len(source), max_examples)
  if not spec.in_memory:
    def label_source():
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
      # Labels only: leave the JPEGs encoded.
      return _open_tfds(name, spec, split, data_dir,
                        decoders={'image': tfds.decode.SkipDecoding()})
    return TfdsDataset(name, split, spec, source,
                       image_size or spec.default_image_size, n, label_source)
  images = np.empty((n,) + spec.image_shape, np.uint8)
  labels = np.empty((n,), np.int32)
  for i in range(n):
    example = source[i]
    image = np.asarray(example['image'])
    if image.shape != spec.image_shape:
      raise DataFileError(
          f'TFDS {name} in {_tfds_dir(data_dir)} has an image of shape '
          f'{image.shape} where {spec.image_shape} was expected; prepare it '
          'again.')
    images[i] = image
    labels[i] = int(example['label'])
  return InMemoryDataset(name, split, spec, images, labels)


# ------------------------------------------------------------------ public API


def _try_sources(cfg, split, idx_fn, tfds_fn):
  name, spec, source, data_dir = _resolve(cfg, split)
  if source == 'idx':
    return idx_fn(name, spec, split, data_dir)
  if source == 'tfds':
    return tfds_fn(name, spec, split, data_dir)
  if 'idx' not in spec.sources:
    return tfds_fn(name, spec, split, data_dir)
  try:
    return idx_fn(name, spec, split, data_dir)
  except DatasetNotFoundError:
    try:
      return tfds_fn(name, spec, split, data_dir)
    except DatasetNotFoundError as e:
      raise DatasetNotFoundError(
          f'{name} was found neither as IDX files in '
          f'{data_dir or DEFAULT_IDX_DIR} nor as a prepared TFDS dataset in '
          f'{_tfds_dir(data_dir)}; {_how_to_get(name, data_dir)}.') from e


def load_dataset(cfg, split='train'):
  """Loads one split of the dataset `cfg` names.

  Args:
    cfg: the `config.data` ConfigDict (or any object with these attributes):
      name ('fashion_mnist' | 'cifar10' | 'imagenet2012'), source ('auto' |
      'idx' | 'tfds'), data_dir (None or a path), image_size (None or int;
      ImageNet only, default 224), max_examples (None or int: the first N).
    split: 'train' or 'test'.

  Returns:
    A `Dataset`: in memory for Fashion-MNIST and CIFAR-10, decoded on demand
    for ImageNet.

  Raises:
    DatasetNotFoundError: the dataset is not where the config points.
    DataFileError: a data file is there but corrupt.
    ValueError: an unknown name, source, split or a bad field value.
  """
  max_examples = _field(cfg, 'max_examples')
  image_size = _field(cfg, 'image_size')
  return _try_sources(
      cfg, split,
      lambda n, s, sp, d: _load_idx(n, s, sp, d, max_examples),
      lambda n, s, sp, d: _load_tfds(n, s, sp, d, max_examples, image_size))


def check_dataset(cfg, split='train'):
  """Checks that `load_dataset(cfg, split)` will find its data, cheaply.

  Reads only IDX headers or opens the TFDS data source, so a run can fail
  before it compiles anything.

  Returns:
    One line saying what was found where, for the log.

  Raises:
    The same errors as `load_dataset`.
  """
  def check_idx(name, spec, split, data_dir):
    n, directory = _check_idx(name, spec, split, data_dir)
    return f'{name} {split!r}: {n} examples in IDX files in {directory}'

  def check_tfds(name, spec, split, data_dir):
    n = len(_open_tfds(name, spec, split, data_dir))
    return (f'{name} {split!r}: {n} examples in TFDS data in '
            f'{_tfds_dir(data_dir)}')

  return _try_sources(cfg, split, check_idx, check_tfds)
