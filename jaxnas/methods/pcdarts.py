"""PC-DARTS (Xu et al. 2019): DARTS's bilevel search with partial channel connections
(1/K of each edge's channels through the mixed op, the rest bypassing it) and edge
normalization (betas, a softmax over each node's incoming edges).

The step is DARTS's (jaxnas/methods/darts.py); the supernet and the settings differ.
"""

import ml_collections

from jaxnas.methods import darts


def get_config() -> ml_collections.ConfigDict:
  """PC-DARTS on CIFAR-10 with the paper's settings."""
  c = darts.get_config()
  c.method = 'pcdarts'
  c.data.train_portion = 0.5       # half of the train split for weights, half for alphas
  c.model.k = 4
  c.model.channel_sampling = 'shuffle'
  c.model.edge_normalization = True
  c.optim.batch_size = 256
  c.optim.learning_rate = 0.1
  c.optim.learning_rate_min = 0.0
  c.optim.arch_learning_rate = 6e-4
  c.optim.arch_warmup_epochs = 15
  return c


class PCDarts(darts.Bilevel):
  name = 'pcdarts'

  def get_config(self):
    return get_config()


METHOD = PCDarts()
