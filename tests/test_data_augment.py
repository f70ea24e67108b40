"""Augmentations: each vectorised op matches tf.image for the same parameters
(within 2/255), blur, crops and the eval crop follow the SimCLR reference
code (tf2/data_util.py), and the random recipe has the rates of
docs/recipes.md."""

import numpy as np
import pytest
import tensorflow as tf

from tf_ssl.data import augment, color

TOL = 2 / 255


def _batch(n=6, size=20, seed=0):
  return tf.constant(np.random.default_rng(seed).uniform(0, 1, (n, size, size, 3)),
                     tf.float32)


def _per_image(fn, x, params):
  return tf.stack([fn(x[i], float(params[i])) for i in range(x.shape[0])])


@pytest.mark.parametrize("name,ours,theirs,lo,hi", [
    ("brightness_v1", lambda x, p: color.brightness(x, p, version=1),
     tf.image.adjust_brightness, -0.8, 0.8),
    ("contrast", color.contrast, tf.image.adjust_contrast, 0.2, 1.8),
    ("saturation", color.saturation, tf.image.adjust_saturation, 0.2, 1.8),
    ("hue", color.hue, tf.image.adjust_hue, -0.2, 0.2),
])
def test_op_matches_tf_image(name, ours, theirs, lo, hi):
  x = _batch()
  p = np.random.default_rng(1).uniform(lo, hi, x.shape[0]).astype(np.float32)
  want = tf.clip_by_value(_per_image(theirs, x, p), 0., 1.)
  np.testing.assert_allclose(ours(x, p), want, atol=TOL, err_msg=name)


def test_brightness_v2_multiplies():
  x = _batch()
  p = np.linspace(0.2, 1.8, x.shape[0]).astype(np.float32)
  want = np.clip(x.numpy() * p[:, None, None, None], 0, 1)
  np.testing.assert_allclose(color.brightness(x, p, version=2), want, atol=1e-6)


def test_grayscale_matches_tf_image():
  x = _batch()
  want = tf.tile(tf.image.rgb_to_grayscale(x), [1, 1, 1, 3])
  np.testing.assert_allclose(color.grayscale(x), want, atol=TOL)


def test_blur_matches_2d_numpy_convolution_with_zero_borders():
  # The reference's gaussian_blur convolves with padding "SAME": zeros
  # beyond the border, so edges darken (reflecting them would not).
  x, k = _batch(3, 16), 5
  sigma = np.array([0.3, 1.0, 2.0], np.float32)
  got = color.gaussian_blur(x, sigma, k).numpy()
  r = k // 2
  for i, s in enumerate(sigma):
    w = np.exp(-np.arange(-r, r + 1) ** 2 / (2 * s * s))
    w2 = np.outer(w, w) / np.outer(w, w).sum()
    pad = np.pad(x[i].numpy(), [(r, r), (r, r), (0, 0)])
    want = sum(w2[a, b] * pad[a:a + 16, b:b + 16] for a in range(k) for b in range(k))
    np.testing.assert_allclose(got[i], want, atol=1e-5)
  assert color.gaussian_blur(x[:0], sigma[:0], k).shape[0] == 0
  # A constant image keeps its value inside and darkens at the corners.
  ones = color.gaussian_blur(tf.ones([1, 16, 16, 3]), [2.0], k).numpy()[0]
  np.testing.assert_allclose(ones[r:-r, r:-r], 1.0, atol=1e-6)
  assert ones[0, 0, 0] < 0.6


def test_per_view_blur_also_pads_with_zeros():
  # Views above 64 px blur one at a time with truncated taps (blur_one).
  x = tf.ones([1, 80, 80, 3])
  aug = augment.SimCLRAugment(80, color_strength=0.0, blur=True, batch_level=False)
  y = np.stack([aug.distort(x, tf.constant([s, 1], tf.int64)).numpy()[0]
                for s in range(8)])
  # (grey views read 0.9999: rgb_to_grayscale's weights sum to 0.9999)
  assert y[:, 0, 0].min() < 0.9 and np.abs(y[:, 40, 40] - 1).max() < 2e-4


