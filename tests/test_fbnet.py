"""Tests of the FBNetV2-like space (jaxnas.spaces.fbnet).

Forward passes use one tiny supernet: channels (stem 4, stages 4, 8, 8, 8, 16, head
32), stages of (1, 3, 1, 2, 1) blocks with the default strides (1, 2, 2, 2, 2), 32x32
RGB images, batch 2. So it has a stride-1 first block that may be residual (stage 0:
4 -> 4 channels, residual only where its width choice is 1.0), a scanned stack (blocks
3-4) and single blocks. Parameters are random (`_scaled_random`); each
program is compiled once for the module. Forwards use impl='xla' (the depthwise convs
are `convolution`s in the compiled program, and `flops.count_macs` sees them).
"""

import functools
import json
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnas import flops
from jaxnas import genotypes
from jaxnas.spaces import fbnet as fb
from jaxnas.spaces import proxyless

SKELETON = dict(channels=(4, 4, 8, 8, 8, 16, 32), depths=(1, 3, 1, 2, 1),
                strides=(1, 2, 2, 2, 2))
DEPTHS = SKELETON['depths']
STAGES = len(DEPTHS)
B, NUM_CLASSES = 2, 10
MODEL = fb.FBNetNetwork(NUM_CLASSES, **SKELETON, impl='xla')
X = jnp.asarray(np.random.default_rng(0).normal(size=(B, 32, 32, 3)), jnp.float32)
# Per stage (kernel, expansion, width, se, act) option indices; ARCH_B flips every one.
# ARCH_A's stage 0 keeps width 1.0 (its block adds its input), ARCH_B's does not.
ARCH_A = {'kernel': [0, 1, 0, 1, 0], 'expansion': [1, 0, 0, 1, 0],
          'width': [1, 0, 1, 0, 0], 'se': [1, 0, 1, 0, 1], 'act': [0, 1, 0, 1, 1]}
ARCH_A = {f: np.asarray(v, np.int32) for f, v in ARCH_A.items()}
ARCH_B = {f: 1 - v for f, v in ARCH_A.items()}

_STATE = {}


def _scaled_random(shapes, seed=0):
  """Random variables of a tree of shapes that keep the signal's scale through the
  network (so that every block's choice shows in the logits): kernels ~ U(-a, a) with
  a = sqrt(6 / fan_in) (the stacked block axis and the depthwise filters' channels are
  not fan-in), BN scale ~ U(0.5, 1.5), bias ~ U(-0.3, 0.3), running mean ~ N(0, 0.3),
  running var ~ U(0.5, 2)."""
  rng = np.random.default_rng(seed)

  def leaf(path, s):
    name = path[-1].key
    if name in ('scale', 'bias', 'mean', 'var'):
      value = {'scale': lambda: rng.uniform(0.5, 1.5, s.shape),
               'bias': lambda: rng.uniform(-0.3, 0.3, s.shape),
               'mean': lambda: rng.normal(0.0, 0.3, s.shape),
               'var': lambda: rng.uniform(0.5, 2.0, s.shape)}[name]()
    else:
      fan_in = (np.prod(s.shape[1:-1]) if name.startswith('dw') else
                np.prod(s.shape[:-1]) if len(s.shape) == 4 else s.shape[-2])
      bound = np.sqrt(6.0 / fan_in)
      value = rng.uniform(-bound, bound, s.shape)
    return jnp.asarray(value, s.dtype)

  return jax.tree_util.tree_map_with_path(leaf, dict(shapes))


@pytest.fixture
def variables():
  """MODEL's random variables (`_scaled_random`), built once for the module."""
  if 'variables' not in _STATE:
    _STATE['variables'] = _scaled_random(jax.eval_shape(
        lambda: MODEL.init(jax.random.key(0), X, ARCH_A, train=False)))
  return _STATE['variables']


@functools.cache
def _forward():
  """MODEL's eval-mode forward (variables, x, choices), jitted once."""
  return jax.jit(lambda v, x, c: MODEL.apply(v, x, c, train=False))


