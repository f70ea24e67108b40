"""Seeds, data order and resume: every random draw depends on (seed, input
pipeline id, start step); equal ones reproduce exactly when deterministic."""

import numpy as np
import pytest
import tensorflow as tf

from tf_ssl.data import augment, make_source, pipeline


def _folder(root, n=8, uniform=False):
  """n 8-px PNGs in two class folders. uniform: all one colour, so crops are
  all alike and only the batch-level distortions tell batches apart."""
  rng = np.random.default_rng(0)
  for i in range(n):
    d = root / f"c{i % 2}"
    d.mkdir(parents=True, exist_ok=True)
    pixels = (np.full([8, 8, 3], [200, 60, 120], np.uint8) if uniform
              else rng.integers(0, 256, (8, 8, 3), np.uint8))
    (d / f"{i:02d}.png").write_bytes(tf.io.encode_png(pixels).numpy())
  return make_source(f"folder:{root}")


def _views(ds, n=2):
  return [b["views"] for b in ds.take(n).as_numpy_iterator()]


def _pretrain(src, ctx=None, **kw):
  kw.setdefault("seed", 5)
  return pipeline.build_pretrain(src, 4, augment.SimCLRAugment(8), ctx,
                                 cache=False, **kw)


def test_pipelines_of_one_run_differ_in_batch_distortions(tmp_path):
  src = _folder(tmp_path, uniform=True)
  a, b = (_views(_pretrain(src, tf.distribute.InputContext(2, i, 2)))
          for i in range(2))
  assert a[0].std() > 0.01  # the distortions did something
  assert not np.allclose(a[0], b[0]) and not np.allclose(a[1], b[1])


def test_unseeded_runs_differ_in_batch_distortions(tmp_path):
  src = _folder(tmp_path, uniform=True)
  a, b = (_views(_pretrain(src, seed=None), 1)[0] for _ in range(2))
  assert not np.allclose(a, b)


def test_resumed_pipeline_draws_new_batches(tmp_path):
  src = _folder(tmp_path)
  fresh = _views(_pretrain(src, deterministic=True))
  resumed = _views(_pretrain(src, start_step=100, deterministic=True))
  assert not np.allclose(fresh[0], resumed[0])
  with pytest.raises(ValueError, match="start_step=-1"):
    _pretrain(src, start_step=-1)


def test_same_seed_and_step_reproduce(tmp_path):
  src = _folder(tmp_path)
  ctx = tf.distribute.InputContext(2, 1, 2)
  runs = [_views(_pretrain(src, ctx, start_step=7, deterministic=True), 3)
          for _ in range(2)]
  for x, y in zip(*runs):
    np.testing.assert_array_equal(x, y)
  bit = augment.BiTAugment(8, 10)
  tune = [[b["image"] for b in pipeline.build_finetune(
      src, 4, bit, seed=3, mixup_alpha=0.2, cache=False, start_step=9,
      deterministic=True).take(3).as_numpy_iterator()] for _ in range(2)]
  for x, y in zip(*tune):
    np.testing.assert_array_equal(x, y)


def test_folder_order_reshuffled_every_epoch_and_sharded(tmp_path):
  src = _folder(tmp_path, n=16)
  epochs = [int(r["label"]) for r in src.shuffled_records(None, 3).repeat(3)
            .as_numpy_iterator()]
  epochs = [epochs[k:k + 16] for k in (0, 16, 32)]
  assert all(sorted(e) == [0] * 8 + [1] * 8 for e in epochs)
  assert epochs[0] != epochs[1] and epochs[0] != sorted(epochs[0])
  paths = lambda i: {r["encoded"] for r in src.shuffled_records(
      tf.distribute.InputContext(2, i, 2), 3).as_numpy_iterator()}
  assert len(paths(0) | paths(1)) == 16 and not paths(0) & paths(1)


def test_tfrecord_file_order_reshuffled_every_epoch(tmp_path):
  for f in range(6):
    with tf.io.TFRecordWriter(str(tmp_path / f"train-{f}")) as w:
      w.write(tf.train.Example(features=tf.train.Features(feature={
          "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"x"])),
          "image/class/label": tf.train.Feature(
              int64_list=tf.train.Int64List(value=[f]))})).SerializeToString())
  src = make_source(f"tfrecord:{tmp_path}/train-*")
  assert [int(r["label"]) for r in src.records().as_numpy_iterator()] == list(range(6))
  order = lambda: [int(r["label"]) for r in src.shuffled_records(None, 4).repeat(3)
                   .as_numpy_iterator()]
  got = order()
  assert got == order()  # seeded
  epochs = [got[k:k + 6] for k in (0, 6, 12)]
  assert all(sorted(e) == list(range(6)) for e in epochs)
  assert len({tuple(e) for e in epochs}) > 1


class _Recorder:
  """Wraps a tfds builder's as_dataset, keeping the shuffle arguments."""

  def __init__(self, builder):
    self.builder, self.calls = builder, []

  def __getattr__(self, name):
    return getattr(self.builder, name)

  def as_dataset(self, split, shuffle_files, read_config, **kw):
    self.calls.append((shuffle_files, read_config.shuffle_seed,
                       read_config.shuffle_reshuffle_each_iteration))
    return self.builder.as_dataset(split, shuffle_files=shuffle_files,
                                   read_config=read_config, **kw)


def test_tfds_training_shuffles_files_eval_does_not(tmp_path):
  from test_data_sources import TinyImages  # pylint: disable=g-import-not-at-top
  TinyImages(data_dir=str(tmp_path)).download_and_prepare()
  src = make_source("tfds:tiny_images", "train", data_dir=str(tmp_path))
  src.builder = rec = _Recorder(src.builder)
  pipeline.build_pretrain(src, 2, augment.SimCLRAugment(8), seed=1, cache=False)
  want = pipeline.Seeds(1).files
  pipeline.build_eval(src, 2, 8, cache=False)
  assert rec.calls == [(True, want, True), (False, None, None)]
  # A different start step reads the files in another order.
  pipeline.build_pretrain(src, 2, augment.SimCLRAugment(8), seed=1, cache=False,
                          start_step=50)
  assert rec.calls[-1][1] != want
  assert sorted(int(r["label"]) for r in src.shuffled_records(None, 3)
                .as_numpy_iterator()) == [0, 0, 0, 1, 1, 1]
