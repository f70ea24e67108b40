"""A memory bank: one normalised embedding per training example, state that
is not trained (PIRL's, after NPID; docs/recipes.md, "PIRL").

Like models/queue.py's KeyQueue it is identical on every replica: each
update writes the rows of the whole global batch (gathered from every
replica) on every replica's copy (`tf_ssl.distribute.update_replicated`),
and checkpoints file it by name with the model.
"""

import math

import keras
import tensorflow as tf

from tf_ssl import distribute


class MemoryBank(keras.layers.Layer):
  """`size` rows of width `dim` [size, dim], row i for example i, and the
  NCE normaliser Z (0 until it is estimated; tf_ssl.losses.pirl).

  The rows start uniform in +-1/sqrt(dim / 3), then l2-normalised (the
  reference's init). `update` moves the rows of a batch's examples towards
  their new embeddings: m_i <- normalise(momentum * m_i + (1 - momentum) f_i).
  """

  def __init__(self, size, dim, **kwargs):
    kwargs.setdefault("name", "memory_bank")
    super().__init__(**kwargs)
    self.size, self.dim = int(size), int(dim)
    bound = 1.0 / math.sqrt(self.dim / 3.0)

    def unit_rows(shape, dtype=None):
      rows = keras.random.uniform(shape, -bound, bound, dtype="float32")
      return tf.cast(tf.math.l2_normalize(rows, axis=1), dtype or "float32")

    self.rows = self.add_weight(shape=(self.size, self.dim), initializer=unit_rows,
                                trainable=False, dtype="float32", name="rows",
                                autocast=False)
    self.normaliser = self.add_weight(shape=(), initializer="zeros", trainable=False,
                                      dtype="float32", name="normaliser",
                                      autocast=False)
    self.built = True  # Never called: methods read and update it.

  def read(self, index):
    """The rows of examples `index` (any int shape) -> [..., dim] float32.
    A sparse read: only those rows are read, not the whole bank."""
    return tf.gather(self.rows.value, index)

  def update(self, embeddings, index, momentum):
    """m_i <- normalise(momentum * m_i + (1 - momentum) * f_i) for the
    examples `index` [B] and their embeddings [B, dim] (both the same on
    every replica: the global batch). An example twice in `index` is
    written once, from one of its rows (both start from the same m_i)."""
    embeddings = tf.cast(embeddings, tf.float32)
    old = self.read(index)
    new = tf.math.l2_normalize(momentum * old + (1.0 - momentum) * embeddings,
                               axis=1)

    def write(rows, r, i):
      return rows.scatter_update(tf.IndexedSlices(r, i))
    distribute.update_replicated(write, [self.rows], new, index)

  def set_normaliser(self, value):
    """Stores Z (a float32 scalar, the same on every replica)."""
    distribute.update_replicated(lambda v, z: v.assign(z), [self.normaliser],
                                 tf.cast(value, tf.float32))