@functools.cache
def _eval_forward(arch):
  model = fb.FBNetEvalNetwork(arch, NUM_CLASSES, **SKELETON, impl='xla')
  return model, jax.jit(lambda v, x: model.apply(v, x, train=False))


def _random_archs(seed, n):
  choices = fb.random_choices(jax.random.key(seed), DEPTHS, num_samples=n)
  return [{f: np.asarray(v[i]) for f, v in choices.items()} for i in range(n)]


# --- skeleton, distributions, architectures ----------------------------------------


def test_skeleton_of_the_paper():
  blocks = fb.block_specs()
  assert len(blocks) == 15 and fb.stages() == [(1, 1), (2, 3), (4, 5), (6, 11), (12, 15)]
  assert [b.number for b in blocks if b.stride == 2] == [2, 4, 6, 12]
  assert [(b.c_in, b.c_out) for b in blocks if b.first] == [
      (8, 16), (16, 24), (24, 40), (40, 80), (80, 112)]
  # Only the later blocks of a stage may be residual in the paper's skeleton.
  assert [b.number for b in blocks if b.may_add_input] == [
      b.number for b in blocks if not b.first]
  assert fb.resolve_channels(width_multiplier=0.5) == (4, 8, 12, 20, 40, 56, 640)
  assert fb.resolve_channels((1, 2), 0.1) == (1, 1)  # at least one channel
  assert fb.stage_widths(8) == (6, 8) and fb.stage_widths(16) == (12, 16)
  assert fb.factorized_shapes() == {f: (5, 2) for f in fb.FACTORS}
  assert fb.joint_shapes(DEPTHS) == {'joint': (5, 32)}
  assert tuple(fb.FACTORS) == ('kernel', 'expansion', 'width', 'se', 'act')
  with pytest.raises(ValueError, match=r'len\(depths\) \+ 2'):
    fb.block_specs((8, 8, 8), (1, 1), (2, 2))


def test_joint_softmax_is_the_product_of_the_factor_softmaxes():
  rng = np.random.default_rng(1)
  logits = {f: jnp.asarray(rng.normal(size=(3, STAGES, n)) * 2, jnp.float32)
            for f, n in zip(fb.FACTORS, fb.NUM_OPTIONS)}
  joint = jax.jit(fb.joint_from_factorized)(logits)['joint']
  chex.assert_shape(joint, (3, STAGES, 32))
  probs = np.asarray(jax.nn.softmax(joint, -1))
  factor_probs = {f: np.asarray(jax.nn.softmax(v, -1)) for f, v in logits.items()}
  combos = np.stack(np.unravel_index(np.arange(32), fb.NUM_OPTIONS), -1)  # (32, 5)
  product = np.ones((3, STAGES, 32))
  for i, f in enumerate(fb.FACTORS):
    product *= factor_probs[f][..., combos[:, i]]
  np.testing.assert_allclose(probs, product, rtol=0, atol=1e-6)
  with pytest.raises(ValueError, match=r"logits\['se'\] must be"):
    fb.joint_from_factorized({**logits, 'se': logits['se'][..., :1]})


def test_joint_index_round_trip_over_all_combinations():
  combos = np.unravel_index(np.arange(32), fb.NUM_OPTIONS)
  choices = dict(zip(fb.FACTORS, combos))
  index = fb.joint_index(choices)
  np.testing.assert_array_equal(index, np.ravel_multi_index(combos, fb.NUM_OPTIONS))
  np.testing.assert_array_equal(index, np.arange(32))
  back = jax.jit(fb.factor_choices_from_joint)(jnp.arange(32))
  for f, c in zip(fb.FACTORS, combos):
    np.testing.assert_array_equal(back[f], c)
  np.testing.assert_array_equal(jax.jit(fb.joint_index)(back), np.arange(32))


