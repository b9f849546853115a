"""AtomNAS-A on ImageNet: the reference's supernet (stem 16) and settings, searched and
trained in one run (the paper: 258M multiply-adds, 3.9M params, 74.6 % top-1).

  python -m jaxnas.main --config=configs/atomnas_a_imagenet.py --workdir=runs/atomnas_a

The global batch is 512 (the reference's 64 per GPU on 8 GPUs); the learning rate scales
with it (0.016 x batch / 256). ``:smoke`` runs a small network for a few steps.
"""

from jaxnas.methods import atomnas


def get_config(arg=None):
  c = atomnas.get_config()
  c.model.stem = 16
  c.atomnas.rho = atomnas.RHO['a']
  return atomnas.METHOD.apply_variant(c, arg, 'atomnas_a_imagenet.py')
