"""jaxnas on two JAX processes, and runs that fail as machines do, through the CLI
(tests/multiprocess_run.py runs ``jaxnas.main`` in a process of its own).

Two processes: ``jax.distributed`` on localhost, 2 CPU devices each, against one process
with the same 4 devices (``--config.parallel.multi_host=True``). The search runs as a
chain in one workdir: one process for steps 1-3 (stopped there), two processes resume it
for steps 4-6, and one process runs the finished workdir again (restoring the
two-process checkpoint). The chain must equal an uninterrupted run of one process; a
short training runs on two processes and on one.

Faults: one search killed (SIGKILL) again and again, between steps, while a checkpoint
is written and while the genotype is written, then resumed from a corrupted checkpoint,
must end as the uninterrupted run; a full disk, a device out of memory and a read-only
workdir each stop a run in one sentence and lose nothing.
"""

import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.join(REPO, 'tests', 'multiprocess_run.py')
STEPS = 6  # 2 epochs of 3 steps

SEARCH_CONFIG = '''
from configs import pcdarts_fashion_mnist

def get_config():
  c = pcdarts_fashion_mnist.get_config('smoke')
  c.model.update(dict(C=4, layers=3, steps=2, multiplier=2, k=2,
                      primitives=('none', 'max_pool_3x3', 'skip_connect', 'sep_conv_3x3')))
  # XLA's depthwise convolutions: the native kernels' custom partitioning gives every
  # process a program of its own, which the persistent compilation cache never finds.
  c.model.depthwise_impl = 'xla'
  c.optim.batch_size = 8
  c.eval_batch_size = 8
  c.eval_max_examples = 16
  c.checkpoint_every_steps = 1
  c.compilation_cache_dir = {cache!r}
  return c
'''

