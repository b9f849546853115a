"""FP-NAS quick search on Fashion-MNIST, offline, sized for a 2-core CPU: PARSEC's quick
search (configs/parsec_fashion_mnist.py) with adaptive sampling, compared side by side
in experiments/parsec_vs_fpnas.py.

The Debian package dataset-fashion-mnist provides the data (IDX files). The sampled
DARTS-like cell space (as UNAS's: per node two (source, op) slots over the 7 UNAS ops)
with a small network (C=8, 4 cells, 4 nodes); K = ceil(H / 4) architectures per step
(FP-NAS's lambda = 1/4, H the entropy in nats: 13 at the start), at least 2 and at most
16, each run alone on the batch (only its ops); batch 16; weights SGD
0.05 (momentum 0.9, cosine to 0.001, wd 3e-4), alpha Adam 1e-2 (betas 0.5, 0.999);
1 weights-only warm-up epoch and 3 search epochs of 100 steps over a 50/50 split of the
60k training images. After each epoch the most likely architecture is scored on 2000
held-out images of the arch split.

  python -m jaxnas.main --config=configs/fpnas_fashion_mnist.py --workdir=/tmp/fpnas_fmnist

Measured on a 2-core Intel Xeon VM (jax 0.10.2, CPU), 2026-12-06, cold compilation
cache: 10.6 min wall (94 s compiling), 5200 architectures sampled (K = 13 on all 400
steps: the entropy fell from 50.3 to 48.8 nats, not below the 48 that K = 12 needs);
held-out accuracy of the most likely architecture 23.4 / 37.8 / 51.5 / 65.2 % after
epochs 1-4; sep/dil convs in the normal cell, pools and sep convs in the reduction cell.
Its cell, retrained with configs/eval_fashion_mnist.py: 87.52 % test top-1.
"""

from jaxnas.methods import fpnas


def get_config(arg=None):
  config = fpnas.get_config(adaptive=True)
  config.data.name = 'fashion_mnist'
  config.data.train_portion = 0.5
  config.data.augment = False
  config.model.C = 8
  config.model.layers = 4
  config.model.steps = 4
  config.model.primitives = fpnas.unas_method.sampled_darts.UNAS_PRIMITIVES
  config.fpnas.sample_scale = 0.25
  config.fpnas.min_samples = 2
  config.fpnas.max_samples = 16
  config.optim.batch_size = 16
  config.optim.epochs = 4
  config.optim.warmup_epochs = 1
  config.optim.steps_per_epoch = 100
  config.optim.learning_rate = 0.05
  config.optim.learning_rate_min = 0.001
  config.optim.arch_learning_rate = 1e-2
  config.log_every_steps = 20
  config.eval_max_examples = 2000
  return fpnas.FPNAS.apply_variant(config, arg, 'fpnas_fashion_mnist')
