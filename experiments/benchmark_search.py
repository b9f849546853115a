r"""Search-step throughput, memory, FLOPs and compile time of the DARTS / PC-DARTS supernets.

  python experiments/benchmark_search.py --methods=pcdarts,darts --batch_sizes=64,256
  python experiments/benchmark_search.py --methods=pcdarts --batch_sizes=256 --remat=0,1
  python experiments/benchmark_search.py --settings=pcdarts:256,pcdarts:256:1,darts:64
  python experiments/benchmark_search.py --methods=pcdarts --cache=cold,warm
  python experiments/benchmark_search.py --methods=pcdarts --compile=concurrent,sequential

Each (method, batch size) runs in its own process, so its peak memory is its own, started
as `python -m jaxnas.main` restarts itself (glibc's huge pages where they help:
jaxnas/host_memory.py) and with the host allocator switched as a search switches it. A
setting builds the paper's CIFAR-10 search config (configs/pcdarts_cifar.py or
configs/darts_cifar.py: C=16, 8 cells, 32x32x3) at the given batch size, compiles the
jitted search step (arch update + weight update, arch updates switched on) as a search
runs it (state replicated, batches split over a mesh of all devices), runs it on synthetic
batches and reports:

  images_per_s   (arch batch + weight batch) / median step time
  projected_search_h  the config's whole search (50 epochs of 25,000 training images)
                 at the measured step times: the arch warm-up epochs at the weight
                 phase's alone, the rest at the full step's; steps only (data loading
                 and the per-epoch evaluation come on top)
  peak_bytes     peak resident memory of the process on CPU (compilation and steps; XLA's
                 analyses below run after it is read, as a search does not run them);
                 peak device memory on GPU
  xla_temp_bytes / xla_argument_bytes   XLA's compiled memory analysis of the larger of
                 the step's two programs (they run one after the other)
  flops_per_step XLA's cost analysis of the step's programs, summed, plus the
                 multiply-adds of the native depthwise kernels (on CPU), which XLA
                 cannot see into, counted from the programs' text; achieved
                 FLOP/s and, where the device peak is known (--peak_flops or the table
                 below), the fraction of it
  compile_s      lowering + XLA compilation of the step's two programs, its arch and
                 weight phases (state_s: creating the state, not included). --compile,
                 as a search's config.compile_mode: concurrent compiles them side by
                 side, sequential one at a time, auto as a search on this backend does.
                 --cache=cold (the default): persistent
                 compilation cache off. --cache=warm: a first process fills a fresh cache
                 and the measured one loads the step from it, as a resumed or repeated
                 search does (jaxnas caches compiled steps under ~/.cache/jaxnas/xla);
                 fill_compile_s and fill_peak_bytes are the first process's
  compile_peak_bytes  process RSS right after compilation (CPU): how much of the peak
                 is the compiler's rather than the step's

Each setting's stages (state creation, compilation, timing) are printed with
timestamps as they finish. A table is printed and the records are written as JSON (the
path is printed) after every setting; a failed setting's record holds its fatal lines and
the path of its whole log, kept beside the JSON. With PC-DARTS at batch 256 and DARTS at
batch 64 among the settings, a last line compares their memory (the paper's claim).
"""

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time

from jaxnas import host_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {'pcdarts': 'configs/pcdarts_cifar.py', 'darts': 'configs/darts_cifar.py',
           'unas': 'configs/unas_cifar.py', 'parsec': 'configs/parsec_cifar.py',
           'fpnas': 'configs/fpnas_cifar.py'}
# Dense float32 peaks (FLOP/s) of accelerators, for the fraction-of-peak column.
PEAK_FP32 = {'H100': 67e12, 'H200': 67e12, 'A100': 19.5e12, 'V100': 15.7e12}


def progress(message: str) -> None:
  """A timestamped stage line on stderr: where a slow or failing setting spent its time."""
  print(f'[{time.strftime("%H:%M:%S")}] {message}', file=sys.stderr, flush=True)


