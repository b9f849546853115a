r"""Times depthwise convs: lax grouped conv ('xla') vs the shifted-sum form.

For x [batch, size, size, C] and w [k, k, C] it measures, per implementation,
the jitted forward and forward+backward (the output plus the gradients wrt x
and w for a random output cotangent) as the median over repeats after warm-up, the
compile seconds of forward+backward, and the number of StableHLO ops the
forward+backward lowers to (what XLA has to compile).

  python experiments/benchmark_depthwise.py
  python experiments/benchmark_depthwise.py --impls=xla,shifted,autodiff \
      --channels=4,16 --kernels=3,5 --edges=14

--impls may include 'autodiff': the shifted-sum forward differentiated by plain
JAX autodiff (no custom rules), the form jaxnas used before. --edges=E > 0 vmaps
the conv over a leading edge axis with per-edge filters, as the supernet does.
Timings on a shared machine are noisy: compare rows from one run.
"""

import json
import os
import platform
import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from jax import lax

from jaxnas.ops import depthwise

_OUT = flags.DEFINE_string('out', 'results/benchmark_depthwise.json',
                           'Where to write the JSON results.')
_IMPLS = flags.DEFINE_list('impls', ['xla', 'shifted'],
                           "Implementations: 'xla', 'shifted', 'autodiff'.")
_CHANNELS = flags.DEFINE_list('channels', ['4', '16'], 'Channel counts C.')
_KERNELS = flags.DEFINE_list('kernels', ['3', '5'], 'Kernel sizes k.')
_BATCH = flags.DEFINE_integer('batch', 64, 'Batch size N.')
_SIZE = flags.DEFINE_integer('size', 32, 'Height and width.')
_STRIDE = flags.DEFINE_integer('stride', 1, 'Stride.')
_DILATION = flags.DEFINE_integer('dilation', 1, 'Dilation.')
_EDGES = flags.DEFINE_integer('edges', 0, 'If > 0, vmap over this many edges.')
_REPEATS = flags.DEFINE_integer('repeats', 20, 'Timed calls per measurement.')
_WARMUP = flags.DEFINE_integer('warmup', 3, 'Untimed calls after compiling.')


def autodiff_conv(x, w, stride, dilation):
  """The shifted-sum forward alone; JAX derives its backward."""
  kh, kw, _ = w.shape
  ph, pw = dilation * (kh - 1) // 2, dilation * (kw - 1) // 2
  xp = jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
  ho = (x.shape[1] + 2 * ph - dilation * (kh - 1) - 1) // stride + 1
  wo = (x.shape[2] + 2 * pw - dilation * (kw - 1) - 1) // stride + 1
  out = 0.0
  for i in range(kh):
    for j in range(kw):
      window = lax.slice(
          xp, (0, i * dilation, j * dilation, 0),
          (x.shape[0], i * dilation + (ho - 1) * stride + 1,
           j * dilation + (wo - 1) * stride + 1, x.shape[3]),
          (1, stride, stride, 1))
      out = out + window * w[i, j]
  return out


def make_conv(impl, stride, dilation, edges):
  if impl == 'autodiff':
    conv = lambda x, w: autodiff_conv(x, w, stride, dilation)
  else:
    conv = lambda x, w: depthwise.depthwise_conv(
        x, w, stride=stride, dilation=dilation, impl=impl)
  return jax.vmap(conv) if edges else conv


def timed_median_ms(fn, args, repeats, warmup):
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times), 1e3 * min(times)


def measure(impl, channels, k, key):
  n, size, edges = _BATCH.value, _SIZE.value, _EDGES.value
  lead = (edges,) if edges else ()
  kx, kw, kr = jax.random.split(key, 3)
  x = jax.random.normal(kx, (*lead, n, size, size, channels), jnp.float32)
  w = jax.random.normal(kw, (*lead, k, k, channels), jnp.float32)
  conv = make_conv(impl, _STRIDE.value, _DILATION.value, edges)
  # The cotangent is an argument, not a closed-over constant, so XLA cannot
  # constant-fold it into the program.
  r = jax.random.normal(kr, jax.eval_shape(conv, x, w).shape, jnp.float32)

  def fwd_bwd(x, w, r):
    # Returns the output too: for a linear functional alone XLA would drop the
    # forward, which training always needs.
    y, vjp = jax.vjp(conv, x, w)
    return y, vjp(r)

  fwd = jax.jit(conv).lower(x, w).compile()
  lowered = jax.jit(fwd_bwd).lower(x, w, r)
  start = time.perf_counter()
  fb = lowered.compile()
  compile_s = time.perf_counter() - start
  fwd_ms, fwd_min = timed_median_ms(fwd, (x, w), _REPEATS.value, _WARMUP.value)
  fb_ms, fb_min = timed_median_ms(fb, (x, w, r), _REPEATS.value, _WARMUP.value)
  return dict(impl=impl, channels=channels, kernel=k, fwd_ms=fwd_ms,
              fwd_min_ms=fwd_min, fwd_bwd_ms=fb_ms, fwd_bwd_min_ms=fb_min,
              compile_fwd_bwd_s=compile_s,
              hlo_ops_fwd_bwd=lowered.as_text().count('stablehlo.'))


def main(argv):
  del argv
  for impl in _IMPLS.value:
    if impl not in ('xla', 'shifted', 'autodiff'):
      raise ValueError(f"--impls: unknown implementation {impl!r}; use 'xla', "
                       "'shifted' or 'autodiff'.")
  setting = dict(batch=_BATCH.value, size=_SIZE.value, stride=_STRIDE.value,
                 dilation=_DILATION.value, edges=_EDGES.value,
                 repeats=_REPEATS.value, warmup=_WARMUP.value)
  print(f'depthwise conv, {setting}, backend {jax.default_backend()}, '
        f'{os.cpu_count()} CPUs, jax {jax.__version__}')
  header = (f"{'impl':>9} {'C':>3} {'k':>2} {'fwd ms':>8} {'fwd+bwd ms':>11} "
            f"{'compile s':>10} {'HLO ops':>8}")
  print(header)
  print('-' * len(header))
  rows = []
  key = jax.random.key(0)
  for channels in map(int, _CHANNELS.value):
    for k in map(int, _KERNELS.value):
      for impl in _IMPLS.value:
        row = measure(impl, channels, k, key)
        rows.append(row)
        print(f"{impl:>9} {channels:>3} {k:>2} {row['fwd_ms']:8.2f} "
              f"{row['fwd_bwd_ms']:11.2f} {row['compile_fwd_bwd_s']:10.2f} "
              f"{row['hlo_ops_fwd_bwd']:8d}", flush=True)

  result = dict(setting=setting, backend=jax.default_backend(),
                jax_version=jax.__version__, cpu_count=os.cpu_count(),
                machine=platform.processor() or platform.machine(),
                devices=[str(d) for d in jax.devices()], rows=rows)
  os.makedirs(os.path.dirname(_OUT.value) or '.', exist_ok=True)
  with open(_OUT.value, 'w') as f:
    json.dump(result, f, indent=2)
  print(f'wrote {_OUT.value}')


if __name__ == '__main__':
  app.run(main)
