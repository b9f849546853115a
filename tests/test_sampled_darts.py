"""Tests of the sampled DARTS-like cell space of UNAS (jaxnas.spaces.sampled_darts).

One tiny network (C=4, 3 cells: normal, reduce, reduce; 2 nodes per cell; 8x8 images)
with all 7 UNAS ops. Parameters come from `random_variables` (conftest) and each
forward is compiled once for the module (`_compiled`), since compiling dominates on CPU.
Eval-mode forwards use impl='xla' for the depthwise convs (lax grouped convolutions), so
that the compiled program names each of them as a `convolution`; the train-mode ones
use impl='auto' (on CPU the native or shifted-sum kernels, and ops.scale for the
weights), so that both forms are checked.
"""

import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnas import genotypes
from jaxnas.ops import primitives as ops
from jaxnas.spaces import darts_eval
from jaxnas.spaces import sampled_darts as sd

STEPS, OPS = 2, sd.UNAS_PRIMITIVES
N = len(OPS)
B = 4
MODEL = sd.SampledNetwork(10, C=4, layers=3, steps=STEPS, multiplier=STEPS, impl='xla')
X = jnp.asarray(np.random.default_rng(0).normal(size=(B, 8, 8, 3)), jnp.float32)

# A sampled cell pair that covers every kind of op and the corner cases: both slots of
# normal node 0 pick the same (source, op) (one computation, one set of parameters);
# reduce node 0 reads cell input 0 through skip_connect at stride 2 (FactorizedReduce);
# reduce node 1 reads node 0 through an identity skip.
ARCH = genotypes.Genotype(
    normal=[('sep_conv_7x7', 1), ('sep_conv_7x7', 1),
            ('max_pool_3x3', 2), ('dil_conv_3x3', 0)],
    normal_concat=[2, 3],
    reduce=[('skip_connect', 0), ('avg_pool_3x3', 1),
            ('skip_connect', 2), ('sep_conv_5x5', 1)],
    reduce_concat=[2, 3])

_STATE = {}


@pytest.fixture
def variables(random_variables):
  """MODEL's random variables, built once for the module (shapes from the mixed path)."""
  if 'variables' not in _STATE:
    _STATE['variables'] = random_variables(MODEL, X, _one_hot(ARCH), train=False)
  return _STATE['variables']


def _one_hot(genotype):
  return sd.one_hot(sd.choices_from_genotype(genotype), STEPS, N)


def _relaxed(seed, samples):
  """Random relaxed weights (softmax of masked random logits), (samples, ...) each."""
  rng = np.random.default_rng(seed)
  logits = {name: rng.normal(size=(samples,) + shape)
            for name, shape in sd.arch_shapes(STEPS, N).items()}
  return {name: jax.nn.softmax(v, -1) for name, v in sd.mask_logits(logits).items()}


@functools.cache
def _compiled(path, train):
  """MODEL's forward on one architecture for the batch (train: (logits, new
  batch_stats)), compiled once; impl 'xla' in eval mode, 'auto' in train mode."""
  model = MODEL.clone(impl='auto' if train else 'xla')

  def forward(variables, x, weights):
    if not train:
      return model.apply(variables, x, weights, train=False, path=path)
    logits, state = model.apply(variables, x, weights, train=True, path=path,
                                mutable=['batch_stats'])
    return logits, state['batch_stats']

  weights = jax.eval_shape(lambda: _relaxed(0, 1))
  variables = jax.eval_shape(lambda: _STATE['variables'])
  return jax.jit(forward).lower(variables, X, weights).compile()


# --- architecture parameters -----------------------------------------------------------


def test_arch_shapes_and_valid_masks():
  shapes = sd.arch_shapes(4, 5)
  assert shapes == {'inputs_normal': (4, 2, 5), 'inputs_reduce': (4, 2, 5),
                    'ops_normal': (4, 2, 5), 'ops_reduce': (4, 2, 5)}
  assert sd.arch_shapes()['ops_normal'] == (4, 2, 7)
  masks = sd.valid_masks(4, 7)
  for name, shape in sd.arch_shapes(4, 7).items():
    chex.assert_shape(masks[name], shape)
  # Node i reads states 0 .. i+1: 2, 3, 4, 5 valid sources, the same for both slots.
  expected = np.array([[1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]],
                      bool)
  for name in ('inputs_normal', 'inputs_reduce'):
    np.testing.assert_array_equal(masks[name], np.repeat(expected[:, None], 2, axis=1))
  assert masks['ops_normal'].all() and masks['ops_reduce'].all()


