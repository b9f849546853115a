"""PARSEC quick search on Fashion-MNIST, offline, sized for a 2-core CPU: the baseline of
the FP-NAS comparison (experiments/parsec_vs_fpnas.py).

The Debian package dataset-fashion-mnist provides the data (IDX files). The sampled
DARTS-like cell space (as UNAS's: per node two (source, op) slots over the 7 UNAS ops)
with a small network (C=8, 4 cells, 4 nodes); K = 16 architectures per step (PARSEC's K
in the DARTS space), each run alone on the batch (only its ops); batch 16; weights SGD
0.05 (momentum 0.9, cosine to 0.001, wd 3e-4), alpha Adam 1e-2 (betas 0.5, 0.999);
1 weights-only warm-up epoch and 3 search epochs of 100 steps over a 50/50 split of the
60k training images. After each epoch the most likely architecture is scored on 2000
held-out images of the arch split.

  python -m jaxnas.main --config=configs/parsec_fashion_mnist.py --workdir=/tmp/parsec_fmnist

Measured on a 2-core Intel Xeon VM (jax 0.10.2, CPU), 2026-12-06, cold compilation
cache: 12.8 min wall (105 s compiling), 6400 architectures sampled (K = 16 on all 400
steps); held-out accuracy of the most likely architecture 18.1 / 40.4 / 56.6 / 61.9 %
after epochs 1-4; final entropy 48.6 nats (50.3 at the start); sep/dil convs in both
cells. Its cell, retrained with configs/eval_fashion_mnist.py: 85.23 % test top-1.
Peak RSS of the whole comparison (both searches and trainings) 3.8 GB.
"""

from jaxnas.methods import fpnas


def get_config(arg=None):
  config = fpnas.get_config(adaptive=False)
  config.data.name = 'fashion_mnist'
  config.data.train_portion = 0.5
  config.data.augment = False
  config.model.C = 8
  config.model.layers = 4
  config.model.steps = 4
  config.model.primitives = fpnas.unas_method.sampled_darts.UNAS_PRIMITIVES
  config.fpnas.num_samples = 16
  config.optim.batch_size = 16
  config.optim.epochs = 4
  config.optim.warmup_epochs = 1
  config.optim.steps_per_epoch = 100
  config.optim.learning_rate = 0.05
  config.optim.learning_rate_min = 0.001
  config.optim.arch_learning_rate = 1e-2
  config.log_every_steps = 20
  config.eval_max_examples = 2000
  return fpnas.PARSEC.apply_variant(config, arg, 'parsec_fashion_mnist')