TRAIN_CONFIG = '''
from configs import eval_fashion_mnist

def get_config():
  c = eval_fashion_mnist.get_config('smoke')
  c.model.C = 4
  c.model.layers = 3
  c.model.auxiliary = False
  c.model.depthwise_impl = 'xla'  # as in the search: cached programs
  c.optim.batch_size = 8
  c.eval_batch_size = 8
  c.data.max_examples = 64
  c.compilation_cache_dir = {cache!r}
  return c
'''


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _run(tmp, name, config, workdir, processes, stop_at_step=None, fault=None, code=0):
  """Runs jaxnas on ``processes`` processes (4 devices in all); returns their records,
  or with ``code`` non-zero (the exit status expected), the log."""
  port = _free_port()
  procs, records = [], []
  for i in range(processes):
    record = os.path.join(tmp, f'{name}-{i}.json')
    args = [sys.executable, RUNNER, str(4 // processes), record]
    args += [f'--stop_at_step={stop_at_step}'] if stop_at_step else []
    args += [f'--fault={fault}'] if fault else []
    args += ['--', f'--config={config}', f'--workdir={workdir}']
    if processes > 1:
      args += ['--config.parallel.multi_host=True',
               f'--config.parallel.coordinator_address=127.0.0.1:{port}',
               f'--config.parallel.num_processes={processes}',
               f'--config.parallel.process_id={i}']
    log = open(os.path.join(tmp, f'{name}-{i}.log'), 'w')  # pylint: disable=consider-using-with
    procs.append((subprocess.Popen(args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                   env=dict(os.environ, PYTHONPATH=REPO)), log))
    records.append(record)
  try:
    for proc, _ in procs:
      proc.wait(timeout=600)
  finally:
    for proc, log in procs:
      if proc.poll() is None:
        proc.kill()
      log.close()
  for i, (proc, _) in enumerate(procs):
    with open(os.path.join(tmp, f'{name}-{i}.log')) as f:
      log = f.read()
    assert proc.returncode == code, f'{name}, process {i}:\n{log[-3000:]}'
    if code:
      return log
  out = []
  for path in records:
    with open(path) as f:
      out.append(json.load(f))
  assert [r['process_index'] for r in out] == list(range(processes))
  assert all(r['process_count'] == processes and r['device_count'] == 4 for r in out)
  return out


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  """The configs, a compilation cache, and the uninterrupted one-process search."""
  tmp = str(tmp_path_factory.mktemp('runs'))
  cache = os.path.join(tmp, 'cache')
  configs = {}
  for name, text in (('search', SEARCH_CONFIG), ('train', TRAIN_CONFIG)):
    configs[name] = os.path.join(tmp, f'{name}_config.py')
    with open(configs[name], 'w') as f:
      f.write(text.format(cache=cache))
  one = os.path.join(tmp, 'one')
  return tmp, configs, one, _run(tmp, 'one', configs['search'], one, 1)[0]


@pytest.fixture(scope='module')
def runs(setup):
  tmp, configs, one, one_record = setup
  chain = os.path.join(tmp, 'chain')
  r = {'one': [one_record],
       'chain_1': _run(tmp, 'chain_1', configs['search'], chain, 1, stop_at_step=3),
       'chain_2': _run(tmp, 'chain_2', configs['search'], chain, 2),
       'chain_again': _run(tmp, 'chain_again', configs['search'], chain, 1),
       'train_2': _run(tmp, 'train_2', configs['train'], os.path.join(tmp, 'train_2'), 2),
       'train_1': _run(tmp, 'train_1', configs['train'], os.path.join(tmp, 'train_1'), 1)}
  return r, {'one': one, 'chain': chain, 'train_1': os.path.join(tmp, 'train_1'),
             'train_2': os.path.join(tmp, 'train_2')}


def _untimed(result):
  """A run's result without its timings (``*_s``), which differ between processes."""
  return {k: v for k, v in result.items() if not k.endswith('_s')}


def _lines(workdir, name, kind=None):
  with open(os.path.join(workdir, name)) as f:
    rows = [json.loads(line) for line in f]
  return [r for r in rows if kind is None or r.get('kind') == kind]


def test_each_process_reads_its_own_rows_of_the_global_batch(runs):
  r, _ = runs
  one, two = r['one'][0]['rows'], [p['rows'] for p in r['chain_2']]
  steps = [s for s in two[0] if s in two[1] and s in one]
  assert set(range(3, STEPS)) <= {int(s) for s in steps}  # loop steps 4-6 read batches 3-5
  for s in steps:
    for part in range(2):  # the weight batch and the arch batch
      rows0, rows1, whole = two[0][s][part], two[1][s][part], one[s][part]
      assert len(rows0['labels']) == len(rows1['labels']) == 4  # 8 over 2 processes
      assert rows0['labels'] + rows1['labels'] == whole['labels']
      np.testing.assert_allclose(rows0['pixels'] + rows1['pixels'], whole['pixels'],
                                 rtol=1e-6)
      assert rows0['pixels'] != rows1['pixels']
  train = [p['rows'] for p in r['train_2']]
  for s in train[0]:
    if s in r['train_1'][0]['rows']:
      assert (train[0][s][0]['labels'] + train[1][s][0]['labels']
              == r['train_1'][0]['rows'][s][0]['labels'])


def test_two_processes_end_alike_and_equal_one_process(runs):
  r, _ = runs
  p0, p1 = r['chain_2']
  assert p0['arch'] == p1['arch']  # the same numbers on both processes
  assert _untimed(p0['result']) == _untimed(p1['result'])
  one = r['one'][0]
  for k, v in one['arch'].items():
    np.testing.assert_allclose(p0['arch'][k], v, rtol=1e-4, atol=1e-5, err_msg=k)
  for k in ('train_loss', 'arch_split_loss'):
    np.testing.assert_allclose(p0['result'][k], one['result'][k], rtol=1e-4, err_msg=k)
  # The finished chain run again on one process restores the two-process checkpoint.
  again = r['chain_again'][0]
  assert again['arch'] == p0['arch']


def test_one_process_writes_the_files_and_one_checkpoint_per_step(runs):
  _, w = runs
  one, chain = w['one'], w['chain']
  with open(os.path.join(one, 'genotype.json')) as f:
    g_one = json.load(f)
  with open(os.path.join(chain, 'genotype.json')) as f:
    g_chain = json.load(f)
  assert g_chain['normal'] == g_one['normal'] and g_chain['reduce'] == g_one['reduce']
  # Each line once: process 1 wrote none, and the resumed runs dropped nothing twice.
  assert [g['epoch'] for g in _lines(chain, 'genotypes.jsonl')] == [1, 2]
  steps = [m['step'] for m in _lines(chain, 'metrics.jsonl', 'train')]
  assert steps == sorted(set(steps)) and steps[-1] == STEPS
  losses = {m['step']: m['train_loss'] for m in _lines(chain, 'metrics.jsonl', 'train')}
  for m in _lines(one, 'metrics.jsonl', 'train'):
    np.testing.assert_allclose(losses[m['step']], m['train_loss'], rtol=1e-4)
  # checkpoints_to_keep of the steps, each complete (orbax's commit marker), none half-written
  ckpts = os.listdir(os.path.join(chain, 'checkpoints'))
  assert str(STEPS) in ckpts and all(c.isdigit() for c in ckpts), ckpts
  assert not [f for f in os.listdir(chain) if '.tmp' in f]
  assert sorted(f for f in os.listdir(chain) if f.startswith('.lock')) == ['.lock-0', '.lock-1']


def test_training_on_two_processes_equals_one(runs):
  r, w = runs
  res2, res1 = r['train_2'][0]['result'], r['train_1'][0]['result']
  assert _untimed(r['train_2'][1]['result']) == _untimed(res2)
  loss2 = [m['train_loss'] for m in _lines(w['train_2'], 'metrics.jsonl', 'train')]
  loss1 = [m['train_loss'] for m in _lines(w['train_1'], 'metrics.jsonl', 'train')]
  assert len(loss2) == len(loss1) > 0
  # The gradient sums run in another order (gloo between the processes); BatchNorm over
  # two rows per device makes the sixth step's loss differ by 3.5e-4 relative.
  np.testing.assert_allclose(loss2[:5], loss1[:5], rtol=1e-5)
  np.testing.assert_allclose(loss2, loss1, rtol=2e-3)
  assert os.path.exists(os.path.join(w['train_2'], 'export', 'last', 'model.json'))


def _json(path):
  with open(path) as f:
    return json.load(f)


def _checkpoints(workdir):
  return sorted(os.listdir(os.path.join(workdir, 'checkpoints')))


def test_a_search_killed_at_any_moment_resumes_to_the_uninterrupted_result(setup):
  """SIGKILL after step 2 before its checkpoint, while the checkpoint of step 4 is
  written, and while genotype.json is written; then a corrupted newest checkpoint. Each
  run resumes from the last complete checkpoint, and the last ends as the run that was
  never interrupted."""
  tmp, configs, one, one_record = setup
  work = os.path.join(tmp, 'killed')
  run = lambda name, fault=None, code=-9: _run(  # noqa: E731
      tmp, name, configs['search'], work, 1, fault=fault, code=code)

  run('kill_1', 'kill_step:2')
  assert _checkpoints(work) == ['1']
  log = run('kill_2', 'kill_checkpoint:4')
  assert 'Resuming from step 1 ' in log
  complete = [c for c in _checkpoints(work) if c.isdigit()]
  assert complete == ['2', '3'], _checkpoints(work)  # step 4's files never committed
  assert [c for c in _checkpoints(work) if not c.isdigit()], 'no half-written checkpoint'
  log = run('kill_3', 'kill_write:genotype.json')
  assert 'Resuming from step 3 ' in log  # the newest complete one, not the half of 4
  # Killed in the middle of genotype.json: there is none (this run never wrote one), and
  # the start's summary.json is whole.
  assert not os.path.exists(os.path.join(work, 'genotype.json'))
  assert [f for f in os.listdir(work) if f.startswith('genotype.json.tmp')]
  assert 'result' not in _json(os.path.join(work, 'summary.json'))
  assert _checkpoints(work)[-2:] == ['5', '6']

  # Step 6's checkpoint corrupted (a data file truncated): the run warns, keeps it aside
  # and resumes from step 5.
  data = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(work, 'checkpoints', '6'))
          for f in fs]
  biggest = max(data, key=os.path.getsize)
  with open(biggest, 'r+b') as f:
    f.truncate(os.path.getsize(biggest) // 3)
  record = _run(tmp, 'kill_done', configs['search'], work, 1)[0]
  with open(os.path.join(tmp, 'kill_done-0.log')) as f:
    log = f.read()
  assert 'warning: the checkpoint of step 6 cannot be restored' in log
  assert 'Resuming from step 5 ' in log
  assert os.path.isdir(os.path.join(work, 'checkpoints-unreadable', '6'))
  assert record['arch'] == one_record['arch']  # bitwise: the same machine and devices
  genotype = _json(os.path.join(work, 'genotype.json'))
  reference = _json(os.path.join(one, 'genotype.json'))
  assert (genotype['normal'], genotype['reduce']) == (reference['normal'], reference['reduce'])
  assert 'result' in _json(os.path.join(work, 'summary.json'))
  assert not [f for f in os.listdir(work) if '.tmp' in f]
  steps = [m['step'] for m in _lines(work, 'metrics.jsonl', 'train')]
  assert steps == list(range(1, STEPS + 1))  # each step once, though steps ran again
  assert [g['epoch'] for g in _lines(work, 'genotypes.jsonl')] == [1, 2]


def test_full_disk_out_of_memory_and_read_only_stop_in_one_sentence(setup):
  tmp, configs, _, _ = setup
  work = os.path.join(tmp, 'faults')
  run = lambda name, fault: _run(  # noqa: E731
      tmp, name, configs['search'], work, 1, fault=fault, code=1)

  def error_line(log):
    assert 'Traceback' not in log, log[-3000:]
    errors = [line for line in log.splitlines() if line.startswith('jaxnas: error:')]
    assert len(errors) == 1, log[-3000:]
    return errors[0]

  line = error_line(run('full', 'enospc_checkpoint:3'))
  assert 'checkpoints/3 (No space left on device)' in line and 'resume' in line
  assert _checkpoints(work) == ['1', '2']
  line = error_line(run('oom', 'oom_step:4'))
  assert 'ran out of memory (Out of memory while trying to allocate 9663676416 bytes' in line
  assert 'optim.batch_size (now 8, 2 per device)' in line
  assert _checkpoints(work) == ['2', '3']
  line = error_line(run('read_only', 'erofs_write:genotype.json'))
  assert 'genotype.json (Read-only file system)' in line
  assert _checkpoints(work) == ['5', '6']  # the search's state is kept: nothing lost


def test_a_config_json_edited_by_hand_is_refused_in_one_sentence(setup, tmp_path):
  from jaxnas import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  _, _, one, _ = setup
  config = _json(os.path.join(one, 'config.json'))
  from ml_collections import config_dict  # pylint: disable=g-import-not-at-top
  original = config_dict.ConfigDict(config)
  for name, text, message in (
      ('edited', json.dumps({**config, 'seed': 7}), 'different config (seed differ)'),
      ('garbled', '{"seed": 7,', 'config.json is unreadable'),
      ('not_a_dict', '[1, 2]', 'config.json is not a config')):
    work = tmp_path / name
    work.mkdir()
    (work / 'config.json').write_text(text)
    with pytest.raises(ckpt_lib.WorkdirError, match=re.escape(message)) as e:
      ckpt_lib.check_workdir_config(str(work), original)
    assert len(str(e.value).splitlines()) == 1 and '--workdir' in str(e.value)
