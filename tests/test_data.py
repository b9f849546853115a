"""Tests of jaxnas.data: IDX and TFDS reading, the search split, batches."""

import gc
import gzip
import io
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from jaxnas import data
from jaxnas.data import datasets

FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'


def data_config(**kwargs):
  fields = dict(name='fashion_mnist', source='auto', data_dir=None,
                image_size=None, max_examples=None)
  fields.update(kwargs)
  return ml_collections.ConfigDict(fields)


# ------------------------------------------------------------------------ IDX


def write_idx(path, array, gzipped):
  array = np.asarray(array, np.uint8)
  header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(
      array.shape, '>i4').tobytes()
  opener = gzip.open if gzipped else open
  with opener(path, 'wb') as f:
    f.write(header + array.tobytes())


def write_fashion_mnist(directory, rng, n_train=5, n_test=3):
  """Train files gzipped, test files plain, as both occur in the wild."""
  arrays = {}
  for split, n, prefix, gzipped in (('train', n_train, 'train', True),
                                    ('test', n_test, 't10k', False)):
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, (n,), dtype=np.uint8)
    suffix = '.gz' if gzipped else ''
    write_idx(os.path.join(directory, f'{prefix}-images-idx3-ubyte{suffix}'),
              images, gzipped)
    write_idx(os.path.join(directory, f'{prefix}-labels-idx1-ubyte{suffix}'),
              labels, gzipped)
    arrays[split] = (images, labels)
  return arrays


@pytest.mark.parametrize('split', ['train', 'test'])
def test_idx_gzipped_and_plain_load_exactly(tmp_path, split):
  arrays = write_fashion_mnist(tmp_path, np.random.default_rng(0))
  ds = data.load_dataset(data_config(source='idx', data_dir=str(tmp_path)),
                         split)
  images, labels = arrays[split]
  assert len(ds) == len(labels)
  assert ds.image_shape == (28, 28, 1)
  assert ds.num_classes == 10
  np.testing.assert_array_equal(ds.labels, labels.astype(np.int32))
  got_images, got_labels = ds.get(np.arange(len(ds)))
  assert got_images.dtype == np.uint8 and got_labels.dtype == np.int32
  np.testing.assert_array_equal(got_images[..., 0], images)
  np.testing.assert_array_equal(got_labels, labels)
  np.testing.assert_allclose(ds.mean, [0.2860])
  np.testing.assert_allclose(ds.std, [0.3530])
  assert data.check_dataset(data_config(data_dir=str(tmp_path)), split) == (
      f"fashion_mnist {split!r}: {len(labels)} examples in IDX files in "
      f'{tmp_path}')


def test_idx_max_examples_keeps_the_first(tmp_path):
  arrays = write_fashion_mnist(tmp_path, np.random.default_rng(1))
  ds = data.load_dataset(data_config(data_dir=str(tmp_path), max_examples=2))
  assert len(ds) == 2
  np.testing.assert_array_equal(ds.get([0, 1])[0][..., 0],
                                arrays['train'][0][:2])


def test_idx_bad_magic_names_the_file(tmp_path):
  write_fashion_mnist(tmp_path, np.random.default_rng(2))
  bad = tmp_path / 't10k-labels-idx1-ubyte'
  raw = bytearray(bad.read_bytes())
  raw[2] = 0x0D  # float type code instead of unsigned byte
  bad.write_bytes(bytes(raw))
  cfg = data_config(source='idx', data_dir=str(tmp_path))
  with pytest.raises(data.DataFileError, match='0x00000d01') as e:
    data.load_dataset(cfg, 'test')
  assert str(bad) in str(e.value)
  with pytest.raises(data.DataFileError, match=str(bad)):
    data.check_dataset(cfg, 'test')
  data.load_dataset(cfg, 'train')  # The other split is fine.


def test_idx_truncated_file_is_a_data_file_error(tmp_path):
  write_fashion_mnist(tmp_path, np.random.default_rng(3))
  bad = tmp_path / 't10k-images-idx3-ubyte'
  bad.write_bytes(bad.read_bytes()[:-10])
  with pytest.raises(data.DataFileError, match='truncated') as e:
    data.load_dataset(data_config(data_dir=str(tmp_path)), 'test')
  assert str(bad) in str(e.value)
  assert isinstance(e.value, ValueError)


