"""Data parallelism over a 1-D device mesh: one code path for 1 to N devices.

The step functions are ``jax.jit``-ed with ``NamedSharding``s: the state is replicated,
each batch is one global array split over the mesh's ``data`` axis. XLA then inserts the
cross-device reductions itself, so a BatchNorm over the global batch is synchronized BN
and the gradients are those of the whole batch, as on one device.

Multi-host: every process builds the same mesh over all devices, reads only its own rows
of each global batch and hands them to ``shard_batch``; ``maybe_initialize_distributed``
must run before anything touches the devices.
"""

import functools

import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np

DATA_AXIS = 'data'
BATCH_NORM_MODES = ('sync', 'per_device')

# XLA:CPU hands dots, reductions and other fusions to the YNNPACK library by default. Its
# reductions are slow on the supernet's stacked-edge gradients (sums over a leading edge
# axis: 10-16x slower than XLA's own loops in isolation) and hold more temporary memory;
# its elementwise fusions are slower still. Only its dots are kept. Measured on the
# CIFAR-10 PC-DARTS search step (2-core CPU, experiments/benchmark_search.py): at batch 64,
# 4.9 s per step and 1.8 GB of XLA temporary buffers against 5.5 s and 2.8 GB with the
# default; at batch 256, 7.3 GB against 11.2 GB of buffers but 26.5 against 23.1 s per step.
CPU_COMPILER_OPTIONS = {'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_DOT'}


def maybe_initialize_distributed(config: ml_collections.ConfigDict, fail=None) -> None:
  """Joins the multi-host job when ``config.parallel.multi_host`` is on.

  Call it first: ``jax.distributed.initialize`` fails once a device has been used. The
  coordinator address, process count and process id come from
  ``parallel.coordinator_address`` / ``num_processes`` / ``process_id`` where set, else
  from the cluster environment that ``jax.distributed`` detects (Cloud TPU, SLURM, Open
  MPI, Kubernetes). ``fail(field, message)`` raises the caller's error for a bad field.
  """
  p = config.get('parallel')
  if p is None or not p.get('multi_host', False) or jax.distributed.is_initialized():
    return
  address = p.get('coordinator_address', '') or None
  count = p.get('num_processes', 0) or None
  index = p.get('process_id', -1)
  index = None if index is None or index < 0 else index
  if count is not None and index is not None and not index < count:
    message = f'= {index} must lie in [0, parallel.num_processes = {count}).'
    if fail is None:
      raise ValueError(f'config.parallel.process_id {message}')
    fail('parallel.process_id', message)
  jax.distributed.initialize(coordinator_address=address, num_processes=count,
                             process_id=index)


def any_process(flag: bool) -> bool:
  """``flag`` or'ed over all processes (a collective: every process calls it at the same
  point); on one process, ``flag`` itself."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


def check_config(config: ml_collections.ConfigDict, fail,
                 batch_norm_modes: tuple[str, ...] = BATCH_NORM_MODES) -> None:
  """Checks ``config.parallel`` and that ``optim.batch_size`` splits over the devices in
  use; ``fail(field, message)`` raises the caller's error."""
  p = config.parallel
  if p.batch_norm not in batch_norm_modes:
    fail('parallel.batch_norm', f'is {p.batch_norm!r}; choose one of {batch_norm_modes}.')
  available = jax.device_count()
  if not 0 <= p.num_devices <= available:
    fail('parallel.num_devices', f'= {p.num_devices} must lie in [0, {available}] (0: all '
         f'{available} devices).')
  if p.num_devices and p.num_devices != available and jax.process_count() > 1:
    fail('parallel.num_devices', f'= {p.num_devices} must be 0 (all devices) on several hosts.')
  devices = num_devices_in_use(p.num_devices)
  if config.optim.batch_size % devices:
    fail('optim.batch_size', f'= {config.optim.batch_size} must be divisible by the {devices} '
         'devices in use (parallel.num_devices).')


def num_devices_in_use(num_devices: int | None = None) -> int:
  """The device count a mesh of ``num_devices`` spans (None or 0: all devices)."""
  return num_devices or jax.device_count()


def make_mesh(num_devices: int | None = None) -> Mesh:
  """A 1-D mesh with axis ``data`` over the first ``num_devices`` devices (None/0: all)."""
  devices = jax.devices()
  n = num_devices_in_use(num_devices)
  if not 0 < n <= len(devices):
    raise ValueError(f'num_devices = {num_devices} must lie in [0, {len(devices)}] '
                     f'(0 uses all {len(devices)} devices).')
  return Mesh(np.array(devices[:n]), (DATA_AXIS,))


def compiler_options(mesh: Mesh) -> dict[str, str]:
  """XLA options for the steps jitted over ``mesh``: ``CPU_COMPILER_OPTIONS`` on the CPU
  backend where this jaxlib knows them, none elsewhere."""
  if mesh.devices.flat[0].platform != 'cpu':
    return {}
  return dict(CPU_COMPILER_OPTIONS) if _cpu_options_supported() else {}


@functools.cache
def _cpu_options_supported() -> bool:
  try:
    jax.jit(lambda x: x + 1).lower(1.0).compile(CPU_COMPILER_OPTIONS)
  except Exception:  # pylint: disable=broad-except  # an unknown option in this jaxlib
    return False
  return True


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array (parameters, optimizer states, metrics)."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """The leading (batch) axis is split over the ``data`` axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows of a batch -> global arrays split over ``data``.

  On one host the local rows are the whole batch; on several, the global batch is the
  processes' rows concatenated in process order (as ``data.SearchBatches`` slices it).
  """
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def replicate(tree, mesh: Mesh):
  """Places every leaf of ``tree`` on all devices of ``mesh``."""
  return jax.device_put(tree, replicated(mesh))


def padded_batch_size(batch_size: int, num_devices: int) -> int:
  """``batch_size`` rounded up to a multiple of ``num_devices`` (for masked eval batches)."""
  return -(-batch_size // num_devices) * num_devices