def test_json_round_trip_format_and_errors():
  d = fb.to_json(ARCH_A)
  assert d['stages'][0] == {'kernel': 3, 'expansion': 6, 'width': 1.0, 'se': True,
                            'act': 'relu'}
  back = fb.from_json(json.loads(json.dumps(d)), DEPTHS)
  for f in fb.FACTORS:
    np.testing.assert_array_equal(back[f], ARCH_A[f])
    assert back[f].dtype == np.int32
  assert fb.from_json(json.dumps(d), DEPTHS)['width'].tolist() == [1, 0, 1, 0, 0]
  assert fb.freeze(back) == fb.freeze(ARCH_A) == fb.freeze(fb.freeze(ARCH_A))
  assert fb.format_architecture(ARCH_A) == (
      'k3 e6 w1.0 se relu | k5 e3 w0.75 no-se hswish | k3 e3 w1.0 se relu | '
      'k5 e6 w0.75 no-se hswish | k3 e3 w0.75 se hswish')
  bad = json.loads(json.dumps(d))
  bad['stages'][2]['kernel'] = 7
  with pytest.raises(ValueError, match=r'stage 2: kernel is 7; choose one of \(3, 5\)'):
    fb.from_json(bad, DEPTHS)
  bad['stages'][2]['kernel'], bad['stages'][1]['se'] = 3, 1
  with pytest.raises(ValueError, match='stage 1: se is 1'):
    fb.from_json(bad, DEPTHS)
  with pytest.raises(ValueError, match="'stages' needs one entry per stage: 5"):
    fb.from_json({'stages': d['stages'][:4]}, DEPTHS)
  del bad['stages'][1]['se']
  with pytest.raises(ValueError, match=r"stage 1: .*missing \['se'\]"):
    fb.from_json(bad, DEPTHS)
  with pytest.raises(ValueError, match="key 'stages'"):
    fb.from_json({'ops': []}, DEPTHS)


# --- the supernet ----------------------------------------------------------------------


def test_variables_are_shared_at_their_maximum_sizes():
  shapes = jax.eval_shape(lambda: MODEL.init(jax.random.key(0), X, ARCH_A, train=True))
  params = jax.tree_util.tree_map(lambda a: a.shape, shapes['params'])
  assert sorted(k for k in params if k.startswith('layer')) == [
      'layer_1', 'layer_2', 'layer_5', 'layer_6', 'layer_7', 'layer_8', 'layers_3_4']
  stack = params['layers_3_4']  # blocks 3 and 4: 8 -> 8, hidden 6 x 8, SE 12
  assert stack['expand'] == (2, 8, 48) and stack['project'] == (2, 48, 8)
  assert stack['dw3'] == (2, 3, 3, 1, 48) and stack['dw5'] == (2, 5, 5, 1, 48)
  assert stack['se_reduce'] == (2, 48, 12) and stack['se_expand'] == (2, 12, 48)
  assert stack['dw_bn'] == {'scale': (2, 48), 'bias': (2, 48)}
  assert params['layer_2']['expand'] == (1, 4, 24)  # from the stage 0 width 4
  assert shapes['batch_stats']['layer_8']['project_bn']['var'].shape == (1, 16)
  assert params['head_conv']['kernel'] == (16, 32)
  with pytest.raises(ValueError, match=r"choices\['width'\] must be integer option"):
    MODEL.init(jax.random.key(0), X, {**ARCH_A, 'width': ARCH_A['width'][:3]},
               train=False)


def _group(number):
  """The variable group of a block and its index in the group's block axis."""
  for first, last in fb.stages(DEPTHS):
    if number == first:
      return proxyless.group_name(first, first), 0
    if first < number <= last:
      return proxyless.group_name(first + 1, last), number - first - 1
  raise AssertionError(number)


