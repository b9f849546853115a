"""UNAS quick search on Fashion-MNIST, offline, sized for a 2-core CPU.

The Debian package dataset-fashion-mnist provides the data (IDX files). The DARTS-like
space of UNAS with a small network (C=8, 4 cells, 4 nodes, the 7 ops), one architecture
per example, REBAR, the generalization-gap objective on a 10 % validation split,
paired-input penalty 0.2; batch 16, 1 warm-up epoch and 3 search epochs of 150 steps,
weights Adam 3e-3 (cosine to 3e-4), arch Adam 3e-3 (cosine to 1e-3). Before the search
it times 600 sampled networks (24 images, median of 5 runs) and fits the latency
surrogate; no latency target (the term is off), but the final architecture's latency is
measured and predicted. After each epoch the most likely architecture is scored on 2000
held-out images of the validation split.

  python -m jaxnas.main --config=configs/unas_fashion_mnist.py --workdir=/tmp/unas_fmnist

Measured on a 2-core Intel Xeon VM (jax 0.10.2, CPU), 2026-12-06, cold compilation
cache: 12 min 43 s wall, 2.55 GB peak RSS; setup 154 s (latency model 59 s, compiling
79 s), about 29 images/s in the search epochs; held-out accuracy of the most likely
architecture 24.1 / 52.2 / 66.4 / 69.5 % after epochs 1-4; sep/dil convs in both
cells (not degenerate); latency surrogate R^2 0.22, mean abs error 0.82 ms on 120
held-out networks (a 12 ms forward pass timed on a shared 2-core CPU is noisy); the
found architecture 13.2 ms measured, 16.2 ms predicted.
"""

from jaxnas.methods import unas


def get_config(arg=None):
  config = unas.get_config()
  config.data.name = 'fashion_mnist'
  config.data.train_portion = 0.9
  config.data.augment = False
  config.model.C = 8
  config.model.layers = 4
  config.model.steps = 4
  config.model.primitives = unas.sampled_darts.UNAS_PRIMITIVES
  config.unas.estimator = 'rebar'
  config.unas.temperature = 0.4
  config.unas.sampling = 'example'
  config.unas.objective = 'gen_gap'
  config.unas.gen_gap_weight = 0.5
  config.unas.paired_input_penalty = 0.2
  config.unas.latency_model = 'measure'
  config.unas.latency_samples = 600
  config.unas.latency_runs = 5
  config.optim.batch_size = 16
  config.optim.epochs = 4
  config.optim.warmup_epochs = 1
  config.optim.steps_per_epoch = 150
  config.optim.learning_rate = 3e-3
  config.optim.learning_rate_min = 3e-4
  config.optim.arch_learning_rate = 3e-3
  config.optim.arch_learning_rate_min = 1e-3
  config.log_every_steps = 20
  config.eval_max_examples = 2000
  return unas.METHOD.apply_variant(config, arg, 'unas_fashion_mnist')
