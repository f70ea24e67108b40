"""Pipelines: per-replica batches, determinism, exact eval, bad input."""

import numpy as np
import pytest
import tensorflow as tf

from tf_ssl.data import augment, from_arrays, make_source, pipeline


def _source(n=24, size=8):
  rng = np.random.default_rng(0)
  return from_arrays(rng.integers(0, 256, (n, size, size, 3), np.uint8),
                     np.arange(n) % 3)


def _local(strategy, dist_batch):
  return [t.numpy() for t in strategy.experimental_local_results(dist_batch)]


def test_pretrain_per_replica_batches(strategy):
  aug = augment.SimCLRAugment(8, 0.5)
  ds = pipeline.pretrain_dataset(strategy, _source(), 8, aug, seed=1)
  batch = next(iter(ds))
  views = _local(strategy, batch["views"])
  r = strategy.num_replicas_in_sync
  assert len(views) == r and all(v.shape == (8 // r, 2, 8, 8, 3) for v in views)
  assert all(v.dtype == np.float32 and 0 <= v.min() and v.max() <= 1 for v in views)
  assert all(l.dtype == np.int64 for l in _local(strategy, batch["label"]))


def test_batch_not_divisible(strategy_4):
  with pytest.raises(ValueError, match="global batch size 6"):
    pipeline.pretrain_dataset(strategy_4, _source(), 6, augment.SimCLRAugment(8))


def test_seeded_is_deterministic_and_epochs_differ():
  aug = augment.SimCLRAugment(8, 0.5)
  take = lambda seed: [b["views"] for b in pipeline.build_pretrain(
      _source(), 24, aug, seed=seed).take(2).as_numpy_iterator()]
  a, b, c = take(3), take(3), take(4)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert not np.array_equal(a[0], c[0])
  assert not np.array_equal(np.sort(a[0].ravel()), np.sort(a[1].ravel()))


def test_eval_every_example_once(strategy):
  n = 23
  src = _source(n)
  ds = pipeline.eval_dataset(strategy, src, 8, 8)
  seen, steps = [], 0
  for batch in ds:
    steps += 1
    for img, mask in zip(_local(strategy, batch["image"]), _local(strategy, batch["mask"])):
      seen += [tuple(np.round(i.ravel()[:6] * 255).astype(int)) for i in img[mask > 0]]
  want = [tuple(x.ravel()[:6]) for x in src.images]
  assert sorted(seen) == sorted(want)
  r = strategy.num_replicas_in_sync
  assert steps == pipeline.eval_steps(
      src, 8 // r, tf.distribute.InputContext(1, 0, r))


@pytest.mark.parametrize("shape,size", [((28, 28, 1), 28), ((40, 36, 3), 24),
                                        ((40, 36, 3), 48)])
@pytest.mark.parametrize("pipelines", [1, 2])
def test_eval_whole_batches_equal_per_example_views(shape, size, pipelines):
  # In-memory arrays take the batch-level path; an explicit view_fn forces the
  # per-example one. Same images (grey tiled, centre crop above 32 px,
  # resize), labels, masks and padding, on every input pipeline.
  rng = np.random.default_rng(1)
  src = from_arrays(rng.integers(0, 256, (13,) + shape, np.uint8), np.arange(13) % 3)
  for pid in range(pipelines):
    ctx = tf.distribute.InputContext(pipelines, pid, pipelines)
    fast = list(pipeline.build_eval(src, 4, size, ctx).as_numpy_iterator())
    slow = list(pipeline.build_eval(
        src, 4, size, ctx, view_fn=lambda r: augment.eval_view(r, size)
    ).as_numpy_iterator())
    assert len(fast) == len(slow) == pipeline.eval_steps(src, 4, ctx)
    for a, b in zip(fast, slow):
      assert a["image"].shape == (4, size, size, 3)
      np.testing.assert_allclose(a["image"], b["image"], atol=1e-6)
      np.testing.assert_array_equal(a["label"], b["label"])
      np.testing.assert_array_equal(a["mask"], b["mask"])


def test_finetune_and_mixup(strategy_2):
  bit = augment.BiTAugment(8, 10)
  batch = next(iter(pipeline.finetune_dataset(strategy_2, _source(), 4, bit, seed=0,
                                              mixup_alpha=0.1)))
  labels = _local(strategy_2, batch["label"])
  assert labels[0].shape == (2, 3) and labels[0].dtype == np.float32
  np.testing.assert_allclose(labels[0].sum(1), 1, atol=1e-6)


def _write_folder(tmp_path):
  rng = np.random.default_rng(0)
  d = tmp_path / "cls"
  d.mkdir()
  for i in range(3):
    tf.io.write_file(str(d / f"{i}.png"), tf.io.encode_png(
        rng.integers(0, 256, (5, 6, 3), np.uint8)))  # smaller than the crop
  good = tf.io.encode_jpeg(rng.integers(0, 256, (40, 40, 3), np.uint8)).numpy()
  (d / "truncated.jpg").write_bytes(good[:len(good) // 3])
  (d / "garbage.png").write_bytes(b"not a png at all")
  return tmp_path


def _skip_reports(text):
  return [l for l in text.splitlines() if "could not be decoded" in l]


def test_corrupt_files_skipped_counted_once_per_epoch(tmp_path, capfd):
  src = make_source(f"folder:{_write_folder(tmp_path)}")
  capfd.readouterr()
  ds = pipeline.build_pretrain(src, 1, augment.SimCLRAugment(16), seed=0)
  views = [b["views"] for b in ds.take(9).as_numpy_iterator()]  # 3 epochs
  assert all(v.shape == (1, 2, 16, 16, 3) for v in views)     # 5x6 upscaled
  reports = _skip_reports(capfd.readouterr().err)
  assert len(reports) >= 2 and reports[0] == reports[1], reports
  assert reports[0] == (f"WARNING: {src.name}: skipped 2 of 5 images this epoch "
                        "(input pipeline 0) because they could not be decoded "
                        "(corrupt or truncated files).")
  ev = list(pipeline.build_eval(src, 4, 16).as_numpy_iterator())
  assert sum(b["mask"].sum() for b in ev) == 3
  assert len(_skip_reports(capfd.readouterr().err)) == 1


def test_label_outside_classes_names_source(tmp_path):
  example = tf.train.Example(features=tf.train.Features(feature={
      "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(
          value=[tf.io.encode_png(tf.zeros([4, 4, 3], tf.uint8)).numpy()])),
      "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[5])),
  }))
  path = str(tmp_path / "bad.tfrecord")
  with tf.io.TFRecordWriter(path) as w:
    w.write(example.SerializeToString())
  src = make_source(f"tfrecord:{path}", num_classes=2)
  with pytest.raises(tf.errors.InvalidArgumentError, match="bad.tfrecord.*outside"):
    next(iter(pipeline.build_pretrain(src, 1, augment.SimCLRAugment(8), seed=0)))


def test_no_false_skips_in_fast_nondeterministic_mode(tmp_path, capfd):
  # Without a seed the parallel map may reorder elements; the end-of-epoch
  # marker must still not overtake images that are decoding, or whole files
  # are reported as skipped when none is corrupt.
  rng = np.random.default_rng(0)
  folder = tmp_path / "c0"
  folder.mkdir()
  for i in range(48):
    side = 16 if i % 8 else 400  # a few slow, large images among fast ones
    pixels = rng.integers(0, 255, (side, side + 7, 3), dtype=np.uint8)
    (folder / f"{i}.jpg").write_bytes(tf.io.encode_jpeg(pixels).numpy())
  src = make_source(f"folder:{tmp_path}")
  capfd.readouterr()
  ds = pipeline.build_pretrain(src, 4, augment.SimCLRAugment(16), seed=None,
                               cache=False)
  for _ in ds.take(4 * 48 // 4):  # four epochs
    pass
  assert _skip_reports(capfd.readouterr().err) == []
