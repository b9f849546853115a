"""UNAS through the shared loop: its objective, its step and its config errors."""

import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnas import base_config
from jaxnas import export
from jaxnas import latency
from jaxnas import search
from jaxnas import train
from jaxnas.methods import unas
from jaxnas.spaces import sampled_darts
from test_data import write_fashion_mnist

# Three of the seven ops (one of each kind) keep the compiled programs small.
TINY_PRIMITIVES = ('skip_connect', 'sep_conv_3x3', 'max_pool_3x3')


def tiny_config(**unas_fields):
  c = unas.METHOD.apply_variant(unas.get_config(), 'smoke', 'unas')
  c.model.update(dict(C=4, layers=3, steps=2, multiplier=2, primitives=TINY_PRIMITIVES))
  c.unas.update(unas_fields)
  c.optim.batch_size = 4
  c.eval_batch_size = 8
  c.eval_max_examples = 8
  c.compilation_cache_dir = ''
  return c


def random_batch(rng, n, shape=(8, 8, 1), classes=10):
  return {'image': jnp.asarray(rng.normal(size=(n,) + shape), jnp.float32),
          'label': jnp.asarray(rng.integers(0, classes, n), jnp.int32)}


# ------------------------------------------------------------------ objective


def test_gen_gap_objective_is_its_formula():
  train = jnp.array([1.0, 2.0, 0.5])
  val = jnp.array([1.5, 1.0, 0.5])
  np.testing.assert_allclose(unas.gen_gap(train, val, 0.5),
                             [1.0 + 0.25, 2.0 + 0.5, 0.5], rtol=1e-6)


def test_paired_input_penalty_counts_slots_that_pick_the_same_source_and_op():
  steps, num_ops = 2, 3
  choices = {  # node 0: both slots (source 1, op 2); node 1: (0, 0) and (2, 0)
      'inputs_normal': np.array([[[1, 1], [0, 2]]]), 'ops_normal': np.array([[[2, 2], [0, 0]]]),
      'inputs_reduce': np.array([[[0, 1], [2, 2]]]), 'ops_reduce': np.array([[[1, 1], [1, 1]]])}
  weights = sampled_darts.one_hot(choices, steps, num_ops)
  # normal: node 0 repeats (1, 2): 1; node 1 differs in source: 0. reduce: node 0
  # differs in source; node 1 repeats (2, 1): 1.
  np.testing.assert_allclose(unas.paired_input_penalty(weights), [2.0])
  # Relaxed weights: (w_in0 . w_in1)(w_op0 . w_op1) per node, by hand for one node.
  rng = np.random.default_rng(0)
  soft = {k: jax.nn.softmax(jnp.asarray(rng.normal(size=v.shape)), -1)
          for k, v in weights.items()}
  expected = sum(
      float(jnp.dot(soft[f'inputs_{k}'][0, i, 0], soft[f'inputs_{k}'][0, i, 1])
            * jnp.dot(soft[f'ops_{k}'][0, i, 0], soft[f'ops_{k}'][0, i, 1]))
      for k in ('normal', 'reduce') for i in range(steps))
  np.testing.assert_allclose(unas.paired_input_penalty(soft), [expected], rtol=1e-5)


def test_entropy_of_uniform_categoricals():
  arch = {k: jnp.zeros(s) for k, s in sampled_darts.arch_shapes(2, 3).items()}
  masked = sampled_darts.mask_logits(arch)
  # Per cell type: node 0 reads 2 sources, node 1 reads 3; each slot picks 1 of 3 ops.
  expected = 2 * (2 * np.log(2) + 2 * np.log(3) + 4 * np.log(3))
  np.testing.assert_allclose(unas.entropy(masked), expected, rtol=1e-5)


# ------------------------------------------------------------------ the step


@pytest.fixture(scope='module')
def step_setup():
  """The tiny model's state, a batch pair and both phases compiled, per sampling mode."""
  out = {}
  rng = np.random.default_rng(0)
  batches = random_batch(rng, 4), random_batch(rng, 4)
  for sampling in ('example', 'batch'):
    config = tiny_config(sampling=sampling)
    config.optim.warmup_epochs = 0
    method = unas.METHOD
    model = method.build_model(config, 10)
    weight_tx, arch_tx = method.make_optimizers(config, 3)
    state = method.create_state(model, (8, 8, 1), weight_tx, arch_tx, config)
    phases = method.make_phases(model, weight_tx, arch_tx, config, 3)
    arch_phase = jax.jit(phases[0]).lower(state, *batches).compile()
    after_arch, _ = arch_phase(state, *batches)
    weight_phase = jax.jit(phases[1]).lower(after_arch, *batches).compile()
    out[sampling] = (state, batches, (arch_phase, weight_phase))
  return out


