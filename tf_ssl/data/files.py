"""File-backed sources: image folders and ImageNet-style TFRecords.

Records keep the encoded bytes, so the augmentation can decode only a crop
window of each JPEG. Corrupt files surface as decode errors in the pipeline,
which skips and counts them (pipeline.py); here only listing can fail.
"""

import os
import threading

import numpy as np
import tensorflow as tf
from absl import logging

from tf_ssl.data import sources

# What tf.io.decode_image reads; GIF gives its first frame.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


def _is_dir(path):
  return tf.io.gfile.isdir(path)


# Sub-folder names that mark a folder of splits rather than of classes.
SPLIT_NAMES = ("train", "test", "val", "validation")


def split_folder(root, split, flag=None):
  """The folder a split of folder:<root> reads: <root>/<split> when it exists,
  else <root>; fails when <root> holds other splits' folders but not this one
  (it would otherwise read them as classes)."""
  flag = flag or f"folder:{root}"
  if not tf.io.gfile.isdir(root):
    raise FileNotFoundError(f"--dataset={flag}: {root} is not a directory.")
  path = os.path.join(root, split)
  if split and tf.io.gfile.isdir(path):
    return path
  splits = sorted(n.rstrip("/") for n in tf.io.gfile.listdir(root)
                  if n.rstrip("/") in SPLIT_NAMES and
                  _is_dir(os.path.join(root, n.rstrip("/"))))
  if splits:
    raise FileNotFoundError(
        f"--dataset={flag}: {root} has split folders {', '.join(splits)} but "
        f"no {split!r}; pass one of them as the split (--train_split / "
        f"--eval_split) or add {path}.")
  return root


def _images_in(folder):
  """Sorted image paths directly in `folder`, and the other files' names."""
  images, other = [], []
  for name in sorted(tf.io.gfile.listdir(folder)):
    path = os.path.join(folder, name.rstrip("/"))
    if name.endswith("/") or _is_dir(path):
      continue
    (images if name.lower().endswith(IMAGE_EXTENSIONS) else other).append(path)
  return images, other


class FolderSource(sources.Source):
  """Images in class sub-folders (labels by sorted folder name), or a flat
  folder of unlabelled images (labels -1).

  Files whose extension is not one of IMAGE_EXTENSIONS are ignored with one
  warning that counts them. "index" is the file's position in the sorted
  list (classes in order, files sorted within each). `flag` (the --dataset
  value) names the source in errors; the Source's name is folder:<root>,
  the folder actually read.
  """

  has_index = True

  def __init__(self, root, flag=None):
    name = f"folder:{root}"
    flag = flag or name
    if not tf.io.gfile.exists(root) or not _is_dir(root):
      raise FileNotFoundError(f"--dataset={flag}: {root} is not a directory.")
    classes = sorted(n.rstrip("/") for n in tf.io.gfile.listdir(root)
                     if _is_dir(os.path.join(root, n.rstrip("/"))))
    paths, labels, ignored = [], [], []
    if classes:
      for label, cls in enumerate(classes):
        found, other = _images_in(os.path.join(root, cls))
        paths += found
        labels += [label] * len(found)
        ignored += other
      loose, other = _images_in(root)
      ignored += loose + other
      num_classes = len(classes)
    else:
      paths, ignored = _images_in(root)
      labels = [-1] * len(paths)
      num_classes = None
    if ignored:
      logging.warning("%s: ignored %d file(s) that are not images in a class "
                      "folder, e.g. %s", name, len(ignored), ignored[0])
    if not paths:
      raise ValueError(f"--dataset={flag}: no images ({', '.join(IMAGE_EXTENSIONS)}) "
                       f"found in {root} or its sub-folders.")
    super().__init__(name, len(paths), num_classes, None, True)
    self.classes = classes
    self.paths = np.array(paths)
    self._labels = np.array(labels, np.int64)

  def records(self, input_context=None, exact_shards=False):
    ds = tf.data.Dataset.from_tensor_slices(
        (self.paths, self._labels, np.arange(len(self.paths), dtype=np.int64)))
    ds = sources.shard(ds, input_context)
    return ds.map(_read, num_parallel_calls=tf.data.AUTOTUNE)

  def shuffled_records(self, input_context, seed):
    """This pipeline's share of the files in a new order every epoch.

    Folders are stored class by class, so a shuffle buffer smaller than the
    folder would fill batches from a few classes; the whole path list is
    shuffled instead (indices in the buffer: 8 bytes per image).
    """
    n, i = 1, 0
    if input_context is not None:
      n, i = input_context.num_input_pipelines, input_context.input_pipeline_id
    paths = tf.constant(self.paths[i::n])
    labels = tf.constant(self._labels[i::n])
    count = int(paths.shape[0])
    order = tf.data.Dataset.range(count).shuffle(
        max(1, count), seed=seed, reshuffle_each_iteration=True)
    return order.map(lambda k: _read(tf.gather(paths, k), tf.gather(labels, k),
                                     i + k * n),
                     num_parallel_calls=tf.data.AUTOTUNE)

  def labels(self):
    return self._labels.copy()

  def take(self, indices):
    sub = object.__new__(FolderSource)
    sources.Source.__init__(sub, f"{self.name}[subset]", len(indices),
                            self.num_classes, None, True)
    sub.classes = self.classes
    sub.paths, sub._labels = self.paths[indices], self._labels[indices]  # pylint: disable=protected-access
    return sub