def test_masked_sampling_never_picks_invalid_sources():
  shapes = sd.arch_shapes(4, N)
  valid = sd.valid_masks(4, N)
  # Invalid sources get the largest raw logits: only the mask keeps them out.
  logits = {name: np.where(valid[name], 0.0, 50.0) for name in shapes}
  masked = sd.mask_logits(logits)
  probs = jax.nn.softmax(masked['inputs_normal'], -1)
  assert float(jnp.max(jnp.where(valid['inputs_normal'], 0.0, probs))) == 0.0
  np.testing.assert_allclose(np.asarray(probs)[3, 0], np.full(5, 0.2), rtol=1e-6)
  # A gradient never reaches the masked entries.
  def log_q(v):
    return jax.nn.log_softmax(sd.mask_logits({'inputs_normal': v})['inputs_normal'])

  g = jax.grad(lambda v: jnp.sum(log_q(v)))(jnp.asarray(logits['inputs_normal']))
  assert float(jnp.max(jnp.abs(jnp.where(valid['inputs_normal'], 0.0, g)))) == 0.0

  draws = sd.random_architecture(jax.random.key(0), 4, N, num_samples=2000,
                                 arch_logits=logits)
  for kind in ('normal', 'reduce'):
    source = np.asarray(draws[f'inputs_{kind}'])
    chex.assert_shape(source, (2000, 4, 2))
    limit = np.arange(4)[:, None] + 1
    assert (source <= limit).all() and (source >= 0).all()
    # ... while every valid source is drawn (uniform over 2..5 choices).
    for i in range(4):
      assert set(np.unique(source[:, i])) == set(range(i + 2))
    ops_drawn = np.asarray(draws[f'ops_{kind}'])
    assert set(np.unique(ops_drawn)) == set(range(N))

  # Gumbel argmax (UNAS's discrete sample) of the masked logits.
  noise = jax.random.gumbel(jax.random.key(1), (5000,) + shapes['inputs_reduce'])
  picks = np.asarray(jnp.argmax(masked['inputs_reduce'] + noise, -1))
  assert (picks <= np.arange(4)[:, None] + 1).all()


def test_one_hot_and_choices_round_trip():
  choices = sd.choices_from_genotype(ARCH)
  np.testing.assert_array_equal(choices['inputs_normal'], [[[1, 1], [2, 0]]])
  np.testing.assert_array_equal(choices['ops_reduce'],
                                [[[OPS.index('skip_connect'), OPS.index('avg_pool_3x3')],
                                  [OPS.index('skip_connect'), OPS.index('sep_conv_5x5')]]])
  weights = sd.one_hot(choices, STEPS, N)
  chex.assert_shape(weights['inputs_reduce'], (1, STEPS, 2, STEPS + 1))
  chex.assert_shape(weights['ops_normal'], (1, STEPS, 2, N))
  np.testing.assert_array_equal(weights['ops_normal'].sum(-1), 1.0)
  # One-hot weights are a sample whose argmax is the genotype.
  assert sd.derive_genotype({k: v[0] for k, v in weights.items()}, STEPS) == ARCH
  with pytest.raises(ValueError, match='dil_conv_5x5'):
    sd.choices_from_genotype(genotypes.PC_DARTS_image)


def test_derive_genotype_picks_argmaxes():
  rng = np.random.default_rng(3)
  logits = {name: rng.normal(size=shape) for name, shape in sd.arch_shapes(4, N).items()}
  logits['inputs_normal'][0, 1, 4] = 100.0  # node 0 cannot read state 4: ignored
  logits['ops_reduce'][3, 0, OPS.index('sep_conv_7x7')] = 100.0
  g = sd.derive_genotype(logits, 4)
  for kind, edges in (('normal', g.normal), ('reduce', g.reduce)):
    for i in range(4):
      for j in (0, 1):
        op, source = edges[2 * i + j]
        assert source == int(np.argmax(logits[f'inputs_{kind}'][i, j, :i + 2]))
        assert op == OPS[int(np.argmax(logits[f'ops_{kind}'][i, j]))]
  assert g.reduce[6][0] == 'sep_conv_7x7'
  assert g.normal_concat == g.reduce_concat == [2, 3, 4, 5]
  assert genotypes.validate(g) == g
  assert genotypes.from_json(genotypes.to_json(g)) == g
  with pytest.raises(ValueError, match=r"arch_logits\['ops_normal'\] of shape \(4, 2, 5\)"):
    sd.derive_genotype(logits, 4, OPS[:5])


