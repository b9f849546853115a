"""Tests of UNAS's ProxylessNAS (GPU) space (jaxnas.spaces.proxyless).

Forward passes use one tiny supernet: channels (stem 8, first block 4, stages 8 and
12, last conv 16), two stages of 3 and 2 layers (strides 2 and 1), 32x32 images. So it
has both kinds of layer groups (a scanned stack, layers 2-3, and single layers) and a
channel-changing layer at stride 1 without a residual (layer 4, as layer 13 of the
paper's network). The paper-size network is only traced (parameter and multiply-add
counts). Parameters come from `random_variables` (conftest); each forward is compiled
once for the module. Eval-mode forwards use impl='xla' (the depthwise convs are
`convolution`s in the compiled program); train-mode ones impl='auto' (on CPU the native
or shifted-sum kernels).
"""

import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnas.spaces import proxyless as px

OPS = px.PROXYLESS_OPS
N = len(OPS)
ZERO = OPS.index('zero')
B = 4
SKELETON = dict(channels=(8, 4, 8, 12, 16), depths=(3, 2), strides=(2, 1))
DEPTHS = SKELETON['depths']
LAYERS = sum(DEPTHS)
MODEL = px.ProxylessNetwork(10, **SKELETON, impl='xla')
X = jnp.asarray(np.random.default_rng(0).normal(size=(B, 32, 32, 3)), jnp.float32)
# 'zero' in the scanned stack (layer 2) and in a single layer (5); an expansion-6 op at
# stride 2 (layer 1) and at stride 1 into more channels (layer 4).
ARCH = ('mb5_e6', 'zero', 'mb7_e3', 'mb3_e6', 'zero')
DROPOUT_KEY = jax.random.key(7)

_STATE = {}


@pytest.fixture
def variables(random_variables):
  """MODEL's random variables, built once for the module."""
  if 'variables' not in _STATE:
    _STATE['variables'] = random_variables(MODEL, X, _one_hot(ARCH), train=False)
  return _STATE['variables']


def _one_hot(arch):
  return px.one_hot(px.choices_from_architecture(arch, depths=DEPTHS))


def _relaxed(seed, samples):
  """Random relaxed weights (softmax of masked random logits), (samples, layers, ops)."""
  logits = np.random.default_rng(seed).normal(size=(samples, LAYERS, N))
  return {'ops': jax.nn.softmax(px.mask_logits({'ops': logits}, DEPTHS)['ops'], -1)}


@functools.cache
def _compiled(path, train, samples=1):
  """MODEL's forward (train: (logits, new batch_stats), dropout key as the last
  argument), compiled once; impl 'xla' in eval mode, 'auto' in train mode."""
  model = MODEL.clone(impl='auto' if train else 'xla')

  def forward(variables, x, weights, key):
    if not train:
      return model.apply(variables, x, weights, train=False, path=path)
    logits, state = model.apply(variables, x, weights, train=True, path=path,
                                mutable=['batch_stats'], rngs={'dropout': key})
    return logits, state['batch_stats']

  weights = jax.eval_shape(lambda: _relaxed(0, samples))
  variables = jax.eval_shape(lambda: _STATE['variables'])
  return jax.jit(forward).lower(variables, X, weights, DROPOUT_KEY).compile()


# --- skeleton and architecture parameters ----------------------------------------------


def test_skeleton_of_the_paper():
  layers = px.layer_specs()
  assert len(layers) == 21
  assert px.channel_changing_layers() == (1, 5, 9, 13, 17, 21)
  changing = [l for l in layers if l.changes_channels]
  assert [l.number for l in changing] == [1, 5, 9, 13, 17, 21]
  assert [l.c_out for l in changing] == [32, 56, 112, 128, 256, 432]
  assert [l.number for l in layers if l.stride == 2] == [1, 5, 9, 17]
  assert layers[0].c_in == 24
  # The 15 other layers keep their channels and add their input; layer 13 (stride 1,
  # 112 -> 128) does not.
  assert [l.number for l in layers if l.residual] == [
      n for n in range(1, 22) if n not in (1, 5, 9, 13, 17, 21)]
  assert px.stages() == [(1, 4), (5, 8), (9, 12), (13, 16), (17, 20), (21, 21)]
  assert px.resolve_channels(width_multiplier=0.5) == (20, 12, 16, 28, 56, 64, 128, 216,
                                                       864)
  with pytest.raises(ValueError, match='len\\(depths\\) \\+ 3'):
    px.layer_specs((8, 8, 8), (1, 1), (2, 2))


