"""Image sources: one interface over tfds, folders, TFRecords, IDX and arrays.

Every source yields dicts {"image": uint8 [H, W, 3], "label": int64 scalar}
with label -1 for unlabelled examples, and "index" (int64, the example's
position in the source's record order, the same in every epoch and on every
input pipeline) when the source can give one (`has_index`; PIRL's memory
bank needs it). Internally a source produces *records* that may still hold
the encoded file ({"encoded": string, "label"}), so the augmentation can
decode only the crop window of a JPEG (see augment.py); `Source.dataset`
decodes them for everyone else.

All file access goes through tf.io.gfile, so any path may be a gs:// bucket.
"""

import gzip

import numpy as np
import tensorflow as tf

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
_IDX_FILES = {"train": "train-{}-ubyte.gz", "test": "t10k-{}-ubyte.gz"}


def decode_image(encoded):
  """Decodes JPEG/PNG/BMP/GIF (first frame) bytes to uint8 [H, W, 3]."""
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def decode_record(record):
  """Turns a record ({"image"} or {"encoded"}, "label"[, "index"]) into the
  public dict."""
  if "encoded" in record:
    image = decode_image(record["encoded"])
  else:
    image = to_rgb(record["image"])
  out = {"image": image, "label": record["label"]}
  if "index" in record:
    out["index"] = record["index"]
  return out


def to_rgb(image):
  """Tiles a grayscale uint8 image ([H, W] or [H, W, 1]) to three channels."""
  if image.shape.rank == 2:
    image = image[..., None]
  if image.shape[-1] == 1:
    image = tf.tile(image, [1, 1, 3])
  return image


def shard(ds, input_context):
  """Keeps this input pipeline's share of `ds` (every n-th element)."""
  if input_context is None or input_context.num_input_pipelines == 1:
    return ds
  return ds.shard(input_context.num_input_pipelines,
                  input_context.input_pipeline_id)


class Source:
  """A finite, ordered collection of labelled (or unlabelled) images.

  Attributes:
    name: what the source reads, e.g. "folder:/data/train",
      "tfrecord:/x/train-*", "tfds:cifar10:test", "arrays": two sources with
      the same name read the same examples (see same_data).
    num_examples: examples in one epoch, over all input pipelines.
    num_classes: number of classes, or None when unknown / unlabelled.
    image_size: (height, width) when every image has it, else None.
    encoded: True when records hold encoded bytes ("encoded") rather than
      decoded pixels ("image").
    has_index: records carry "index", the example's position in record
      order (0 .. num_examples - 1).
  """
  has_index = False

  def __init__(self, name, num_examples, num_classes, image_size, encoded):
    self.name = name
    self._num_examples = num_examples
    self.num_classes = num_classes
    self.image_size = tuple(image_size) if image_size else None
    self.encoded = encoded

  @property
  def num_examples(self):
    return self._num_examples

  def records(self, input_context=None, exact_shards=False):
    """One epoch of raw records, this pipeline's shard, in a fixed order.

    Args:
      input_context: a tf.distribute.InputContext, or None for everything.
      exact_shards: shard by element (shard sizes differ by at most one) even
        where sharding by file would be cheaper; evaluation needs this.
    """
    raise NotImplementedError

  def shuffled_records(self, input_context, seed):
    """One epoch of records in a seeded order that changes every epoch.

    Training reads this so that sources stored in a fixed order (class
    sorted folders, a file list) do not feed the shuffle buffer the same
    sequence each epoch. The default is records(): the pipeline's shuffle
    buffer still mixes them.

    Args:
      input_context: as in records().
      seed: int, equal on every input pipeline: sources that shard by
        element need every pipeline to see the same order before sharding.
    """
    del seed
    return self.records(input_context)

  def dataset(self, input_context=None):
    """One epoch of {"image": uint8 [H, W, 3], "label": int64} dicts.

    Args:
      input_context: a tf.distribute.InputContext; when given, only this input
        pipeline's shard is read.
    """
    return self.records(input_context).map(
        decode_record, num_parallel_calls=tf.data.AUTOTUNE)

  def labels(self):
    """All labels in record order, as int64 NumPy (reads the whole source)."""
    ds = self.records(None).map(lambda r: r["label"]).batch(4096)
    parts = [b for b in ds.as_numpy_iterator()]
    return np.concatenate(parts) if parts else np.zeros([0], np.int64)

  def take(self, indices):
    """A Source of the examples at `indices` (sorted, in record order)."""
    from tf_ssl.data import subsets  # pylint: disable=g-import-not-at-top
    return subsets.IndexedSubset(self, indices)

  def __repr__(self):
    return (f"Source({self.name!r}, num_examples={self.num_examples}, "
            f"num_classes={self.num_classes}, image_size={self.image_size})")


