"""Tests of AtomNAS: the space of atoms (jaxnas.spaces.atomnas) and the one-stage run
(jaxnas.methods.atomnas).

The network tests use one hand-built architecture, `ARCH`: a stem of 4 channels at
stride 1, the fixed first block, a stride-2 block 4 -> 6 with branches k3 (8 atoms) and
k5 (2 atoms), a residual block 6 -> 6 with k3 (6) and k5 (4), and a head of 10, on 8x8
single-channel images (4x4 after the stride-2 block). Forwards use impl='xla'.
"""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnas
from jaxnas import base_config
from jaxnas import common
from jaxnas import search
from jaxnas import train
from jaxnas.methods import atomnas as method
from jaxnas.spaces import atomnas as A
from test_data import write_fashion_mnist

ARCH = A.Architecture(4, 1, (
    A.Block(4, 4, 1, (3,), (4,), expand=False),
    A.Block(4, 6, 2, (3, 5), (8, 2)),
    A.Block(6, 6, 1, (3, 5), (6, 4)),
), last=10)
NUM_CLASSES, SIDE = 3, 8
X = jnp.asarray(np.random.default_rng(0).normal(size=(4, SIDE, SIDE, 1)), jnp.float32)


def variables(arch=ARCH, seed=0):
  """Random variables of AtomNet(arch): kernels ~ U(-a, a), a = sqrt(3 / fan_in), BN
  scale ~ U(0.5, 1.5), bias ~ U(-0.3, 0.3), running mean ~ N(0, 0.3), var ~ U(0.5, 2)."""
  model = A.AtomNet(arch, NUM_CLASSES, impl='xla')
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), X, train=False))
  rng = np.random.default_rng(seed)

  def leaf(path, s):
    name = path[-1].key
    if name == 'scale':
      return jnp.asarray(rng.uniform(0.5, 1.5, s.shape), jnp.float32)
    if name == 'bias':
      return jnp.asarray(rng.uniform(-0.3, 0.3, s.shape), jnp.float32)
    if name == 'mean':
      return jnp.asarray(rng.normal(0.0, 0.3, s.shape), jnp.float32)
    if name == 'var':
      return jnp.asarray(rng.uniform(0.5, 2.0, s.shape), jnp.float32)
    fan_in = np.prod(s.shape[:-1]) if len(s.shape) != 4 or s.shape[2] != 1 else np.prod(
        s.shape[:2])
    a = np.sqrt(3.0 / fan_in)
    return jnp.asarray(rng.uniform(-a, a, s.shape), jnp.float32)

  return jax.tree_util.tree_map_with_path(leaf, dict(shapes))


def set_atoms(params, keys_to_idx, scale=0.0, bias=None):
  """params with the dw BN scale (and bias, if given) of the listed atoms set."""
  params = jax.tree.map(lambda x: x, params)
  for (i, k), idx in keys_to_idx.items():
    bn = dict(params[f'block_{i}'][f'k{k}_dw_bn'])
    bn['scale'] = bn['scale'].at[np.asarray(idx)].set(scale)
    if bias is not None:
      bn['bias'] = bn['bias'].at[np.asarray(idx)].set(bias)
    params[f'block_{i}'] = {**params[f'block_{i}'], f'k{k}_dw_bn': bn}
  return params


# ----------------------------------------------------------------------------- costs


def test_multiply_adds_equal_a_hand_count_and_the_traced_count():
  # stem 8*8*9*1*4; block 0 (8x8): 4 x 8*8*(9 + 4); block 1 (8 -> 4): k3 8 x (4*4*(9 + 6)
  # + 8*8*4), k5 2 x (4*4*(25 + 6) + 8*8*4); block 2 (4x4): k3 6 x 4*4*(6 + 9 + 6),
  # k5 4 x 4*4*(6 + 25 + 6); head 4*4*6*10; classifier 10*3.
  hand = (2304 + 4 * 832 + 8 * 496 + 2 * 752 + 6 * 336 + 4 * 592 + 960 + 30)
  assert A.multiply_adds(ARCH, SIDE, NUM_CLASSES, 1) == hand == 16478
  traced = A.architecture_cost(ARCH, image_size=SIDE, num_classes=NUM_CLASSES, in_channels=1)
  assert traced['multiply_adds'] == hand
  # With SE (2 x hidden x width, the width 3 for a 6-channel input, 2 for 4; the first
  # block's 4 channels too) and on the reference supernet.
  se = A.architecture_cost(ARCH, image_size=SIDE, num_classes=NUM_CLASSES, in_channels=1,
                           se=True)
  assert se['multiply_adds'] == hand + 4 * 2 * 2 + 10 * 2 * 2 + 10 * 2 * 3
  assert se['multiply_adds'] == A.multiply_adds(ARCH, SIDE, NUM_CLASSES, 1, se=True)
  supernet = A.supernet()
  assert len(supernet.blocks) == 22 and supernet.atoms() == 31392
  assert A.multiply_adds(supernet, 224, 1000) == A.architecture_cost(
      supernet, image_size=224, num_classes=1000)['multiply_adds']


