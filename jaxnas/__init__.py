"""jaxnas: memory-efficient neural architecture search in JAX/Flax."""

import os


def _tune_compilation():
  # Must run before JAX starts a backend; a flag the user set in XLA_FLAGS wins.
  flags = os.environ.get('XLA_FLAGS', '')
  # XLA:CPU splits each program into many LLVM modules compiled in parallel; with few
  # cores the split costs more than it saves (a small supernet's backward on 2 cores:
  # 15.5 s to compile by default, 8.5 s unsplit).
  if 'xla_cpu_parallel_codegen_split_count' not in flags and (os.cpu_count() or 1) <= 4:
    flags += ' --xla_cpu_parallel_codegen_split_count=1'
  # XLA:GPU's Triton GEMM fusion aborts the process while compiling the supernet's search
  # step (jaxlib 0.11.2, H100: "Check failed: subdim_size_accumulator == dim_size" in
  # triton_tiling_propagation.cc); the step's matmuls are small and go to cuBLAS instead.
  if 'xla_gpu_enable_triton_gemm' not in flags:
    flags += ' --xla_gpu_enable_triton_gemm=false'
  os.environ['XLA_FLAGS'] = flags.strip()


_tune_compilation()

__version__ = '0.1.0'


def load_model(path: str, which: str = 'best'):
  """A trained model as a function from images to logits: ``jaxnas.load_model(workdir)``
  (see jaxnas.export.load_model)."""
  from jaxnas import export  # pylint: disable=g-import-not-at-top
  return export.load_model(path, which)
