"""Tests of jaxnas.ops.depthwise against lax's grouped convolution."""

import functools
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax import test_util

from jaxnas.ops import depthwise
from jaxnas.ops import native

C = 3
CPU_FORMS = ('shifted', 'native')
CASES = list(itertools.product(('shifted', 'native', 'xla'), (3, 5), (1, 2), (1, 2)))
SIZES = ((7, 7), (8, 8))  # Non-square inputs are in the vmap and HVP tests.


def reference(x, w, stride, dilation, relu=False):
  """PyTorch Conv2d(C, C, k, stride, dilation*(k-1)//2, dilation, groups=C), of
  ReLU(x) where ``relu``."""
  if relu:
    x = jax.nn.relu(x)
  kh, kw, c = w.shape
  pads = [(dilation * (kh - 1) // 2,) * 2, (dilation * (kw - 1) // 2,) * 2]
  return lax.conv_general_dilated(
      x, w.reshape(kh, kw, 1, c), (stride, stride), pads,
      rhs_dilation=(dilation, dilation),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=c,
      precision=lax.Precision.HIGHEST)


def torch_out_size(size, k, stride, dilation):
  p = dilation * (k - 1) // 2
  return (size + 2 * p - dilation * (k - 1) - 1) // stride + 1


def inputs(key, shape, k):
  kx, kw = jax.random.split(key)
  return (jax.random.normal(kx, shape, jnp.float32),
          jax.random.normal(kw, (k, k, shape[-1]), jnp.float32))


def assert_close(a, b, tol=1e-5):
  # Scale-aware: weight gradients are sums over N*H*W terms.
  scale = max(1.0, float(jnp.max(jnp.abs(b))))
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol,
                             atol=tol * scale)


@pytest.mark.parametrize('relu', (False, True))
@pytest.mark.parametrize('size', SIZES)
@pytest.mark.parametrize('impl,k,stride,dilation', CASES)
def test_values_and_grads_match_grouped_conv(impl, k, stride, dilation, size, relu):
  x, w = inputs(jax.random.key(0), (2, *size, C), k)
  out_shape = (2, torch_out_size(size[0], k, stride, dilation),
               torch_out_size(size[1], k, stride, dilation), C)
  # Gradients of a random linear functional of the output.
  r = jax.random.normal(jax.random.key(1), out_shape)

  @jax.jit
  def value_and_grads(x, w, r):
    y, vjp = jax.vjp(lambda x, w: depthwise.depthwise_conv(
        x, w, stride=stride, dilation=dilation, impl=impl, relu=relu), x, w)
    return y, vjp(r)

  @jax.jit
  def ref_value_and_grads(x, w, r):
    y, vjp = jax.vjp(lambda x, w: reference(x, w, stride, dilation, relu), x, w)
    return y, vjp(r)

  y, grads = value_and_grads(x, w, r)
  ref_y, ref_grads = ref_value_and_grads(x, w, r)
  chex.assert_shape(y, out_shape)
  assert_close(y, ref_y)
  for g, ref_g in zip(grads, ref_grads):
    assert_close(g, ref_g)


@pytest.mark.parametrize('relu', (False, True))
@pytest.mark.parametrize('impl', ('shifted', 'native', 'xla'))
def test_vmap_over_edges_matches_loop(impl, relu):
  e, k, stride, dilation = 3, 3, 2, 2
  x, _ = inputs(jax.random.key(2), (e, 2, 8, 7, C), k)
  w = jax.random.normal(jax.random.key(3), (e, k, k, C))
  r = jax.random.normal(jax.random.key(4), (e, 2, 4, 4, C))
  conv = functools.partial(depthwise.depthwise_conv, stride=stride,
                           dilation=dilation, impl=impl, relu=relu)
  ref = functools.partial(reference, stride=stride, dilation=dilation, relu=relu)

  def loop(x, w):
    return jnp.stack([ref(x[i], w[i]) for i in range(e)])

  def grads(f, x, w):
    return jax.grad(lambda x, w: jnp.sum(r * f(x, w)), (0, 1))(x, w)

  @jax.jit
  def pairs(x, w):
    """(vmapped, per-edge loop) pairs that must agree."""
    batched = functools.partial(depthwise.depthwise_conv_batched, stride=stride,
                                dilation=dilation, impl=impl, relu=relu)
    shared = lambda x0, w: jax.vmap(conv, in_axes=(None, 0))(x0, w)  # noqa: E731
    shared_ref = lambda x0, w: jnp.stack([ref(x0, w[i]) for i in range(e)])  # noqa: E731
    ref_grads = grads(loop, x, w)
    # Nested vmap (e.g. edges inside a vmapped population of architectures).
    nested_grads = grads(lambda x, w: jax.vmap(batched)(x, w)[0],
                         jnp.stack([x, x]), jnp.stack([w, w]))
    return [
        (batched(x, w), loop(x, w)),
        *zip(grads(jax.vmap(conv), x, w), ref_grads),
        *zip([g[0] for g in nested_grads], ref_grads),
        # One operand shared across the mapped axis.
        (jax.vmap(lambda x: conv(x, w[0]))(x),
         jnp.stack([ref(x[i], w[0]) for i in range(e)])),
        (shared(x[0], w), shared_ref(x[0], w)),
        *zip(grads(shared, x[0], w), grads(shared_ref, x[0], w)),
        # Shared along the inner of two mapped axes, mapped along the outer.
        *zip([g[1] for g in grads(lambda x, w: jax.vmap(shared)(x, w)[1], x[:2],
                                  jnp.stack([w, w]))],
             grads(shared_ref, x[1], w)),
    ]

  for actual, expected in pairs(x, w):
    assert_close(actual, expected)


@pytest.mark.parametrize('relu', (False, True))
@pytest.mark.parametrize('impl', CPU_FORMS)
@pytest.mark.parametrize('stride,dilation', ((1, 1), (2, 1), (1, 2), (2, 2)))
def test_hessian_vector_product_matches_grouped_conv(stride, dilation, impl, relu):
  """DARTS second order differentiates through a gradient: check forward-over-
  reverse and reverse-over-reverse Hessian-vector products."""
  k = 3
  x, w = inputs(jax.random.key(5), (2, 7, 8, C), k)
  tx, tw = inputs(jax.random.key(6), x.shape, k)
  r = jax.random.normal(
      jax.random.key(7), reference(x, w, stride, dilation).shape)
  # The Hessian of the ReLU is zero almost everywhere: relu(x) then enters the loss
  # bilinearly with w and through tanh, which the check exercises.

  def loss(conv):
    # tanh makes the Hessian depend on x and w, not just on the bilinearity.
    return lambda x, w: jnp.sum(r * jnp.tanh(conv(x, w)))

  conv = loss(lambda x, w: depthwise.depthwise_conv(
      x, w, stride=stride, dilation=dilation, impl=impl, relu=relu))
  ref = loss(lambda x, w: reference(x, w, stride, dilation, relu))

  def hvp_fwd_rev(f):
    return jax.jvp(jax.grad(f, (0, 1)), (x, w), (tx, tw))[1]

  def hvp_rev_rev(f):
    return jax.grad(lambda x, w: sum(
        jnp.vdot(g, t) for g, t in zip(jax.grad(f, (0, 1))(x, w), (tx, tw))),
                    (0, 1))(x, w)

  expected = hvp_fwd_rev(ref)
  for hvp in (hvp_fwd_rev(conv), hvp_rev_rev(conv)):
    for h, e in zip(hvp, expected):
      assert_close(h, e, tol=1e-4)


def test_grads_match_finite_differences_to_second_order():
  # float64, so the 'shifted' form (the native kernels are float32 only).
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.key(8), (2, 6, 5, 2), jnp.float64)
    w = jax.random.normal(jax.random.key(9), (3, 3, 2), jnp.float64)
    for stride, dilation, relu in ((1, 1, False), (2, 2, False), (1, 2, True)):
      f = lambda x, w: jnp.tanh(depthwise.depthwise_conv(
          x, w, stride=stride, dilation=dilation, impl='shifted', relu=relu))
      # With the ReLU, inputs kept clear of its kink by more than the differences' step.
      xs = x + 0.05 * jnp.sign(x) if relu else x
      test_util.check_grads(f, (xs, w), order=2, modes=('fwd', 'rev'))