def test_penalty_equals_its_formula_on_a_hand_built_network():
  params = variables()['params']
  weights = A.penalty_weights(ARCH, SIDE)
  # Costs per atom: block 1 k3 496, k5 752; block 2 k3 336, k5 592 (block 0 is fixed).
  mean = (8 * 496 + 2 * 752 + 6 * 336 + 4 * 592) / 20
  expected_w = {(1, 3): 496 / mean, (1, 5): 752 / mean, (2, 3): 336 / mean,
                (2, 5): 592 / mean}
  assert weights.keys() == expected_w.keys()
  for key, w in expected_w.items():
    assert weights[key] == pytest.approx(w, rel=1e-12)
  expected = sum(w * np.abs(np.asarray(params[f'block_{i}'][f'k{k}_dw_bn']['scale'])).sum()
                 for (i, k), w in expected_w.items())
  np.testing.assert_allclose(float(A.penalty(params, ARCH, weights)), expected, rtol=1e-6)
  # Its gradient is p_b * sign(gamma) on each atom's scale and nothing elsewhere.
  grads = jax.grad(lambda p: A.penalty(p, ARCH, weights))(params)
  g = grads['block_1']['k5_dw_bn']['scale']
  np.testing.assert_allclose(g, expected_w[(1, 5)] * np.sign(
      params['block_1']['k5_dw_bn']['scale']), rtol=1e-6)
  assert float(jnp.abs(grads['block_1']['k5_project']['kernel']).max()) == 0.0


# ----------------------------------------------------------------------------- shrinking


# Atoms removed: block 1's k5 branch whole and three of its k3 atoms, two of block 2's k3.
DEAD = {(1, 3): [0, 3, 7], (1, 5): [0, 1], (2, 3): [1, 4]}


def keep_of(dead=DEAD):
  keep = {}
  for i, b in enumerate(ARCH.blocks):
    for k, h in zip(b.kernels, b.hidden):
      if b.searched:
        mask = np.ones(h, bool)
        mask[dead.get((i, k), [])] = False
        keep[(i, k)] = mask
  return keep


def test_removing_atoms_with_zero_scale_keeps_the_outputs():
  v = variables()
  params = set_atoms(v['params'], DEAD, 0.0)  # their BN bias stays: a constant output
  keep = keep_of()
  small = A.shrink_architecture(ARCH, keep)
  assert [b.hidden for b in small.blocks] == [(4,), (5, 0), (4, 4)]
  new_params = A.shrink_tree(params, ARCH, keep)
  new_stats = A.shrink_batch_stats(v['batch_stats'], params, ARCH, keep)
  assert 'k5_dw' not in new_params['block_1'] and new_params['block_1']['k3_dw'][
      'kernel'].shape == (3, 3, 1, 5)
  big_model = A.AtomNet(ARCH, NUM_CLASSES, impl='xla')
  small_model = A.AtomNet(small, NUM_CLASSES, impl='xla')
  for train_mode in (False, True):
    apply = lambda m, p, s: m.apply({'params': p, 'batch_stats': s}, X, train=train_mode,  # noqa: E731
                                    mutable=['batch_stats'] if train_mode else False)
    big, small_out = apply(big_model, params, v['batch_stats']), apply(
        small_model, new_params, new_stats)
    if train_mode:
      big, small_out = big[0], small_out[0]
    np.testing.assert_allclose(small_out[0], big[0], rtol=1e-5, atol=1e-5)
  # Without the running-mean correction the eval outputs would move.
  uncorrected = A.shrink_tree(v['batch_stats'], ARCH, keep)
  moved = small_model.apply({'params': new_params, 'batch_stats': uncorrected}, X,
                            train=False)[0]
  assert float(jnp.abs(moved - big_model.apply({'params': params, 'batch_stats': v[
      'batch_stats']}, X, train=False)[0]).max()) > 1e-3
  # Multiply-adds after the shrink: 16478 less 3 x 496 + 2 x 752 + 2 x 336.
  assert A.multiply_adds(small, SIDE, NUM_CLASSES, 1) == 16478 - 3 * 496 - 2 * 752 - 2 * 336
  assert A.architecture_cost(small, image_size=SIDE, num_classes=NUM_CLASSES,
                             in_channels=1)["multiply_adds"] == 16478 - 1488 - 1504 - 672


