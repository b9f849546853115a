"""Data pipeline: datasets by name, the search split, and host-side batches."""

from jaxnas.data.batches import cutout
from jaxnas.data.batches import eval_batches
from jaxnas.data.batches import normalize
from jaxnas.data.batches import pad_crop_flip
from jaxnas.data.batches import Prefetcher
from jaxnas.data.batches import SearchBatches
from jaxnas.data.batches import TrainBatches
from jaxnas.data.datasets import check_dataset
from jaxnas.data.datasets import DATASETS
from jaxnas.data.datasets import Dataset
from jaxnas.data.datasets import DatasetNotFoundError
from jaxnas.data.datasets import DatasetSpec
from jaxnas.data.datasets import InMemoryDataset
from jaxnas.data.datasets import load_dataset
from jaxnas.data.datasets import TfdsDataset
from jaxnas.data.idx import DataFileError
from jaxnas.data.splits import search_split

__all__ = [
    'DATASETS',
    'DataFileError',
    'Dataset',
    'DatasetNotFoundError',
    'DatasetSpec',
    'InMemoryDataset',
    'Prefetcher',
    'SearchBatches',
    'TfdsDataset',
    'TrainBatches',
    'check_dataset',
    'cutout',
    'eval_batches',
    'load_dataset',
    'normalize',
    'pad_crop_flip',
    'search_split',
]