def test_arch_shapes_and_valid_masks():
  assert px.arch_shapes() == {'ops': (21, 7)}
  assert px.arch_shapes(DEPTHS, 6) == {'ops': (5, 6)}
  mask = px.valid_masks()['ops']
  chex.assert_shape(mask, (21, 7))
  rows = np.array([0, 4, 8, 12, 16, 20])
  assert not mask[rows, ZERO].any()
  assert mask[np.setdiff1d(np.arange(21), rows)].all() and mask[:, :ZERO].all()
  assert mask.sum() == 21 * 7 - 6
  # Without 'zero' among the primitives every op is valid everywhere.
  assert px.valid_masks(DEPTHS, OPS[:4])['ops'].all()
  with pytest.raises(ValueError, match='at least one MBConv'):
    px.valid_masks(DEPTHS, ('zero',))


def test_masked_sampling_never_picks_zero_in_channel_changing_layers():
  valid = px.valid_masks()['ops']
  changing = np.array(px.channel_changing_layers()) - 1
  # 'zero' gets the largest raw logit everywhere: only the mask keeps it out.
  logits = np.zeros((21, N))
  logits[:, ZERO] = 50.0
  masked = px.mask_logits({'ops': logits})['ops']
  probs = np.asarray(jax.nn.softmax(masked, -1))
  assert (probs[changing, ZERO] == 0.0).all()
  np.testing.assert_allclose(probs[changing, :ZERO], 1 / 6, rtol=1e-6)
  # A gradient never reaches the masked entries.
  g = jax.grad(lambda v: jnp.sum(jax.nn.log_softmax(px.mask_logits({'ops': v})['ops'])))(
      jnp.asarray(logits))
  assert not np.asarray(g)[~valid].any() and np.asarray(g)[valid].any()

  draws = np.asarray(px.random_architecture(jax.random.key(0), num_samples=2000,
                                            arch_logits={'ops': logits})['ops'])
  chex.assert_shape(draws, (2000, 21))
  assert (draws[:, changing] != ZERO).all()
  assert set(np.unique(draws[:, changing])) == set(range(6))
  assert (np.delete(draws, changing, 1) == ZERO).all()  # elsewhere 'zero' wins
  # Uniform (logits None): every valid op is drawn, 'zero' never where invalid.
  uniform = np.asarray(px.random_architecture(jax.random.key(1), num_samples=2000)['ops'])
  assert (uniform[:, changing] != ZERO).all()
  assert set(np.unique(uniform[:, 1])) == set(range(N))
  # Gumbel argmax (UNAS's discrete sample) of the masked logits.
  noise = jax.random.gumbel(jax.random.key(2), (5000, 21, N))
  picks = np.asarray(jnp.argmax(px.mask_logits({'ops': np.zeros((21, N))})['ops'] + noise,
                                -1))
  assert (picks[:, changing] != ZERO).all() and (picks[:, 1] == ZERO).any()