def test_a_residual_block_without_atoms_becomes_the_identity_and_others_keep_one():
  dead = {(1, 3): list(range(8)), (1, 5): [0, 1], (2, 3): list(range(6)),
          (2, 5): list(range(4))}
  keep = A.keep_masks(ARCH, {key: ~m for key, m in keep_of(dead).items()},
                      importance={(1, 3): np.arange(8.0), (1, 5): np.array([0.5, 9.0]),
                                  (2, 3): np.ones(6), (2, 5): np.ones(4)})
  small = A.shrink_architecture(ARCH, keep)
  # Block 1 (stride 2, 4 -> 6) keeps its most important atom (k5 #1); block 2 is gone.
  assert [b.hidden for b in small.blocks] == [(4,), (0, 1), (0, 0)]
  v = variables()
  new_params = A.shrink_tree(v['params'], ARCH, keep)
  assert set(new_params['block_2']) == set()
  y = A.AtomNet(small, NUM_CLASSES, impl='xla').apply(
      {'params': new_params, 'batch_stats': A.shrink_tree(v['batch_stats'], ARCH, keep)},
      X, train=False)[0]
  assert y.shape == (4, NUM_CLASSES) and bool(jnp.all(jnp.isfinite(y)))
  assert 'id' in A.format_architecture(small)
  with pytest.raises(ValueError, match='cannot be the identity'):
    A.from_json({**A.to_json(small), 'blocks': [dict(b, hidden=[0] * len(b['hidden']))
                                                  for b in A.to_json(small)['blocks']]})


def tiny_config():
  c = method.get_config()
  c.data.name = 'fashion_mnist'
  c.data.image_size = None
  c.model.stages = ((1, 4, 1, 1), (2, 6, 1, 2), (2, 6, 1, 1))
  c.model.kernels = (3, 5)
  c.model.stem, c.model.stem_stride, c.model.last = 4, 2, 10
  c.model.dropout = 0.0
  c.model.depthwise_impl = 'xla'
  c.optim.batch_size = 8
  c.optim.epochs = 3
  c.optim.steps_per_epoch = 3
  c.optim.warmup_epochs = 1
  c.optim.lr_decay_epochs = 1
  c.atomnas.rho_ramp_epochs = 1
  c.recalibrate_batches = 2
  c.log_every_steps = 1
  c.checkpoint_every_steps = 2
  c.eval_batch_size = 8
  c.eval_max_examples = 8
  return c


def test_a_step_after_shrinking_equals_the_step_with_the_atoms_zeroed():
  config = tiny_config()
  arch = A.supernet(config.model.stages, 4, 2, 10, (3, 5))
  # Dead: gamma = beta = 0 in the weights and the EMA (an atom the penalty has killed).
  dead = {(1, 3): [0, 5], (1, 5): [1, 2, 3, 4, 6], (2, 5): list(range(12))}
  tx = method.make_optimizer(config, 3)
  model = method.build_model(config, arch, 10)
  state = method.create_state(model, (28, 28, 1), tx, 0)
  state = state.replace(params=set_atoms(state.params, dead, 0.0, 0.0),
                        ema_params=set_atoms(state.ema_params, dead, 0.0, 0.0))
  weights = A.penalty_weights(arch, 28)
  step = jax.jit(method.make_train_step(model, tx, config, 3, weights))
  rng = np.random.default_rng(1)
  batches = [{'image': jnp.asarray(rng.normal(size=(8, 28, 28, 1)), jnp.float32),
              'label': jnp.asarray(rng.integers(0, 10, 8), jnp.int32)} for _ in range(2)]
  state1, _ = step(state, batches[0])  # moments and EMA no longer at their start
  state2, _ = step(state1, batches[1])
  keep = {}
  for (i, k), h in ((key, h) for i, b in enumerate(arch.blocks) if b.searched
                    for key, h in (((i, k), h) for k, h in zip(b.kernels, b.hidden))):
    keep[(i, k)] = np.ones(h, bool)
    keep[(i, k)][dead.get((i, k), [])] = False
  # The dead atoms stayed dead (relu'(0) = 0 and d|g|/dg = 0 at 0).
  assert float(jnp.abs(state1.params['block_1']['k3_dw_bn']['scale'][0])) == 0.0
  small = A.shrink_architecture(arch, keep)
  assert small.blocks[2].hidden == (12, 0)
  small_model = method.build_model(config, small, 10)
  small_step = jax.jit(method.make_train_step(small_model, tx, config, 3, weights))
  shrunk2, _ = small_step(method.shrink_state(state1, arch, keep, 'relu'), batches[1])
  expected = method.shrink_state(state2, arch, keep, 'relu')
  for field in ('params', 'opt_state', 'ema_params', 'batch_stats', 'ema_batch_stats'):
    chex.assert_trees_all_close(getattr(shrunk2, field), getattr(expected, field),
                                rtol=2e-5, atol=2e-6)
  assert int(shrunk2.step) == 2