@pytest.mark.parametrize('relu', (False, True))
@pytest.mark.parametrize('impl', CPU_FORMS)
def test_linearization_saves_only_x_and_w(impl, relu):
  """With ``relu`` too: the backward pass keeps x itself, not a rectified copy."""
  x, w = inputs(jax.random.key(10), (2, 8, 8, C), 5)
  _, vjp_fn = jax.vjp(
      lambda x, w: depthwise.depthwise_conv(x, w, impl=impl, relu=relu), x, w)
  saved = sorted(jax.tree.leaves(vjp_fn), key=lambda l: l.ndim)
  assert [l.shape for l in saved] == [w.shape, x.shape]
  np.testing.assert_array_equal(saved[1], x)


@pytest.mark.parametrize('impl', CPU_FORMS)
def test_input_shared_by_vmapped_filters_is_not_copied(impl):
  """vmap over filters of one input (the edges leaving one state) passes the input
  once to every conv of the step, forward and backward, instead of one copy per filter."""
  x, _ = inputs(jax.random.key(11), (2, 8, 8, C), 3)
  w = jax.random.normal(jax.random.key(12), (4, 3, 3, C))

  def loss(x, w):
    conv = functools.partial(depthwise.depthwise_conv, impl=impl, relu=True)
    return jnp.sum(jnp.tanh(jax.vmap(conv, in_axes=(None, 0))(x, w)))

  jaxpr = jax.make_jaxpr(jax.grad(loss, (0, 1)))(x, w).jaxpr
  convs = [eq for eq in jaxpr.eqns if eq.primitive.name.startswith('jaxnas_depthwise')]
  assert len(convs) == 3  # Forward, input gradient, weight gradient.
  reads_x = [eq for eq in convs if eq.invars[0].aval.shape == x.shape]
  assert len(reads_x) == 2  # The forward conv and the weight gradient read x as is.
  assert not any(eq.primitive.name == 'broadcast_in_dim'
                 and eq.invars[0].aval.shape == x.shape for eq in jaxpr.eqns)


