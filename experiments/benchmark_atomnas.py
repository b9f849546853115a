r"""One AtomNAS training step at a config's supernet size: compile time, images/s, memory.

  python experiments/benchmark_atomnas.py --config=configs/atomnas_a_imagenet.py --batch_size=16
  python experiments/benchmark_atomnas.py --config=configs/atomnas_a_imagenet.py \
      --batch_size=64 --steps=10 --shrink=0.5

Builds the config's supernet (ImageNet-A: 224 px, 22 blocks, 31,392 atoms), compiles the
training step as a run does (state replicated, the batch split over all devices), runs it
on synthetic batches and prints, then writes as JSON: the step's compile time, its median
time and images/s, the process's peak resident memory so far (CPU) or the device's peak
memory so far (GPU: the shrunk network's row includes the supernet's), and the network's
multiply-adds and parameters. ``--shrink=f`` also measures the
network with a fraction f of every searched branch's atoms removed (the shrink and the
recompile a run pays when atoms die), so the cost of a shrink shows beside the step.
"""

import argparse
import json
import os
import platform
import resource
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from jaxnas import parallel  # pylint: disable=g-import-not-at-top
from jaxnas import summary as summary_lib  # pylint: disable=g-import-not-at-top
from jaxnas.methods import atomnas as method  # pylint: disable=g-import-not-at-top
from jaxnas.spaces import atomnas as space  # pylint: disable=g-import-not-at-top


def load_config(path: str):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location('cfg', os.path.join(REPO, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def peak_bytes() -> int:
  if jax.default_backend() != 'cpu':
    stats = jax.devices()[0].memory_stats() or {}
    return int(stats.get('peak_bytes_in_use', 0))
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(config, arch, state, tx, mesh, steps: int, weights, image_shape, num_classes):
  rep, rows = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  model = method.build_model(config, arch, num_classes)
  rng = np.random.default_rng(0)
  batch = {'image': rng.normal(size=(config.optim.batch_size,) + image_shape).astype(np.float32),
           'label': rng.integers(0, num_classes, config.optim.batch_size).astype(np.int32)}
  batch = parallel.shard_batch(batch, mesh)
  t0 = time.perf_counter()
  step = jax.jit(method.make_train_step(model, tx, config, 1000, weights),
                 in_shardings=(rep, rows), out_shardings=(rep, rep)).lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  state, metrics = step(state, batch)  # warm-up
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  median = float(np.median(times))
  cost = method.cost(config, arch, image_shape[0], image_shape[2], num_classes)
  return state, {'atoms': arch.atoms(), 'multiply_adds': cost['multiply_adds'],
                 'params': cost['params'], 'compile_s': compile_s, 'step_s': median,
                 'images_per_s': config.optim.batch_size / median,
                 'loss': float(metrics['train_total_loss'])}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='configs/atomnas_a_imagenet.py')
  parser.add_argument('--batch_size', type=int, default=16)
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--shrink', type=float, default=0.0,
                      help='also measure with this fraction of each branch removed')
  parser.add_argument('--out', default=os.path.join(REPO, 'results', 'benchmark_atomnas.json'))
  args = parser.parse_args()
  if not 0 <= args.shrink < 1:
    parser.error(f'--shrink must be in [0, 1), got {args.shrink}.')

  config = load_config(args.config)
  config.optim.batch_size = args.batch_size
  image_shape, num_classes = summary_lib.input_spec(config)
  mesh = parallel.make_mesh(0)
  arch = space.supernet(config.model.stages, config.model.stem, config.model.stem_stride,
                        config.model.last, config.model.kernels)
  weights = space.penalty_weights(arch, image_shape[0])
  tx = method.make_optimizer(config, 1000)
  state = method.create_state(method.build_model(config, arch, num_classes), image_shape, tx,
                              config.seed, mesh)
  records = []
  state, record = measure(config, arch, state, tx, mesh, args.steps, weights, image_shape,
                          num_classes)
  records.append({'network': 'supernet', **record, 'peak_bytes': peak_bytes()})
  if args.shrink:
    keep = {}
    for i, b in enumerate(arch.blocks):
      for k, h in zip(b.kernels, b.hidden):
        if b.searched:
          keep[(i, k)] = np.arange(h) >= int(args.shrink * h)
    t0 = time.perf_counter()
    small_state = jax.device_put(method.shrink_state(state, arch, keep, config.model.act),
                                 parallel.replicated(mesh))
    shrink_s = time.perf_counter() - t0
    small = space.shrink_architecture(arch, keep)
    _, record = measure(config, small, small_state, tx, mesh, args.steps, weights,
                        image_shape, num_classes)
    records.append({'network': f'shrunk by {args.shrink:g}', **record, 'shrink_s': shrink_s,
                    'peak_bytes': peak_bytes()})

  device = jax.devices()[0]
  header = {'config': args.config, 'batch_size': args.batch_size, 'steps': args.steps,
            'backend': jax.default_backend(), 'devices': jax.device_count(),
            'device': getattr(device, 'device_kind', str(device)),
            'cpu': platform.processor() or platform.machine(), 'cpu_count': os.cpu_count(),
            'date': time.strftime('%Y-%m-%d')}
  print(f'{args.config} at batch {args.batch_size} on {jax.device_count()} '
        f'{header["device"]} device(s):')
  for r in records:
    extra = f', shrink {r["shrink_s"]:.1f} s' if 'shrink_s' in r else ''
    print(f'  {r["network"]:>14}: {r["atoms"]} atoms, {r["multiply_adds"] / 1e6:.1f}M '
          f'multiply-adds, {r["params"] / 1e6:.2f}M params | compile {r["compile_s"]:.1f} s'
          f'{extra} | step {r["step_s"]:.3f} s, {r["images_per_s"]:.1f} img/s | peak '
          f'{r["peak_bytes"] / 2**30:.2f} GiB')
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump({**header, 'records': records}, f, indent=2)
  print(f'Wrote {args.out}.')


if __name__ == '__main__':
  main()