def test_crop_attempts_and_fallback_follow_the_reference():
  # sample_distorted_bounding_box(max_attempts=100) in the reference: on a
  # 20 x 100 image only ~13% of candidates fit, so 10 attempts fell back to
  # the whole image for ~21% of the crops; 100 attempts almost never do.
  boxes = augment.sample_crops(tf.constant([4, 2], tf.int64), 2000, 20, 100).numpy()
  whole = np.all(boxes == [0, 0, 20, 100], axis=1)
  assert whole.mean() < 0.005, whole.mean()
  area = boxes[:, 2] * boxes[:, 3] / 2000
  assert (boxes[:, 2] <= 20).all() and area.min() >= 0.075
  # When nothing fits (a 1-pixel-high strip), the whole image.
  strip = augment.sample_crops(tf.constant([1, 1], tf.int64), 50, 1, 300).numpy()
  assert (strip == [0, 0, 1, 300]).all()


def test_crop_area_and_aspect_statistics():
  boxes = tf.stack([augment.sample_crop(tf.constant([i, 3], tf.int64), 300, 300)
                    for i in range(1500)]).numpy()
  area = boxes[:, 2] * boxes[:, 3] / 300 ** 2
  log_aspect = np.log(boxes[:, 3] / boxes[:, 2])
  assert (boxes[:, :2] >= 0).all() and (boxes[:, :2] + boxes[:, 2:] <= 300).all()
  assert 0.075 <= area.min() and area.max() <= 1.0
  # U(0.08, 1) has mean 0.54; large crops of extreme aspect do not fit a
  # square image and are redrawn, which lowers it a little (NumPy: ~0.49).
  assert 0.46 < area.mean() < 0.53 and area.min() < 0.1 and area.max() > 0.95
  assert abs(area.std() - 0.92 / np.sqrt(12)) < 0.03
  # log-uniform in (3/4, 4/3) before the fit check trims the largest crops
  assert np.abs(log_aspect).max() <= np.log(4 / 3) + 0.02
  assert abs(log_aspect.mean()) < 0.02 and log_aspect.std() > 0.12


