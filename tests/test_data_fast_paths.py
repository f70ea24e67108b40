"""The fast paths of the input pipeline compute the same recipe: batched crop
resizing equals slice + tf.image.resize, the per-view and whole-batch XLA
distortions agree, the truncated blur equals the full kernel, and the planar
jitter equals the tf.image ops in each order."""

import numpy as np
import pytest
import tensorflow as tf

from tf_ssl.data import augment, color

TOL = 2 / 255


def _batch(n=6, size=20, seed=0):
  return tf.constant(np.random.default_rng(seed).uniform(0, 1, (n, size, size, 3)),
                     tf.float32)


def test_resize_boxes_matches_slice_and_resize():
  """The batched crop resize is tf.image.resize of each slice (edges too)."""
  images = tf.constant(np.random.default_rng(0).integers(0, 256, (3, 20, 24, 3), np.uint8))
  boxes = augment.sample_crops(tf.constant([1, 1], tf.int64), 12, 20, 24)
  got = augment.resize_boxes(images, boxes, tf.range(12) // 4, 16)
  want = tf.stack([tf.image.resize(images[i // 4][b[0]:b[0] + b[2], b[1]:b[1] + b[3]],
                                   [16, 16]) / 255. for i, b in enumerate(boxes.numpy())])
  np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("blur", [False, True])
def test_per_view_and_batch_distort_agree(blur):
  """The two XLA paths (one view at a time with conditionals, whole batch
  with selects) give the same views for the same seed."""
  x = _batch(24, 60, seed=3)
  seed = tf.constant([1, 2], tf.int64)
  per_view = augment.SimCLRAugment(60, blur=blur, batch_level=False).distort(x, seed)
  whole = augment.SimCLRAugment(60, blur=blur, batch_level=True).distort(x, seed)
  np.testing.assert_allclose(per_view, whole, atol=TOL)
  assert np.abs(per_view - x).mean() > 0.05  # something happened


def test_truncated_blur_matches_full_kernel():
  x = _batch(4, 64, seed=4)
  sigma = np.array([0.1, 0.5, 1.3, 2.0], np.float32)
  planes = tf.transpose(x, [0, 3, 1, 2])
  got = tf.stack([tf.stack(color.blur_one(tuple(tf.unstack(planes[i])), sigma[i], 23), -1)
                  for i in range(4)])
  np.testing.assert_allclose(got, color.gaussian_blur(x, sigma, 23), atol=1e-3)


def test_jitter_one_matches_tf_image_in_order():
  x = _batch(1, 20)[0]
  p = {"brightness": 1.3, "contrast": 0.6, "saturation": 1.7, "hue": -0.15}
  for order in ([0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]):
    got = tf.stack(color.jitter_one(tuple(tf.unstack(x, axis=-1)), p,
                                    tf.constant(order)), -1)
    want = x
    for j in order:
      want = tf.clip_by_value([lambda a: a * p["brightness"],
                               lambda a: tf.image.adjust_contrast(a, p["contrast"]),
                               lambda a: tf.image.adjust_saturation(a, p["saturation"]),
                               lambda a: tf.image.adjust_hue(a, p["hue"])][j](want), 0., 1.)
    np.testing.assert_allclose(got, want, atol=TOL, err_msg=str(order))
