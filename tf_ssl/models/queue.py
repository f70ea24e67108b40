"""A FIFO of normalised embeddings that is state, not trained: MoCo's queue
of keys, SwAV's queue of earlier projections.

It is identical on every replica: each step writes the rows of the whole
global batch (gathered from every replica) on every replica's copy
(`tf_ssl.distribute.update_replicated`), so a method reading it sees on N
replicas what it would see on one.
"""

import keras
import tensorflow as tf

from tf_ssl import distribute


class KeyQueue(keras.layers.Layer):
  """`size` rows of width `dim` [size, dim], a write pointer and a fill count.

  It starts as l2-normalised Gaussian rows (MoCo's reference); `filled`
  counts the rows written, up to `size`, so a method can wait for a full
  queue (SwAV). `push` writes whole global batches, which divide `size`, so
  a write never wraps.
  """

  def __init__(self, size, dim, **kwargs):
    kwargs.setdefault("name", "queue")
    super().__init__(**kwargs)
    self.size = int(size)
    self.dim = int(dim)

    def unit_rows(shape, dtype=None):
      rows = keras.random.normal(shape, dtype="float32")
      return tf.cast(tf.math.l2_normalize(rows, axis=1), dtype or "float32")

    self.keys = self.add_weight(shape=(self.size, self.dim), initializer=unit_rows,
                                trainable=False, dtype="float32", name="keys",
                                autocast=False)
    self.pointer = self.add_weight(shape=(), initializer="zeros", trainable=False,
                                   dtype="int32", name="pointer", autocast=False)
    self.filled = self.add_weight(shape=(), initializer="zeros", trainable=False,
                                  dtype="int32", name="filled", autocast=False)
    self.built = True  # Never called: methods read `keys` and push.

  @property
  def full(self):
    """True once `size` rows have been written (bool tensor)."""
    return tf.greater_equal(tf.convert_to_tensor(self.filled), self.size)

  def push(self, rows, active=True):
    """Writes `rows` [B, dim] (the same on every replica) at the pointer and
    moves it by B; with `active` False (a bool tensor may decide at run
    time) nothing changes."""
    rows = tf.cast(rows, tf.float32)
    batch = tf.shape(rows)[0]
    active = tf.convert_to_tensor(active, tf.bool)
    start = tf.convert_to_tensor(self.pointer)
    # Branch-free, so it runs in any replica context: an inactive push
    # writes back the rows already there.
    index = start + tf.range(batch)
    current = tf.gather(tf.convert_to_tensor(self.keys), index)
    rows = tf.where(active, rows, current)
    moved = tf.where(active, batch, 0)

    def write(queue, r, i):
      return queue.scatter_update(tf.IndexedSlices(r, i))

    def advance(pointer, n):
      return pointer.assign((pointer + n) % self.size)

    def fill(filled, n):
      return filled.assign(tf.minimum(filled + n, self.size))

    distribute.update_replicated(write, [self.keys], rows, index)
    distribute.update_replicated(advance, [self.pointer], moved)
    distribute.update_replicated(fill, [self.filled], moved)
