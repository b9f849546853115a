r"""The size of the search step's programs for an accelerator, measured without one.

  python experiments/program_size.py --methods=pcdarts,darts --cell_forms=unrolled,scanned
  python experiments/program_size.py --platforms=cuda,tpu --batch_size=256
  python experiments/program_size.py --compile   # also compile for this host's backend

For each (method, cell form) it builds the paper's CIFAR-10 search step
(configs/pcdarts_cifar.py or configs/darts_cifar.py: C=16, 8 cells, 32x32x3, the arch
updates on), with the depthwise convolutions as XLA ops (the GPU and TPU form), traces
its two programs (the arch phase and the weight phase) on abstract shapes and lowers them
for each of --platforms (no device of that kind is needed). It reports per program:
the StableHLO ops (all, convolutions, while loops) and the lowering seconds. With
--compile it also compiles both programs for this host's backend (XLA:CPU here; the
GPU's compile time needs a GPU) and reports the compile seconds and the optimized HLO's
instructions and fusions: a proxy, as the GPU compiler runs its own passes.

A table is printed and the records are written as JSON (--out).
"""

import argparse
import collections
import importlib.util
import json
import os
import platform
import re
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
CONFIGS = {'pcdarts': 'configs/pcdarts_cifar.py', 'darts': 'configs/darts_cifar.py'}


def stablehlo_counts(text: str) -> dict:
  ops = collections.Counter(re.findall(r'\bstablehlo\.([a-z_]+)', text))
  return {'ops': sum(ops.values()), 'convolutions': ops['convolution'],
          'while_loops': ops['while'], 'top': dict(ops.most_common(6))}


def hlo_counts(text: str) -> dict:
  """Instructions and fusions of an optimized HLO module's text."""
  instructions = sum(1 for line in text.splitlines() if re.match(r'\s+(ROOT )?%\S+ = ', line))
  return {'hlo_instructions': instructions,
          'fusions': len(re.findall(r'= \S+ fusion\(', text))}


def measure(method: str, cell_form: str, batch_size: int, platforms, compile_: bool):
  import jax
  import jax.numpy as jnp
  from jaxnas import parallel
  from jaxnas import search

  spec = importlib.util.spec_from_file_location('cfg', os.path.join(REPO, CONFIGS[method]))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.optim.batch_size = batch_size
  config.optim.arch_warmup_epochs = 0
  config.model.depthwise_impl = 'xla'  # the GPU / TPU form of the depthwise convs
  config.model.cell_form = cell_form
  method_lib = search.method_of(config)
  mesh = parallel.make_mesh(1)
  model = method_lib.build_model(config, 10, 1)
  steps_per_epoch = int(50000 * config.data.train_portion) // batch_size
  weight_tx, arch_tx = method_lib.make_optimizers(config, steps_per_epoch)
  state = jax.eval_shape(lambda: method_lib.create_state(model, (32, 32, 3), weight_tx,
                                                         arch_tx, config, mesh))
  batch = {'image': jax.ShapeDtypeStruct((batch_size, 32, 32, 3), jnp.float32),
           'label': jax.ShapeDtypeStruct((batch_size,), jnp.int32)}
  phases = search.make_search_phases(model, weight_tx, arch_tx, config, steps_per_epoch)
  record = {'method': method, 'cell_form': cell_form, 'batch_size': batch_size,
            'C': config.model.C, 'layers': config.model.layers, 'programs': []}
  for name, phase in zip(('arch phase', 'weight phase'), phases):
    traced = jax.jit(phase).trace(state, batch, batch)
    program = {'program': name}
    for target in platforms:
      t0 = time.perf_counter()
      text = traced.lower(lowering_platforms=(target,)).as_text()
      program[target] = {**stablehlo_counts(text), 'lower_s': time.perf_counter() - t0}
      print(f'  {method} {cell_form} {name} for {target}: {program[target]["ops"]} ops',
            flush=True)
    if compile_:
      t0 = time.perf_counter()
      compiled = traced.lower().compile()
      program['compile'] = {'backend': jax.default_backend(),
                            'compile_s': time.perf_counter() - t0,
                            **hlo_counts(compiled.as_text())}
      print(f'  {method} {cell_form} {name}: compiled for {jax.default_backend()} in '
            f'{program["compile"]["compile_s"]:.1f} s', flush=True)
    record['programs'].append(program)
  return record


def table(records, platforms) -> str:
  head = ['method', 'cell form', 'program'] + [f'StableHLO ops ({p})' for p in platforms]
  head += ['convolutions', 'while loops']
  compiled = any('compile' in p for r in records for p in r['programs'])
  if compiled:
    head += ['compile (s)', 'HLO instructions', 'fusions']
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for r in records:
    for p in r['programs']:
      first = p[platforms[0]]
      cells = [r['method'], r['cell_form'], p['program']]
      cells += [f'{p[t]["ops"]:,}' for t in platforms]
      cells += [str(first['convolutions']), str(first['while_loops'])]
      if compiled:
        c = p.get('compile', {})
        cells += [f'{c.get("compile_s", 0):.1f}', f'{c.get("hlo_instructions", 0):,}',
                  f'{c.get("fusions", 0):,}']
      lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--methods', default='pcdarts')
  parser.add_argument('--cell_forms', default='unrolled,scanned')
  parser.add_argument('--platforms', default='cuda')
  parser.add_argument('--batch_size', type=int, default=256)
  parser.add_argument('--compile', action='store_true',
                      help="also compile for this host's backend (slow on a CPU)")
  parser.add_argument('--out', default='results/program_size.json')
  args = parser.parse_args()
  platforms = args.platforms.split(',')
  records = []
  for method in args.methods.split(','):
    for form in args.cell_forms.split(','):
      records.append(measure(method, form, args.batch_size, platforms, args.compile))
  text = table(records, platforms)
  print(text)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  import jax
  with open(args.out, 'w') as f:
    json.dump({'records': records, 'jax': jax.__version__, 'host': platform.node(),
               'date': time.strftime('%Y-%m-%d')}, f, indent=2)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
