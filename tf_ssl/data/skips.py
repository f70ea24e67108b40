"""Skipping corrupt images: counted, and reported once per epoch.

tf.data's ignore_errors drops an element whose decode fails but says nothing.
To report, each epoch of records ends with a marker element that carries the
number of records read in that epoch; after the decode map and
ignore_errors, the marker compares it with the number that survived and, if
any were lost, logs one warning and records it in a SkipCounter.
"""

import threading

import tensorflow as tf
from absl import logging

MARK_KEYS = ("_marker", "_count")


class SkipCounter:
  """Per-epoch counts of skipped (undecodable) examples.

  Attributes:
    epochs: list of (pipeline_id, skipped, read) for every epoch that lost
      at least one example, in the order the epochs ended.
  """

  def __init__(self, name):
    self.name = name
    self.epochs = []
    self._lock = threading.Lock()

  @property
  def total(self):
    return sum(e[1] for e in self.epochs)

  def report(self, pipeline_id, skipped, read):
    pipeline_id, skipped, read = int(pipeline_id), int(skipped), int(read)
    with self._lock:
      self.epochs.append((pipeline_id, skipped, read))
    logging.warning("%s: skipped %d of %d images this epoch (input pipeline %d) "
                    "because they could not be decoded (corrupt or truncated "
                    "files).", self.name, skipped, read, pipeline_id)
    return 0


def _marker_like(spec):
  """A harmless record with the structure of `spec` (decodable image)."""
  out = {}
  for key, s in spec.items():
    if key == "encoded":
      out[key] = tf.io.encode_png(tf.zeros([1, 1, 3], tf.uint8))
    elif key == "label":
      out[key] = tf.constant(-1, tf.int64)
    else:
      out[key] = tf.zeros([d if d is not None else 1 for d in s.shape], s.dtype)
  return out


def with_epoch_marker(records):
  """Appends the end-of-epoch marker, carrying the epoch's record count."""
  records = records.map(lambda r: dict(r, _marker=False))
  marker = dict(_marker_like(records.element_spec), _marker=True)
  records = records.concatenate(tf.data.Dataset.from_tensors(marker))

  def count(n, r):
    n = tf.where(r["_marker"], n, n + 1)
    return n, dict(r, _count=n)
  return records.scan(tf.constant(0, tf.int64), count)


def count_skipped(ds, counter, pipeline_id):
  """Counts survivors per epoch, reports losses at the marker, drops it."""
  def step(survived, x):
    def report():
      return tf.py_function(
          counter.report, [pipeline_id, x["_count"] - survived, x["_count"]],
          tf.int64)
    lost = x["_marker"] & (x["_count"] > survived)
    done = tf.cond(lost, report, lambda: tf.constant(0, tf.int64))
    with tf.control_dependencies([done]):
      survived = tf.where(x["_marker"], tf.constant(0, tf.int64), survived + 1)
    return survived, x
  ds = ds.scan(tf.constant(0, tf.int64), step)
  ds = ds.filter(lambda x: ~x["_marker"])
  return ds.map(lambda x: {k: v for k, v in x.items() if k not in MARK_KEYS})