def test_derive_architecture_picks_the_masked_argmax():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(21, N))
  logits[4, ZERO] = 100.0   # layer 5 changes channels: ignored
  logits[5, ZERO] = 100.0   # layer 6 does not
  arch = px.derive_architecture({'ops': logits})
  assert len(arch) == 21 and arch[5] == 'zero'
  for n, op in enumerate(arch):
    allowed = logits[n, :ZERO] if n + 1 in px.channel_changing_layers() else logits[n]
    assert op == OPS[int(np.argmax(allowed))]
  assert arch[4] == OPS[int(np.argmax(logits[4, :ZERO]))]
  # JSON and one-hot round trips, one line per stage.
  assert px.from_json(px.to_json(arch)) == tuple(arch)
  weights = px.one_hot(px.choices_from_architecture(arch))
  chex.assert_shape(weights['ops'], (1, 21, N))
  assert px.derive_architecture({'ops': weights['ops'][0]}) == arch
  assert px.format_architecture(arch).count('|') == 5
  assert not px.is_degenerate(arch) and not px.is_degenerate(px.PROXYLESS_GPU)
  assert px.is_degenerate([op if n + 1 in px.channel_changing_layers() else 'zero'
                           for n, op in enumerate(arch)])
  assert px.format_architecture(px.PROXYLESS_GPU).startswith('mb5_e3 zero zero zero | ')
  with pytest.raises(ValueError, match=r'Layers \[5\] change the channels'):
    px.validate_architecture(arch[:4] + ['zero'] + arch[5:])
  with pytest.raises(ValueError, match='one op per layer: 21'):
    px.validate_architecture(arch[:20])
  with pytest.raises(ValueError, match="arch_logits\\['ops'\\] of shape \\(21, 7\\)"):
    px.derive_architecture({'ops': logits[:, :6]})


def test_weights_are_checked_before_compute(variables):
  weights = _relaxed(0, B)
  with pytest.raises(ValueError, match="path='discrete' runs one architecture"):
    MODEL.apply(variables, X, weights, train=False, path='discrete')
  with pytest.raises(ValueError, match=r"weights\['ops'\] must be \(S,\) \+ \(5, 7\)"):
    MODEL.apply(variables, X, {'ops': weights['ops'][:2]}, train=False)
  with pytest.raises(ValueError, match='path must be one of'):
    MODEL.apply(variables, X, _one_hot(ARCH), train=False, path='hard')
  with pytest.raises(ValueError, match="rngs=\\{'dropout': key\\}"):
    MODEL.apply(variables, X, weights, train=True, mutable=['batch_stats'])


def test_both_paths_have_the_same_variables():
  w = _one_hot(ARCH)
  trees = [jax.eval_shape(lambda p=path: MODEL.init(jax.random.key(0), X, w, train=True,
                                                   path=p)) for path in px.PATHS]
  shapes = [jax.tree_util.tree_map(lambda a: a.shape, t) for t in trees]
  assert shapes[0] == shapes[1]
  params = shapes[0]['params']
  assert sorted(k for k in params if k.startswith('layer')) == [
      'layer_1', 'layer_4', 'layer_5', 'layers_2_3']
  stack = params['layers_2_3']  # layers 2 and 3, 8 -> 8 channels, on a layer axis
  assert stack['mb7_e6_expand'] == (2, 8, 48)
  assert stack['mb7_e6_dw'] == (2, 7, 7, 1, 48)
  assert stack['mb5_e3_project'] == (2, 24, 8)
  assert stack['mb3_e6_bn1'] == {'scale': (2, 48), 'bias': (2, 48)}
  assert params['layer_4']['mb3_e3_expand'] == (1, 8, 24)  # 8 -> 12, hidden 3 x 8
  assert params['layer_4']['mb3_e3_project'] == (1, 24, 12)
  assert len(params['layer_1']) == 6 * 6  # 3 kernels and 3 BNs per op, no 'zero'
  assert shapes[0]['batch_stats']['layer_5']['mb5_e6_bn2']['var'] == (1, 12)


# --- the two paths ---------------------------------------------------------------------


def _stats(tree, group, bn, pos=0):
  return tuple(np.asarray(tree[group][bn][k][pos]) for k in ('mean', 'var'))