def run_setting(method: str, batch_size: int, remat: bool, steps: int,
                peak_flops: float, cache_dir: str = '', compile_mode: str = 'auto') -> dict:
  """Measures one setting in this process; returns its record. With ``cache_dir`` the
  compiled step is read from (or written to) that persistent compilation cache;
  ``compile_mode`` is a search's ``config.compile_mode``."""
  import importlib.util
  import jax
  import numpy as np
  from jaxnas import parallel
  from jaxnas import search
  from jaxnas.ops import depthwise

  host_memory.map_large_allocations()  # as a search does
  if cache_dir:
    search.setup_compilation_cache(cache_dir)
  spec = importlib.util.spec_from_file_location('cfg', os.path.join(REPO, CONFIGS[method]))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.optim.batch_size = batch_size
  # The epochs of weight steps alone before the arch updates start: DARTS's
  # arch_warmup_epochs, UNAS's, PARSEC's and FP-NAS's warmup_epochs. Set to 0 to time the
  # full step.
  warm_field = 'arch_warmup_epochs' if 'arch_warmup_epochs' in config.optim else 'warmup_epochs'
  warm_epochs = config.optim[warm_field]
  config.optim[warm_field] = 0
  if remat:
    config.model.remat = remat
  config.compile_mode = compile_mode
  shape = (32, 32, 3)

  mesh = parallel.make_mesh()
  method_lib = search.method_of(config)
  model = method_lib.build_model(config, 10, mesh.size)
  # CIFAR-10's 50,000 training images, the config's share for the weights.
  steps_per_epoch = int(50000 * config.data.train_portion) // batch_size
  weight_tx, arch_tx = method_lib.make_optimizers(config, steps_per_epoch)
  start = time.perf_counter()
  progress(f'{method} batch {batch_size} on {jax.devices()[0].device_kind}: creating the state')
  state = method_lib.create_state(model, shape, weight_tx, arch_tx, config, mesh)
  state_s = time.perf_counter() - start
  host_memory.release_host_memory()  # as a search does, here and after compiling
  rng = np.random.default_rng(0)

  def batch():
    return parallel.shard_batch(
        {'image': rng.normal(size=(batch_size,) + shape).astype(np.float32),
         'label': rng.integers(0, 10, batch_size).astype(np.int32)}, mesh)

  train, val = batch(), batch()
  concurrent = search.concurrent_compile(compile_mode)
  progress(f'state created in {state_s:.1f} s; lowering and compiling the search step '
           f'(its arch and weight phases, {"side by side" if concurrent else "in turn"})')
  t0 = time.perf_counter()
  compiled, = search.compile_search_step(model, weight_tx, arch_tx, config, steps_per_epoch,
                                         mesh, state, train, val)
  compile_s = time.perf_counter() - t0
  progress(f'compiled in {compile_s:.1f} s; timing {steps} steps after a warm-up')
  compile_peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  host_memory.release_host_memory()
  host_memory.reuse_freed_allocations()

  state, _ = compiled(state, train, val)  # warm-up
  jax.block_until_ready(state)

  def timed(run):
    """Seconds of each of ``steps`` calls of ``run`` on the state, which they advance,
    and the last call's metrics."""
    nonlocal state
    seconds = []
    for _ in range(steps):
      t = time.perf_counter()
      state, metrics = run(state, train, val)
      jax.block_until_ready(state)
      seconds.append(time.perf_counter() - t)
    return seconds, metrics

  times, metrics = timed(compiled)
  step_s = float(np.median(times))
  # The weight phase alone: a step of the arch warm-up epochs, whose arch phase is skipped.
  weight_step_s = float(np.median(timed(compiled.phases[1])[0]))
  o = config.optim
  search_s = steps_per_epoch * (warm_epochs * weight_step_s + (o.epochs - warm_epochs) * step_s)

  device = jax.devices()[0]
  if device.platform == 'gpu':
    stats = device.memory_stats() or {}
    peak_bytes = int(stats.get('peak_bytes_in_use', 0))
    peak_kind = 'device'
    peak = peak_flops or next((v for k, v in PEAK_FP32.items() if k in device.device_kind), 0)
  else:
    peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak_kind = 'process RSS'
    peak = peak_flops

  # The analyses walk the compiled program (cost analysis: about 0.6 GB of host memory for
  # the batch-64 PC-DARTS step on CPU), which a search never does: they run after the peak
  # is read.
  programs = compiled.phases
  memory = [program.memory_analysis() for program in programs]
  flops = sum(_flops(program) for program in programs)
  achieved = flops / step_s
  return {
      'method': method, 'batch_size': batch_size, 'remat': remat, 'C': config.model.C,
      'layers': config.model.layers, 'k': config.model.get('k', 1),
      'images_per_s': 2 * batch_size / step_s, 'step_s': step_s, 'step_times_s': times,
      'weight_step_s': weight_step_s,
      # The config's whole search (CIFAR-10: 25,000 training images for the weights), steps
      # only: per epoch, data loading and the held-out evaluation come on top.
      'epochs': o.epochs, 'steps_per_epoch': steps_per_epoch,
      'projected_search_h': search_s / 3600,
      'peak_bytes': peak_bytes, 'peak_kind': peak_kind,
      # The phases run one after the other: the step needs the larger one's buffers.
      'xla_temp_bytes': _max_field(memory, 'temp_size_in_bytes'),
      'xla_argument_bytes': _max_field(memory, 'argument_size_in_bytes'),
      'flops_per_step': flops, 'achieved_flops_per_s': achieved,
      'fraction_of_peak': achieved / peak if peak else None,
      'compile_s': compile_s, 'state_s': state_s,
      'cache': 'warm' if cache_dir else 'cold',
      'compile_mode': 'concurrent' if concurrent else 'sequential',
      'compile_peak_bytes': compile_peak_bytes if device.platform == 'cpu' else None,
      'backend': device.platform, 'device': device.device_kind,
      'depthwise_impl': depthwise.resolve_impl(config.model.depthwise_impl),
      'devices': jax.device_count(), 'host': platform.node(), 'cpus': os.cpu_count(),
      'loss_finite': bool(np.isfinite(float(metrics['train_loss']))),
  }


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla = float(cost.get('flops', float('nan'))) if cost else float('nan')
  from jaxnas.ops import native  # imports jax: only in a setting's process
  # XLA counts a custom call as no FLOPs: add the native depthwise kernels' own.
  return xla + native.custom_call_flops(compiled.as_text())


