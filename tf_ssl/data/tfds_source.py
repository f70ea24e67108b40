"""A tensorflow-datasets dataset as a Source, read from data_dir, never downloaded."""

import os

import numpy as np
import tensorflow as tf

from tf_ssl.data import sources


class TfdsSource(sources.Source):
  """A prepared tfds dataset (imagenet2012, cifar10, stl10, ...).

  Images are read undecoded (tfds SkipDecoding), so JPEG datasets such as
  imagenet2012 get the crop-window decode of augment.py. A split without a
  "label" feature, or with label -1 (stl10's "unlabelled"), is unlabelled.
  "index" is the example's position in the split (sub-splits such as
  "train[:10%]" count from their own start), from tfds' per-example id
  (file, position in the file) and the split's file instructions, so it
  does not depend on the order the files are read in.
  """

  def __init__(self, dataset, split="train", data_dir=None):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    self._tfds = tfds
    flag = f"tfds:{dataset}"
    try:
      self.builder = tfds.builder(dataset, data_dir=data_dir)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"--dataset={flag}: tfds has no dataset {dataset!r} "
                       f"({e}).") from e
    if not self.builder.is_prepared():
      raise FileNotFoundError(
          f"--dataset={flag}: not prepared under --data_dir={data_dir!r}. "
          "tf_ssl never downloads; prepare it first, e.g. `tfds build "
          f"{dataset} --data_dir=<dir>`, and pass that --data_dir.")
    info = self.builder.info
    try:
      num_examples = info.splits[split].num_examples
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"--dataset={flag}: no split {split!r}; it has "
                       f"{', '.join(info.splits.keys())}.") from e
    if num_examples == 0:
      raise ValueError(f"--dataset={flag} split {split!r} is empty.")
    label = info.features["label"] if "label" in info.features.keys() else None
    shape = info.features["image"].shape
    size = shape[:2] if None not in shape[:2] else None
    super().__init__(f"{flag}:{split}", num_examples,
                     getattr(label, "num_classes", None), size, True)
    self.split = split
    self._has_label = label is not None
    # Each file the split reads, and what turns a position in that file into
    # the example's number in the split: the examples read before the file
    # minus the positions skipped in it (take -1: to the end of the file).
    files = info.splits[split].file_instructions
    taken = [f.take if f.take >= 0 else f.examples_in_shard - f.skip for f in files]
    self._files = [os.path.basename(f.filename) for f in files]
    self._starts = np.cumsum([0] + taken[:-1]) - np.array([f.skip for f in files])
    # A split that reads one file twice ("train[:5]+train[:5]") has no
    # unique index.
    self.has_index = len(set(self._files)) == len(self._files)

  def records(self, input_context=None, exact_shards=False):
    return self._read(input_context, exact_shards, None)

  def shuffled_records(self, input_context, seed):
    """Records with tfds' file order reshuffled every epoch (seeded)."""
    return self._read(input_context, False, seed)

  def _read(self, input_context, exact_shards, seed):
    tfds = self._tfds
    n = input_context.num_input_pipelines if input_context else 1
    num_shards = self.builder.info.splits[self.split].num_shards
    by_file = n > 1 and not exact_shards and num_shards >= n
    split = self.split
    if n > 1 and not by_file:
      # tfds cuts the split into n runs of examples, so no pipeline depends
      # on another reading the files in the same order.
      split = tfds.even_splits(split, n)[input_context.input_pipeline_id]
    read_config = tfds.ReadConfig(
        try_autocache=False, input_context=input_context if by_file else None,
        shuffle_seed=seed,
        shuffle_reshuffle_each_iteration=True if seed is not None else None,
        add_tfds_id=self.has_index)
    ds = self.builder.as_dataset(
        split, shuffle_files=seed is not None, read_config=read_config,
        decoders={"image": tfds.decode.SkipDecoding()})
    has_label = self._has_label

    def record(x):
      out = {"encoded": x["image"],
             "label": (tf.cast(x["label"], tf.int64) if has_label
                       else tf.constant(-1, tf.int64))}
      if self.has_index:
        out["index"] = self._index(x["tfds_id"])
      return out
    return ds.map(record)

  def _index(self, tfds_id):
    """The split position of the example tfds calls "<file>__<position>"."""
    parts = tf.strings.split(tfds_id, "__")
    position = tf.strings.to_number(parts[-1], tf.int64)
    file = tf.argmax(tf.cast(tf.equal(self._files, parts[0]), tf.int32))
    return tf.gather(tf.constant(self._starts, tf.int64), file) + position