@pytest.mark.parametrize('train', (False, True))
def test_discrete_path_equals_mixed_path_on_one_hot_weights(train, variables):
  w = _one_hot(ARCH)
  mixed = _compiled('mixed', train)(variables, X, w, DROPOUT_KEY)
  discrete = _compiled('discrete', train)(variables, X, w, DROPOUT_KEY)
  if not train:
    np.testing.assert_allclose(discrete, mixed, rtol=1e-5, atol=1e-5)
    return
  # The same dropout on the 'zero' layers, the same BatchNorm batches for chosen ops.
  np.testing.assert_allclose(discrete[0], mixed[0], rtol=1e-4, atol=1e-5)
  new_mixed, new_discrete, old = mixed[1], discrete[1], variables['batch_stats']
  chosen = [('layer_1', 'mb5_e6_bn0', 0), ('layer_1', 'mb5_e6_bn2', 0),
            ('layers_2_3', 'mb7_e3_bn1', 1), ('layer_4', 'mb3_e6_bn2', 0),
            ('first_block', None, None)]
  for group, bn, pos in chosen[:-1]:
    for a, b, c in zip(_stats(new_discrete, group, bn, pos),
                       _stats(new_mixed, group, bn, pos), _stats(old, group, bn, pos)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
      assert np.abs(a - c).max() > 1e-3
  # Ops not chosen (and layer 2's ops, layer 2 being 'zero') keep their statistics in
  # the discrete path; the mixed path moves every op's.
  for group, bn, pos in (('layer_1', 'mb3_e3_bn2', 0), ('layers_2_3', 'mb7_e3_bn1', 0),
                         ('layer_5', 'mb3_e3_bn0', 0)):
    for a, c in zip(_stats(new_discrete, group, bn, pos), _stats(old, group, bn, pos)):
      np.testing.assert_array_equal(a, c)
    assert np.abs(_stats(new_mixed, group, bn, pos)[0] - _stats(old, group, bn, pos)[0]
                  ).max() > 1e-3
  np.testing.assert_allclose(new_discrete['feature_mix_bn']['mean'],
                             new_mixed['feature_mix_bn']['mean'], rtol=1e-4, atol=1e-5)


def test_zero_is_followed_by_dropout_in_train_mode_only(variables):
  """Train mode: the output depends on the dropout key through the 'zero' layers (both
  paths), and not where no layer is 'zero'."""
  w = _one_hot(ARCH)
  other = jax.random.key(8)
  for path in px.PATHS:
    a = _compiled(path, True)(variables, X, w, DROPOUT_KEY)[0]
    b = _compiled(path, True)(variables, X, w, other)[0]
    assert np.abs(a - b).max() > 1e-3, path
  no_zero = _one_hot(('mb5_e6', 'mb3_e3', 'mb7_e3', 'mb3_e6', 'mb5_e3'))
  a = _compiled('discrete', True)(variables, X, no_zero, DROPOUT_KEY)[0]
  b = _compiled('discrete', True)(variables, X, no_zero, other)[0]
  np.testing.assert_array_equal(a, b)


def _hlo_convolutions(text):
  """(convolutions outside any conditional, convolutions that one run executes at most)
  of a compiled HLO module: a conditional executes its largest branch at most, a while
  loop its body known_trip_count times (lax.scan's loops carry that count)."""
  computations, name, entry = {}, None, None
  for line in text.splitlines():
    header = re.match(r'(ENTRY )?%([^\s(]+) .*\{$', line)
    if header:
      name = header.group(2)
      entry = name if header.group(1) else entry
      computations[name] = []
    elif name and line.startswith('  '):
      computations[name].append(line)

  @functools.cache
  def count(name, branches):  # with ``branches``, the convolutions inside conditionals
    own = 0
    for line in computations[name]:
      own += ' convolution(' in line
      cond = re.search(r'branch_computations=\{([^}]*)\}', line)
      if cond:
        if branches:
          own += max(count(b.strip().lstrip('%'), True) for b in cond.group(1).split(','))
        continue
      loop = re.search(r'body=%([^\s,)]+)', line)
      if loop:
        trips = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', line)
        assert trips, line  # a loop of unknown length: the count would be wrong
        own += int(trips.group(1)) * count(loop.group(1), branches)
        continue
      for callee in re.findall(r'(?:calls|to_apply)=%([^\s,)]+)', line):
        own += count(callee, branches)
    return own

  return count(entry, False), count(entry, True)


def test_discrete_path_compiles_to_conditionals_that_run_one_op(variables):
  del variables  # only for _compiled's shapes
  mixed, discrete = (_compiled(p, False).as_text() for p in px.PATHS)
  # One switch per layer group: layer 1, layers 2-3 (one switch in the scan's body),
  # layers 4 and 5 (XLA may add more).
  assert discrete.count(' conditional(') >= 4
  assert ' conditional(' not in mixed
  assert ' while(' in discrete and ' while(' in mixed  # the stack of layers 2-3
  # Depthwise convs are `convolution`s (impl='xla'), and so is the stem's 3x3 conv: two
  # outside the searchable layers (stem, the fixed first block).
  outside, run = _hlo_convolutions(discrete)
  assert outside == 2  # every candidate op's convolution is inside a switch
  assert run == 2 + LAYERS  # at most one op (one depthwise conv) per layer
  # The mixed path runs every op: one depthwise conv per kernel size and layer.
  assert _hlo_convolutions(mixed) == (2 + 3 * LAYERS,) * 2


@functools.cache
def _logits_and_grads():
  """Eval mode, one architecture per example: (loss, logits), d loss / d weights."""
  labels = jnp.arange(B) % 10

  def loss(variables, weights):
    logits = MODEL.apply(variables, X, weights, train=False)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1)
    return jnp.mean(nll), logits

  return jax.jit(jax.value_and_grad(loss, argnums=1, has_aux=True))


