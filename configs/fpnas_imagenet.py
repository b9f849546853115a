"""FP-NAS (Yan et al., CVPR 2021) on ImageNet in the FBNetV2-like micro space, with
coarse-to-fine distributions and a FLOPs target.

The space (jaxnas/spaces/fbnet.py): the skeleton of FBNetV2's F models (stem 3x3 s2 to 8,
stages of 1, 2, 2, 6, 4 inverted-residual blocks, head 1x1 to 1280), per stage a kernel
{3, 5}, expansion {3, 6}, width {0.75, 1.0} x the stage's channels, squeeze-excite
on/off and ReLU / h-swish: 79.2M (the smallest) to 281.7M (the largest) multiply-adds at
224 px. Sampling is adaptive (K = ceil(H / 4), at least 2, at most 16); the first 10
epochs sample from the factorized distribution (one categorical per stage and factor),
then the joint one over the 32 combinations per stage takes over, initialized to the
factors' product. The loss adds beta * log C with C the mean over the samples of
max(0, FLOPs / target - 1), target 200M multiply-adds, beta 0.5.

The FP-NAS paper searched ImageNet-100 with hyperparameters it does not list; every
number here (epochs 30, batch 256, weights SGD 0.1 cosine to 0.001 with wd 4e-5, alpha
Adam 3e-3 after 5 weights-only epochs, the switch at epoch 10, target and beta) is a
jaxnas choice.

  python -m jaxnas.main --config=configs/fpnas_imagenet.py --workdir=runs/fpnas_imagenet

Needs ImageNet prepared with TFDS; a GPU/TPU job, not run with jaxnas yet. The found
architecture (architecture.json) trains with --config.space=fbnet of jaxnas.train
(base_config.train_config('fbnet')). ``:smoke`` (64 px, a tiny skeleton) checks a setup.
"""

from jaxnas.methods import fpnas


def get_config(arg=None):
  config = fpnas.get_config(adaptive=True, space='fbnet')
  config.data.name = 'imagenet2012'
  config.data.image_size = 224
  config.data.train_portion = 0.8
  config.data.augment = True
  config.model.width_multiplier = 1.0
  config.fpnas.sample_scale = 0.25
  config.fpnas.min_samples = 2
  config.fpnas.max_samples = 16
  config.fpnas.switch_epoch = 10
  config.fpnas.flops_target = 200e6
  config.fpnas.cost_weight = 0.5
  config.optim.batch_size = 256
  config.optim.epochs = 30
  config.optim.warmup_epochs = 5
  config.optim.learning_rate = 0.1
  config.optim.learning_rate_min = 0.001
  config.optim.weight_decay = 4e-5
  config.optim.arch_learning_rate = 3e-3
  config.eval_batch_size = 250
  config = fpnas.FPNAS.apply_variant(config, arg, 'fpnas_imagenet')
  if arg == 'smoke':
    config.data.image_size = 64
  return config
