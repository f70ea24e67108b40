"""Deterministic label subsets for semi-supervised work (1%, 10%, k per class).

The subset is a pure function of the source's labels (in record order) and
the seed, so every worker that computes it gets the same examples.
"""

import numpy as np
import tensorflow as tf

from tf_ssl.data import sources


def label_subset_indices(labels, fraction=None, per_class=None, seed=0):
  """Sorted record indices of a class-balanced, seeded subset of `labels`.

  Exactly one of `fraction` and `per_class` must be given. Selection is
  stratified: from each class, round(fraction * class size) examples (at
  least 1), or `per_class` examples (all of them when the class is smaller),
  drawn with NumPy's default_rng(seed). Unlabelled examples (-1) are never
  chosen. A pure function of the labels and the seed, so every worker (and
  every tool that needs the indices themselves) gets the same subset.

  Args:
    labels: int array of the labels in record order (-1: unlabelled).
    fraction: in (0, 1], e.g. 0.01 or 0.1.
    per_class: examples per class, e.g. 10.
    seed: the subset's seed.

  Returns:
    int64 array of indices in record order.
  """
  if (fraction is None) == (per_class is None):
    raise ValueError("label_subset: pass exactly one of fraction (e.g. 0.01) "
                     "and per_class (e.g. 10).")
  if fraction is not None and not 0 < fraction <= 1:
    raise ValueError(f"label_subset: fraction={fraction} must be in (0, 1].")
  if per_class is not None and per_class < 1:
    raise ValueError(f"label_subset: per_class={per_class} must be >= 1.")
  labels = np.asarray(labels)
  classes = np.unique(labels[labels >= 0])
  if classes.size == 0:
    raise ValueError("label_subset: there are no labelled examples.")
  rng = np.random.default_rng(seed)
  chosen = []
  for c in classes:
    members = np.flatnonzero(labels == c)
    k = per_class if per_class is not None else max(
        1, int(round(fraction * members.size)))
    chosen.append(rng.permutation(members)[:min(k, members.size)])
  return np.sort(np.concatenate(chosen)).astype(np.int64)


def label_subset(source, fraction=None, per_class=None, seed=0):
  """A Source with the examples `label_subset_indices` picks from `source`.

  Args:
    source: a labelled Source.
    fraction, per_class, seed: as in label_subset_indices.

  Returns:
    A Source whose num_classes is the source's.
  """
  try:
    indices = label_subset_indices(source.labels(), fraction, per_class, seed)
  except ValueError as e:
    raise ValueError(f"{e} (source: {source.name})") from None
  return source.take(indices)


class IndexedSubset(sources.Source):
  """Records at given indices of a source that cannot index directly
  (tfds, TFRecords).

  The first epoch reads the parent in order, up to the last chosen index,
  and keeps the chosen records; they are cached in memory, so the following
  epochs of the same dataset read only the subset (the 1% ImageNet subset
  is ~13k records, ~1.4 GB of JPEGs split over the input pipelines; the
  parent is 1.28M). The parent's size need not be known. "index" is the
  record's position in the subset.
  """
  has_index = True

  def __init__(self, parent, indices):
    indices = np.unique(np.asarray(indices, np.int64))
    if indices.size == 0 or indices[0] < 0:
      raise ValueError(f"{parent.name}: a subset needs indices >= 0; got "
                       f"{indices.size} indices, the first {indices[:1]}.")
    super().__init__(f"{parent.name}[subset]", len(indices),
                     parent.num_classes, parent.image_size, parent.encoded)
    self.parent, self.indices = parent, indices

  def records(self, input_context=None, exact_shards=False):
    indices = tf.constant(self.indices)
    last = len(self.indices) - 1

    def chosen(i, _):
      at = tf.minimum(tf.searchsorted(indices, i[None])[0], last)
      return tf.equal(tf.gather(indices, at), i)
    ds = self.parent.records(None).take(int(self.indices[-1]) + 1).enumerate()
    ds = ds.filter(chosen).enumerate().map(
        lambda k, x: dict(x[1], index=tf.cast(k, tf.int64)))
    return sources.shard(ds, input_context).cache()


class MaskedLabels(sources.Source):
  """Every record of `parent`, with label -1 except at the kept indices.

  The semi-supervised pool: all images, the labels of a subset only
  (e.g. distillation's labelled term). Needs records that carry "index"
  (in-memory, folder and tfds sources; not TFRecords).
  """
  has_index = True

  def __init__(self, parent, keep_indices):
    if not parent.has_index:
      raise ValueError(f"{parent.name}: keeping the labels of a subset needs "
                       "records with example indices (in-memory, folder or tfds "
                       "sources; TFRecord files have none).")
    super().__init__(f"{parent.name}[labels of {len(keep_indices)}]",
                     parent.num_examples, parent.num_classes, parent.image_size,
                     parent.encoded)
    self.parent = parent
    self.keep = np.unique(np.asarray(keep_indices, np.int64))
    if self.keep.size == 0:
      raise ValueError(f"{parent.name}: no labelled examples to keep.")

  def _mask(self, ds):
    keep = tf.constant(self.keep)
    last = len(self.keep) - 1

    def fn(record):
      i = record["index"]
      at = tf.minimum(tf.searchsorted(keep, i[None])[0], last)
      kept = tf.equal(tf.gather(keep, at), i)
      return dict(record, label=tf.where(kept, record["label"],
                                         tf.constant(-1, record["label"].dtype)))
    return ds.map(fn)

  def records(self, input_context=None, exact_shards=False):
    return self._mask(self.parent.records(input_context, exact_shards))

  def shuffled_records(self, input_context, seed):
    return self._mask(self.parent.shuffled_records(input_context, seed))

  def labels(self):
    labels = np.full([self.num_examples], -1, np.int64)
    labels[self.keep] = self.parent.labels()[self.keep]
    return labels


def keep_subset_labels(source, fraction=None, per_class=None, seed=0):
  """All of `source`, labelled only where label_subset would pick (the same
  examples for the same seed)."""
  try:
    indices = label_subset_indices(source.labels(), fraction, per_class, seed)
  except ValueError as e:
    raise ValueError(f"{e} (source: {source.name})") from None
  return MaskedLabels(source, indices)