def test_mixed_path_weighs_each_example_by_its_own_sample(variables):
  forward = lambda w: _logits_and_grads()(variables, w)  # noqa: E731
  w = _relaxed(1, B)
  (_, out), grads = forward(w)
  chex.assert_shape(out, (B, 10))
  # Example 1 gets another sample: only its logits move (eval mode: no batch coupling).
  out2 = forward({'ops': w['ops'].at[1].set(w['ops'][2])})[0][1]
  np.testing.assert_array_equal(np.delete(out2, 1, 0), np.delete(out, 1, 0))
  assert np.abs(out2[1] - out[1]).max() > 1e-3
  # The same sample in every row equals one sample for the whole batch (S = 1).
  one = {'ops': w['ops'][:1]}
  np.testing.assert_allclose(forward({'ops': jnp.repeat(one['ops'], B, 0)})[0][1],
                             _compiled('mixed', False)(variables, X, one, DROPOUT_KEY),
                             rtol=1e-5, atol=1e-5)
  # Every valid entry of every example moves the loss; 'zero' where a layer changes
  # channels does not.
  valid = px.valid_masks(DEPTHS)['ops']
  g = np.asarray(grads['ops'])
  assert np.isfinite(g).all() and (np.abs(g)[:, valid] > 0).all()
  assert not g[:, ~valid].any()


def test_discrete_path_gradient_reaches_the_chosen_entries(variables):
  """One-hot weights (straight-through): d loss / d weights is non-zero exactly at the
  chosen op of each layer."""
  w = _one_hot(ARCH)

  def loss(weights):
    logits = MODEL.apply(variables, X, weights, train=False, path='discrete')
    return jnp.mean(jax.nn.log_softmax(logits)[:, 0])

  g = np.asarray(jax.jit(jax.grad(loss))(w)['ops'])
  np.testing.assert_array_equal(g != 0, np.asarray(w['ops']) != 0)


# --- the evaluation network ----------------------------------------------------------


def _eval_variables(variables, arch):
  """The supernet's variables of ``arch``'s ops, in ProxylessEvalNetwork's tree."""
  out = {}
  for col in ('params', 'batch_stats'):
    tree = variables[col]
    new = {k: tree[k] for k in ('stem_conv', 'stem_bn', 'first_block', 'feature_mix_conv',
                                'feature_mix_bn', 'classifier') if k in tree}
    for first, last in px.stages(DEPTHS):
      for lo, hi in ((first, first), (first + 1, last)):
        for n in range(lo, hi + 1):
          op = arch[n - 1]
          if op == 'zero':
            continue
          group = tree[f'layer_{lo}' if lo == hi else f'layers_{lo}_{hi}']
          at = lambda a, i=n - lo: a[i]  # noqa: E731
          layer = {f'{m}_bn': jax.tree_util.tree_map(at, group[f'{op}_bn{b}'])
                   for b, m in enumerate(('expand', 'dw', 'project'))}
          if col == 'params':
            layer.update({m: {'kernel': group[f'{op}_{m}'][n - lo]}
                          for m in ('expand', 'dw', 'project')})
          new[f'layer_{n}'] = layer
    out[col] = new
  return out


