"""Trains a genotype from scratch on ImageNet with the PC-DARTS evaluation settings.

14 cells, C=48, the three stride-2 stem convs, 250 epochs, batch 1024, SGD lr 0.5 with
PC-DARTS's linear decay and 5 warm-up epochs, momentum 0.9, weight decay 3e-5, gradient
clipping 5, label smoothing 0.1, auxiliary head (weight 0.4), no drop path, 224x224
center crops with random flips. The genotype defaults to PC_DARTS_image.

  python -m jaxnas.main --config=configs/eval_imagenet.py --workdir=runs/eval_imagenet
  python -m jaxnas.main --config=configs/eval_imagenet.py --workdir=runs/eval_imagenet --dry_run

Needs ImageNet (imagenet2012) prepared with TFDS. Paper: 24.2 / 7.3 % top-1 / top-5 error,
597M multiply-adds. Not trained with jaxnas yet (no ImageNet or accelerator where jaxnas
was measured). ``--dry_run`` (measured, 2-core CPU): 5.342M params (6.603M with the
auxiliary head) and 581.6M multiply-adds per image, counting the convolutions and the
classifier. ``:smoke`` (64x64 images, C=8, 5 cells, no auxiliary head) checks a setup end to end.
"""

from jaxnas import base_config


def get_config(arg=None):
  config = base_config.train_config()
  config.genotype = 'PC_DARTS_image'
  config.data.name = 'imagenet2012'
  config.data.image_size = 224
  config.data.cutout = 0
  config.model.C = 48
  config.model.layers = 14
  config.model.stem = 'imagenet'
  config.model.drop_path = 0.0
  config.optim.batch_size = 1024
  config.optim.epochs = 250
  config.optim.schedule = 'linear'
  config.optim.learning_rate = 0.5
  config.optim.warmup_epochs = 5
  config.optim.weight_decay = 3e-5
  config.optim.label_smoothing = 0.1
  config.eval_batch_size = 250
  base_config.apply_variant(config, arg, 'eval_imagenet', base_config.TRAIN_VARIANTS)
  if arg == 'smoke':
    config.genotype = 'PC_DARTS_image'
    config.data.image_size = 64
    config.model.auxiliary = False  # 64x64 images leave 2x2 maps for the head
  return config