def test_idx_missing_dir_and_files_are_not_found(tmp_path):
  missing = tmp_path / 'nowhere'
  with pytest.raises(data.DatasetNotFoundError) as e:
    data.load_dataset(data_config(source='idx', data_dir=str(missing)))
  message = str(e.value)
  assert isinstance(e.value, FileNotFoundError)
  assert 'fashion_mnist' in message and str(missing) in message
  assert 'apt-get install -y dataset-fashion-mnist' in message
  assert 'config.data.data_dir' in message

  write_fashion_mnist(tmp_path, np.random.default_rng(4))
  os.remove(tmp_path / 'train-labels-idx1-ubyte.gz')
  with pytest.raises(data.DatasetNotFoundError,
                     match='train-labels-idx1-ubyte'):
    data.check_dataset(data_config(source='idx', data_dir=str(tmp_path)))


def test_auto_names_both_places_when_nothing_is_found(tmp_path):
  with pytest.raises(data.DatasetNotFoundError) as e:
    data.check_dataset(data_config(data_dir=str(tmp_path)))
  message = str(e.value)
  assert message.count(str(tmp_path)) >= 2
  assert 'IDX files' in message and 'TFDS' in message
  assert 'tfds build fashion_mnist' in message


@pytest.mark.parametrize('field,value,match', [
    ('name', 'mnist', 'data.name'),
    ('source', 'csv', 'data.source'),
    ('max_examples', 0, 'data.max_examples'),
    ('image_size', 32, 'data.image_size'),
    ('image_size', -5, 'data.image_size'),
])
def test_bad_config_fields_are_named(field, value, match):
  with pytest.raises(ValueError, match=match):
    data.check_dataset(data_config(**{field: value}))


def test_idx_is_only_for_fashion_mnist():
  with pytest.raises(ValueError, match=r"data.source.*\['auto', 'tfds'\]"):
    data.load_dataset(data_config(name='cifar10', source='idx'))


def test_unknown_split_is_a_value_error(tmp_path):
  with pytest.raises(ValueError, match="'val'"):
    data.load_dataset(data_config(data_dir=str(tmp_path)), 'val')


# ----------------------------------------------------------------------- TFDS
# Two ways to get TFDS data without TensorFlow, both used below:
# * tfds.testing.mock_data(policy=USE_CODE) works with tfds.data_source in
#   tfds 4.9.10 (the default AUTO policy also falls back to it for cifar10), but
#   only per-index `source[i]`: its `__getitems__` is broken, and `decoders=`
#   needs TensorFlow to encode the fake images.
# * A tiny real dataset written to tmp_path: PNG/JPEG bytes encoded with PIL,
#   serialized by the TFDS features (no TensorFlow for pre-encoded images),
#   written as array_record, plus dataset_info.json from the builder's info.


def write_tfds(data_dir, name, splits, image_format='PNG'):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  builder = tfds.builder(name, data_dir=str(data_dir),
                         file_format='array_record')
  os.makedirs(builder.data_dir, exist_ok=True)
  infos = []
  for split, examples in splits.items():
    path = os.path.join(builder.data_dir,
                        f'{name}-{split}.array_record-00000-of-00001')
    writer = array_record_module.ArrayRecordWriter(path, 'group_size:1')
    for example in examples:
      encoded = io.BytesIO()
      Image.fromarray(example['image'].squeeze(-1)
                      if example['image'].shape[-1] == 1 else
                      example['image']).save(encoded, format=image_format)
      writer.write(builder.info.features.serialize_example(
          {**example, 'image': encoded.getvalue()}))
    writer.close()
    infos.append(tfds.core.SplitInfo(
        name=split, shard_lengths=[len(examples)], num_bytes=0,
        filename_template=tfds.core.ShardedFileTemplate(
            data_dir=builder.data_dir, dataset_name=name, split=split,
            template='{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}',
            filetype_suffix='array_record')))
  builder.info.set_splits(tfds.core.SplitDict(infos))
  builder.info.write_to_directory(builder.data_dir)


