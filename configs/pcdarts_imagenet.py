"""PC-DARTS search on ImageNet with the paper's settings.

Batch 1024, 50 epochs, lr 0.5 with 5 linear warm-up epochs then cosine, K=2, arch lr 6e-3,
arch updates from epoch 35, gradient clipping on the alphas too, 10% / 2.5% of each class's
train images for the weights / the architecture, a stem of three stride-2 convs
(224 -> 28), 8 cells.

  python -m jaxnas.main --config=configs/pcdarts_imagenet.py --workdir=/tmp/pcdarts_imagenet

Needs ImageNet (imagenet2012) prepared with TFDS. Paper: 11.5 h on 8 V100s (3.8 GPU-days);
the found cell: 24.2 / 7.3 % top-1 / top-5 error. Not run with jaxnas yet (no ImageNet or
accelerator where jaxnas was measured). ``configs/pcdarts_imagenet.py:smoke`` (64x64
images) checks a setup end to end on CPU.
"""

from jaxnas.methods import pcdarts


def get_config(arg=None):
  config = pcdarts.get_config()
  config.data.name = 'imagenet2012'
  config.data.image_size = 224
  config.data.per_class_fractions = (0.1, 0.025)
  config.data.augment = True
  config.model.C = 16
  config.model.layers = 8
  config.model.stem = 'imagenet'
  config.model.k = 2
  config.model.edge_normalization = True
  config.optim.batch_size = 1024
  config.optim.epochs = 50
  config.optim.lr_timing = 'reference'  # epoch e at eta(e + 1), as the reference
  config.optim.learning_rate = 0.5
  config.optim.warmup_epochs = 5
  config.optim.arch_learning_rate = 6e-3
  config.optim.arch_grad_clip = 5.0
  config.optim.arch_warmup_epochs = 35
  config.eval_batch_size = 256
  config = pcdarts.METHOD.apply_variant(config, arg, 'pcdarts_imagenet')
  if arg == 'smoke':
    config.data.image_size = 64
  return config
