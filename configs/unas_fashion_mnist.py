"""UNAS quick search on Fashion-MNIST, offline, sized for a 2-core CPU.

The Debian package dataset-fashion-mnist provides the data (IDX files). The DARTS-like
space of UNAS with a small network (C=8, 5 cells, 4 nodes, the 7 ops), one architecture
per example, REBAR, the generalization-gap objective on a 10 % validation split,
paired-input penalty 0.2; batch 32, 1 warm-up epoch and 3 search epochs of 150 steps,
weights Adam 1e-3 (cosine to 1e-4), arch Adam 3e-3 (cosine to 1e-3). After each epoch
the most likely architecture is scored on 2000 held-out images.

  python -m jaxnas.main --config=configs/unas_fashion_mnist.py --workdir=/tmp/unas_fmnist
"""

from jaxnas.methods import unas


def get_config(arg=None):
  config = unas.get_config()
  config.data.name = 'fashion_mnist'
  config.data.train_portion = 0.9
  config.data.augment = False
  config.model.C = 8
  config.model.layers = 5
  config.model.steps = 4
  config.model.primitives = unas.sampled_darts.UNAS_PRIMITIVES
  config.unas.estimator = 'rebar'
  config.unas.temperature = 0.4
  config.unas.sampling = 'example'
  config.unas.objective = 'gen_gap'
  config.unas.gen_gap_weight = 0.5
  config.unas.paired_input_penalty = 0.2
  config.optim.batch_size = 32
  config.optim.epochs = 4
  config.optim.warmup_epochs = 1
  config.optim.steps_per_epoch = 150
  config.optim.learning_rate = 1e-3
  config.optim.learning_rate_min = 1e-4
  config.optim.arch_learning_rate = 3e-3
  config.optim.arch_learning_rate_min = 1e-3
  config.log_every_steps = 25
  config.eval_max_examples = 2000
  return unas.METHOD.apply_variant(config, arg, 'unas_fashion_mnist')
