"""Sources: every kind yields {"image": uint8 [H, W, 3], "label": int64}."""

import gzip
import io
import logging

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tf_ssl.data import files, sources, subsets, tfds_source
from tf_ssl.data import from_arrays, label_subset, make_source


def _img(seed, h=12, w=10):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8)


def _save(path, array, fmt):
  Image.fromarray(array).save(path, format=fmt)


def _read_all(source, ctx=None):
  return list(source.dataset(ctx).as_numpy_iterator())


def test_arrays_grayscale_tiled_and_sharded():
  images = np.arange(5 * 4 * 4, dtype=np.uint8).reshape(5, 4, 4)
  src = from_arrays(images, [0, 1, 2, 0, 1])
  assert (src.num_examples, src.num_classes, src.image_size) == (5, 3, (4, 4))
  out = _read_all(src)
  assert out[2]["image"].shape == (4, 4, 3) and out[2]["image"].dtype == np.uint8
  np.testing.assert_array_equal(out[2]["image"][..., 1], images[2])
  ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=1)
  assert [r["label"] for r in _read_all(src, ctx)] == [1, 0]


def test_arrays_bad_labels_and_empty():
  with pytest.raises(ValueError, match="label 7 at index 1"):
    from_arrays(np.zeros([2, 4, 4], np.uint8), [0, 7], num_classes=3)
  with pytest.raises(ValueError, match="empty"):
    from_arrays(np.zeros([0, 4, 4], np.uint8))


def test_idx_fashion_mnist_format(tmp_path):
  images = np.random.default_rng(0).integers(0, 256, (3, 28, 28), np.uint8)
  labels = np.array([9, 0, 4], np.uint8)
  def write(name, arr, ndim):
    header = (0x0800 + ndim).to_bytes(4, "big") + b"".join(
        d.to_bytes(4, "big") for d in arr.shape)
    with gzip.open(tmp_path / name, "wb") as f:
      f.write(header + arr.tobytes())
  write("t10k-images-idx3-ubyte.gz", images, 3)
  write("t10k-labels-idx1-ubyte.gz", labels, 1)
  src = make_source("fashion_mnist", "test", data_dir=str(tmp_path))
  out = _read_all(src)
  assert [o["label"] for o in out] == [9, 0, 4]
  np.testing.assert_array_equal(out[1]["image"][..., 2], images[1])
  with pytest.raises(FileNotFoundError, match="train-images-idx3"):
    make_source("fashion_mnist", "train", data_dir=str(tmp_path))


def test_real_fashion_mnist():
  if not tf.io.gfile.exists(sources.FASHION_MNIST_DIR):
    pytest.skip("Debian's dataset-fashion-mnist is not installed")
  src = make_source("fashion_mnist", "test")
  assert (src.num_examples, src.num_classes, src.image_size) == (10000, 10, (28, 28))
  assert np.bincount(src.labels()).tolist() == [1000] * 10


def test_folder_classes_formats_and_ignored(tmp_path, caplog):
  for i, (cls, fmt, ext) in enumerate([("cat", "JPEG", "jpg"), ("cat", "PNG", "png"),
                                        ("dog", "BMP", "bmp"), ("dog", "GIF", "gif")]):
    (tmp_path / cls).mkdir(exist_ok=True)
    _save(tmp_path / cls / f"{i}.{ext}", _img(i), fmt)
  (tmp_path / "dog" / "notes.txt").write_text("not an image")
  with caplog.at_level(logging.WARNING):
    src = make_source(f"folder:{tmp_path}")
  assert "ignored 1 file" in caplog.text and "notes.txt" in caplog.text
  assert (src.num_examples, src.num_classes, src.classes) == (4, 2, ["cat", "dog"])
  out = _read_all(src)
  assert [o["label"] for o in out] == [0, 0, 1, 1]
  assert all(o["image"].shape == (12, 10, 3) for o in out)
  np.testing.assert_array_equal(out[1]["image"], _img(1))  # PNG is lossless
  np.testing.assert_array_equal(out[2]["image"], _img(2))  # BMP too


def test_flat_folder_unlabelled_and_errors(tmp_path):
  for i in range(3):
    _save(tmp_path / f"{i}.png", _img(i), "PNG")
  src = make_source(f"folder:{tmp_path}")
  assert src.num_classes is None and [o["label"] for o in _read_all(src)] == [-1] * 3
  with pytest.raises(FileNotFoundError, match="nope"):
    make_source(f"folder:{tmp_path}/nope")
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="no images"):
    make_source(f"folder:{tmp_path}/empty")
  with pytest.raises(ValueError, match="--dataset='bogus'"):
    make_source("bogus")


def _example(encoded, label):
  return tf.train.Example(features=tf.train.Features(feature={
      "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[encoded])),
      "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
  })).SerializeToString()