def test_backward_is_one_reduction_independent_of_kernel_size():
  """The weight gradient is one variadic reduce (plus the batch sum), not one
  reduction per tap; that keeps compiled programs small and fast."""
  counts = []
  for k in (3, 5):
    x, w = inputs(jax.random.key(11), (2, 8, 8, C), k)
    r = jnp.ones((2, 8, 8, C))
    f = jax.grad(lambda x, w: jnp.sum(
        r * depthwise.depthwise_conv(x, w, impl='shifted')), (0, 1))
    text = jax.jit(f).lower(x, w).as_text()
    counts.append(text.count('stablehlo.reduce'))
  assert counts[0] == counts[1] <= 3, counts


def test_low_precision_inputs():
  x, w = inputs(jax.random.key(12), (2, 8, 8, C), 3)
  y = depthwise.depthwise_conv(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16),
                               impl='shifted')
  assert y.dtype == jnp.bfloat16
  assert_close(y.astype(jnp.float32), reference(x, w, 1, 1), tol=5e-2)
  gw = jax.grad(lambda w: jnp.sum(depthwise.depthwise_conv(
      x.astype(jnp.bfloat16), w, impl='shifted').astype(jnp.float32)))(
          w.astype(jnp.bfloat16))
  assert gw.dtype == jnp.bfloat16


def test_native_form_is_one_custom_call_per_conv():
  x, w = inputs(jax.random.key(14), (2, 8, 8, C), 5)
  f = jax.grad(lambda x, w: jnp.sum(jnp.sin(depthwise.depthwise_conv(x, w, impl='native'))),
               (0, 1))
  text = jax.jit(f).lower(x, w).as_text()
  # Forward, input gradient (the transposed conv) and weight gradient.
  assert text.count(f'@{native.CONV_TARGET}') == 2
  assert text.count(f'@{native.WEIGHT_GRAD_TARGET}') == 1


