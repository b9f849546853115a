"""jaxnas: memory-efficient neural architecture search in JAX/Flax."""

import os


def _tune_cpu_compilation():
  # XLA:CPU splits each program into many LLVM modules compiled in parallel; with few
  # cores the split costs more than it saves (a small supernet's backward on 2 cores:
  # 15.5 s to compile by default, 8.5 s unsplit). Must run before JAX starts a backend.
  flags = os.environ.get('XLA_FLAGS', '')
  if 'xla_cpu_parallel_codegen_split_count' not in flags and (os.cpu_count() or 1) <= 4:
    os.environ['XLA_FLAGS'] = f'{flags} --xla_cpu_parallel_codegen_split_count=1'.strip()


_tune_cpu_compilation()

__version__ = '0.1.0'


def load_model(path: str, which: str = 'best'):
  """A trained model as a function from images to logits: ``jaxnas.load_model(workdir)``
  (see jaxnas.export.load_model)."""
  from jaxnas import export  # pylint: disable=g-import-not-at-top
  return export.load_model(path, which)
