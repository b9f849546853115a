"""FP-NAS quick search in the FBNetV2-like space on Fashion-MNIST, offline, sized for a
2-core CPU: coarse-to-fine and the FLOPs target at work (``:smoke`` for a few steps).

The space (jaxnas/spaces/fbnet.py) at half width with stages of 1, 2, 2, 3, 2 blocks:
per stage a kernel {3, 5}, expansion {3, 6}, width {0.75, 1.0}, squeeze-excite on/off
and ReLU / h-swish, 0.30M (the smallest) to 1.32M (the largest) multiply-adds on a 28x28
image. K = ceil(H / 4) architectures per step (at least 2, at most 16), each run alone on
the batch; the factorized distribution for the first 5 epochs, then the joint one over
the 32 combinations per stage; beta = 0.5 on log C, C the mean over the samples of
max(0, FLOPs / 0.6M - 1). Batch 32, 2 weights-only warm-up epochs and 8 search epochs of
150 steps over a 50/50 split of the 60k training images; weights SGD 0.05 (cosine to
0.001), alpha Adam 1e-2. After each epoch the most likely architecture is scored on 2000
held-out images of the arch split; the run reports its multiply-adds beside the target.

  python -m jaxnas.main --config=configs/fpnas_fbnet_fashion_mnist.py --workdir=/tmp/fpnas_fbnet

Measured on a 2-core Intel Xeon VM (jax 0.10.2, CPU), 2026-12-06, cold compilation
cache: 4.1 min wall (23 s compiling), 6638 architectures (K 5, then 4 as the entropy fell
from 17.3 to 12.6 nats); the found architecture has 0.339M multiply-adds, under the 0.6M
target (the same run with --config.fpnas.cost_weight=0: 0.841M).
"""

from jaxnas.methods import fpnas


def get_config(arg=None):
  config = fpnas.get_config(adaptive=True, space='fbnet')
  config.data.name = 'fashion_mnist'
  config.data.image_size = None
  config.data.train_portion = 0.5
  config.data.augment = False
  config.model.width_multiplier = 0.5
  config.model.depths = (1, 2, 2, 3, 2)
  config.fpnas.sample_scale = 0.25
  config.fpnas.min_samples = 2
  config.fpnas.max_samples = 16
  config.fpnas.switch_epoch = 5
  config.fpnas.flops_target = 0.6e6
  config.fpnas.cost_weight = 0.5
  config.optim.batch_size = 32
  config.optim.epochs = 10
  config.optim.warmup_epochs = 2
  config.optim.steps_per_epoch = 150
  config.optim.learning_rate = 0.05
  config.optim.learning_rate_min = 0.001
  config.optim.arch_learning_rate = 1e-2
  config.log_every_steps = 20
  config.eval_max_examples = 2000
  return fpnas.FPNAS.apply_variant(config, arg, 'fpnas_fbnet_fashion_mnist')