def test_tfds_mock_data_cifar10():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  with tfds.testing.mock_data(num_examples=12,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    cfg = data_config(name='cifar10', source='tfds')
    assert data.check_dataset(cfg, 'test').startswith(
        "cifar10 'test': 12 examples in TFDS data")
    ds = data.load_dataset(cfg, 'train')
    source = tfds.data_source('cifar10', split='train')
    expected = np.stack([source[i]['image'] for i in range(12)])
    expected_labels = [int(source[i]['label']) for i in range(12)]
  assert isinstance(ds, data.InMemoryDataset)
  assert (len(ds), ds.num_classes, ds.image_shape) == (12, 10, (32, 32, 3))
  images, labels = ds.get(np.arange(12))
  assert images.dtype == np.uint8 and images.shape == (12, 32, 32, 3)
  assert labels.dtype == np.int32 and ds.labels.dtype == np.int32
  np.testing.assert_array_equal(images, expected)
  np.testing.assert_array_equal(labels, expected_labels)
  assert images.std() > 10  # Mock images are random, not blank.
  np.testing.assert_allclose(ds.std, [0.2470, 0.2435, 0.2616])


def test_tfds_on_disk_cifar10_without_tensorflow(tmp_path):
  rng = np.random.default_rng(5)
  images = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
  labels = [3, 1, 4, 1, 5, 9]
  write_tfds(tmp_path, 'cifar10', {
      'train': [{'image': images[i], 'label': labels[i], 'id': f'train_{i}'}
                for i in range(4)],
      'test': [{'image': images[i], 'label': labels[i], 'id': f'test_{i}'}
               for i in range(4, 6)],
  })
  cfg = data_config(name='cifar10', data_dir=str(tmp_path))
  train = data.load_dataset(cfg, 'train')
  test = data.load_dataset(cfg, 'test')
  assert (len(train), len(test)) == (4, 2)
  np.testing.assert_array_equal(train.get([0, 1, 2, 3])[0], images[:4])
  np.testing.assert_array_equal(test.get([1, 0])[0], images[[5, 4]])
  np.testing.assert_array_equal(train.labels, labels[:4])
  np.testing.assert_array_equal(test.labels, labels[4:])
  assert len(data.load_dataset(data_config(
      name='cifar10', data_dir=str(tmp_path), max_examples=3))) == 3


def test_tfds_unprepared_is_not_found(tmp_path):
  with pytest.raises(data.DatasetNotFoundError) as e:
    data.check_dataset(data_config(name='cifar10', data_dir=str(tmp_path)))
  message = str(e.value)
  assert 'cifar10' in message and str(tmp_path) in message
  assert "pip install 'jaxnas[prepare]'" in message
  assert f'tfds build cifar10 --data_dir={tmp_path}' in message
  assert '--config.data.data_dir' in message
  with pytest.raises(data.DatasetNotFoundError,
                     match='ILSVRC2012_img_train.tar'):
    data.check_dataset(data_config(name='imagenet2012',
                                   data_dir=str(tmp_path)))


def test_tfds_prepared_as_tfrecord_says_so(tmp_path):
  image = np.zeros((32, 32, 3), np.uint8)
  write_tfds(tmp_path, 'cifar10', {
      'train': [{'image': image, 'label': 0, 'id': 'train_0'}]})
  info = tmp_path / 'cifar10' / '3.0.2' / 'dataset_info.json'
  info.write_text(info.read_text().replace('"array_record"', '"tfrecord"'))
  with pytest.raises(data.DatasetNotFoundError) as e:
    data.load_dataset(data_config(name='cifar10', data_dir=str(tmp_path)))
  message = str(e.value)
  assert f'is prepared in {info.parent} but cannot be read' in message
  assert '--file_format=array_record' in message


def test_fashion_mnist_auto_falls_back_to_tfds(tmp_path):
  images = np.random.default_rng(6).integers(0, 256, (3, 28, 28, 1),
                                             dtype=np.uint8)
  write_tfds(tmp_path, 'fashion_mnist', {
      'train': [{'image': images[i], 'label': i} for i in range(3)]})
  ds = data.load_dataset(data_config(data_dir=str(tmp_path)))
  assert ds.image_shape == (28, 28, 1)
  np.testing.assert_array_equal(ds.get([2, 0])[0], images[[2, 0]])
  np.testing.assert_array_equal(ds.labels, [0, 1, 2])


def test_imagenet_decodes_on_demand_to_image_size(tmp_path):
  rng = np.random.default_rng(7)
  shapes = [(20, 36), (40, 24), (16, 16)]
  write_tfds(tmp_path, 'imagenet2012', {'validation': [
      {'image': rng.integers(0, 256, shape + (3,), dtype=np.uint8),
       'label': 10 * i + 7, 'file_name': f'img{i}.JPEG'}
      for i, shape in enumerate(shapes)]}, image_format='JPEG')
  ds = data.load_dataset(
      data_config(name='imagenet2012', data_dir=str(tmp_path), image_size=16),
      'test')
  assert isinstance(ds, data.TfdsDataset)
  assert (len(ds), ds.num_classes, ds.image_shape) == (3, 1000, (16, 16, 3))
  images, labels = ds.get([2, 0])
  assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8
  np.testing.assert_array_equal(labels, [27, 7])
  np.testing.assert_array_equal(ds.labels, [7, 17, 27])
  default = data.load_dataset(
      data_config(name='imagenet2012', data_dir=str(tmp_path)), 'validation')
  assert default.image_shape == (224, 224, 3)


def test_resize_center_crop():
  image = np.arange(16 * 30 * 3, dtype=np.int64).reshape(16, 30, 3) % 251
  image = image.astype(np.uint8)
  # Shorter side already 16: no resize, only the center crop.
  np.testing.assert_array_equal(datasets.resize_center_crop(image, 16),
                                image[:, 7:23])
  assert datasets.resize_center_crop(image, 8).shape == (8, 8, 3)
  gray = np.full((10, 12), 9, np.uint8)
  np.testing.assert_array_equal(datasets.resize_center_crop(gray, 10),
                                np.full((10, 10, 3), 9))


# ---------------------------------------------------------------------- split


def make_dataset(n=100, num_classes=10, hw=8, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, hw, hw, 3), dtype=np.uint8)
  labels = np.arange(n) % num_classes
  return data.InMemoryDataset('cifar10', 'train', data.DATASETS['cifar10'],
                              images, labels)


