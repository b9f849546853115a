"""Trains an architecture of the ProxylessNAS (GPU) space from scratch on ImageNet, with
the training settings of ProxylessNAS's own code (mit-han-lab/proxylessnas,
search/imagenet_run_exp.py).

The architecture defaults to UNAS_PROXYLESS (the one UNAS found in this space); a UNAS
search workdir of this space (its architecture.json), a .json file or PROXYLESS_GPU work
too. 300 epochs, batch 256, SGD with Nesterov momentum 0.9, lr 0.05 cosine to 0, weight
decay 4e-5 except on the BatchNorms, label smoothing 0.1, dropout 0.3 before the
classifier (the reference's GPU model), BN eps 1e-3; 224x224 crops with random flips
(the reference adds colour jitter, which jaxnas's pipeline does not).

  python -m jaxnas.main --config=configs/eval_proxyless_imagenet.py --workdir=runs/eval_px \\
      --config.genotype=runs/unas_proxyless
  python -m jaxnas.main --config=configs/eval_proxyless_imagenet.py --workdir=runs/eval_px \\
      --dry_run

Needs ImageNet (imagenet2012) prepared with TFDS. Not trained with jaxnas yet (no
ImageNet or accelerator where jaxnas was measured). ``--dry_run`` (measured, 2-core CPU)
prints the network's size and cost: 5.97M params and 428M multiply-adds per image for
UNAS_PROXYLESS (7.12M and 465M for PROXYLESS_GPU). ``:smoke`` (64x64 images, width x0.25)
checks a setup end to end.
"""

from jaxnas import base_config


def get_config(arg=None):
  config = base_config.train_config('proxyless')
  config.genotype = 'UNAS_PROXYLESS'
  config.data.name = 'imagenet2012'
  config.data.image_size = 224
  config.data.cutout = 0
  config.model.dropout = 0.3
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
  base_config.apply_variant(config, arg, 'eval_proxyless_imagenet',
                            base_config.TRAIN_VARIANTS)
  if arg == 'smoke':
    config.data.image_size = 64
  return config
