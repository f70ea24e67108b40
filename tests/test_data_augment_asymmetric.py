"""BYOL / MoCo v3 asymmetric views on SimCLRAugment: per-op jitter maxima,
per-view blur and solarisation probabilities (views are [B, V, ...], the
view of flattened row r is r % V) on all three distortion paths, and
defaults that give exactly the views of the code before them."""

# _before calls the XLA functions directly.
# pylint: disable=protected-access

import numpy as np
import pytest
import tensorflow as tf

from tf_ssl.data import augment, color

SIZE, IMAGES = 32, 600
CALLS = 300  # examples through __call__ (one XLA call each)
SEED = tf.constant([3, 8], tf.int64)
ASYM = dict(color_strength=0.0, blur=True, blur_prob=(1.0, 0.1),
            solarize_prob=(0.0, 0.2))


def _views(n=IMAGES, size=SIZE, seed=2):
  return tf.constant(np.random.default_rng(seed).uniform(
      0.1, 0.9, (n, 2, size, size, 3)), tf.float32)


def _images(n=IMAGES, seed=4):
  return np.random.default_rng(seed).integers(0, 256, (n, 40, 40, 3), np.uint8)


def _per_example(aug, images):
  """__call__ on each image (seed [i, 11]) in a tf.data map, as the
  per-example pipeline runs it: [B, V, S, S, 3]."""
  ds = tf.data.Dataset.from_tensor_slices(images).enumerate().map(
      lambda i, im: aug({"image": im}, tf.stack([i, 11])))
  return np.stack(list(ds.as_numpy_iterator()))


def _run(path, **kwargs):
  if path == "per_example":
    aug = augment.SimCLRAugment(SIZE, batch_level=False, **kwargs)
    return _per_example(aug, _images(CALLS))
  aug = augment.SimCLRAugment(SIZE, batch_level=path == "batch", **kwargs)
  return aug.distort(_views(), SEED).numpy()


def _changed(a, b):
  return np.abs(a - b).max(axis=(2, 3, 4)) > 1e-6  # [B, V]


def _solarize(v):
  return np.where(v >= 0.5, 1 - v, v)


def _close(rate, p, n):
  return abs(rate - p) <= 4 * np.sqrt(p * (1 - p) / n) + 1e-9


def test_solarize_values():
  x = tf.constant([0.2, 0.7, 0.5, 0.0, 1.0, 0.4999])
  want = [0.2, 0.3, 0.5, 0.0, 0.0, 0.4999]
  np.testing.assert_allclose(color.solarize(x), want, atol=1e-7)
  planes = color.solarize_planar((x, x[::-1], x))
  np.testing.assert_allclose(planes[1], want[::-1], atol=1e-7)
  # On 8-bit values it is PIL's ImageOps.solarize at 128.
  i = np.arange(256)
  np.testing.assert_allclose(color.solarize(tf.constant(i / 255., tf.float32)),
                             np.where(i >= 128, 255 - i, i) / 255., atol=1e-6)


@pytest.mark.parametrize("path", ["batch", "per_view", "per_example"])
def test_per_view_blur_and_solarize_rates(path):
  """Blur p (1.0, 0.1), solarisation p (0.0, 0.2) by view, found by
  comparing with the same seed and blur off or solarisation always on (the
  same compiled function: only the coins differ); solarisation is x -> 1 - x
  of the finished view."""
  y = _run(path, **ASYM)
  unblurred = _run(path, **dict(ASYM, blur=False))
  always = _run(path, **dict(ASYM, solarize_prob=1.0))
  assert y.min() >= 0 and y.max() <= 1
  blurred, solarized = _changed(y, unblurred), ~_changed(y, always)
  np.testing.assert_allclose(always[~solarized], _solarize(y[~solarized]),
                             atol=1e-6)
  n = len(y)
  # A sigma below ~0.19 (~5% of U(0.1, 2)) moves no pixel by 1e-6 in float32,
  # so view 1's rate (p = 1) measures that share, and view 2's is 0.1 of it.
  seen = blurred[:, 0].mean()
  assert 0.9 < seen <= 1.0, seen
  assert _close(blurred[:, 1].mean(), 0.1 * seen, n), blurred[:, 1].mean()
  assert not solarized[:, 0].any()
  assert _close(solarized[:, 1].mean(), 0.2, n), solarized[:, 1].mean()
  if path == "per_example":
    return
  # Without solarisation, the same views: it comes after grayscale and blur.
  unsolarized = _run(path, **dict(ASYM, solarize_prob=0.0))
  np.testing.assert_allclose(y[solarized], _solarize(unsolarized[solarized]),
                             atol=1e-6)
  np.testing.assert_array_equal(y[~solarized], unsolarized[~solarized])
  if path == "batch":  # the per-view path computes the same views
    np.testing.assert_allclose(y, _run("per_view", **ASYM), atol=2 / 255)