def test_tfrecord(tmp_path):
  for f in range(2):
    with tf.io.TFRecordWriter(str(tmp_path / f"train-{f}.tfrecord")) as w:
      for i in range(3):
        w.write(_example(tf.io.encode_png(_img(3 * f + i)).numpy(), 3 * f + i))
  src = make_source(f"tfrecord:{tmp_path}/train-*", num_classes=6)
  assert src.num_examples == 6
  out = _read_all(src)
  assert sorted(o["label"] for o in out) == list(range(6))
  for o in out:  # PNG round-trips exactly
    np.testing.assert_array_equal(o["image"], _img(o["label"]))
  ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=0)
  assert sorted(o["label"] for o in _read_all(src, ctx)) == [0, 1, 2]
  with pytest.raises(FileNotFoundError, match="no file matches"):
    make_source(f"tfrecord:{tmp_path}/val-*")


class TinyImages(__import__("tensorflow_datasets").core.GeneratorBasedBuilder):
  """A 2-class tfds dataset built from generated PNGs, no download."""
  VERSION = __import__("tensorflow_datasets").core.Version("1.0.0")

  def _info(self):
    import tensorflow_datasets as tfds
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(8, 8, 3)),
        "label": tfds.features.ClassLabel(num_classes=2)}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(6),
            "test": self._generate_examples(2)}

  def _generate_examples(self, n):
    for i in range(n):
      yield i, {"image": _img(i, 8, 8), "label": i % 2}


def test_tfds_local_build(tmp_path):
  TinyImages(data_dir=str(tmp_path)).download_and_prepare()
  src = make_source("tfds:tiny_images", "train", data_dir=str(tmp_path))
  assert (src.num_examples, src.num_classes, src.image_size) == (6, 2, (8, 8))
  out = _read_all(src)
  assert sorted(o["label"] for o in out) == [0, 0, 0, 1, 1, 1]
  assert {o["image"].tobytes() for o in out} == {_img(i, 8, 8).tobytes() for i in range(6)}
  sub = label_subset(src, per_class=1, seed=3)
  assert sorted(o["label"] for o in _read_all(sub)) == [0, 1]
  with pytest.raises(FileNotFoundError, match="never downloads"):
    make_source("tfds:tiny_images", data_dir=str(tmp_path / "elsewhere"))


def test_label_subsets_deterministic_and_balanced():
  labels = np.repeat(np.arange(10), 100)
  src = from_arrays(np.zeros([1000, 2, 2], np.uint8), labels)
  a = label_subset(src, fraction=0.1, seed=1)
  b = label_subset(src, fraction=0.1, seed=1)
  c = label_subset(src, per_class=5, seed=2)
  np.testing.assert_array_equal(a.labels(), b.labels())
  assert np.bincount(a.labels()).tolist() == [10] * 10
  assert np.bincount(c.labels()).tolist() == [5] * 10
  assert a.num_classes == 10 and a.num_examples == 100
  with pytest.raises(ValueError, match="exactly one"):
    label_subset(src)


class _CountingSource(sources.Source):
  """A parent that counts the records it hands out (a Python generator: the
  test runs locally)."""

  def __init__(self, n):
    super().__init__("counting", n, 3, None, False)
    self.read = 0

  def records(self, input_context=None, exact_shards=False):
    def gen():
      for i in range(self.num_examples):
        self.read += 1
        yield {"image": np.full([2, 2, 3], i, np.uint8), "label": i % 3}
    return tf.data.Dataset.from_generator(gen, output_signature={
        "image": tf.TensorSpec([2, 2, 3], tf.uint8),
        "label": tf.TensorSpec([], tf.int64)})


def test_indexed_subset_reads_parent_once():
  parent = _CountingSource(100)
  sub = subsets.IndexedSubset(parent, [40, 3, 17])
  got = [int(r["image"][0, 0, 0]) for r in sub.records().repeat(3).as_numpy_iterator()]
  assert got == [3, 17, 40] * 3
  assert parent.read <= 41 + 2  # one pass up to the last index (+ prefetch)
  ctx = tf.distribute.InputContext(2, 1, 2)
  assert [int(r["label"]) for r in sub.records(ctx).as_numpy_iterator()] == [17 % 3]
  with pytest.raises(ValueError, match="indices >= 0"):
    subsets.IndexedSubset(parent, [])


def _write_records(path, n):
  with tf.io.TFRecordWriter(str(path)) as w:
    for i in range(n):
      w.write(_example(b"x", i))


def test_tfrecord_count_per_file_once_or_given(tmp_path):
  for f, n in enumerate([3, 0, 5]):
    _write_records(tmp_path / f"train-{f}", n)
  paths = [str(tmp_path / f"train-{f}") for f in range(3)]
  assert files.count_records(paths) == [3, 0, 5]
  _write_records(tmp_path / "train-1", 4)  # counted already: not re-read
  assert make_source(f"tfrecord:{tmp_path}/train-*").num_examples == 8
  # A given count is used as is: these files are never read.
  (tmp_path / "bad-0").write_bytes(b"not a tfrecord")
  src = make_source(f"tfrecord:{tmp_path}/bad-*", num_examples=1281167)
  assert src.num_examples == 1281167
  with pytest.raises(tf.errors.DataLossError):
    make_source(f"tfrecord:{tmp_path}/bad-*").num_examples  # pylint: disable=expression-not-assigned
