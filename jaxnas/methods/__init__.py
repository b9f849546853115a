"""Search methods, chosen by name (``config.method``).

Adding a method: a module here with a ``base.Method`` subclass (its config fields,
validation, model, optimizers, step phases, evaluation and derived architecture), one
line in ``METHODS`` and one config under ``configs/``. ``register`` adds one at run time
(a plug-in outside jaxnas, or a test's).
"""

from jaxnas.methods import atomnas
from jaxnas.methods import base
from jaxnas.methods import darts
from jaxnas.methods import fpnas
from jaxnas.methods import pcdarts
from jaxnas.methods import unas

METHODS: dict[str, base.Method] = {
    'darts': darts.METHOD,
    'pcdarts': pcdarts.METHOD,
    'unas': unas.METHOD,
    'parsec': fpnas.PARSEC,
    'fpnas': fpnas.FPNAS,
    'atomnas': atomnas.METHOD,
}


def register(method: base.Method) -> base.Method:
  """Makes ``method`` available as ``config.method = method.name``."""
  if not method.name:
    raise ValueError(f'{type(method).__name__} has no name.')
  METHODS[method.name] = method
  return method


def get(name: str) -> base.Method:
  if name not in METHODS:
    raise KeyError(name)
  return METHODS[name]