def test_sample_jitter_per_op_ranges():
  p = color.sample_jitter(tf.constant([1, 5]), 4000, (0.4, 0.4, 0.2, 0.1))
  for name, lo, hi in (("brightness", 0.6, 1.4), ("contrast", 0.6, 1.4),
                       ("saturation", 0.8, 1.2), ("hue", -0.1, 0.1)):
    v = p[name].numpy()
    assert lo <= v.min() < lo + 0.01 and hi - 0.01 < v.max() <= hi, name
  v1 = color.sample_jitter(tf.constant([1, 5]), 4000, (0.3, 0, 0, 0), version=1)
  b = v1["brightness"].numpy()
  assert -0.3 <= b.min() < -0.29 and 0.29 < b.max() <= 0.3
  assert (v1["contrast"].numpy() == 1).all() and (v1["hue"].numpy() == 0).all()
  # A strength s is (0.8s, 0.8s, 0.8s, 0.2s), to the bit.
  for version in (1, 2):
    s = 0.7
    a = color.sample_jitter(tf.constant([2, 2]), 50, s, version)
    t = color.sample_jitter(tf.constant([2, 2]), 50,
                            (0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s), version)
    for k in a:
      np.testing.assert_array_equal(a[k], t[k])


def _hsv(y):
  return tf.image.rgb_to_hsv(tf.constant(y[:, :, 0, 0])).numpy()  # [B, V, 3]


@pytest.mark.parametrize("op,jitter,lo,hi", [
    ("brightness", (0.4, 0, 0, 0), 0.6, 1.4),
    ("saturation", (0, 0, 0.2, 0), 0.8, 1.2),
    ("hue", (0, 0, 0, 0.1), -0.1, 0.1),
])
def test_views_jitter_within_per_op_maxima(op, jitter, lo, hi):
  """One op on: its factor (delta for hue), read off a flat image, stays
  within [1 - m, 1 + m] ([-m, m]) and reaches near both ends."""
  pixel = np.array([0.5, 0.4, 0.3], np.float32)
  x = tf.constant(np.broadcast_to(pixel, (IMAGES, 2, SIZE, SIZE, 3)))
  aug = augment.SimCLRAugment(SIZE, blur=False, jitter=jitter)
  y = aug.distort(x, tf.constant([9, 1], tf.int64)).numpy()
  hsv, ref = _hsv(y), _hsv(x.numpy())
  keep = hsv[..., 1] > 1e-3  # not grey
  if op == "hue":
    f = (hsv[..., 0] - ref[..., 0] + 0.5) % 1 - 0.5
  else:
    k = 2 if op == "brightness" else 1  # V, or S (V is kept)
    f = hsv[..., k] / ref[..., k]
  f = f[keep]
  assert lo - 1e-4 <= f.min() < lo + 0.02 and hi - 0.02 < f.max() <= hi + 1e-4