def test_one_step_moves_the_logits_and_the_weights(step_setup):
  for sampling, (state, (train, val), (arch_phase, weight_phase)) in step_setup.items():
    after_arch, metrics = arch_phase(state, train, val)
    assert np.isfinite(metrics['val_loss']) and np.isfinite(metrics['arch_grad_norm'])
    moved = [float(jnp.max(jnp.abs(a - b))) for a, b in
             zip(jax.tree.leaves(after_arch.arch), jax.tree.leaves(state.arch))]
    assert max(moved) > 1e-4, sampling
    chex.assert_trees_all_equal(after_arch.params, state.params)
    after, metrics = weight_phase(after_arch, train, val)
    assert np.isfinite(metrics['train_loss']) and int(after.step) == 1
    chex.assert_trees_all_equal(after.arch, after_arch.arch)
    assert any(float(jnp.max(jnp.abs(a - b))) > 0 for a, b in
               zip(jax.tree.leaves(after.params), jax.tree.leaves(state.params)))
    # The logits of sources a node cannot read stay 0 (no gradient reaches them).
    valid = sampled_darts.valid_masks(2, 3)
    for name in ('inputs_normal', 'inputs_reduce'):
      assert np.all(np.asarray(after.arch[name])[~valid[name]] == 0.0)


def test_per_batch_sampling_scores_z_on_the_discrete_path(step_setup):
  """One architecture per batch: L(z) runs only the sampled ops (conditionals in the
  compiled arch phase); one per example runs every op, masked (no conditionals)."""
  counts = {}
  for sampling, (_, _, (arch_phase, _)) in step_setup.items():
    counts[sampling] = arch_phase.as_text().count(' conditional(')
  # The warm-up cond is one conditional in both; the discrete path adds a switch per
  # node slot.
  assert counts['batch'] > counts['example'] >= 1, counts


# ------------------------------------------------------------------ through the loop


@pytest.fixture(scope='module')
def idx_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp('fmnist_idx')
  write_fashion_mnist(str(directory), np.random.default_rng(0), n_train=80, n_test=8)
  return str(directory)


def loop_config(idx_dir, cache_dir):
  c = tiny_config()
  c.data.name = 'fashion_mnist'
  c.data.source = 'idx'
  c.data.data_dir = idx_dir
  c.data.max_examples = None
  c.optim.epochs = 2
  c.optim.steps_per_epoch = 3
  c.optim.warmup_epochs = 1
  c.checkpoint_every_steps = 2
  c.compilation_cache_dir = cache_dir
  return c


def test_search_resumes_to_the_same_result_from_its_seed(tmp_path, idx_dir):
  cache = str(tmp_path / 'cache')
  full = search.run_search(loop_config(idx_dir, cache), str(tmp_path / 'full'))
  for name in ('genotype.json', 'arch.npz', 'cells.svg', 'genotypes.jsonl', 'summary.json'):
    assert os.path.exists(tmp_path / 'full' / name), name
  assert full['method'] == 'unas' and np.isfinite(full['arch_split_loss'])
  # Interrupted after step 5 (checkpoint 4), resumed: the same arch logits and genotype.
  stopped = str(tmp_path / 'stopped')
  search.run_search(loop_config(idx_dir, cache), stopped, stop_at_step=5)
  resumed = search.run_search(loop_config(idx_dir, cache), stopped)
  assert resumed['genotype'] == full['genotype']
  a, b = np.load(tmp_path / 'full' / 'arch.npz'), np.load(os.path.join(stopped, 'arch.npz'))
  for name in a.files:
    np.testing.assert_array_equal(a[name], b[name])
  # The arch moved in the search epoch only.
  assert max(np.abs(a[name]).max() for name in a.files) > 1e-4


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize('field, value, match', [
    ('unas.estimator', 'gumbel', r"config\.unas\.estimator is 'gumbel'; choose one of"),
    ('unas.objective', 'gap', r"config\.unas\.objective is 'gap'"),
    ('unas.sampling', 'sample', r"config\.unas\.sampling is 'sample'"),
    ('unas.temperature', 0.0, r'config\.unas\.temperature must be positive'),
    ('unas.temperature', -0.4, r'config\.unas\.temperature must be positive'),
    ('space', 'darts', r"config\.space is 'darts'; UNAS searches"),
    ('space', 'proxyless9', r"config\.space is 'proxyless9'; choose one of"),
    ('unas.latency_target_ms', 10.0, r'config\.unas\.latency_model is empty'),
    ('model.primitives', ('skip_connect', 'none'), r'config\.model\.primitives must be'),
])
def test_bad_fields_are_named_before_compute(field, value, match):
  config = tiny_config()
  section, _, name = field.rpartition('.')
  (config[section] if section else config)[name] = value
  with pytest.raises(search.ConfigError, match=match):
    search.validate_config(config)


