"""AtomNAS on Fashion-MNIST, offline: a small supernet of atoms searched and trained in one
run on the 2-core CPU (``:smoke`` for a few steps).

  python -m jaxnas.main --config=configs/atomnas_fashion_mnist.py --workdir=runs/atomnas_fmnist
"""

from jaxnas.methods import atomnas


def get_config(arg=None):
  c = atomnas.get_config()
  c.data.name = 'fashion_mnist'
  c.data.image_size = None
  c.data.augment = False
  c.data.max_examples = 10000
  # 28 px: stem at stride 1, then 28 -> 14 -> 7.
  c.model.stages = ((1, 8, 1, 1), (3, 16, 2, 2), (3, 24, 2, 2), (3, 32, 1, 1))
  c.model.stem = 8
  c.model.stem_stride = 1
  c.model.last = 128
  c.model.dropout = 0.0
  c.optim.batch_size = 128
  c.optim.epochs = 8
  c.optim.warmup_epochs = 1.0
  c.optim.base_learning_rate = 0.016 * 4
  c.optim.lr_decay_epochs = 1.0
  c.optim.lr_decay = 0.9
  c.optim.ema_decay = 0.99
  c.atomnas.rho = 2e-3
  c.atomnas.rho_ramp_epochs = 2
  c.atomnas.shrink_min_macs = 1e5
  c.recalibrate_batches = 4
  c.log_every_steps = 20
  c.checkpoint_every_steps = 200
  c.eval_batch_size = 1000
  c.eval_max_examples = 2000
  return atomnas.METHOD.apply_variant(c, arg, 'atomnas_fashion_mnist.py')