def test_asymmetric_settings():
  aug = augment.SimCLRAugment.asymmetric(224)
  assert aug.jitter == (0.4, 0.4, 0.2, 0.1) and aug.num_views == 2
  assert aug.blur_prob == (1.0, 0.1) and aug.solarize_prob == (0.0, 0.2)
  assert aug.blur and aug.version == 2 and aug.blur_kernel == 23
  small = augment.SimCLRAugment.asymmetric(32, color_strength=1.0,
                                           crop_area=(0.2, 1))
  assert small.jitter == (0.8, 0.8, 0.4, 0.2) and not small.blur
  assert small.crop_area == (0.2, 1)
  views = small.distort(_views(), SEED)
  assert views.shape == (IMAGES, 2, SIZE, SIZE, 3)
  with pytest.raises(ValueError, match="non-negative"):
    augment.SimCLRAugment.asymmetric(SIZE, color_strength=-1.0)


def _before(aug, views, seed, scale=1.):
  """SimCLRAugment._distort as it was before per-view probabilities."""
  shape = tf.shape(views)
  x = tf.reshape(views, [-1, aug.image_size, aug.image_size, 3])
  n = tf.shape(x)[0]
  s = tf.random.experimental.stateless_split(seed, 6)
  coin = lambda i, p: tf.random.stateless_uniform([n], s[i]) < p
  flip, gray = coin(0, 0.5), coin(3, 0.2)
  params = color.sample_jitter(s[1], n, aug.color_strength, aug.version)
  jitter = coin(2, 0.8)
  blur = coin(4, 0.5) if aug.blur else tf.zeros([n], tf.bool)
  sigma = tf.random.stateless_uniform([n], s[5], 0.1, 2.0)
  if aug.batch_level and aug.image_size <= 64:
    x = tf.clip_by_value(x * scale, 0., 1.) if scale != 1. else x
    x = augment._distort_batch(x, flip, params, jitter, gray, aug.version)
    if aug.blur:
      chosen = tf.where(blur)
      blurred = color.gaussian_blur(tf.gather_nd(x, chosen),
                                    tf.gather_nd(sigma, chosen), aug.blur_kernel)
      x = tf.tensor_scatter_nd_update(x, chosen, blurred)
  else:
    x = augment._distort_each(x, flip, params, jitter, gray, blur, sigma,
                              aug.version, aug.blur_kernel, scale)
  return tf.reshape(x, shape)


@pytest.mark.parametrize("batch_level", [True, False])
def test_defaults_reproduce_the_views_before(batch_level):
  kw = dict(color_strength=0.5, blur=True, batch_level=batch_level)
  plain = augment.SimCLRAugment(SIZE, **kw)
  variants = [plain,
              augment.SimCLRAugment(SIZE, **kw, jitter=None, blur_prob=0.5,
                                    solarize_prob=0.0),
              augment.SimCLRAugment(SIZE, **kw, blur_prob=(0.5, 0.5),
                                    solarize_prob=(0, 0))]
  x = _views()  # the shapes of the tests above: their compiled functions
  want = _before(plain, x, SEED).numpy()
  image = tf.constant(_images(1)[0])
  s = tf.random.experimental.stateless_split(SEED, 2)
  crops = plain._crops_255({"image": image}, s[0])
  want_call = _before(plain, crops, s[1], 1. / 255.).numpy()
  for aug in variants:
    np.testing.assert_array_equal(aug.distort(x, SEED), want)
    np.testing.assert_array_equal(aug({"image": image}, SEED), want_call)


@pytest.mark.parametrize("kwargs", [
    dict(blur_prob=1.5), dict(blur_prob=-0.1), dict(blur_prob=(0.5,)),
    dict(blur_prob=(0.5, 0.5, 0.5)), dict(blur_prob="high"),
    dict(solarize_prob=(0.1, 2.0)), dict(solarize_prob=float("nan")),
    dict(solarize_prob=(0.2,), num_views=3),
    dict(jitter=(0.4, 0.4, 0.2)), dict(jitter=(0.4, -0.1, 0.2, 0.1)),
    dict(jitter=0.5), dict(jitter="abcd"), dict(jitter=(0.4, 0.4, 0.2, None)),
], ids=str)
def test_bad_arguments(kwargs):
  with pytest.raises(ValueError, match=r"^[^\n]+$"):
    augment.SimCLRAugment(SIZE, **kwargs)