class ArraySource(Source):
  """Images held in memory as NumPy arrays; "index" is the array row."""
  has_index = True

  def __init__(self, images, labels=None, num_classes=None, name="arrays"):
    images = np.asarray(images)
    if images.dtype != np.uint8:
      raise ValueError(f"{name}: images must be uint8 [N, H, W(, C)], got "
                       f"{images.dtype}; convert with (x * 255).astype(np.uint8).")
    if images.ndim == 3:
      images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
      raise ValueError(f"{name}: images must have shape [N, H, W], [N, H, W, 1] "
                       f"or [N, H, W, 3]; got {images.shape}.")
    if len(images) == 0:
      raise ValueError(f"{name}: the source is empty (0 images).")
    if labels is None:
      labels = np.full([len(images)], -1, np.int64)
    labels = np.asarray(labels).astype(np.int64).reshape([-1])
    if len(labels) != len(images):
      raise ValueError(f"{name}: {len(images)} images but {len(labels)} labels.")
    if num_classes is None and (labels >= 0).any():
      num_classes = int(labels.max()) + 1
    bad = np.flatnonzero((labels < -1) | (num_classes is not None and
                                          labels >= (num_classes or 0)))
    if bad.size:
      raise ValueError(f"{name}: label {labels[bad[0]]} at index {bad[0]} is "
                       f"outside [0, {num_classes}) (-1 means unlabelled).")
    super().__init__(name, len(images), num_classes, images.shape[1:3], False)
    self.images, self._labels = images, labels

  def records(self, input_context=None, exact_shards=False):
    n, i = 1, 0
    if input_context is not None:
      n, i = input_context.num_input_pipelines, input_context.input_pipeline_id
    # Slicing NumPy before building the dataset keeps each pipeline's graph
    # constant to its own shard.
    ds = tf.data.Dataset.from_tensor_slices(
        {"image": self.images[i::n], "label": self._labels[i::n],
         "index": np.arange(self.num_examples, dtype=np.int64)[i::n]})
    return ds.map(lambda r: dict(r, image=to_rgb(r["image"])))

  def labels(self):
    return self._labels.copy()

  def take(self, indices):
    indices = np.asarray(indices)
    return ArraySource(self.images[indices], self._labels[indices],
                       self.num_classes, f"{self.name}[subset]")


def same_data(a, b):
  """True when Sources `a` and `b` read the same examples (e.g. an eval split
  that fell back to the training folder), judged by their names."""
  return a.name == b.name


def from_arrays(images, labels=None, num_classes=None, name="arrays"):
  """A Source over in-memory uint8 images [N, H, W(, 1|3)] and int labels.

  Grayscale is tiled to three channels when read. labels=None means every
  example is unlabelled (-1). num_classes defaults to max(label) + 1.
  """
  return ArraySource(images, labels, num_classes, name)