def _eval_variables(variables, choices):
  """The slices of the supernet's variables that the chosen blocks use, in
  FBNetEvalNetwork's tree."""
  arch = fb.freeze(choices)
  channels = fb.resolve_channels(SKELETON['channels'])
  out = {}
  for col in ('params', 'batch_stats'):
    tree = variables[col]
    new = {k: tree[k] for k in ('stem_conv', 'stem_bn', 'head_bn', 'classifier')
           if k in tree}
    c_in = channels[0]
    for block in fb.block_specs(channels, DEPTHS, SKELETON['strides']):
      k, e, w, se, _ = arch[block.stage]
      c_out = fb.stage_widths(block.c_out)[fb.FACTORS['width'].index(w)]
      hidden = e * c_in
      name, i = _group(block.number)
      g = tree[name]
      layer = {bn: {key: v[i, :c] for key, v in g[bn].items()}
               for bn, c in (('expand_bn', hidden), ('dw_bn', hidden),
                             ('project_bn', c_out))}
      if col == 'params':
        layer['expand'] = {'kernel': g['expand'][i, :c_in, :hidden]}
        layer['dw'] = {'kernel': g[f'dw{k}'][i, ..., :hidden]}
        layer['project'] = {'kernel': g['project'][i, :hidden, :c_out]}
        if se:
          s = fb.se_channels(hidden)
          layer['se_reduce'] = {'kernel': g['se_reduce'][i, :hidden, :s]}
          layer['se_expand'] = {'kernel': g['se_expand'][i, :s, :hidden]}
      new[f'layer_{block.number}'] = layer
      c_in = c_out
    if col == 'params':
      new['head_conv'] = {'kernel': tree['head_conv']['kernel'][:c_in]}
    out[col] = new
  return out


@pytest.mark.parametrize('choices', (ARCH_A, ARCH_B), ids=('A', 'B'))
def test_supernet_equals_the_eval_network_on_its_slices(choices, variables):
  """The masked supernet on an architecture computes what the architecture's own
  network computes with the supernet's weights of its options (eval mode)."""
  arch = fb.freeze(choices)
  model, forward = _eval_forward(arch)
  eval_vars = _eval_variables(variables, choices)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), X, train=False))
  assert jax.tree_util.tree_map(lambda a: a.shape, shapes) == jax.tree_util.tree_map(
      lambda a: a.shape, eval_vars)
  out, aux = forward(eval_vars, X)
  assert aux is None
  expected = _forward()(variables, X, choices)
  chex.assert_shape(expected, (B, NUM_CLASSES))
  assert np.abs(expected).max() > 1e-2
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_every_factor_changes_the_output(variables):
  base = np.asarray(_forward()(variables, X, ARCH_A))
  for f in fb.FACTORS:
    for stage in range(STAGES):
      flipped = {**ARCH_A, f: ARCH_A[f].copy()}
      flipped[f][stage] = 1 - flipped[f][stage]
      out = np.asarray(_forward()(variables, X, flipped))
      assert np.abs(out - base).max() > 1e-3, (f, stage)


def _hlo_computations(text):
  computations, name = {}, None
  for line in text.splitlines():
    header = re.match(r'(?:ENTRY )?%([^\s(]+) .*\{$', line)
    if header:
      name = header.group(1)
      computations[name] = []
    elif name and line.startswith('  '):
      computations[name].append(line)
  return computations


def test_compiled_program_runs_only_the_chosen_options(variables):
  """Per block group a conditional over the depthwise kernels, one over squeeze-excite
  and one per activation; every depthwise convolution lies inside a branch."""
  text = _forward().lower(variables, X, ARCH_A).compile().as_text()
  computations = _hlo_computations(text)

  @functools.cache
  def reach(name):  # the lines of a computation and of everything it calls
    lines = list(computations[name])
    for line in computations[name]:
      for callee in re.findall(r'(?:calls|to_apply|body|condition)=%([^\s,)}]+)', line):
        lines += reach(callee)
      cond = re.search(r'branch_computations=\{([^}]*)\}', line)
      if cond:
        lines += [l for b in cond.group(1).split(',') for l in reach(b.strip().lstrip('%'))]
    return tuple(lines)

  kinds, inside = [], set()
  for lines in computations.values():
    for line in lines:
      cond = re.search(r' conditional\(.*branch_computations=\{([^}]*)\}', line)
      if not cond:
        continue
      branches = [b.strip().lstrip('%') for b in cond.group(1).split(',')]
      body = '\n'.join(l for b in branches for l in reach(b))
      inside.update(l for b in branches for l in reach(b))
      kinds.append('kernel' if 'feature_group_count' in body else
                   'se' if ' dot(' in body else 'act')
  groups = 7  # layer_1, layer_2, layers_3_4, layer_5 .. layer_8
  assert kinds.count('kernel') >= groups and kinds.count('se') >= groups
  assert kinds.count('act') >= 2 * groups
  depthwise = [l for ls in computations.values() for l in ls
               if ' convolution(' in l and 'feature_group_count' in l]
  assert depthwise and all(l in inside for l in depthwise)
  assert ' while(' in text  # the stack of blocks 3-4