def test_search_split_is_the_reference_prefix_split():
  ds = make_dataset(n=10)
  weight, arch = data.search_split(ds, 0.5, seed=0)
  np.testing.assert_array_equal(weight, np.arange(5))
  np.testing.assert_array_equal(arch, np.arange(5, 10))
  assert weight.dtype == np.int64 and arch.dtype == np.int64
  weight, arch = data.search_split(ds, 0.35, seed=0)
  assert (len(weight), len(arch)) == (3, 7)  # floor(3.5) = 3


@pytest.mark.parametrize('portion', [0.0, 1.0, 1.5, -0.2])
def test_search_split_rejects_bad_portion(portion):
  with pytest.raises(ValueError, match='data.train_portion'):
    data.search_split(make_dataset(n=10), portion, seed=0)


def test_search_split_per_class_fractions():
  ds = make_dataset(n=400)  # 40 examples per class.
  weight, arch = data.search_split(ds, 0.5, seed=3,
                                   per_class_fractions=(0.1, 0.025))
  assert (len(weight), len(arch)) == (40, 10)
  np.testing.assert_array_equal(np.bincount(ds.labels[weight], minlength=10),
                                [4] * 10)
  np.testing.assert_array_equal(np.bincount(ds.labels[arch], minlength=10),
                                [1] * 10)
  assert not set(weight) & set(arch)
  again = data.search_split(ds, 0.5, seed=3, per_class_fractions=(0.1, 0.025))
  np.testing.assert_array_equal(again[0], weight)
  other = data.search_split(ds, 0.5, seed=4, per_class_fractions=(0.1, 0.025))
  assert not np.array_equal(other[0], weight)
  with pytest.raises(ValueError, match='data.per_class_fractions'):
    data.search_split(ds, 0.5, seed=0, per_class_fractions=(0.9, 0.2))


# -------------------------------------------------------------------- batches


def make_batches(ds=None, batch_size=8, seed=0, augment=False, **kwargs):
  ds = ds if ds is not None else make_dataset()
  weight, arch = data.search_split(ds, 0.5, seed=seed)
  return data.SearchBatches(ds, weight, arch, batch_size, seed, augment,
                            **kwargs)


def test_batch_shapes_and_splits():
  ds = make_dataset(n=100)
  batches = make_batches(ds, batch_size=8, process_index=0, process_count=1)
  assert batches.steps_per_epoch == 50 // 8
  # Without multi-host arguments the process comes from JAX (one on CPU).
  default = make_batches(ds, batch_size=8)
  assert (default.process_index, default.process_count) == (0, 1)
  train, val = batches.batch(0)
  assert train['image'].shape == (8, 8, 8, 3)
  assert train['image'].dtype == np.float32
  assert train['label'].shape == (8,) and train['label'].dtype == np.int32
  train_idx, val_idx = batches.indices(0)
  assert set(train_idx) <= set(range(50)) and set(val_idx) <= set(range(50, 100))
  np.testing.assert_array_equal(train['label'], ds.labels[train_idx])
  np.testing.assert_array_equal(val['label'], ds.labels[val_idx])


