"""Trains an architecture of the FBNetV2-like space (an FP-NAS or PARSEC search in
configs/fpnas_imagenet.py) from scratch on ImageNet.

  python -m jaxnas.main --config=configs/eval_fbnet_imagenet.py --workdir=runs/eval_fbnet \\
      --config.genotype=runs/fpnas_imagenet

The architecture comes from a search workdir (its architecture.json) or such a .json
file. FP-NAS does not publish its training recipe; these settings are ProxylessNAS's
(a jaxnas choice for a MobileNet-like network): 300 epochs, batch 256, SGD with Nesterov
momentum 0.9, lr 0.05 cosine to 0, weight decay 4e-5 except on the BatchNorms, label
smoothing 0.1, dropout 0.2 before the classifier; 224x224 crops with random flips. Not
trained with jaxnas yet. ``:smoke`` (64x64 images, width x0.25) checks a setup.
"""

from jaxnas import base_config


def get_config(arg=None):
  config = base_config.train_config('fbnet')
  config.genotype = 'runs/fpnas_imagenet'
  config.data.name = 'imagenet2012'
  config.data.image_size = 224
  config.data.cutout = 0
  config.model.dropout = 0.2
  config.optim.batch_size = 256
  config.optim.epochs = 300
  config.optim.schedule = 'cosine'
  config.optim.learning_rate = 0.05
  config.optim.learning_rate_min = 0.0
  config.optim.momentum = 0.9
  config.optim.nesterov = True
  config.optim.weight_decay = 4e-5
  config.optim.decay_batch_norm = False
  config.optim.grad_clip = 0.0
  config.optim.label_smoothing = 0.1
  config.eval_batch_size = 500
  base_config.apply_variant(config, arg, 'eval_fbnet_imagenet', base_config.TRAIN_VARIANTS)
  if arg == 'smoke':
    config.data.image_size = 64
  return config
