"""Multiply-adds of a function, counted on its jaxpr.

Counts what the papers count: the multiply-adds of convolutions and matrix products
(including 1x1 convs and the classifier). Pools, BN, activations and additions are left
out. The count walks nested jaxprs (jit, custom derivative rules, control flow bodies
once each).
"""

import math

import jax
from jax.extend import core


def _conv_macs(eqn) -> int:
  out = eqn.outvars[0].aval.shape
  rhs = eqn.invars[1].aval.shape
  spec = eqn.params['dimension_numbers'].rhs_spec  # (out feature, in feature, *spatial)
  return math.prod(out) * rhs[spec[1]] * math.prod(rhs[d] for d in spec[2:])


def _dot_macs(eqn) -> int:
  (lhs_contract, _), _ = eqn.params['dimension_numbers']
  lhs = eqn.invars[0].aval.shape
  return math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contract)


def _sub_jaxprs(eqn):
  for value in eqn.params.values():
    for v in (value if isinstance(value, (tuple, list)) else (value,)):
      if isinstance(v, core.ClosedJaxpr):
        yield v.jaxpr
      elif isinstance(v, core.Jaxpr):
        yield v


def jaxpr_macs(jaxpr) -> int:
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'conv_general_dilated':
      total += _conv_macs(eqn)
    elif name == 'dot_general':
      total += _dot_macs(eqn)
    elif name == 'scan':  # its body runs `length` times
      total += eqn.params['length'] * sum(jaxpr_macs(sub) for sub in _sub_jaxprs(eqn))
    else:
      total += sum(jaxpr_macs(sub) for sub in _sub_jaxprs(eqn))
  return total


def count_macs(fn, *args, **kwargs) -> int:
  """Multiply-adds of one call ``fn(*args, **kwargs)`` (traced, not run)."""
  return jaxpr_macs(jax.make_jaxpr(fn)(*args, **kwargs).jaxpr)
