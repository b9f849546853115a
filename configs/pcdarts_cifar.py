"""PC-DARTS search on CIFAR-10 with the paper's settings (Xu et al. 2019).

Batch 256, 50 epochs, C=16, 8 cells, K=4 partial channels with channel shuffle, edge
normalization, SGD lr 0.1 cosine to 0 (momentum 0.9, wd 3e-4, clip 5), Adam arch lr 6e-4
betas (0.5, 0.999) wd 1e-3, arch updates from epoch 15, half the train set for the weights
and half for the architecture, random crop + flip, first order.

  python -m jaxnas.main --config=configs/pcdarts_cifar.py --workdir=/tmp/pcdarts_cifar

Needs CIFAR-10 prepared with TFDS (see the README). Paper: 0.1 GPU-days on a GTX 1080Ti,
found cell 2.57 +- 0.07 % test error after retraining. The full search is a GPU/TPU job:
measured on a 2-core CPU (experiments/benchmark_search.py) this supernet's step takes
2.1-2.3 s at batch 64 on a fast day (50-59 s to compile, with the native CPU kernels) and
21.6 s at batch 256 on a slower one, 29 hours of steps for the 50 epochs. No full
search has been run with jaxnas yet: there was no CIFAR-10 where it was measured, and on
the one GPU tried (an H100) the step had not finished compiling in the time available
(see experiments/PERFORMANCE.md). The ``smoke`` variant
(``configs/pcdarts_cifar.py:smoke``) checks a setup end to end on CPU.
"""

from jaxnas.methods import pcdarts


def get_config(arg=None):
  config = pcdarts.get_config()
  config.data.name = 'cifar10'
  config.data.train_portion = 0.5
  config.data.augment = True
  config.model.C = 16
  config.model.layers = 8
  config.model.k = 4
  config.model.channel_sampling = 'shuffle'
  config.model.edge_normalization = True
  config.optim.batch_size = 256
  config.optim.epochs = 50
  config.optim.lr_timing = 'reference'  # epoch e at eta(e + 1), as the reference
  config.optim.learning_rate = 0.1
  config.optim.learning_rate_min = 0.0
  config.optim.momentum = 0.9
  config.optim.weight_decay = 3e-4
  config.optim.grad_clip = 5.0
  config.optim.arch_learning_rate = 6e-4
  config.optim.arch_betas = (0.5, 0.999)
  config.optim.arch_weight_decay = 1e-3
  config.optim.arch_warmup_epochs = 15
  config.optim.order = 1
  return pcdarts.METHOD.apply_variant(config, arg, 'pcdarts_cifar')
