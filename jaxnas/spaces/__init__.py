"""Search spaces, chosen by name (``config.space``): each a supernet module class. A
method says which spaces it searches (its ``validate``).

``EVAL_SPACES`` holds the spaces whose found architectures ``jaxnas.train`` trains from
scratch (a training config's ``space``), each an adapter with ``validate(model_config,
image_shape, fail)``, ``load(spec, model_config)``, ``from_json(d, source,
model_config)``, ``build(model_config, architecture, num_classes, impl=None)`` (a module
whose ``apply(variables, x, train=...)`` returns ``(logits, auxiliary logits or None)``),
``to_json``, ``format``, ``count_params``, and ``drop_path`` (whether the network takes a
``drop_rate``).
"""

from jaxnas.spaces import atomnas
from jaxnas.spaces import darts
from jaxnas.spaces import darts_eval
from jaxnas.spaces import fbnet
from jaxnas.spaces import proxyless
from jaxnas.spaces import sampled_darts

SEARCH_SPACES = {
    'darts': darts.SearchNetwork,             # DARTS / PC-DARTS: every edge a mixed op
    'unas_darts': sampled_darts.SampledNetwork,  # two sampled (source, op) slots per node
    'proxyless': proxyless.ProxylessNetwork,  # ProxylessNAS GPU: MBConv or zero per layer
    'fbnet': fbnet.FBNetNetwork,              # FBNetV2-like: kernel, expansion, width, SE, act
    'atomnas': atomnas.AtomNet,               # AtomNAS: blocks of atoms, shrunk as they die
}

EVAL_SPACES = {
    'darts': darts_eval.EVAL_SPACE,          # a genotype's cell stacked (DARTS, PC-DARTS, UNAS)
    'proxyless': proxyless.EVAL_SPACE,       # one MBConv per layer (UNAS in ProxylessNAS)
    'fbnet': fbnet.EVAL_SPACE,               # the chosen blocks (FP-NAS, PARSEC in fbnet)
    'atomnas': atomnas.EVAL_SPACE,           # a shrunk AtomNAS network
}
