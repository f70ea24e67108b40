"""Text files a run writes into its work directory (flags, results)."""

import tensorflow as tf


def write_text(path, text):
  """Writes via a temporary file and a rename: atomic on local disks and GCS,
  and a rewrite replaces the file (ram:// GFile "w" would append)."""
  tmp = path + ".tmp"
  with tf.io.gfile.GFile(tmp, "w") as f:
    f.write(text)
  tf.io.gfile.rename(tmp, path, overwrite=True)