def _colourful(n, size=32):
  """Distinct images, left half darker than the right (flips show)."""
  x = np.random.default_rng(2).uniform(0.1, 0.9, (n, size, size, 3)).astype(np.float32)
  x[:, :, :size // 2] *= 0.5
  return tf.constant(x)


def test_flip_grayscale_blur_rates():
  n = 800
  x = _colourful(n)
  aug = augment.SimCLRAugment(32, color_strength=0.0, blur=True)
  y = aug.distort(x, tf.constant([5, 5], tf.int64)).numpy()
  gray = np.abs(y[..., 0] - y[..., 1]).max(axis=(1, 2)) < 1e-6
  left_dark = y[:, :, :16].mean(axis=(1, 2, 3)) < y[:, :, 16:].mean(axis=(1, 2, 3))
  # With jitter strength 0, a non-grey view differs from its (maybe flipped)
  # image only by blur (and float rounding); sigma < ~0.29 moves no pixel by
  # 1e-3 (10% of U(0.1, 2)), so about 0.5 * 0.9 of views show it.
  xf = x.numpy()[:, :, ::-1]
  changed = np.minimum(np.abs(y - x.numpy()).max(axis=(1, 2, 3)),
                       np.abs(y - xf).max(axis=(1, 2, 3))) > 1e-3
  blurred = changed[~gray]
  for rate, want in ((1 - left_dark.mean(), 0.5), (gray.mean(), 0.2), (blurred.mean(), 0.45)):
    assert abs(rate - want) < 0.06, (rate, want)
  assert y.min() >= 0 and y.max() <= 1


def test_jitter_rate_and_range():
  n = 800
  x = _colourful(n)
  aug = augment.SimCLRAugment(32, color_strength=1.0, blur=False)
  y = aug.distort(x, tf.constant([6, 6], tf.int64)).numpy()
  xf = x.numpy()[:, :, ::-1]
  gray = np.abs(y[..., 0] - y[..., 1]).max(axis=(1, 2)) < 1e-6
  unchanged = np.minimum(np.abs(y - x.numpy()).max(axis=(1, 2, 3)),
                         np.abs(y - xf).max(axis=(1, 2, 3))) < 1e-6
  assert abs(1 - unchanged[~gray].mean() - 0.8) < 0.06
  assert y.min() >= 0 and y.max() <= 1


def test_views_differ_and_stay_in_range():
  image = tf.constant(np.random.default_rng(0).integers(0, 256, (40, 50, 3), np.uint8))
  aug = augment.SimCLRAugment(24, num_views=3)
  views = aug({"image": image}, tf.constant([1, 2], tf.int64)).numpy()
  assert views.shape == (3, 24, 24, 3) and views.min() >= 0 and views.max() <= 1
  assert np.abs(views[0] - views[1]).mean() > 0.01


def test_jpeg_window_decode_matches_full_decode():
  """Decoding only the union of the crop boxes gives the same views."""
  image = np.random.default_rng(0).integers(0, 256, (60, 80, 3), np.uint8)
  encoded = tf.io.encode_jpeg(image, quality=95)
  aug = augment.SimCLRAugment(32)
  seed = tf.constant([3, 4], tf.int64)
  from_bytes = aug.crop_views({"encoded": encoded}, seed)
  decoded = tf.io.decode_jpeg(encoded, channels=3)
  from_pixels = aug.crop_views({"image": decoded}, seed)
  np.testing.assert_allclose(from_bytes, from_pixels, atol=TOL)


def test_jpeg_window_pixels_equal_a_full_decode():
  """The decoded window reaches past the boxes, so 4:2:0 chroma upsampling
  at its edge does not change the pixels of any box."""
  rng = np.random.default_rng(5)
  for _ in range(20):
    h, w = (int(v) for v in rng.integers(40, 120, 2))
    image = rng.integers(0, 256, (h, w, 3), np.uint8)
    encoded = tf.io.encode_jpeg(image, quality=95)  # 4:2:0 by default
    full = tf.io.decode_jpeg(encoded, channels=3).numpy()
    y0, x0 = (int(v) for v in rng.integers(0, 10, 2))
    bh, bw = int(rng.integers(5, h - y0)), int(rng.integers(5, w - x0))
    window, boxes = augment._window_and_boxes(  # pylint: disable=protected-access
        {"encoded": encoded}, lambda *_: tf.constant([[y0, x0, bh, bw]]))
    y, x = boxes.numpy()[0, :2]
    np.testing.assert_array_equal(window.numpy()[y:y + bh, x:x + bw],
                                  full[y0:y0 + bh, x0:x0 + bw])


def test_eval_view_centre_crop():
  image = tf.constant(np.random.default_rng(0).integers(0, 256, (64, 96, 3), np.uint8))
  got = augment.eval_view({"image": image}, 56)
  crop = image[4:60, 20:76]  # 0.875 * 64 = 56, centred
  want = tf.image.resize(crop, [56, 56]) / 255.
  np.testing.assert_allclose(got, want, atol=TOL)
  # An odd margin: the reference's center_crop offsets by (margin + 1) // 2.
  # 0.875 * 60 = 52.5 rounds half to even, 52; margins 8 and 29 -> 4 and 15.
  odd = tf.constant(np.random.default_rng(1).integers(0, 256, (60, 81, 3), np.uint8))
  want = tf.image.resize(odd[4:56, 15:67], [52, 52]) / 255.
  np.testing.assert_allclose(augment.eval_view({"image": odd}, 52), want, atol=1e-6)
  np.testing.assert_allclose(augment.eval_view_batch(odd[None], 52)[0], want, atol=1e-6)
  small = augment.eval_view({"image": image[:32, :32]}, 32)  # no crop at 32 px
  np.testing.assert_allclose(small, tf.cast(image[:32, :32], tf.float32) / 255., atol=TOL)


def test_bit_views_and_sizes():
  assert augment.bit_sizes(32, 32) == (160, 128)
  assert augment.bit_sizes(224, 224) == (512, 480)
  image = tf.constant(np.random.default_rng(0).integers(0, 256, (20, 30, 3), np.uint8))
  bit = augment.BiTAugment(16, 20)
  assert bit.train({"image": image}, tf.constant([1, 1], tf.int64)).shape == (16, 16, 3)
  want = tf.image.resize(image, [16, 16]) / 255.
  np.testing.assert_allclose(bit.eval({"image": image}), want, atol=TOL)


def test_mixup_soft_labels():
  batch = {"image": tf.constant(np.random.default_rng(0).uniform(size=(4, 2, 2, 3)),
                                tf.float32),
           "label": tf.constant([0, 1, 2, 1], tf.int64)}
  out = augment.mixup(batch, 0.4, 3, tf.constant([1, 2], tf.int64))
  lab = out["label"].numpy()
  np.testing.assert_allclose(lab.sum(1), 1, atol=1e-6)
  lam = lab[0, 0]  # image 0 (label 0) mixed with image 3 (label 1)
  np.testing.assert_allclose(out["image"][0], lam * batch["image"][0] +
                             (1 - lam) * batch["image"][3], atol=1e-5)
