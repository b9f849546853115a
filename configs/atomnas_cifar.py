"""AtomNAS on CIFAR-10 (32x32): the reference's stages with the stem and the second stage
at stride 1 (32 -> 32 -> 16 -> 8 -> 4 -> 4 -> 2 -> 2), stem 32, and the ImageNet recipe
over 300 epochs at batch 128 (jaxnas's choices: the reference searched on ImageNet only).

  python -m jaxnas.main --config=configs/atomnas_cifar.py --workdir=runs/atomnas_cifar
"""

from jaxnas.methods import atomnas
from jaxnas.spaces import atomnas as space


def get_config(arg=None):
  c = atomnas.get_config()
  c.data.name = 'cifar10'
  c.data.image_size = None
  c.data.cutout = 16
  stages = [list(s) for s in space.STAGES]
  stages[1][3] = 1
  c.model.stages = tuple(tuple(s) for s in stages)
  c.model.stem = 32
  c.model.stem_stride = 1
  c.optim.batch_size = 128
  c.optim.epochs = 300
  c.atomnas.rho_ramp_epochs = 20
  c.recalibrate_batches = 20
  c.eval_batch_size = 500
  return atomnas.METHOD.apply_variant(c, arg, 'atomnas_cifar.py')