def _read(path, label, index):
  return {"encoded": tf.io.read_file(path), "label": label,
          "index": tf.cast(index, tf.int64)}


_FEATURES = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "image/class/label": tf.io.FixedLenFeature([], tf.int64, default_value=-1),
}


# Records per TFRecord file, counted at most once per process.
_RECORD_COUNTS = {}
_COUNT_LOCK = threading.Lock()


def count_records(paths, parallel=16):
  """Records in each of the TFRecord files `paths` (a list of ints).

  Each file is counted once per process (remembered by path) and up to
  `parallel` files at a time, since from a bucket the count is bound by
  per-file latency, not by cores.
  """
  with _COUNT_LOCK:
    todo = [p for p in dict.fromkeys(paths) if p not in _RECORD_COUNTS]
    if todo:
      count = lambda f: tf.data.TFRecordDataset(f, buffer_size=1 << 22).reduce(
          tf.constant(0, tf.int64), lambda n, _: n + 1)
      ds = tf.data.Dataset.from_tensor_slices(todo).map(
          count, num_parallel_calls=min(parallel, len(todo)), deterministic=True)
      for path, n in zip(todo, ds.as_numpy_iterator()):
        _RECORD_COUNTS[path] = int(n)
    return [_RECORD_COUNTS[p] for p in paths]


class TFRecordSource(sources.Source):
  """ImageNet-style TFRecords: `image/encoded` bytes, `image/class/label`.

  Labels are taken as stored (0-based); records without a label are
  unlabelled (-1). With num_classes given, the pipeline checks every label
  against it and fails naming the glob.

  num_examples is known only by reading every record, so it is counted only
  when asked for (the trainer's epoch length, eval, label subsets), files in
  parallel and once per process (count_records); pass num_examples when you
  know it (ImageNet train: 1281167) to skip the count.
  """

  def __init__(self, pattern, num_classes=None, flag=None, num_examples=None):
    name = f"tfrecord:{pattern}"
    self._flag = flag or name
    self.files = sorted(tf.io.gfile.glob(pattern))
    if not self.files:
      raise FileNotFoundError(f"--dataset={self._flag}: no file matches {pattern}.")
    if num_examples is not None and num_examples < 1:
      raise ValueError(f"--dataset={self._flag}: num_examples={num_examples} "
                       "must be >= 1 (or None to count the records).")
    super().__init__(name, num_examples, num_classes, None, True)

  @property
  def num_examples(self):
    if self._num_examples is None:
      self._num_examples = sum(count_records(self.files))
      if self._num_examples == 0:
        raise ValueError(f"--dataset={self._flag}: the files matching "
                         f"{self.name[len('tfrecord:'):]} hold no records.")
    return self._num_examples

  def records(self, input_context=None, exact_shards=False):
    return self._read(input_context, exact_shards, None)

  def shuffled_records(self, input_context, seed):
    """Records with the file order reshuffled every epoch (the same order on
    every pipeline, each then keeping its share)."""
    return self._read(input_context, False, seed)

  def _read(self, input_context, exact_shards, seed):
    n = input_context.num_input_pipelines if input_context else 1
    by_file = n > 1 and not exact_shards and len(self.files) >= n
    files = tf.data.Dataset.from_tensor_slices(self.files)
    if by_file:  # cheaper: each pipeline opens only its own files
      files = sources.shard(files, input_context)
    if seed is not None:
      files = files.shuffle(len(self.files), seed=seed,
                            reshuffle_each_iteration=True)
    ds = files.interleave(tf.data.TFRecordDataset, cycle_length=4,
                          num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if not by_file:
      ds = sources.shard(ds, input_context)

    def parse(serialized):
      f = tf.io.parse_single_example(serialized, _FEATURES)
      return {"encoded": f["image/encoded"], "label": f["image/class/label"]}
    return ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE)