# ----------------------------------------------------------------------------- optimizer


def test_rmsprop_schedule_and_ema_follow_the_reference_formulas():
  config = tiny_config()
  config.optim.batch_size = 512
  config.optim.warmup_epochs = 5
  config.optim.lr_decay_epochs = 2.4
  schedule = method.lr_schedule(config, 100)
  # Warm-up from 0.016 to 0.032 over 500 steps, then 0.032 * 0.97^floor(t / 240).
  np.testing.assert_allclose(schedule(0), 0.016, rtol=1e-6)
  np.testing.assert_allclose(schedule(250), 0.024, rtol=1e-6)
  np.testing.assert_allclose(schedule(500), 0.032 * 0.97 ** 2, rtol=1e-6)
  np.testing.assert_allclose(schedule(1000), 0.032 * 0.97 ** 4, rtol=1e-6)
  # TensorFlow's RMSProp: v = 0.9 v + 0.1 g^2 from 0, m = 0.9 m + lr g / sqrt(v + 1e-3).
  tx = method.make_optimizer(config, 100)
  w = {'w': jnp.array([1.0, -2.0])}
  s = tx.init(w)
  v, m = np.zeros(2), np.zeros(2)
  for t, g in enumerate((np.array([0.5, -1.0]), np.array([2.0, 0.1]))):
    u, s = tx.update({'w': jnp.asarray(g, jnp.float32)}, s, w)
    v = 0.9 * v + 0.1 * g ** 2
    m = 0.9 * m + float(schedule(t)) * g / np.sqrt(v + 1e-3)
    np.testing.assert_allclose(u['w'], -m, rtol=1e-5)
  # EMA decay: min(0.9999^(512 / 4096), (1 + t) / (10 + t)).
  np.testing.assert_allclose(method.ema_decay(config, 0), 0.1)
  np.testing.assert_allclose(method.ema_decay(config, 10 ** 6), 0.9999 ** 0.125, rtol=1e-7)
  # Weight decay: conv and classifier kernels and the classifier's bias, not BN.
  mask = method.decay_mask(variables()['params'])
  assert mask['classifier'] == {'kernel': True, 'bias': True}
  assert mask['block_1']['k3_dw_bn'] == {'scale': False, 'bias': False}
  assert mask['block_1']['k3_dw'] == {'kernel': True}


# ----------------------------------------------------------------------------- the run


@pytest.fixture(scope='module')
def idx_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp('fmnist_idx')
  write_fashion_mnist(str(directory), np.random.default_rng(0), n_train=48, n_test=8)
  return str(directory)


def run_config(idx_dir, cache):
  c = tiny_config()
  c.data.source = 'idx'
  c.data.data_dir = idx_dir
  c.data.augment = False
  # Atoms die fast here: a threshold above most |gamma| after a few steps.
  c.atomnas.threshold = 0.99
  c.atomnas.shrink_min_macs = 1.0
  c.optim.ema_decay = 0.5
  c.compilation_cache_dir = cache
  return c