def test_unaugmented_batch_is_normalized_by_the_formula():
  ds = make_dataset()
  train, _ = make_batches(ds, process_index=0, process_count=1).batch(3)
  idx = make_batches(ds, process_index=0, process_count=1).indices(3)[0]
  x = ds.images[idx].astype(np.float64) / 255
  expected = (x - np.array([0.4914, 0.4822, 0.4465])) / np.array(
      [0.2470, 0.2435, 0.2616])
  np.testing.assert_allclose(train['image'], expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(train['image'].mean(axis=(0, 1, 2)),
                             expected.mean(axis=(0, 1, 2)), atol=1e-5)


def test_each_epoch_visits_every_index_at_most_once_in_a_new_order():
  batches = make_batches(batch_size=8, process_index=0, process_count=1)
  spe = batches.steps_per_epoch
  epoch0 = np.concatenate([batches.indices(s)[0] for s in range(spe)])
  epoch1 = np.concatenate([batches.indices(s)[0] for s in range(spe, 2 * spe)])
  assert len(set(epoch0)) == spe * 8 and len(set(epoch1)) == spe * 8
  assert not np.array_equal(epoch0, epoch1)


def test_batches_are_a_function_of_seed_and_step():
  a = make_batches(augment=True, seed=1, process_index=0, process_count=1)
  b = make_batches(augment=True, seed=1, process_index=0, process_count=1)
  c = make_batches(augment=True, seed=2, process_index=0, process_count=1)
  late = 2 * a.steps_per_epoch + 3
  first = a.batch(late)
  a.batch(0)  # Another epoch in between must not change step `late`.
  for x, y in zip(first, b.batch(late)):
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['label'], y['label'])
  np.testing.assert_array_equal(a.batch(late)[1]['image'], first[1]['image'])
  assert not np.array_equal(a.batch(late + 1)[0]['image'], first[0]['image'])
  assert not np.array_equal(c.batch(late)[0]['image'], first[0]['image'])


def test_augmentation_is_drawn_per_sample_per_step_per_split():
  # All images identical, so any difference comes from the augmentation.
  image = np.random.default_rng(0).integers(0, 256, (8, 8, 3), np.uint8)
  ds = data.InMemoryDataset('cifar10', 'train', data.DATASETS['cifar10'],
                            np.stack([image] * 100), np.zeros(100))
  batches = make_batches(ds, augment=True, process_index=0, process_count=1)
  train0, val0 = batches.batch(0)
  train1, _ = batches.batch(1)
  # A flip alone makes at most 2 distinct images; crops are per sample too.
  assert len({x.tobytes() for x in train0['image']}) > 2
  assert not np.array_equal(train0['image'], train1['image'])
  assert not np.array_equal(train0['image'], val0['image'])


def test_zero_steps_and_bad_batch_sizes_name_batch_size():
  with pytest.raises(ValueError, match='batch_size=64'):
    make_batches(batch_size=64, process_index=0, process_count=1)
  with pytest.raises(ValueError, match='batch_size=10'):
    make_batches(batch_size=10, process_index=0, process_count=4)
  with pytest.raises(ValueError, match='batch_size'):
    make_batches(batch_size=0, process_index=0, process_count=1)


def test_flip_only_keeps_each_image_or_its_mirror():
  batch_size = 32
  plain = make_batches(batch_size=batch_size, process_index=0,
                       process_count=1)
  flipped = make_batches(batch_size=batch_size, augment=True, crop_padding=0,
                         process_index=0, process_count=1)
  x = plain.batch(1)[0]['image']
  y = flipped.batch(1)[0]['image']
  same = np.all(y == x, axis=(1, 2, 3))
  mirrored = np.all(y == x[:, :, ::-1], axis=(1, 2, 3))
  assert np.all(same | mirrored)
  assert same.any() and mirrored.any()


def test_pad_crop_flip_matches_slicing_the_padded_image():
  rng = np.random.default_rng(0)
  images = rng.integers(1, 256, (3, 6, 6, 2), dtype=np.uint8)
  offsets = np.array([[4, 4], [0, 0], [1, 7]])
  flips = np.array([False, False, True])
  out = data.pad_crop_flip(images, offsets, flips, padding=4)
  np.testing.assert_array_equal(out[0], images[0])  # Centered: unchanged.
  np.testing.assert_array_equal(out[1, 4:, 4:], images[1, :2, :2])
  assert not out[1, :4].any() and not out[1, :, :4].any()
  padded = np.pad(images[2], ((4, 4), (4, 4), (0, 0)))
  np.testing.assert_array_equal(out[2], padded[1:7, 7:13][:, ::-1])