def test_genotypes_accept_sep_conv_7x7_and_keep_the_darts_order():
  assert genotypes.PRIMITIVES[0] == 'none' and 'sep_conv_7x7' not in genotypes.PRIMITIVES
  assert set(OPS) <= set(genotypes.GENOTYPE_OPS)
  with pytest.raises(genotypes.GenotypeError, match='sep_conv_7x7'):
    genotypes.validate(ARCH._replace(normal=[('conv_9x9', 0)] + ARCH.normal[1:]))


def test_eval_network_builds_a_genotype_with_sep_conv_7x7():
  model = darts_eval.EvalNetwork(darts_eval.freeze(ARCH), 10, C=4, layers=3,
                                 auxiliary=False)
  x = jnp.zeros((2, 8, 8, 3))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  logits, _ = jax.eval_shape(lambda v: model.apply(v, x, train=False), variables)
  chex.assert_shape(logits, (2, 10))
  sep = variables['params']['cell_0']['edge_0_sep_conv_7x7']
  chex.assert_shape(sep['DepthwiseConv_0']['kernel'], (7, 7, 1, 4))
  assert 'scale' in sep['BatchNorm_1']  # affine BN, evaluation mode


def test_weights_are_checked_before_compute(variables):
  weights = _relaxed(0, B)
  with pytest.raises(ValueError, match=r"path='discrete' runs one architecture"):
    MODEL.apply(variables, X, weights, train=False, path='discrete')
  with pytest.raises(ValueError, match=r"weights\['ops_reduce'\] must be \(S,\)"):
    MODEL.apply(variables, X, {**weights, 'ops_reduce': weights['ops_reduce'][:2]},
                train=False)
  with pytest.raises(ValueError, match='path must be one of'):
    MODEL.apply(variables, X, _one_hot(ARCH), train=False, path='hard')
  with pytest.raises(ValueError, match="no 'ops_normal'"):
    MODEL.apply(variables, X, {k: v for k, v in weights.items() if k != 'ops_normal'},
                train=False)


def test_both_paths_have_the_same_variables():
  w = _one_hot(ARCH)
  trees = [jax.eval_shape(lambda p=path: MODEL.init(jax.random.key(0), X, w, train=True,
                                                   path=p)) for path in sd.PATHS]
  assert jax.tree_util.tree_structure(trees[0]) == jax.tree_util.tree_structure(trees[1])
  assert jax.tree_util.tree_map(lambda a: a.shape, trees[0]) == jax.tree_util.tree_map(
      lambda a: a.shape, trees[1])
  group = trees[0]['params']['cell_1']['edges_from_0']  # a reduction cell: FactorizedReduce
  chex.assert_shape(group['sep_conv_7x7_dw1'], (2, 7, 7, 1, 8))
  chex.assert_shape(group['skip_connect_pw0'], (2, 8, 4))
  assert 'skip_connect_pw0' not in trees[0]['params']['cell_0']['edges_from_0']


# --- the two paths ---------------------------------------------------------------------


def _stats_of(stats, cell, source, node, bn):
  """The running (mean, var) of BN ``bn`` on edge source -> node of ``cell``."""
  group = stats[f'cell_{cell}'][f'edges_from_{source}'][bn]
  pos = node - max(0, source - 1)
  return np.asarray(group['mean'][pos]), np.asarray(group['var'][pos])