def test_lax_map_over_architectures_equals_separate_calls(variables):
  archs = _random_archs(3, 3)
  stacked = {f: jnp.stack([a[f] for a in archs]) for f in fb.FACTORS}
  mapped = jax.jit(lambda v, x, cs: jax.lax.map(
      lambda c: MODEL.apply(v, x, c, train=False), cs))(variables, X, stacked)
  chex.assert_shape(mapped, (3, B, NUM_CLASSES))
  for i, arch in enumerate(archs):
    np.testing.assert_allclose(mapped[i], _forward()(variables, X, arch), rtol=1e-5,
                               atol=1e-6)


def test_train_mode_gradients_and_statistics(variables):
  """Finite gradients; the statistics of masked channels stay as they were."""
  labels = jnp.arange(B) % NUM_CLASSES

  def loss(params, stats, choices):
    logits, state = MODEL.apply({'params': params, 'batch_stats': stats}, X, choices,
                                train=True, mutable=['batch_stats'])
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1)
    return jnp.mean(nll), state['batch_stats']

  step = jax.jit(jax.value_and_grad(loss, has_aux=True))
  (value, new), grads = step(variables['params'], variables['batch_stats'], ARCH_A)
  assert np.isfinite(value)
  leaves = jax.tree_util.tree_leaves(grads)
  assert all(np.isfinite(g).all() for g in leaves)
  assert sum(np.abs(g).sum() for g in leaves) > 0
  old = variables['batch_stats']
  # Stage 1 (blocks 2-4): expansion 3 of width 4 (block 2) and of 6 (blocks 3-4); the
  # output width 6 of 8.
  for name, i, hidden in (('layer_2', 0, 12), ('layers_3_4', 1, 18)):
    for key in ('mean', 'var'):
      a, o = np.asarray(new[name]['dw_bn'][key][i]), np.asarray(old[name]['dw_bn'][key][i])
      np.testing.assert_array_equal(a[hidden:], o[hidden:])
      assert (a[:hidden] != o[:hidden]).all()
      a, o = (np.asarray(new[name]['project_bn'][key][i]),
              np.asarray(old[name]['project_bn'][key][i]))
      np.testing.assert_array_equal(a[6:], o[6:])
      assert (a[:6] != o[:6]).all()
  # Weights acting only on masked channels get no gradient: the 5x5 kernel is unused.
  assert not np.asarray(grads['layer_1']['dw5']).any()
  assert not np.asarray(grads['layer_2']['expand'][0, :, 12:]).any()


# --- multiply-adds ---------------------------------------------------------------------


