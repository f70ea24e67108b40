"""tf_ssl.outputs.write_text: a rewrite replaces the file, also on ram://
(where a plain GFile "w" on an existing file appends), and no temporary
file is left behind."""

import uuid

import pytest
import tensorflow as tf

from tf_ssl import outputs


@pytest.mark.parametrize("root", ["local", "ram"])
def test_rewrite_replaces_and_leaves_no_temporary(root, tmp_path):
  base = str(tmp_path) if root == "local" else f"ram://outputs-{uuid.uuid4().hex}"
  tf.io.gfile.makedirs(base)
  path = base + "/results.json"
  outputs.write_text(path, '{"a": 1}')
  outputs.write_text(path, '{"b": 2}')
  with tf.io.gfile.GFile(path) as f:
    assert f.read() == '{"b": 2}'
  assert tf.io.gfile.listdir(base) == ["results.json"]
