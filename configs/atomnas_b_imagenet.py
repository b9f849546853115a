"""AtomNAS-B on ImageNet: the reference's supernet (stem 32) and settings, searched and
trained in one run (the paper: 326M multiply-adds, 4.4M params, 75.5 % top-1).

  python -m jaxnas.main --config=configs/atomnas_b_imagenet.py --workdir=runs/atomnas_b

The global batch is 512 (the reference's 64 per GPU on 8 GPUs); the learning rate scales
with it (0.016 x batch / 256). ``:smoke`` runs a small network for a few steps.
"""

from jaxnas.methods import atomnas


def get_config(arg=None):
  c = atomnas.get_config()
  c.model.stem = 32
  c.atomnas.rho = atomnas.RHO['b']
  return atomnas.METHOD.apply_variant(c, arg, 'atomnas_b_imagenet.py')