def test_multiply_adds_by_hand():
  """ARCH_A at 32x32, counted block by block: (H_in W_in C_in h expand, H W h k^2
  depthwise, 2 h s squeeze-excite, H W h C_out project)."""
  stem = 16 * 16 * 3 * 9 * 4
  b1 = 256 * 4 * 24 + 256 * 24 * 9 + 2 * 24 * 6 + 256 * 24 * 4     # k3 e6 4->4, SE 6
  b2 = 256 * 4 * 12 + 64 * 12 * 25 + 64 * 12 * 6                   # k5 e3 4->6, s2
  b34 = 2 * (64 * 6 * 18 + 64 * 18 * 25 + 64 * 18 * 6)              # k5 e3 6->6
  b5 = 64 * 6 * 18 + 16 * 18 * 9 + 2 * 18 * 4 + 16 * 18 * 8        # SE round(4.5) = 4
  b6 = 16 * 8 * 48 + 4 * 48 * 25 + 4 * 48 * 6                      # k5 e6 8->6, s2
  b7 = 4 * 6 * 36 + 4 * 36 * 25 + 4 * 36 * 6
  b8 = 4 * 6 * 18 + 1 * 18 * 9 + 2 * 18 * 4 + 1 * 18 * 12          # 2x2 -> 1x1, 6->12
  head = 1 * 12 * 32 + 32 * NUM_CLASSES
  expected = stem + b1 + b2 + b34 + b5 + b6 + b7 + b8 + head
  count = functools.partial(fb.multiply_adds, image_size=32, num_classes=NUM_CLASSES,
                            **SKELETON)
  assert int(count(ARCH_A)) == expected
  traced = jax.jit(count)({f: jnp.asarray(v) for f, v in ARCH_A.items()})
  assert traced.dtype == jnp.int32 and int(traced) == expected
  # Leading axes are kept.
  both = count({f: np.stack([ARCH_A[f], ARCH_B[f]]) for f in fb.FACTORS})
  assert both.shape == (2,) and int(both[0]) == expected and both[1] == count(ARCH_B)


def test_multiply_adds_equal_count_macs_of_the_eval_network():
  x = jnp.zeros((1, 24, 24, 3), jnp.float32)  # 24 -> 12 -> 12, 6, 3, 2, 1
  counts = []
  for arch in _random_archs(5, 5):
    model = fb.FBNetEvalNetwork(fb.freeze(arch), NUM_CLASSES, **SKELETON, impl='xla')
    v = jax.eval_shape(lambda m=model: m.init(jax.random.key(0), x, train=False))
    macs = flops.count_macs(lambda v, x, m=model: m.apply(v, x, train=False)[0], v, x)
    formula = fb.multiply_adds(arch, image_size=24, num_classes=NUM_CLASSES, **SKELETON)
    assert int(formula) == macs, fb.format_architecture(arch)
    counts.append(macs)
  assert len(set(counts)) > 1


# --- training a found architecture ----------------------------------------------------


def test_eval_space_adapter(tmp_path):
  m = type('Model', (), dict(channels=SKELETON['channels'], width_multiplier=1.0,
                             depths=DEPTHS, strides=SKELETON['strides'], dropout=0.1,
                             depthwise_impl='xla'))()
  space = fb.EVAL_SPACE
  assert space.name == 'fbnet' and not space.drop_path
  (tmp_path / fb.ARCHITECTURE_FILE).write_text(json.dumps(fb.to_json(ARCH_B)))
  arch = space.load(str(tmp_path), m)
  assert arch == fb.freeze(ARCH_B) and hash(arch)
  assert space.from_json(space.to_json(arch), 'x.json', m) == arch
  assert space.format(m, arch) == fb.format_architecture(ARCH_B)
  model = space.build(m, arch, NUM_CLASSES)
  assert isinstance(model, fb.FBNetEvalNetwork) and model.dropout == 0.1
  params = jax.eval_shape(lambda: model.init(
      {'params': jax.random.key(0), 'dropout': jax.random.key(1)}, X, train=True))['params']
  counts = space.count_params(params)
  assert counts['params'] == counts['params_with_auxiliary'] == fb.count_params(params) > 0
  bad = tmp_path / 'bad.json'
  bad.write_text(json.dumps({'stages': fb.to_json(ARCH_B)['stages'][:2]}))
  with pytest.raises(genotypes.GenotypeError, match='bad.json: .*one entry per stage'):
    space.load(str(bad), m)
  with pytest.raises(genotypes.GenotypeError, match='no such architecture file'):
    space.load(str(tmp_path / 'missing'), m)
  failures = []
  m.dropout = 1.5
  space.validate(m, (32, 32, 3), lambda field, msg: failures.append(field))
  assert failures == ['model.dropout']
