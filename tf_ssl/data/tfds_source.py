"""A tensorflow-datasets dataset as a Source, read from data_dir, never downloaded."""

import tensorflow as tf

from tf_ssl.data import sources


class TfdsSource(sources.Source):
  """A prepared tfds dataset (imagenet2012, cifar10, stl10, ...).

  Images are read undecoded (tfds SkipDecoding), so JPEG datasets such as
  imagenet2012 get the crop-window decode of augment.py. A split without a
  "label" feature, or with label -1 (stl10's "unlabelled"), is unlabelled.
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
        shuffle_reshuffle_each_iteration=True if seed is not None else None)
    ds = self.builder.as_dataset(
        split, shuffle_files=seed is not None, read_config=read_config,
        decoders={"image": tfds.decode.SkipDecoding()})
    has_label = self._has_label
    return ds.map(lambda x: {
        "encoded": x["image"],
        "label": (tf.cast(x["label"], tf.int64) if has_label
                  else tf.constant(-1, tf.int64))})