def _max_field(analyses, field: str):
  values = [getattr(a, field, None) for a in analyses]
  return None if None in values else max(values)


HEADER = (f'{"method":8} {"batch":>5} {"remat":>5} {"cache":>5} {"compile":>10} '
          f'{"compile s":>9} '
          f'{"step s":>7} {"img/s":>7} {"peak GB":>8} {"compile GB":>10} {"xla temp GB":>11} '
          f'{"GFLOP/step":>10} {"GFLOP/s":>8} {"of peak":>7} {"search h":>8}')


def row(r: dict) -> str:
  """One line of the printed table for a record."""
  head = (f'{r["method"]:8} {r["batch_size"]:>5} {int(r["remat"]):>5} {r["cache"]:>5} '
          f'{r.get("compile_mode", ""):>10}')
  if 'error' in r:
    return head + ' failed'
  gb = lambda b: b / 1e9 if b is not None else float('nan')  # noqa: E731
  frac = f'{100 * r["fraction_of_peak"]:.1f}%' if r['fraction_of_peak'] else 'n/a'
  return (f'{head} {r["compile_s"]:>9.1f} {r["step_s"]:>7.3f} {r["images_per_s"]:>7.1f} '
          f'{gb(r["peak_bytes"]):>8.2f} {gb(r["compile_peak_bytes"]):>10.2f} '
          f'{gb(r["xla_temp_bytes"]):>11.2f} {r["flops_per_step"] / 1e9:>10.1f} '
          f'{r["achieved_flops_per_s"] / 1e9:>8.1f} {frac:>7} '
          f'{r.get("projected_search_h", float("nan")):>8.1f}')


