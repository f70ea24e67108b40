"""File-backed sources: image folders and ImageNet-style TFRecords.

Records keep the encoded bytes, so the augmentation can decode only a crop
window of each JPEG. Corrupt files surface as decode errors in the pipeline,
which skips and counts them (pipeline.py); here only listing can fail.
"""

import os

import numpy as np
import tensorflow as tf
from absl import logging

from tf_ssl.data import sources

# What tf.io.decode_image reads; GIF gives its first frame.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


def _is_dir(path):
  return tf.io.gfile.isdir(path)


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
  warning that counts them.
  """

  def __init__(self, root):
    name = f"folder:{root}"
    if not tf.io.gfile.exists(root) or not _is_dir(root):
      raise FileNotFoundError(f"--dataset={name}: {root} is not a directory.")
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
      raise ValueError(f"--dataset={name}: no images ({', '.join(IMAGE_EXTENSIONS)}) "
                       f"found in {root} or its sub-folders.")
    super().__init__(name, len(paths), num_classes, None, True)
    self.classes = classes
    self.paths = np.array(paths)
    self._labels = np.array(labels, np.int64)

  def records(self, input_context=None, exact_shards=False):
    ds = tf.data.Dataset.from_tensor_slices((self.paths, self._labels))
    ds = sources.shard(ds, input_context)
    return ds.map(lambda p, y: {"encoded": tf.io.read_file(p), "label": y},
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


_FEATURES = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "image/class/label": tf.io.FixedLenFeature([], tf.int64, default_value=-1),
}


class TFRecordSource(sources.Source):
  """ImageNet-style TFRecords: `image/encoded` bytes, `image/class/label`.

  Labels are taken as stored (0-based); records without a label are
  unlabelled (-1). With num_classes given, the pipeline checks every label
  against it and fails naming the glob.
  """

  def __init__(self, pattern, num_classes=None):
    name = f"tfrecord:{pattern}"
    self.files = sorted(tf.io.gfile.glob(pattern))
    if not self.files:
      raise FileNotFoundError(f"--dataset={name}: no file matches {pattern}.")
    super().__init__(name, None, num_classes, None, True)

  @property
  def num_examples(self):
    # Counting reads every file once; only eval and subsets ask for it.
    if self._num_examples is None:
      self._num_examples = int(
          tf.data.TFRecordDataset(self.files).reduce(0, lambda n, _: n + 1))
      if self._num_examples == 0:
        raise ValueError(f"--dataset={self.name}: the files hold no records.")
    return self._num_examples

  def records(self, input_context=None, exact_shards=False):
    n = input_context.num_input_pipelines if input_context else 1
    by_file = n > 1 and not exact_shards and len(self.files) >= n
    files = tf.data.Dataset.from_tensor_slices(self.files)
    if by_file:  # cheaper: each pipeline opens only its own files
      files = sources.shard(files, input_context)
    ds = files.interleave(tf.data.TFRecordDataset, cycle_length=4,
                          num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if not by_file:
      ds = sources.shard(ds, input_context)

    def parse(serialized):
      f = tf.io.parse_single_example(serialized, _FEATURES)
      return {"encoded": f["image/encoded"], "label": f["image/class/label"]}
    return ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE)
