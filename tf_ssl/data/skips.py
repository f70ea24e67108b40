"""Skipping corrupt images: counted, and reported once per epoch.

tf.data's ignore_errors drops an element whose decode fails but says nothing.
To report, each epoch of records ends with a marker element that carries the
number of records read in that epoch; after the decode map and
ignore_errors, the marker compares it with the number that survived and, if
any were lost, prints one warning to stderr.

The report is a graph op (tf.print), not a Python callback: the pipeline
must run where no Python client is (tf.data service, the hosts of a
multi-host slice), so nothing in it may call back into Python.
"""

import sys

import tensorflow as tf

MARK_KEYS = ("_marker", "_count")


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


def skip_message(name, skipped, read, pipeline_id):
  """The warning for one epoch that lost `skipped` of `read` images (a
  string tensor; the arguments may be tensors)."""
  num = lambda x: tf.strings.as_string(tf.cast(x, tf.int64))
  return tf.strings.join([
      "WARNING: ", name, ": skipped ", num(skipped), " of ", num(read),
      " images this epoch (input pipeline ", num(pipeline_id), ") because "
      "they could not be decoded (corrupt or truncated files)."])


def count_skipped(ds, name, pipeline_id):
  """Counts survivors per epoch, reports losses at the marker, drops it.

  Args:
    ds: elements with the MARK_KEYS of with_epoch_marker, after
      ignore_errors.
    name: the source's name, for the message.
    pipeline_id: this input pipeline's id, for the message.
  """
  def step(survived, x):
    def report():
      msg = skip_message(name, x["_count"] - survived, x["_count"], pipeline_id)
      with tf.control_dependencies([tf.print(msg, output_stream=sys.stderr)]):
        return tf.constant(0, tf.int64)
    lost = x["_marker"] & (x["_count"] > survived)
    done = tf.cond(lost, report, lambda: tf.constant(0, tf.int64))
    with tf.control_dependencies([done]):
      survived = tf.where(x["_marker"], tf.constant(0, tf.int64), survived + 1)
    return survived, x
  ds = ds.scan(tf.constant(0, tf.int64), step)
  ds = ds.filter(lambda x: ~x["_marker"])
  return ds.map(lambda x: {k: v for k, v in x.items() if k not in MARK_KEYS})