def test_process_slices_concatenate_to_the_global_batch():
  ds = make_dataset(n=200)
  full = make_batches(ds, batch_size=16, augment=True, process_index=0,
                      process_count=1).batch(5)
  parts = [make_batches(ds, batch_size=16, augment=True, process_index=i,
                        process_count=4).batch(5) for i in range(4)]
  assert parts[0][0]['image'].shape == (4, 8, 8, 3)
  for which in range(2):
    for key in ('image', 'label'):
      np.testing.assert_array_equal(
          np.concatenate([p[which][key] for p in parts]), full[which][key])


def test_iterate_prefetches_the_same_batches_in_order():
  batches = make_batches(augment=True, process_index=0, process_count=1)
  got = list(batches.iterate(start_step=4, num_steps=5))
  assert len(got) == 5
  for step, (train, val) in zip(range(4, 9), got):
    want_train, want_val = batches.batch(step)
    np.testing.assert_array_equal(train['image'], want_train['image'])
    np.testing.assert_array_equal(val['label'], want_val['label'])


def test_iterate_closes_early_and_forwards_errors():
  batches = make_batches(process_index=0, process_count=1)
  with batches.iterate(0, None) as it:
    next(it)
  it._thread.join(timeout=5)
  assert not it._thread.is_alive()
  # Dropping an endless iterator without close() stops its thread too.
  it = batches.iterate(0, None)
  next(it)
  thread = it._thread
  del it
  gc.collect()
  thread.join(timeout=5)
  assert not thread.is_alive()

  class Broken(data.InMemoryDataset):
    def get(self, indices):
      if 60 in indices or 61 in indices:
        raise OSError('disk gone')
      return super().get(indices)

  ds = make_dataset()
  broken = make_batches(Broken('cifar10', 'train', data.DATASETS['cifar10'],
                               ds.images, ds.labels),
                        batch_size=2, process_index=0, process_count=1)
  bad_step = next(s for s in range(broken.steps_per_epoch)
                  if {60, 61} & set(broken.indices(s)[1]))
  it = broken.iterate(0, broken.steps_per_epoch)
  for _ in range(bad_step):
    next(it)
  with pytest.raises(OSError, match='disk gone'):
    next(it)
  with pytest.raises(StopIteration):
    next(it)


def test_eval_batches_pad_the_last_batch_with_a_mask():
  ds = make_dataset(n=20)
  indices = np.array([3, 1, 4, 15, 9, 2, 6, 5, 13, 17])
  got = list(data.eval_batches(ds, indices, 4, process_index=0,
                               process_count=1))
  assert len(got) == 3
  for batch in got:
    assert batch['image'].shape == (4, 8, 8, 3)
    assert batch['image'].dtype == np.float32
  np.testing.assert_array_equal(got[2]['mask'], [1, 1, 0, 0])
  np.testing.assert_array_equal(got[0]['mask'], [1, 1, 1, 1])
  labels = np.concatenate([b['label'][b['mask'] > 0] for b in got])
  np.testing.assert_array_equal(labels, ds.labels[indices])
  images = np.concatenate([b['image'][b['mask'] > 0] for b in got])
  np.testing.assert_allclose(
      images, data.normalize(ds.images[indices], ds.mean, ds.std))
  assert not got[2]['image'][2:].any()
  halves = [list(data.eval_batches(ds, indices, 4, process_index=i,
                                   process_count=2)) for i in range(2)]
  for step in range(3):
    np.testing.assert_array_equal(
        np.concatenate([h[step]['mask'] for h in halves]), got[step]['mask'])
    np.testing.assert_array_equal(
        np.concatenate([h[step]['label'] for h in halves]), got[step]['label'])


# ----------------------------------------------------------- real Fashion-MNIST


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DIR),
                    reason='dataset-fashion-mnist is not installed')
def test_real_fashion_mnist():
  cfg = data_config()
  train = data.load_dataset(cfg, 'train')
  test = data.load_dataset(cfg, 'test')
  assert (len(train), len(test)) == (60000, 10000)
  assert train.num_classes == 10 and train.image_shape == (28, 28, 1)
  np.testing.assert_array_equal(np.bincount(train.labels), [6000] * 10)
  np.testing.assert_array_equal(np.bincount(test.labels), [1000] * 10)
  # The published normalization constants are this split's statistics.
  pixels = train.images.astype(np.float64) / 255
  assert abs(pixels.mean() - 0.2860) < 1e-3
  assert abs(pixels.std() - 0.3530) < 1e-3