def memory_claim(records: list[dict]) -> list[str]:
  """Lines comparing PC-DARTS at batch 256 with DARTS at batch 64 (the paper's claim: no
  more memory), one per pair of measured rows (by rematerialization and compile mode)."""
  ok = [r for r in records if 'error' not in r]
  lines = []
  for pc in (r for r in ok if r['method'] == 'pcdarts' and r['batch_size'] == 256):
    for darts in (r for r in ok if r['method'] == 'darts' and r['batch_size'] == 64
                  and r['cache'] == pc['cache'] and r['compile_mode'] == pc['compile_mode']):
      ratio = lambda f: f'{pc[f] / 1e9:.2f} / {darts[f] / 1e9:.2f} GB ({pc[f] / darts[f]:.2f}x)'  # noqa: E731
      lines.append(f'PC-DARTS batch 256 (remat {int(pc["remat"])}) against DARTS batch 64 '
                   f'(remat {int(darts["remat"])}): peak {ratio("peak_bytes")}, XLA buffers '
                   f'{ratio("xla_temp_bytes")}')
  return lines


def parse_settings(args) -> list[tuple[str, int, str]]:
  """(method, batch size, remat) of every setting: ``--settings`` where given, else every
  combination of ``--methods``, ``--batch_sizes`` and ``--remat``."""
  if not args.settings:
    return [(m, int(b), r) for m in args.methods.split(',')
            for b in args.batch_sizes.split(',') for r in args.remat.split(',')]
  settings = []
  for item in args.settings.split(','):
    parts = item.split(':')
    if len(parts) not in (2, 3) or not parts[1].isdigit() or parts[2:] not in ([], ['0'], ['1']):
      sys.exit(f'--settings: {item!r} is not METHOD:BATCH or METHOD:BATCH:REMAT '
               '(e.g. pcdarts:256:1).')
    settings.append((parts[0], int(parts[1]), parts[2] if parts[2:] else '0'))
  return settings


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--methods', default='pcdarts,darts')
  parser.add_argument('--batch_sizes', default='64')
  parser.add_argument('--remat', default='0',
                      help='0, 1 or 0,1: rematerialize each cell in the backward pass')
  parser.add_argument('--cache', default='cold',
                      help='cold, warm or cold,warm: compile the step, or load it from a '
                           'persistent compilation cache filled by a first process')
  parser.add_argument('--compile', default='auto',
                      help="concurrent, sequential, auto (a search's default: concurrent "
                           'except on the CPU backend) or a comma-separated list: compile '
                           "the step's arch and weight phases side by side or one at a time "
                           '(config.compile_mode)')
  parser.add_argument('--settings', default='',
                      help='METHOD:BATCH[:REMAT],... (e.g. pcdarts:256,darts:64): these '
                           'settings instead of every combination of --methods, '
                           '--batch_sizes and --remat')
  parser.add_argument('--steps', type=int, default=3, help='timed steps after a warm-up')
  parser.add_argument('--peak_flops', type=float, default=0.0,
                      help='device peak FLOP/s for the fraction-of-peak column')
  parser.add_argument('--out', default=os.path.join(REPO, 'results', 'benchmark_search.json'))
  parser.add_argument('--child', default='', help=argparse.SUPPRESS)
  args = parser.parse_args()

  if args.child:
    method, batch_size, remat, mode, cache_dir = args.child.split(':', 4)
    record = run_setting(method, int(batch_size), remat == '1', args.steps, args.peak_flops,
                         cache_dir, compile_mode=mode)
    print('RECORD ' + json.dumps(record), flush=True)
    return

  for cache in args.cache.split(','):
    if cache not in ('cold', 'warm'):
      sys.exit(f'--cache: unknown mode {cache!r}; choose cold, warm or cold,warm.')
  for mode in args.compile.split(','):
    if mode not in ('auto', 'concurrent', 'sequential'):
      sys.exit(f'--compile: unknown mode {mode!r}; choose auto, concurrent or sequential.')
  settings = parse_settings(args)
  for method, _, _ in settings:
    if method not in CONFIGS:
      sys.exit(f'--methods, --settings: unknown method {method!r}; choose from '
               f'{sorted(CONFIGS)}.')

  def child(method, batch_size, remat, mode, cache_dir, label):
    """Runs one setting in a fresh process: (record, None) or (None, error lines).

    The child's stage lines are echoed as they come; all its output goes to a log file
    beside --out, kept (and named in the error) when the setting fails."""
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR='')
    env = host_memory.huge_pages_environ(env) or env  # as python -m jaxnas.main runs
    log_path = f'{os.path.splitext(args.out)[0]}.{label}.log'
    with open(log_path, 'w') as log, subprocess.Popen(
        [sys.executable, __file__, f'--child={method}:{batch_size}:{remat}:{mode}:{cache_dir}',
         f'--steps={args.steps}', f'--peak_flops={args.peak_flops}'],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
      lines = []
      for line in proc.stdout:
        log.write(line)
        if line.startswith('['):
          print('   ' + line.rstrip(), flush=True)
        lines.append(line.rstrip())
    record_lines = [l for l in lines if l.startswith('RECORD ')]
    if proc.returncode or not record_lines:
      # XLA's fatal errors are log lines starting 'F<date>'; Python's end the output.
      fatal = [l for l in lines
               if re.match(r'F\d{4} ', l) or 'Check failed' in l or re.search(r'\w+Error:', l)]
      return None, [f'exit {proc.returncode}'] + (fatal[:3] or lines[-3:]) + [f'log: {log_path}']
    os.remove(log_path)
    return json.loads(record_lines[-1][len('RECORD '):]), None

  def run_one(method, batch_size, remat, mode, cache, records):
    print(f'== {method} batch {batch_size} remat {remat} {mode} compile cache {cache} ...',
          flush=True)
    label = f'{method}_b{batch_size}_remat{remat}_{mode}_{cache}'
    with tempfile.TemporaryDirectory(prefix='jaxnas-bench-cache-') as cache_dir:
      error = None
      fill = {}
      if cache == 'warm':  # the first process compiles and fills the cache
        fill, error = child(method, batch_size, remat, mode, cache_dir, f'{label}_fill')
      if error is None:
        record, error = child(method, batch_size, remat, mode,
                              cache_dir if cache == 'warm' else '', label)
      if error is None and fill:
        record.update(fill_compile_s=fill['compile_s'], fill_peak_bytes=fill['peak_bytes'])
    if error is not None:
      print(f'   failed: {" / ".join(error)}', flush=True)
      records.append({'method': method, 'batch_size': batch_size, 'remat': remat == '1',
                      'cache': cache, 'compile_mode': mode, 'error': error})
    else:
      records.append(record)
      print('   ' + HEADER + '\n   ' + row(record), flush=True)
      if 'fill_compile_s' in record:
        print(f'   the first process compiled and wrote the cache in '
              f'{record["fill_compile_s"]:.1f} s, peak {record["fill_peak_bytes"] / 1e9:.2f} '
              'GB', flush=True)
    with open(args.out, 'w') as f:  # after every setting: a stopped run keeps its rows
      json.dump(records, f, indent=2)

  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  records = []
  for method, batch_size, remat in settings:
    for mode in args.compile.split(','):
      for cache in args.cache.split(','):
        run_one(method, batch_size, remat, mode, cache, records)

  print(HEADER)
  for r in records:
    print(row(r))
  for line in memory_claim(records):
    print(line)
  print(f'Wrote {args.out}')


if __name__ == '__main__':
  main()