@pytest.mark.parametrize('train', (False, True))
def test_discrete_path_equals_mixed_path_on_one_hot_weights(train, variables):
  w = _one_hot(ARCH)
  mixed = _compiled('mixed', train)(variables, X, w)
  discrete = _compiled('discrete', train)(variables, X, w)
  if not train:
    np.testing.assert_allclose(discrete, mixed, rtol=1e-5, atol=1e-5)
    return
  # The chosen ops' BatchNorms see the same batch in both paths.
  np.testing.assert_allclose(discrete[0], mixed[0], rtol=1e-5, atol=1e-5)
  new_mixed, new_discrete = mixed[1], discrete[1]
  old = variables['batch_stats']
  # Normal cell 0: node 0 runs sep_conv_7x7 on state 1 once for both slots (its stats
  # move once, as in the mixed path); dil_conv_3x3 on edge 0 -> 0 is not chosen.
  for bn in ('sep_conv_7x7_bn0', 'sep_conv_7x7_bn1'):
    trees = (new_discrete, new_mixed, old)
    for a, b, c in zip(*(_stats_of(t, 0, 1, 0, bn) for t in trees)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
      assert np.abs(a - c).max() > 1e-3
  for a, b in zip(_stats_of(new_discrete, 0, 0, 0, 'dil_conv_3x3_bn0'),
                  _stats_of(old, 0, 0, 0, 'dil_conv_3x3_bn0')):
    np.testing.assert_array_equal(a, b)
  # ... while the mixed path updates every op.
  assert np.abs(_stats_of(new_mixed, 0, 0, 0, 'dil_conv_3x3_bn0')[0]
                - _stats_of(old, 0, 0, 0, 'dil_conv_3x3_bn0')[0]).max() > 1e-3
  # Reduction cell 1: FactorizedReduce on edge 0 -> 0.
  for a, b in zip(_stats_of(new_discrete, 1, 0, 0, 'skip_connect_bn'),
                  _stats_of(new_mixed, 1, 0, 0, 'skip_connect_bn')):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_discrete_path_equals_the_op_applied_directly(variables):
  """Normal cell 0 alone, its output node 1: slot 0 max-pools node 0 and slot 1 runs
  dil_conv_3x3 on cell input 0, each with the variables of its edge; checked against the
  DARTS primitive modules holding those variables."""
  cell = sd.SampledCell(4, False, False, train=False, steps=STEPS, multiplier=1,
                        impl='xla')
  cell_vars = {k: v['cell_0'] for k, v in variables.items()}
  rng = np.random.default_rng(5)
  s0, s1 = (jnp.asarray(rng.normal(size=(B, 8, 8, 12)), jnp.float32) for _ in range(2))
  w = _one_hot(ARCH)
  w_in, w_op = w['inputs_normal'] * 0.5, w['ops_normal']  # the weight scales the output
  apply = jax.jit(lambda v, a, b: cell.apply(v, a, b, w_in, w_op, 'discrete'))
  out = apply(cell_vars, s0, s1)

  def edge_op(states, source, node, op):
    """The DARTS primitive module (ops.make_op, search mode) with edge source -> node's
    variables of op."""
    params = cell_vars['params'][f'edges_from_{source}']
    stats = cell_vars['batch_stats'][f'edges_from_{source}']
    pos = node - max(0, source - 1)
    names = {'sep_conv_7x7': [('DepthwiseConv_0', 'dw0'), ('Conv1x1_0', 'pw0'),
                              ('DepthwiseConv_1', 'dw1'), ('Conv1x1_1', 'pw1')],
             'dil_conv_3x3': [('DepthwiseConv_0', 'dw0'), ('Conv1x1_0', 'pw0')]}
    bns = {'sep_conv_7x7': ['bn0', 'bn1'], 'dil_conv_3x3': ['bn0'], 'max_pool_3x3': ['bn']}
    module_vars = {
        'params': {m: {'kernel': params[f'{op}_{n}'][pos]} for m, n in names.get(op, [])},
        'batch_stats': {f'BatchNorm_{k}': {'mean': stats[f'{op}_{n}']['mean'][pos],
                                           'var': stats[f'{op}_{n}']['var'][pos]}
                        for k, n in enumerate(bns[op])}}
    module = ops.make_op(op, 4, 1, affine=False, impl='xla')
    return module.apply(module_vars, states[source], False)

  # The cell's preprocessed inputs (ReLU-1x1-BN, non-affine), then node 0: both slots
  # pick sep_conv_7x7 on input 1 with weight 0.5 each.
  p0, p1 = (ops.ReLUConvBN(4).apply({k: v[name] for k, v in cell_vars.items()}, s, False)
            for name, s in (('preprocess0', s0), ('preprocess1', s1)))
  node0 = edge_op([p0, p1], 1, 0, 'sep_conv_7x7')
  expected = 0.5 * (edge_op([p0, p1, node0], 2, 1, 'max_pool_3x3')
                    + edge_op([p0, p1, node0], 0, 1, 'dil_conv_3x3'))
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def _hlo_convolutions(text):
  """(convolutions outside any conditional, convolutions that one run executes at most,
  the most in one branch) of a compiled HLO module: a conditional executes one branch,
  so it counts its largest."""
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
    own, largest = 0, 0
    for line in computations[name]:
      own += ' convolution(' in line
      cond = re.search(r'branch_computations=\{([^}]*)\}', line)
      if cond:
        if branches:
          sizes = [count(b.strip().lstrip('%'), True)[0] for b in cond.group(1).split(',')]
          own, largest = own + max(sizes), max([largest] + sizes)
        continue
      for callee in re.findall(r'(?:calls|to_apply)=%([^\s,)]+)', line):
        c, m = count(callee, branches)
        own, largest = own + c, max(largest, m)
    return own, largest

  outside = count(entry, False)[0]
  run, per_branch = count(entry, True)
  return outside, run, per_branch


def test_discrete_path_compiles_to_conditionals_that_run_one_op(variables):
  del variables  # only for _compiled's shapes
  mixed, discrete = (_compiled(p, False) for p in sd.PATHS)
  slots = MODEL.layers * STEPS * 2
  text = discrete.as_text()
  assert text.count(' conditional(') >= slots  # one switch per slot (XLA may add more)
  assert ' conditional(' not in mixed.as_text()
  # Depthwise convs are `convolution`s (impl='xla'), and so is the stem's 3x3 conv.
  outside, run, per_branch = _hlo_convolutions(text)
  assert outside == 1  # the stem: every op's convolutions are inside the switches
  assert per_branch == 2  # a branch is one op (a sep conv's two depthwise convs)
  assert run <= 1 + 2 * slots
  # The mixed path runs every op: per cell, 3 groups of edges (vmapped) x 7 depthwise
  # convs, none under a conditional.
  assert _hlo_convolutions(mixed.as_text()) == (1 + MODEL.layers * 3 * 7,) * 2 + (0,)
  # XLA's cost analysis also counts a conditional as its costliest branch (sep_conv_7x7
  # in every slot here), against every op of every edge.
  flops = {p: c.cost_analysis()['flops'] for p, c in zip(sd.PATHS, (mixed, discrete))}
  assert flops['discrete'] < flops['mixed'] / 2.5, flops


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
  forward = lambda w: _logits_and_grads()(variables, w)[0][1]  # noqa: E731
  w = _relaxed(1, B)
  out = forward(w)
  chex.assert_shape(out, (B, 10))
  # Example 1 gets another sample: only its logits move (eval mode: no batch coupling).
  w2 = {k: v.at[1].set(v[2]) for k, v in w.items()}
  out2 = forward(w2)
  np.testing.assert_array_equal(np.delete(out2, 1, 0), np.delete(out, 1, 0))
  assert np.abs(out2[1] - out[1]).max() > 1e-3
  # The same sample in every row equals one sample for the whole batch (S = 1).
  one = {k: v[:1] for k, v in w.items()}
  np.testing.assert_allclose(forward({k: jnp.repeat(v, B, 0) for k, v in one.items()}),
                             _compiled('mixed', False)(variables, X, one),
                             rtol=1e-5, atol=1e-5)


def test_mixed_path_gradients_wrt_relaxed_weights(variables):
  w = _relaxed(2, B)
  (loss, _), grads = _logits_and_grads()(variables, w)
  valid = sd.valid_masks(STEPS, N)
  for name, g in grads.items():
    chex.assert_shape(g, w[name].shape)
    g = np.asarray(g)
    assert np.isfinite(g).all(), name
    # Every valid entry of every example moves the loss; sources a node cannot read don't.
    assert (np.abs(g)[:, valid[name]] > 0).all(), name
    assert not g[:, ~valid[name]].any(), name
  # Central differences along one random direction per name.
  rng = np.random.default_rng(4)
  eps = 3e-4
  for name in w:
    d = jnp.asarray(rng.normal(size=w[name].shape) * valid[name], jnp.float32)
    loss_at = lambda v: _logits_and_grads()(variables, {**w, name: v})[0][0]  # noqa: E731
    plus, minus = loss_at(w[name] + eps * d), loss_at(w[name] - eps * d)
    np.testing.assert_allclose((plus - minus) / (2 * eps), jnp.vdot(grads[name], d),
                               rtol=2e-2, atol=2e-3, err_msg=name)
  assert np.isfinite(loss)


def test_gradients_in_train_mode_and_through_the_discrete_path(variables):
  """Train-mode BN with one relaxed sample per example (mixed, the search's setting),
  and one-hot weights for the batch (discrete, eval mode: the straight-through gradient
  reaches exactly the chosen entries)."""
  labels = jnp.arange(B) % 10

  def grads(path, weights, train):
    def loss(w):
      logits, _ = MODEL.clone(impl='auto').apply(variables, X, w, train=train, path=path,
                                                 mutable=['batch_stats'])
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))
    return jax.jit(jax.grad(loss))(weights)

  valid = sd.valid_masks(STEPS, N)
  for name, g in grads('mixed', _relaxed(3, B), True).items():
    g = np.asarray(g)
    assert np.isfinite(g).all() and (np.abs(g)[:, valid[name]] > 0).all(), name
    assert not g[:, ~valid[name]].any(), name
  w = _one_hot(ARCH)
  for name, g in grads('discrete', w, False).items():
    g = np.asarray(g)
    assert np.isfinite(g).all(), name
    np.testing.assert_array_equal(g != 0, np.asarray(w[name]) != 0, err_msg=name)