def test_a_latency_model_that_does_not_fit_the_space_is_named(tmp_path):
  shapes = {'inputs_normal': (2, 2, 3), 'ops_normal': (2, 2, 5)}  # another space's layout
  rng = np.random.default_rng(0)
  feats = rng.integers(0, 2, (20, 32)).astype(np.float64)
  surrogate = latency.fit(feats, feats.sum(1), shapes={'x': (32,)})
  path = str(tmp_path / 'latency.json')
  latency.save(surrogate, path)
  del shapes
  config = tiny_config(latency_target_ms=5.0, latency_model=path)
  with pytest.raises(search.ConfigError, match=r'config\.unas\.latency_model .*latency\.json'):
    search.validate_config(config)


def test_proxyless_space_with_a_measured_latency_model(tmp_path, idx_dir):
  """The ProxylessNAS space through the loop: one architecture per batch, a latency
  surrogate measured at the start and used by the latency term, the final
  architecture's latency measured and predicted."""
  c = unas.METHOD.apply_variant(unas.get_config('proxyless'), 'smoke', 'unas')
  c.model.channels = (4, 4, 4, 8, 8, 8, 8, 8, 16)
  c.model.depths = (2, 1, 1, 1, 1, 1)
  c.model.primitives = ('mb3_e3', 'mb5_e3', 'zero')
  c.data.name, c.data.source, c.data.data_dir = 'fashion_mnist', 'idx', idx_dir
  c.data.max_examples = None
  c.optim.batch_size = 4
  c.optim.epochs, c.optim.steps_per_epoch, c.optim.warmup_epochs = 2, 2, 1
  c.eval_batch_size = c.eval_max_examples = 8
  c.compilation_cache_dir = ''
  c.unas.update(sampling='batch', latency_model='measure', latency_samples=12,
                latency_images=4, latency_runs=3, latency_target_ms=1e-3,
                latency_ramp_steps=1)
  workdir = str(tmp_path / 'proxyless')
  result = search.run_search(c, workdir)
  surrogate = latency.load(os.path.join(workdir, unas.LATENCY_FILE), {'ops': (7, 3)})
  assert surrogate.n_fit + surrogate.n_holdout == 12
  assert result['latency_model_samples'] == 12
  assert result['latency_ms'] > 0 and np.isfinite(result['latency_predicted_ms'])
  # The channel-changing layers (1, 3, 4, 5, 6, 7 here) never pick 'zero'.
  ops = result['genotype']
  assert len(ops) == 7 and all(ops[n - 1] != 'zero' for n in (1, 3, 4, 5, 6, 7))
  with open(os.path.join(workdir, unas.ARCHITECTURE_FILE)) as f:
    assert json.load(f)['ops'] == list(ops)
  # The latency term (target 1 us, full weight from the first arch step) was logged.
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    logged = [json.loads(line) for line in f]
  assert any(np.isfinite(r.get('latency_ms', np.nan)) for r in logged)

  # The evaluation stage trains the found architecture from the search's workdir, and
  # the exported model gives the logits of that architecture.
  t = base_config.train_smoke(base_config.train_config('proxyless'))
  t.genotype = workdir
  t.model.update(channels=c.model.channels, depths=c.model.depths, width_multiplier=1.0,
                 dropout=0.2)
  t.data.update(name='fashion_mnist', source='idx', data_dir=idx_dir, max_examples=None,
                cutout=0)
  t.optim.update(batch_size=4, epochs=1, steps_per_epoch=2, nesterov=True,
                 decay_batch_norm=False)
  t.eval_batch_size, t.eval_max_examples, t.compilation_cache_dir = 8, 8, ''
  trained = train.run_train(t, str(tmp_path / 'eval'))
  assert trained['model']['genotype'] == {'ops': list(ops)}
  assert trained['model']['space'] == 'proxyless' and trained['test_examples'] == 8
  model = export.load_model(str(tmp_path / 'eval'))
  assert model.space == 'proxyless' and model.genotype == tuple(ops)
  images = np.zeros((2, 28, 28, 1), np.uint8)
  assert model(images).shape == (2, 10) and np.all(np.isfinite(model(images)))