def test_native_flops_are_read_from_the_compiled_program():
  """XLA counts a custom call as no FLOPs; `native.custom_call_flops` counts 2 per
  multiply-add: each conv output takes k*k taps, and so does each cotangent element of
  the weight gradient. Here the two convs (forward, stride 2, and the transposed conv)
  and the weight gradient of one conv, with the input shared by 3 vmapped filters."""
  k, e = 3, 3
  x, _ = inputs(jax.random.key(15), (2, 8, 8, C), k)
  w = jax.random.normal(jax.random.key(16), (e, k, k, C))
  conv = functools.partial(depthwise.depthwise_conv, stride=2, impl='native', relu=True)
  f = jax.grad(lambda x, w: jnp.sum(jnp.sin(jax.vmap(conv, in_axes=(None, 0))(x, w))),
               (0, 1))
  text = jax.jit(f).lower(x, w).compile().as_text()
  out, full = e * 2 * 4 * 4 * C, e * 2 * 8 * 8 * C  # Conv outputs; transposed conv's.
  assert native.custom_call_flops(text) == 2 * k * k * (out + full + out)


def test_native_gradients_are_the_same_on_every_run():
  """The kernels spread samples over threads as they come free; the results must not
  depend on which thread took which sample (a resumed search redoes steps)."""
  x, w = inputs(jax.random.key(16), (4, 64, 12, 12, 8), 5)
  w = jnp.broadcast_to(w, (4, *w.shape))
  grads = jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.sin(depthwise.depthwise_conv_batched(
      x, w, impl='native'))), (0, 1)))
  first = grads(x, w)
  for _ in range(5):
    for a, b in zip(grads(x, w), first):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_native_form_falls_back_to_xla_ops_off_float32():
  x, w = inputs(jax.random.key(15), (2, 8, 8, C), 3)
  lowered = jax.jit(lambda x, w: depthwise.depthwise_conv(x, w, impl='native')).lower(
      x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
  assert native.CONV_TARGET not in lowered.as_text()


def test_impl_selection(monkeypatch):
  monkeypatch.delenv(depthwise.ENV_VAR, raising=False)
  expected = 'native' if jax.default_backend() == 'cpu' else 'xla'
  assert depthwise.resolve_impl('auto') == expected
  assert depthwise.is_cpu_form('shifted') and not depthwise.is_cpu_form('xla')
  monkeypatch.setenv(depthwise.ENV_VAR, 'xla')
  assert depthwise.resolve_impl('auto') == 'xla'
  assert depthwise.resolve_impl('shifted') == 'shifted'  # Explicit wins.
  monkeypatch.setenv(depthwise.ENV_VAR, 'cudnn')
  with pytest.raises(ValueError, match=depthwise.ENV_VAR):
    depthwise.resolve_impl('auto')
  with pytest.raises(ValueError, match='impl'):
    depthwise.resolve_impl('fast')


def test_bad_arguments_raise_clear_errors():
  x, w = inputs(jax.random.key(13), (2, 8, 8, C), 3)
  with pytest.raises(ValueError, match='same C'):
    depthwise.depthwise_conv(x, w[..., :2])
  with pytest.raises(ValueError, match='stride'):
    depthwise.depthwise_conv(x, w, stride=0)
  with pytest.raises(ValueError, match='same E'):
    depthwise.depthwise_conv_batched(x[None], w[None].repeat(2, 0))


def test_auto_uses_the_shifted_form_when_the_kernels_cannot_be_built(monkeypatch):
  monkeypatch.delenv(depthwise.ENV_VAR, raising=False)
  monkeypatch.setattr(native, '_failure', None)
  monkeypatch.setenv('CXX', '/nonexistent/c++')
  monkeypatch.setattr(native.shutil, 'which', lambda name: None)
  assert not native.available()
  assert 'no C++ compiler' in native.unavailable_reason()
  if jax.default_backend() == 'cpu':
    assert depthwise.resolve_impl('auto') == 'shifted'
  with pytest.raises(RuntimeError, match="impl 'native'.*no C\\+\\+ compiler"):
    depthwise.resolve_impl('native')


def test_native_build_is_cached_and_keyed_by_source(monkeypatch, tmp_path):
  monkeypatch.setenv(native.CACHE_ENV_VAR, str(tmp_path))
  first = native._build()
  assert first.parent == tmp_path and first.exists()
  mtime = first.stat().st_mtime_ns
  assert native._build() == first and first.stat().st_mtime_ns == mtime
  edited = tmp_path / 'edited.cc'
  edited.write_text(native.SOURCE.read_text() + '\n// edited\n')
  monkeypatch.setattr(native, 'SOURCE', edited)
  assert native._build() != first
