"""Splits of own data: folder:<root> reads <root>/<split>/ when it exists,
tfrecord:<glob> substitutes {split}, and a Source's name says what it read,
so evaluating on the training data can be detected (sources.same_data)."""

import numpy as np
import pytest
import tensorflow as tf

from tf_ssl.data import make_source, sources


def _png(path, value):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(tf.io.encode_png(np.full([4, 4, 3], value, np.uint8)).numpy())


def _labels(src):
  return sorted(int(r["label"]) for r in src.dataset().as_numpy_iterator())


def test_folder_reads_split_subfolder(tmp_path):
  for split, n in (("train", 3), ("test", 1)):
    for cls in ("a", "b"):
      for i in range(n):
        _png(tmp_path / split / cls / f"{i}.png", i)
  train = make_source(f"folder:{tmp_path}", "train")
  test = make_source(f"folder:{tmp_path}", "test")
  assert train.name == f"folder:{tmp_path}/train"
  assert test.name == f"folder:{tmp_path}/test"
  assert (train.num_examples, test.num_examples) == (6, 2)
  assert train.classes == test.classes == ["a", "b"]
  assert _labels(test) == [0, 1]
  assert not sources.same_data(train, test)


def test_folder_without_split_subfolders_is_every_split(tmp_path):
  for cls in ("a", "b"):
    _png(tmp_path / cls / "0.png", 1)
  train = make_source(f"folder:{tmp_path}", "train")
  test = make_source(f"folder:{tmp_path}", "test")
  assert train.name == test.name == f"folder:{tmp_path}"
  assert train.classes == ["a", "b"]
  assert sources.same_data(train, test)


def test_folder_missing_split_names_the_flag(tmp_path):
  _png(tmp_path / "train" / "a" / "0.png", 1)
  _png(tmp_path / "val" / "a" / "0.png", 1)
  # Without the check, train/ and val/ would be read as two classes.
  with pytest.raises(FileNotFoundError,
                     match=r"--dataset=folder:.*train, val but no 'test'.*--eval_split"):
    make_source(f"folder:{tmp_path}", "test")
  assert make_source(f"folder:{tmp_path}", "val").num_examples == 1


def _write_tfrecord(path, labels):
  with tf.io.TFRecordWriter(str(path)) as w:
    for y in labels:
      w.write(tf.train.Example(features=tf.train.Features(feature={
          "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(
              value=[tf.io.encode_png(tf.zeros([2, 2, 3], tf.uint8)).numpy()])),
          "image/class/label": tf.train.Feature(
              int64_list=tf.train.Int64List(value=[y]))})).SerializeToString())


def test_tfrecord_split_placeholder(tmp_path):
  _write_tfrecord(tmp_path / "train-0", [0, 1, 1])
  _write_tfrecord(tmp_path / "test-0", [1])
  flag = f"tfrecord:{tmp_path}/{{split}}-*"
  train, test = make_source(flag, "train"), make_source(flag, "test")
  assert train.name == f"tfrecord:{tmp_path}/train-*"
  assert test.name == f"tfrecord:{tmp_path}/test-*"
  assert (_labels(train), _labels(test)) == ([0, 1, 1], [1])
  assert not sources.same_data(train, test)
  with pytest.raises(FileNotFoundError,
                     match=r"--dataset=tfrecord:.*\{split\}-\*: no file matches .*val-\*"):
    make_source(flag, "val")
  # A glob without {split} is read for every split.
  a = make_source(f"tfrecord:{tmp_path}/train-*", "train")
  b = make_source(f"tfrecord:{tmp_path}/train-*", "test")
  assert sources.same_data(a, b) and _labels(b) == [0, 1, 1]