def test_run_shrinks_resumes_across_a_shrink_and_exports_the_shrunk_model(tmp_path, idx_dir):
  cache = str(tmp_path / 'cache')
  full = search.run_search(run_config(idx_dir, cache), str(tmp_path / 'full'))
  shrinks = full['recompiles']
  assert len(shrinks) >= 2 and all(s['atoms_removed'] > 0 for s in shrinks)
  assert full['multiply_adds'] < full['supernet_multiply_adds']
  assert full['atoms'] == full['architecture'].atoms() < A.supernet(
      ((1, 4, 1, 1), (2, 6, 1, 2), (2, 6, 1, 1)), 4, 2, 10, (3, 5)).atoms()
  with open(tmp_path / 'full' / 'architecture.json') as f:
    saved = A.from_json(json.load(f)['architecture'])
  assert saved == full['architecture']
  with open(tmp_path / 'full' / 'metrics.jsonl') as f:
    kinds = [json.loads(line)['kind'] for line in f]
  assert kinds.count('shrink') == len(shrinks)

  # The exported model is the shrunk network; its logits equal those of the network
  # built from the saved architecture and the exported variables.
  model = jaxnas.load_model(str(tmp_path / 'full'), 'last')
  assert model.space == 'atomnas' and model.genotype == full['architecture']
  images = np.random.default_rng(2).integers(0, 256, (4, 28, 28), np.uint8)
  logits = model(images)
  x = (images[..., None].astype(np.float32) / 255.0 - model.mean) / model.std
  rebuilt = jax.jit(lambda v, x: A.AtomNet(saved, 10, impl='xla').apply(v, x, train=False)[0])(
      model.variables, jnp.asarray(x))
  np.testing.assert_array_equal(np.asarray(logits), np.asarray(rebuilt))

  # The found network as an evaluation-stage model (e.g. retrained with SE and Swish).
  config = base_config.train_config('atomnas')
  config.data.name, config.genotype = 'fashion_mnist', str(tmp_path / 'full')
  config.model.update(se=True, act='swish')
  summary = train.model_summary(config, train.validate_config(config))
  assert summary['space'] == 'atomnas' and summary['multiply_adds'] > A.multiply_adds(
      saved, 28, 10, 1)  # its SE layers on top

  # Stopped after the first shrink (epoch 1 = step 3, checkpoint 4), resumed: the same run.
  stopped = str(tmp_path / 'stopped')
  search.run_search(run_config(idx_dir, cache), stopped, stop_at_step=5)
  resumed = search.run_search(run_config(idx_dir, cache), stopped)
  assert resumed['architecture'] == full['architecture']
  assert [r['step'] for r in resumed['recompiles']] == [r['step'] for r in shrinks]
  assert resumed['test_top1'] == full['test_top1']
  a = jaxnas.load_model(stopped, 'last').variables
  b = model.variables
  chex.assert_trees_all_equal(a, b)


def test_bad_fields_fail_in_one_sentence_naming_the_field():
  cases = [('atomnas.rho', -1.0), ('atomnas.threshold', -1e-3),
           ('model.stages', ((1, 8, 1, 2), (6, 16, 2, 2), (6, 24, 2, 2), (6, 32, 2, 2),
                             (6, 40, 2, 2), (6, 48, 1, 2))),
           ('model.stages', ((6, 8, 1, 1), (6, 16, 2, 2))),
           ('model.act', 'gelu'), ('optim.ema_decay', 1.0)]
  for field, value in cases:
    config = tiny_config()
    section, name = field.split('.')
    config[section][name] = value
    with pytest.raises(common.ConfigError, match=f'config.{field}') as e:
      search.validate_config(config)
    assert '\n' not in str(e.value)


@pytest.mark.parametrize('name', ['atomnas_a_imagenet', 'atomnas_b_imagenet',
                                  'atomnas_c_imagenet', 'atomnas_cifar',
                                  'atomnas_fashion_mnist'])
def test_every_config_and_its_smoke_variant_validates(name):
  import importlib  # pylint: disable=g-import-not-at-top
  module = importlib.import_module(f'configs.{name}')
  for arg in (None, 'smoke'):
    config = module.get_config(arg)
    search.validate_config(config)
    summary = search.method_of(config).summary(config)
    assert summary['params'] > 0 and summary['multiply_adds'] > 0 and summary['atoms'] > 0
  # The three ImageNet targets: the reference's stems and penalties.
  if name.endswith('imagenet'):
    config = module.get_config()
    assert (config.model.stem, config.atomnas.rho) == {
        'a': (16, 1.8e-4), 'b': (32, 1.2e-4), 'c': (32, 1.0e-4)}[name[8]]