def _read_idx(path):
  """Parses a gzipped IDX file (the MNIST format) into a NumPy array."""
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(f"{path} not found")
  with tf.io.gfile.GFile(path, "rb") as f:
    data = gzip.decompress(f.read())
  magic = int.from_bytes(data[:4], "big")
  if magic >> 8 != 0x08:  # 0x08 = unsigned byte, the only type MNIST uses
    raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {magic:#x})")
  ndim = magic & 0xFF
  shape = [int.from_bytes(data[4 + 4 * k:8 + 4 * k], "big") for k in range(ndim)]
  body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
  if body.size != int(np.prod(shape)):
    raise ValueError(f"{path}: truncated IDX file ({body.size} of "
                     f"{int(np.prod(shape))} bytes)")
  return body.reshape(shape)


def fashion_mnist(split="train", data_dir=None):
  """Fashion-MNIST from Debian's IDX files (60k train / 10k test, 28x28).

  Args:
    split: "train" or "test".
    data_dir: a directory holding the four *-ubyte.gz files; None means
      /usr/share/datasets/fashion-mnist (package dataset-fashion-mnist).
  """
  if split not in _IDX_FILES:
    raise ValueError(f"fashion_mnist: split={split!r} is not 'train' or 'test'.")
  root = data_dir or FASHION_MNIST_DIR
  paths = [f"{root}/{_IDX_FILES[split].format(k)}"
           for k in ("images-idx3", "labels-idx1")]
  missing = [p for p in paths if not tf.io.gfile.exists(p)]
  if missing:
    raise FileNotFoundError(
        f"fashion_mnist: {missing[0]} not found. Install Debian's "
        "dataset-fashion-mnist (tools/setup.sh does) or pass --data_dir to a "
        "folder holding the IDX .gz files.")
  images, labels = _read_idx(paths[0]), _read_idx(paths[1])
  return ArraySource(images, labels, 10, f"fashion_mnist:{split}")


def make_source(name, split="train", data_dir=None, num_classes=None,
                num_examples=None):
  """Builds a Source from a flag string.

  Args:
    name: "fashion_mnist"; "tfds:<dataset>" (e.g. tfds:cifar10, read from
      data_dir, never downloaded); "folder:<path>" (one sub-folder per class,
      or a flat folder of unlabelled images); "tfrecord:<glob>" (ImageNet-style
      `image/encoded`, `image/class/label`).
    split: the split to read. fashion_mnist and tfds take split names ("train",
      "test", or any tfds split string such as "unlabelled" or
      "train[:10%]"). folder:<root> reads <root>/<split>/ when that sub-folder
      exists, else <root> itself; tfrecord:<glob> replaces "{split}" in the
      glob (tfrecord:gs://b/imagenet/{split}-*), and a glob without it is
      read for every split. The Source's name says what was read, so
      same_data(train, eval) tells when evaluation sees the training data.
    data_dir: tfds data directory, or the folder with Fashion-MNIST's files.
    num_classes: for tfrecord sources, the class count (labels are checked
      against it); ignored elsewhere (read from the data).
    num_examples: for tfrecord sources, the number of records when known
      (spares counting them); ignored elsewhere.

  Returns:
    A Source.

  Raises:
    ValueError: for an unknown name, naming the flag value.
  """
  from tf_ssl.data import files, tfds_source  # pylint: disable=g-import-not-at-top
  kind, _, arg = name.partition(":")
  if name == "fashion_mnist":
    return fashion_mnist(split, data_dir)
  if kind == "tfds" and arg:
    return tfds_source.TfdsSource(arg, split, data_dir)
  if kind == "folder" and arg:
    return files.FolderSource(files.split_folder(arg, split, name), flag=name)
  if kind == "tfrecord" and arg:
    return files.TFRecordSource(arg.replace("{split}", split), num_classes,
                                flag=name, num_examples=num_examples)
  raise ValueError(
      f"--dataset={name!r}: expected fashion_mnist, tfds:<name>, "
      "folder:<path> or tfrecord:<glob>.")
