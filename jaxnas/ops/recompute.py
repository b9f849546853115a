"""Rematerialization that the backward pass cannot hoist, for Flax modules.

``jax.checkpoint`` keeps a recomputation apart from the forward pass with optimization
barriers on its inputs. XLA:CPU removes those barriers, after which common-subexpression
elimination merges the recomputation back into the forward pass and nothing is saved.
Even where the recomputation survives, it depends only on the saved inputs, so a
scheduler may run it right after the forward pass and keep its results alive as long.

``recompute`` instead makes the recomputation depend on the incoming cotangent: its
inputs are the saved ones plus zero times one element of the cotangent. That scalar
exists only once the backward pass reaches the module, so the forward pass is recomputed
there, and it differs from the forward pass's inputs, so it is not merged back. Adding
zero changes no finite value.
"""

import functools

import flax.linen as nn
from flax.core import lift
import jax
import jax.numpy as jnp


def _first_float_element(tree) -> jax.Array:
  for leaf in jax.tree.leaves(tree):
    if jnp.issubdtype(leaf.dtype, jnp.floating) and leaf.size:
      return leaf.reshape(-1)[0]
  raise ValueError('recompute: the cotangent has no floating-point element to wait for.')


def after(tree, cotangent):
  """``tree`` with every floating-point leaf made to depend on ``cotangent`` (plus zero
  times its first floating-point element): a value that XLA can neither compute before
  the cotangent exists nor merge with ``tree`` itself."""
  zero = _first_float_element(cotangent) * 0

  def tie(leaf):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      return leaf + zero.astype(leaf.dtype)
    return leaf

  return jax.tree.map(tie, tree)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _call(fn, args):
  return fn(*args)


def _call_forward(fn, args):
  return fn(*args), args


def _call_backward(fn, args, cotangent):
  _, vjp = jax.vjp(fn, *after(args, cotangent))
  return (vjp(cotangent),)


_call.defvjp(_call_forward, _call_backward)


def recompute_fn(fn):
  """``fn`` whose gradient recomputes ``fn``'s intermediates once the cotangent of its
  output is available, keeping only ``fn``'s inputs from the forward pass.

  ``fn`` is traced once: the recomputation evaluates the same program, so a function
  with side effects at trace time (a Flax scope drawing RNG keys from a counter) gives
  the recomputation the same values as the forward pass.
  """

  def wrapped(*args):
    closed, consts = jax.closure_convert(fn, *args)
    return _call(closed, (*args, *consts))

  return wrapped


def _lifted_recompute(fn, variables=True, rngs=True):
  """``flax.core.lift.checkpoint`` with ``recompute_fn`` in place of ``jax.checkpoint``."""

  def inner(scope_fn, repack_fn, variable_groups, rng_groups, *args):

    @recompute_fn
    @functools.wraps(fn)
    def recomputed(variable_groups, rng_groups, *args):
      scope = scope_fn(variable_groups, rng_groups)
      y = fn(scope, *args)
      return y, repack_fn(scope)

    return recomputed(variable_groups, rng_groups, *args)

  return lift.pack(inner, (variables,), (variables,), (rngs,), name='recompute')


def recompute(module_class):
  """The Flax module class whose ``__call__`` is rematerialized by ``recompute_fn``.
  Positional array arguments only; the variables (updated batch statistics included)
  and RNG streams pass through as with ``nn.remat``."""
  return nn.transforms.lift_transform(_lifted_recompute, module_class)
