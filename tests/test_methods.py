"""The method registry: a method defined outside jaxnas runs through the shared loop."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jaxnas import base_config
from jaxnas import methods
from jaxnas import search
from jaxnas.methods import base
from test_data import write_fashion_mnist


class TwoHeads(nn.Module):
  """A toy supernet: softmax(arch['logits'])-weighted sum of two linear heads, one on
  the image and one on the image squared."""
  num_classes: int

  @nn.compact
  def __call__(self, x, train: bool):
    del train
    logits = self.variable('arch', 'logits', lambda: jnp.zeros((2,))).value
    w = jax.nn.softmax(logits)
    x = x.reshape(x.shape[0], -1)
    return (w[0] * nn.Dense(self.num_classes, name='linear')(x)
            + w[1] * nn.Dense(self.num_classes, name='square')(x * x))


class ToyMethod(base.Method):
  """Weights and arch logits updated in one phase: the weights on the train batch, the
  logits on the val batch (first order)."""

  name = 'toy_two_heads'

  def get_config(self):
    c = base_config.loop_config()
    c.method, c.space = self.name, 'darts'  # the space field is checked by the loop
    c.optim.learning_rate = 0.05
    c.optim.arch_learning_rate = 0.1
    c.optim.nan_at_step = 0  # > 0: the weights become NaN at that step (a test's fault)
    return c

  def validate(self, config, fail):
    if config.optim.learning_rate <= 0:
      fail('optim.learning_rate', 'must be positive.')

  def build_model(self, config, num_classes, num_devices=1):
    return TwoHeads(num_classes)

  def make_optimizers(self, config, steps_per_epoch):
    return optax.sgd(config.optim.learning_rate), optax.adam(config.optim.arch_learning_rate)

  def make_phases(self, model, weight_tx, arch_tx, config, steps_per_epoch):
    def loss(params, arch, batch):
      logits = model.apply({'params': params, 'arch': arch}, batch['image'], train=True)
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()

    def step(state, train_batch, val_batch):
      val_loss, arch_grads = jax.value_and_grad(loss, 1)(state.params, state.arch, val_batch)
      train_loss, grads = jax.value_and_grad(loss)(state.params, state.arch, train_batch)
      updates, weight_opt = weight_tx.update(grads, state.weight_opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      if config.optim.nan_at_step:
        params = jax.tree.map(
            lambda p: jnp.where(state.step + 1 == config.optim.nan_at_step, jnp.nan, p), params)
      updates, arch_opt = arch_tx.update(arch_grads, state.arch_opt_state)
      state = state.replace(params=params, weight_opt_state=weight_opt,
                            arch=optax.apply_updates(state.arch, updates),
                            arch_opt_state=arch_opt, step=state.step + 1)
      return state, {'train_loss': train_loss, 'train_acc': jnp.zeros(()),
                     'val_loss': val_loss}

    return (step,)

  def derive(self, config, arch):
    return 'square' if arch['logits'][1] > arch['logits'][0] else 'linear'

  def to_json(self, architecture):
    return {'head': architecture}

  def summary(self, config):
    return {'method': self.name, 'dataset': config.data.name}

  def format_summary(self, summary):
    return f'{summary["method"]} on {summary["dataset"]}'


@pytest.fixture(scope='module')
def toy():
  method = methods.register(ToyMethod())
  yield method
  del methods.METHODS[method.name]


@pytest.fixture(scope='module')
def idx_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp('fmnist_idx')
  write_fashion_mnist(str(directory), np.random.default_rng(0), n_train=64, n_test=8)
  return str(directory)


def toy_config(toy, idx_dir) -> ml_collections.ConfigDict:
  c = toy.get_config()
  c.data.name = 'fashion_mnist'
  c.data.source = 'idx'
  c.data.data_dir = idx_dir
  c.data.augment = False
  c.optim.batch_size = 8
  c.optim.epochs = 2
  c.optim.steps_per_epoch = 3
  c.eval_batch_size = 8
  c.log_every_steps = 1
  c.checkpoint_every_steps = 2
  c.compilation_cache_dir = ''
  return c


def test_a_registered_method_runs_through_the_shared_loop(toy, idx_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  result = search.run_search(toy_config(toy, idx_dir), workdir)
  assert result['method'] == 'toy_two_heads' and result['steps'] == 6
  assert result['genotype'] in ('linear', 'square')
  for name in ('config.json', 'metrics.jsonl', 'genotypes.jsonl', 'arch.npz', 'summary.json'):
    assert os.path.exists(os.path.join(workdir, name)), name
  with open(os.path.join(workdir, 'genotypes.jsonl')) as f:
    epochs = [json.loads(line) for line in f]
  assert [e['epoch'] for e in epochs] == [1, 2]
  assert all(e['head'] in ('linear', 'square') for e in epochs)
  # The arch logits moved (one Adam step moves each by about the learning rate).
  logits = np.load(os.path.join(workdir, 'arch.npz'))['logits']
  assert np.abs(logits).max() > 0.05
  np.testing.assert_allclose(epochs[-1]['logits'], logits, rtol=1e-6)
  with open(os.path.join(workdir, 'summary.json')) as f:
    summary = json.load(f)
  assert summary['model'] == {'method': 'toy_two_heads', 'dataset': 'fashion_mnist'}
  assert summary['result']['genotype'] == {'head': result['genotype']}
  assert 0.0 <= summary['result']['arch_split_acc'] <= 1.0

  # Resumed after an interruption at step 3 (checkpoint at 3, the end of epoch 1), the
  # search ends where the uninterrupted one did.
  again = str(tmp_path / 'again')
  assert search.run_search(toy_config(toy, idx_dir), again, stop_at_step=4) == {
      'stopped_at_step': 4}
  search.run_search(toy_config(toy, idx_dir), again)
  np.testing.assert_allclose(np.load(os.path.join(again, 'arch.npz'))['logits'], logits,
                             rtol=1e-6)


def test_the_loop_stops_a_method_at_nan_without_saving(toy, idx_dir, tmp_path):
  config = toy_config(toy, idx_dir)
  # The weights become NaN in step 4 (its loss, computed before the update, is finite):
  # the checkpoint of step 4 is refused, and the one of step 3 stays the last.
  config.optim.nan_at_step = 4
  workdir = str(tmp_path / 'nan')
  with pytest.raises(search.NonFiniteLossError, match='NaN/inf at step 4'):
    search.run_search(config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '3']


def test_a_methods_own_validation_runs_before_compute(toy, idx_dir):
  config = toy_config(toy, idx_dir)
  config.optim.learning_rate = -1.0
  with pytest.raises(search.ConfigError, match=r'config\.optim\.learning_rate'):
    search.validate_config(config)


def test_an_unknown_method_names_the_field_and_the_registered_ones():
  config = base_config.loop_config()
  config.method = 'darts2'
  with pytest.raises(search.ConfigError, match=r"config\.method is 'darts2'.*pcdarts"):
    search.validate_config(config)


def test_register_refuses_a_nameless_method():
  with pytest.raises(ValueError, match='ToyMethod'):
    methods.register(type('ToyMethod', (base.Method,), {})())