def test_eval_network_equals_the_discrete_path_with_its_variables(variables):
  """The derived network alone (zero layers removed), with the supernet's variables of
  its ops, computes what the discrete path computes: same skeleton, same blocks."""
  model = px.ProxylessEvalNetwork(ARCH, 10, **SKELETON, impl='xla')
  eval_vars = _eval_variables(variables, ARCH)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), X, train=False))
  assert jax.tree_util.tree_map(lambda a: a.shape, shapes) == jax.tree_util.tree_map(
      lambda a: a.shape, eval_vars)
  out, aux = jax.jit(lambda v: model.apply(v, X, train=False))(eval_vars)
  assert aux is None
  expected = _compiled('discrete', False)(variables, X, _one_hot(ARCH), DROPOUT_KEY)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_eval_network_drops_zero_layers_and_is_smaller_than_the_supernet():
  model = px.ProxylessEvalNetwork(ARCH, 10, **SKELETON)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), X, train=False))['params']
  assert sorted(k for k in params if k.startswith('layer')) == [
      'layer_1', 'layer_3', 'layer_4']
  assert 'expand_bn' in params['layer_3'] and 'scale' in params['layer_3']['expand_bn']
  supernet = jax.eval_shape(lambda: MODEL.init(jax.random.key(0), X, _one_hot(ARCH),
                                               train=True))['params']
  assert px.count_params(params) < px.count_params(supernet) / 5
  with pytest.raises(ValueError, match=r'Layers \[4\] change the channels'):
    px.ProxylessEvalNetwork(ARCH[:3] + ('zero', 'zero'), 10, **SKELETON).init(
        jax.random.key(0), X, train=False)


def _mbconv_params(c_in, c_out, k, e):
  h = c_in * e
  expand = c_in * h + 2 * h if e > 1 else 0
  return expand + k * k * h + 2 * h + h * c_out + 2 * c_out


def _mbconv_macs(c_in, c_out, k, e, hw_in, stride):
  h, hw_out = c_in * e, hw_in // stride
  expand = hw_in ** 2 * c_in * h if e > 1 else 0
  return expand + hw_out ** 2 * h * (k * k + c_out)


def test_paper_size_network_params_and_multiply_adds_by_hand():
  """The default skeleton with every layer mb3_e3, counted from the layer formulas:
  stem 3x3 s2 conv 3 -> 40 + BN; fixed MBConv k3 e1 40 -> 24; per stage its first layer
  into the stage's channels, then 3 (the last stage: 0) layers at those channels; 1x1
  conv 432 -> 1728 + BN; linear 1728 -> 1000 with bias. BNs have scale and bias."""
  arch = ('mb3_e3',) * 21
  stages = [(32, 2), (56, 2), (112, 2), (128, 1), (256, 2), (432, 1)]
  params = 27 * 40 + 2 * 40 + _mbconv_params(40, 24, 3, 1)
  macs = 112 ** 2 * 40 * 27 + _mbconv_macs(40, 24, 3, 1, 112, 1)
  c_in, hw = 24, 112
  for s, (c, stride) in enumerate(stages):
    params += _mbconv_params(c_in, c, 3, 3)
    macs += _mbconv_macs(c_in, c, 3, 3, hw, stride)
    hw //= stride
    rest = 3 if s < 5 else 0
    params += rest * _mbconv_params(c, c, 3, 3)
    macs += rest * _mbconv_macs(c, c, 3, 3, hw, 1)
    c_in = c
  assert hw == 7
  params += 432 * 1728 + 2 * 1728 + 1728 * 1000 + 1000
  macs += 7 ** 2 * 432 * 1728 + 1728 * 1000
  assert px.architecture_cost(arch) == {'params': params, 'multiply_adds': macs}
  # ProxylessNAS (GPU) itself: 465M multiply-adds, as its paper reports.
  cost = px.architecture_cost(px.PROXYLESS_GPU)
  assert round(cost['multiply_adds'] / 1e6) == 465, cost
