"""Search spaces, chosen by name (``config.space``): each a supernet module class. A
method says which spaces it searches (its ``validate``)."""

from jaxnas.spaces import darts
from jaxnas.spaces import proxyless
from jaxnas.spaces import sampled_darts

SEARCH_SPACES = {
    'darts': darts.SearchNetwork,             # DARTS / PC-DARTS: every edge a mixed op
    'unas_darts': sampled_darts.SampledNetwork,  # two sampled (source, op) slots per node
    'proxyless': proxyless.ProxylessNetwork,  # ProxylessNAS GPU: MBConv or zero per layer
}
