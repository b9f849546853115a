"""Evaluation networks: shapes, auxiliary head, drop path, cutout, parameter counts,
multiply-adds, random genotypes and malformed genotypes; the ProxylessNAS space's network
and its training options."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import eval_cifar
from configs import eval_imagenet
from configs import eval_proxyless_imagenet
from jaxnas import data
from jaxnas import flops
from jaxnas import genotypes
from jaxnas import train
from jaxnas.ops import primitives as ops
from jaxnas.spaces import darts_eval
from jaxnas.spaces import proxyless

RNGS = {'params': jax.random.key(0), 'drop_path': jax.random.key(1)}


def network(name='PC_DARTS_cifar', **kwargs):
  return darts_eval.EvalNetwork(darts_eval.freeze(genotypes.PUBLISHED[name]), **kwargs)


@pytest.mark.parametrize('stem,size,classes', [('cifar', 32, 10), ('imagenet', 224, 1000)])
def test_network_and_auxiliary_head_shapes(stem, size, classes):
  model = network(num_classes=classes, C=4, layers=5, stem=stem)
  x = jnp.zeros((2, size, size, 3))
  variables = jax.eval_shape(lambda: model.init(RNGS, x, train=True, drop_rate=0.1))
  logits, aux = jax.eval_shape(
      lambda v: model.apply(v, x, train=True, drop_rate=0.1, rngs=RNGS,
                            mutable=['batch_stats'])[0], variables)
  chex.assert_shape(logits, (2, classes))
  chex.assert_shape(aux, (2, classes))
  logits, aux = jax.eval_shape(lambda v: model.apply(v, x, train=False), variables)
  chex.assert_shape(logits, (2, classes))
  assert aux is None
  # The head reads cell 2L//3 = 3 (8x8 for CIFAR, 7x7 for ImageNet); its 768-conv covers
  # the whole 2x2 pooled map, as in both references.
  head = variables['params']['auxiliary_head']
  chex.assert_shape(head['Conv_0']['kernel'], (2, 2, 128, 768))
  assert ('BatchNorm_1' in head) == (stem == 'cifar')
  assert 'auxiliary_head' not in jax.eval_shape(
      lambda: network(num_classes=classes, C=4, layers=5, stem=stem, auxiliary=False).init(
          RNGS, x, train=True))['params']


@pytest.mark.parametrize('kind,size', [('cifar', 8), ('imagenet', 7)])
def test_auxiliary_head_alone(kind, size):
  head = darts_eval.AuxiliaryHead(10, kind)
  x = jnp.ones((3, size, size, 6))
  variables = head.init(jax.random.key(0), x, train=True)
  out, _ = head.apply(variables, x, train=True, mutable=['batch_stats'])
  chex.assert_shape(out, (3, 10))


def test_drop_path_zeroes_whole_samples_with_the_rate():
  rate, n = 0.3, 20000
  x = jax.random.uniform(jax.random.key(0), (n, 3, 3, 2), minval=0.5, maxval=1.0)
  y = np.asarray(darts_eval.drop_path(x, jnp.float32(rate), jax.random.key(1)))
  dropped = np.all(y == 0, axis=(1, 2, 3))
  kept = np.all(np.isclose(y, np.asarray(x) / (1 - rate)), axis=(1, 2, 3))
  assert np.all(dropped | kept)  # every sample entirely dropped or entirely kept
  sigma = np.sqrt(rate * (1 - rate) / n)
  assert abs(dropped.mean() - rate) < 4 * sigma
  np.testing.assert_allclose(np.asarray(darts_eval.drop_path(x, jnp.float32(0.0),
                                                             jax.random.key(2))), x)


def _cell_outputs(op, drop_rate, train_mode, key=1):
  edges = tuple((op, j) for j in (0, 1, 0, 1))  # 2 nodes
  cell = darts_eval.EvalCell(edges, (2, 3), 4, reduction=False, reduction_prev=False)
  s = jax.random.normal(jax.random.key(0), (64, 6, 6, 4))
  variables = cell.init(RNGS, s, s, True, 0.5)
  out = cell.apply(variables, s, s, train_mode, drop_rate,
                   rngs={'drop_path': jax.random.key(key)}, mutable=['batch_stats'])[0]
  return np.asarray(out)


def test_drop_path_spares_identity_and_is_off_in_eval():
  # skip_connect at stride 1 is the identity: drop path leaves it alone.
  np.testing.assert_allclose(_cell_outputs('skip_connect', 0.9, True),
                             _cell_outputs('skip_connect', None, True), rtol=1e-6)
  # Any other op is dropped per sample during training ...
  pooled = _cell_outputs('max_pool_3x3', 0.5, True)
  assert not np.allclose(pooled, _cell_outputs('max_pool_3x3', None, True))
  sample_zero = np.all(pooled[..., :4] == 0, axis=(1, 2, 3))
  assert 0 < sample_zero.mean() < 0.6  # node 2 zero when both of its edges are dropped
  # ... and never in evaluation mode.
  np.testing.assert_allclose(_cell_outputs('max_pool_3x3', 0.5, False),
                             _cell_outputs('max_pool_3x3', None, False), rtol=1e-6)


def test_network_eval_ignores_drop_rate():
  model = network(num_classes=10, C=4, layers=3)
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  variables = model.init(RNGS, x, train=True, drop_rate=0.0)
  a, _ = model.apply(variables, x, train=False)
  b, _ = model.apply(variables, x, train=False, drop_rate=0.9)
  np.testing.assert_array_equal(a, b)


def test_cutout_zeroes_the_clipped_square():
  images = np.ones((3, 10, 12, 2), np.float32)
  centers = np.array([[5, 6], [0, 0], [9, 11]])
  out = data.cutout(images, centers, 4)
  zero = np.all(out == 0, axis=-1)
  assert zero[0].sum() == 16 and np.all(zero[0, 3:7, 4:8])
  assert zero[1].sum() == 4 and np.all(zero[1, 0:2, 0:2])  # clipped at the corner
  assert zero[2].sum() == 9 and np.all(zero[2, 7:10, 9:12])  # rows 7..9, columns 9..11
  np.testing.assert_array_equal(out[~zero], 1.0)


def test_train_batches_apply_cutout_deterministically():
  spec = data.DATASETS['fashion_mnist']
  images = np.full((20, 28, 28, 1), 200, np.uint8)
  ds = data.InMemoryDataset('fashion_mnist', 'train', spec, images, np.zeros(20, np.int32))
  batches = data.TrainBatches(ds, np.arange(20), 4, seed=3, augment=False, cutout_length=8)
  a, b = batches.batch(2), batches.batch(2)
  np.testing.assert_array_equal(a['image'], b['image'])
  zero = (a['image'] == 0).reshape(4, -1).sum(1)
  assert np.all((zero > 0) & (zero <= 64))
  assert batches.steps_per_epoch == 5


@pytest.mark.parametrize('config_module,genotype,expected', [
    (eval_cifar, 'PC_DARTS_cifar', 3.635e6),
    (eval_cifar, 'DARTS_V2', 3.349e6),
    (eval_imagenet, 'PC_DARTS_image', 5.342e6),
])
def test_published_parameter_counts(config_module, genotype, expected):
  config = config_module.get_config()
  config.genotype = genotype
  summary = train.model_summary(config, train.validate_config(config))
  assert abs(summary['params'] - expected) / expected < 0.002
  assert summary['params_with_auxiliary'] > summary['params']
  assert summary['multiply_adds'] > 4e8


def test_count_macs_matches_hand_formula():
  x = jnp.zeros((1, 8, 8, 3))
  conv_w = jnp.zeros((3, 3, 3, 16))
  dense_w = jnp.zeros((16, 10))
  dw = jnp.zeros((5, 5, 1, 16))

  def f(x):
    y = jax.lax.conv_general_dilated(x, conv_w, (1, 1), 'SAME',
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    y = jax.lax.conv_general_dilated(y, dw, (2, 2), 'SAME', feature_group_count=16,
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return jax.jit(lambda z: jnp.mean(z, (1, 2)) @ dense_w)(y)

  expected = 8 * 8 * 16 * (3 * 9) + 4 * 4 * 16 * 25 + 16 * 10
  assert flops.count_macs(f, x) == expected
  # A scanned body counts once per iteration (the scanned DARTS cell's inner edges).
  scanned = lambda x: jax.lax.scan(lambda c, w: (c @ w, None), x, jnp.zeros((3, 10, 10)))[0]
  assert flops.count_macs(scanned, jnp.zeros((4, 10))) == 3 * 4 * 10 * 10


def test_random_genotypes_are_valid_reproducible_and_varied():
  draws = [genotypes.random_genotype(np.random.default_rng(s)) for s in range(50)]
  again = genotypes.random_genotype(np.random.default_rng(7))
  assert again == draws[7]
  ops_seen = set()
  for g in draws:
    assert genotypes.validate(g, steps=4) == g
    for edges in (g.normal, g.reduce):
      for node in range(4):
        (_, a), (_, b) = edges[2 * node:2 * node + 2]
        assert a != b  # two distinct inputs per node
      ops_seen |= {op for op, _ in edges}
  assert ops_seen == set(genotypes.PRIMITIVES[1:])
  assert len({genotypes.format_genotype(g) for g in draws}) == 50


def _chi_square_p(counts):
  """p-value of counts against equal probabilities (Pearson's chi-square)."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  return stats.chisquare(np.asarray(counts, np.float64)).pvalue


def test_random_genotypes_are_uniform_over_the_space():
  rng = np.random.default_rng(0)
  draws = [genotypes.random_genotype(rng) for _ in range(2000)]
  ops = genotypes.PRIMITIVES[1:]  # every op but 'none'
  for cell in ('normal', 'reduce'):
    op_counts = {op: 0 for op in ops}
    pairs = [{} for _ in range(4)]  # node -> {(a, b): count}
    for g in draws:
      edges = getattr(g, cell)
      for op, _ in edges:
        op_counts[op] += 1
      for node in range(4):
        pair = tuple(sorted(source for _, source in edges[2 * node:2 * node + 2]))
        pairs[node][pair] = pairs[node].get(pair, 0) + 1
    # 16,000 ops over 7 choices: uniform at the 0.1 % level, and the bound rejects a skew.
    assert _chi_square_p(list(op_counts.values())) > 1e-3, op_counts
    for node, counts in enumerate(pairs):
      # Node k reads 2 distinct of its k + 2 inputs: every pair is drawn, equally often.
      assert len(counts) == (node + 2) * (node + 1) // 2
      if node:  # node 0 has one pair, (0, 1)
        assert _chi_square_p(list(counts.values())) > 1e-3, (node, counts)
  skewed = list(op_counts.values())
  skewed[0] = int(skewed[0] * 1.15)  # one op 15 % more frequent than the others
  assert _chi_square_p(skewed) < 1e-3


@pytest.mark.parametrize('edit,message', [
    (lambda d: d['normal'].__setitem__(0, ['conv_7x7', 0]), "unknown op 'conv_7x7'"),
    (lambda d: d['normal'].__setitem__(0, ['sep_conv_3x3', 5]), 'may only read inputs 0..1'),
    (lambda d: d['reduce'].pop(), 'has 7 edges'),
])
def test_malformed_genotype_file_is_a_clear_error(tmp_path, edit, message):
  d = genotypes.to_json(genotypes.DARTS_V2)
  edit(d)
  path = tmp_path / 'bad.json'
  path.write_text(json.dumps(d))
  config = eval_cifar.get_config()
  config.genotype = str(path)
  with pytest.raises(genotypes.GenotypeError, match=message) as e:
    train.validate_config(config)
  assert str(path) in str(e.value) and '\n' not in str(e.value)


def test_auxiliary_head_on_too_small_maps_is_a_config_error():
  config = eval_imagenet.get_config()
  config.data.image_size = 64
  with pytest.raises(train.ConfigError, match=r'config\.model\.auxiliary needs maps of at least'):
    train.validate_config(config)
  config.model.auxiliary = False
  train.validate_config(config)


def test_unknown_genotype_name_is_a_clear_error():
  config = eval_cifar.get_config()
  config.genotype = 'PC_DARTS_cifra'
  with pytest.raises(genotypes.GenotypeError, match='not a published genotype'):
    train.validate_config(config)


def _eta(e, lr=0.025, epochs=600):
  return lr * 0.5 * (1 + np.cos(np.pi * e / epochs))


# eval_cifar runs the reference's timing: epoch e at the cosine's eta(e + 1), 0 at the end.
@pytest.mark.parametrize('schedule,epoch,expected', [
    ('cosine', 0, _eta(1)), ('cosine', 299, 0.0125), ('cosine', 500, _eta(501)),
    ('cosine', 599, 0.0),
    ('linear', 0, 0.5 / 5), ('linear', 4, 0.5 * (245 - 4) / 245),
    ('linear', 100, 0.5 * 145 / 245), ('linear', 247, 0.5 * 3 / (245 * 5)),
])
def test_learning_rate_schedules(schedule, epoch, expected):
  config = eval_imagenet.get_config() if schedule == 'linear' else eval_cifar.get_config()
  lr = train.lr_schedule(config, steps_per_epoch=10)(jnp.int32(epoch * 10 + 3))
  np.testing.assert_allclose(float(lr), expected, rtol=1e-5, atol=1e-9)
  if schedule == 'cosine':  # jaxnas's timing: eta(e)
    config.optim.lr_timing = 'jaxnas'
    lr = train.lr_schedule(config, steps_per_epoch=10)(jnp.int32(epoch * 10 + 3))
    np.testing.assert_allclose(float(lr), _eta(epoch), rtol=1e-5, atol=1e-9)


def test_eval_primitives_have_affine_bn_and_no_pool_bn():
  x = jnp.zeros((1, 8, 8, 4))
  pool = jax.eval_shape(lambda: ops.make_op('avg_pool_3x3', 4, 1, affine=True).init(
      jax.random.key(0), x, True))
  assert not pool  # no BN after pools in the evaluation network
  sep = jax.eval_shape(lambda: ops.make_op('sep_conv_3x3', 4, 1, affine=True).init(
      jax.random.key(0), x, True))
  assert 'scale' in sep['params']['BatchNorm_0']


# ------------------------------------------------------------------ ProxylessNAS space


@pytest.mark.parametrize('name,params,macs', [
    # ProxylessNAS (GPU): the paper's 465M multiply-adds; UNAS's architecture in this space.
    ('PROXYLESS_GPU', 7.120e6, 465.3e6), ('UNAS_PROXYLESS', 5.966e6, 428.0e6)])
def test_proxyless_published_architecture_sizes(name, params, macs):
  config = eval_proxyless_imagenet.get_config()
  config.genotype = name
  summary = train.model_summary(config, train.validate_config(config))
  assert summary['space'] == 'proxyless' and summary['genotype'] == {
      'ops': list(proxyless.PUBLISHED[name])}
  assert abs(summary['params'] - params) / params < 1e-3
  assert abs(summary['multiply_adds'] - macs) / macs < 1e-3
  assert summary['params_with_auxiliary'] == summary['params']  # no auxiliary head
  assert 'mb' in train.format_summary(summary)


def test_weight_decay_can_leave_batch_norm_out_and_momentum_can_be_nesterov():
  config = eval_proxyless_imagenet.get_config('smoke')
  arch = train.validate_config(config)
  model = train.build_model(config, arch, 10)
  params = jax.eval_shape(lambda: model.init(RNGS, jnp.zeros((1, 16, 16, 3)), train=False)
                          )['params']
  mask = train.batch_norm_mask(params)
  flat = {'/'.join(str(getattr(k, 'key', k)) for k in path): m
          for path, m in jax.tree_util.tree_leaves_with_path(mask)}
  assert all(not m for k, m in flat.items() if '_bn/' in k) and any('_bn/' in k for k in flat)
  assert flat['classifier/bias'] and flat['classifier/kernel'] and flat['stem_conv/kernel']
  # With zero gradients, one step shrinks the weights that decay and no others.
  params = jax.tree.map(lambda s: jnp.ones(s.shape), params)
  tx = train.make_optimizer(config, steps_per_epoch=1)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  for k, u in zip(flat, jax.tree.leaves(updates)):
    assert bool(jnp.all(u < 0)) == flat[k], k
  # Nesterov: the first update of a constant gradient g is -lr * (1 + momentum) * g.
  config.optim.update(weight_decay=0.0, grad_clip=0.0)
  tx = train.make_optimizer(config, steps_per_epoch=1)
  g = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(g, tx.init(params), params)
  lr = config.optim.learning_rate
  np.testing.assert_allclose(updates['classifier']['bias'], -lr * 1.9, rtol=1e-6)


@pytest.mark.parametrize('edit,field,message', [
    (lambda c: c.__setitem__('space', 'nasnet'), None, r"config\.space is 'nasnet'"),
    (lambda c: c.model.__setitem__('dropout', 1.0), None, r'config\.model\.dropout must be'),
    (lambda c: c.model.__setitem__('depths', (4, 4)), None, r'config\.model\.channels'),
    (lambda c: c.__setitem__('genotype', 'PROXYLESS_CPU'), 'genotype',
     r'no such architecture file; name a published architecture \(PROXYLESS_GPU'),
])
def test_bad_proxyless_training_config_is_named(edit, field, message):
  config = eval_proxyless_imagenet.get_config()
  edit(config)
  error = genotypes.GenotypeError if field else train.ConfigError
  with pytest.raises(error, match=message):
    train.validate_config(config)


def test_an_architecture_of_another_skeleton_is_named_with_its_file(tmp_path):
  path = tmp_path / 'architecture.json'
  path.write_text(json.dumps({'ops': ['mb3_e3'] * 7}))
  config = eval_proxyless_imagenet.get_config()
  config.genotype = str(tmp_path)  # a search workdir: its architecture.json
  with pytest.raises(genotypes.GenotypeError, match=r'architecture\.json: An architecture '
                     r'names one op per layer: 21 for depths \(4, 4, 4, 4, 4, 1\); got 7'):
    train.validate_config(config)
  config.model.depths = (2, 1, 1, 1, 1, 1)
  assert train.validate_config(config) == ('mb3_e3',) * 7


def test_an_fbnet_architecture_trains_with_its_eval_config(tmp_path):
  from configs import eval_fbnet_imagenet  # pylint: disable=g-import-not-at-top
  from jaxnas.spaces import fbnet  # pylint: disable=g-import-not-at-top
  largest = {f: np.full((5,), len(v) - 1) for f, v in fbnet.FACTORS.items()}
  (tmp_path / 'architecture.json').write_text(json.dumps(fbnet.to_json(largest)))
  for arg in (None, 'smoke'):
    config = eval_fbnet_imagenet.get_config(arg)
    config.genotype = str(tmp_path)
    summary = train.model_summary(config, train.validate_config(config))
    assert summary['space'] == 'fbnet' and summary['params'] > 0
  # At 224 px the search's formula and the count traced in the network agree.
  config = eval_fbnet_imagenet.get_config()
  config.genotype = str(tmp_path)
  summary = train.model_summary(config, train.validate_config(config))
  assert summary['multiply_adds'] == fbnet.multiply_adds(largest, image_size=224,
                                                         num_classes=1000) == 281723776
  config.genotype = str(tmp_path / 'missing')
  with pytest.raises(genotypes.GenotypeError, match='no such architecture file'):
    train.validate_config(config)
