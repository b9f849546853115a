"""Files replaced whole (jaxnas.files): the old file or the new one, never a part."""

import json
import os

import numpy as np
import pytest

from jaxnas import files


def test_json_replaces_whole_and_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
  path = tmp_path / 'sub' / 'summary.json'
  files.write_json(path, {'a': 1})
  files.write_json(path, {'a': 2})
  assert json.loads(path.read_text()) == {'a': 2}
  # Not serializable: nothing is written, the old file stays.
  with pytest.raises(TypeError):
    files.write_json(path, {'a': object()})
  assert json.loads(path.read_text()) == {'a': 2}
  # Interrupted between writing and renaming: the old file stays, no temporary is left.
  def fail(src, dst):
    raise OSError('disk gone')
  monkeypatch.setattr(os, 'replace', fail)
  with pytest.raises(OSError, match='disk gone'):
    files.write_json(path, {'a': 3})
  monkeypatch.undo()
  assert json.loads(path.read_text()) == {'a': 2}
  assert sorted(os.listdir(path.parent)) == ['summary.json']


def test_npz_and_text_round_trip(tmp_path):
  files.write_npz(tmp_path / 'arch.npz', alphas=np.arange(6.0).reshape(2, 3))
  np.testing.assert_array_equal(np.load(tmp_path / 'arch.npz')['alphas'],
                                np.arange(6.0).reshape(2, 3))
  assert files.write_text(tmp_path / 'c.svg', '<svg/>') == str(tmp_path / 'c.svg')
  assert (tmp_path / 'c.svg').read_text() == '<svg/>'
  assert sorted(os.listdir(tmp_path)) == ['arch.npz', 'c.svg']
