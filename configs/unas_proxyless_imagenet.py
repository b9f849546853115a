"""UNAS search on ImageNet in the ProxylessNAS (GPU) space (Vahdat et al. 2020), with the
settings of the reference's commands.sh.

21 searchable layers (MBConv kernel {3,5,7} x expansion {3,6}, plus 'zero' in the 15
layers that keep their width), one architecture per batch (8 GPUs x 24 = batch 192 there),
REBAR, logits softened with eps 0.08, the generalization-gap objective on a 10 %
validation split, no paired-input penalty; 20 warm-up epochs (weights only) and 15
search epochs; weights Adam 3e-4 (wd 3e-4), arch Adam 1e-3; the latency term
0.1 * ramp * relu(latency - 10 ms) with a latency surrogate measured at the start of the
run on its own backend (200 sampled networks, 24 images each, median of 10 runs).

  python -m jaxnas.main --config=configs/unas_proxyless_imagenet.py --workdir=/tmp/unas_in

Needs ImageNet prepared with TFDS (see the README); a GPU/TPU job, not run with jaxnas
yet. The reference's 10 ms target was set for its GPUs: set
``--config.unas.latency_target_ms`` for the hardware that times the networks.
``configs/unas_proxyless_imagenet.py:smoke`` (a tiny skeleton, 64 px) checks a setup end
to end on CPU.
"""

from jaxnas.methods import unas


def get_config(arg=None):
  config = unas.get_config('proxyless')
  config.data.name = 'imagenet2012'
  config.data.image_size = 224
  config.data.train_portion = 0.9
  config.data.augment = True
  config.model.width_multiplier = 1.0
  config.unas.estimator = 'rebar'
  config.unas.temperature = 0.4
  config.unas.soften_eps = 0.08
  config.unas.sampling = 'batch'
  config.unas.objective = 'gen_gap'
  config.unas.gen_gap_weight = 0.5
  config.unas.paired_input_penalty = 0.0
  config.unas.latency_model = 'measure'
  config.unas.latency_target_ms = 10.0
  config.unas.latency_scale = 0.1
  config.unas.latency_ramp_steps = 30000
  config.optim.batch_size = 192
  config.optim.epochs = 35
  config.optim.warmup_epochs = 20
  config.optim.learning_rate = 3e-4
  config.optim.learning_rate_min = 1e-4
  config.optim.weight_decay = 3e-4
  config.optim.arch_learning_rate = 1e-3
  config.optim.arch_learning_rate_min = 3e-4
  config.eval_batch_size = 250
  config = unas.METHOD.apply_variant(config, arg, 'unas_proxyless_imagenet')
  if arg == 'smoke':
    config.data.image_size = 64
    config.unas.latency_samples = 20
    config.unas.latency_target_ms = 1.0
  return config
