"""SimCLR / SupCon views, BiT train and eval views, and MixUp (RECIPES.md).

A SimCLR view is made in two stages so that each runs where it is cheapest:
  1. `crop_views` (per example, in a tf.data map): samples each view's crop
     box, decodes only the union of the boxes from a JPEG (decode_and_crop),
     and resizes each crop to image_size with *bilinear* interpolation (the
     reference is bicubic; RECIPES.md allows bilinear, and it is about twice
     as fast).
  2. `distort` (flip, colour jitter in random order with p=0.8, grayscale
     p=0.2, Gaussian blur p=0.5 with per-image sigma), vectorised over many
     images with per-image random parameters (color.py). The pipeline runs it
     on whole batches of views (batch_level=True, default at <= 64 px where
     per-image op dispatch dominates), or on the V views of each example.

All randomness is stateless and comes from an explicit seed, so a pipeline
with a seed is deterministic.
"""

import math

import tensorflow as tf

from tf_ssl.data import color
from tf_ssl.data import sources


def sample_crop(seed, height, width, area_range=(0.08, 1.0),
                aspect_range=(3 / 4, 4 / 3), attempts=10):
  """Samples a random-resized-crop box (offset_y, offset_x, h, w), int32.

  Area fraction is uniform in area_range and the aspect ratio (w / h)
  log-uniform in aspect_range (RECIPES.md). Of `attempts` candidates the
  first that fits is used; if none fits, the whole image (the fallback of
  the reference's sample_distorted_bounding_box).
  """
  s = tf.random.experimental.stateless_split(seed, 4)
  h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  area = tf.random.stateless_uniform([attempts], s[0], *area_range) * h * w
  log_r = tf.random.stateless_uniform(
      [attempts], s[1], math.log(aspect_range[0]), math.log(aspect_range[1]))
  cw = tf.round(tf.sqrt(area * tf.exp(log_r)))
  ch = tf.round(tf.sqrt(area / tf.exp(log_r)))
  fits = (cw <= w) & (ch <= h) & (cw >= 1) & (ch >= 1)
  first = tf.argmax(tf.cast(fits, tf.int32))
  ok = tf.reduce_any(fits)
  ch = tf.cast(tf.where(ok, ch[first], h), tf.int32)
  cw = tf.cast(tf.where(ok, cw[first], w), tf.int32)
  u = tf.random.stateless_uniform([2], s[2])
  oy = tf.cast(u[0] * tf.cast(height - ch + 1, tf.float32), tf.int32)
  ox = tf.cast(u[1] * tf.cast(width - cw + 1, tf.float32), tf.int32)
  return tf.stack([tf.minimum(oy, height - ch), tf.minimum(ox, width - cw),
                   ch, cw])


def _resize(image, size):
  """uint8/float crop -> float32 [size, size, 3] in [0, 1], bilinear."""
  out = tf.image.resize(image, [size, size], method="bilinear")
  return tf.clip_by_value(out / 255., 0., 1.)


def _window_and_boxes(record, boxes_fn):
  """Decodes the part of the record's image that `boxes_fn(h, w)` needs.

  Returns (window uint8 [h', w', 3], boxes [V, 4] relative to the window).
  For JPEG bytes only the union of the boxes is decoded.
  """
  if "image" in record:
    image = sources.to_rgb(record["image"])
    shape = tf.shape(image)
    return image, boxes_fn(shape[0], shape[1])
  encoded = record["encoded"]

  def jpeg():
    shape = tf.image.extract_jpeg_shape(encoded)
    boxes = boxes_fn(shape[0], shape[1])
    top_left = tf.reduce_min(boxes[:, :2], axis=0)
    bottom_right = tf.reduce_max(boxes[:, :2] + boxes[:, 2:], axis=0)
    window = tf.image.decode_and_crop_jpeg(
        encoded, tf.concat([top_left, bottom_right - top_left], 0), channels=3)
    return window, boxes - tf.concat([top_left, [0, 0]], 0)[None]

  def other():
    image = sources.decode_image(encoded)
    shape = tf.shape(image)
    return image, boxes_fn(shape[0], shape[1])
  window, boxes = tf.cond(tf.io.is_jpeg(encoded), jpeg, other)
  window.set_shape([None, None, 3])
  return window, boxes


class SimCLRAugment:
  """SimCLR v1/v2 (and SupCon) training views.

  Args:
    image_size: output side in pixels (views are square).
    color_strength: jitter strength s (1.0 ImageNet, 0.5 CIFAR).
    version: 1 (additive brightness) or 2 (multiplicative brightness).
    blur: Gaussian blur p=0.5; None means on at image_size >= 96.
    crop_area: (min, max) crop area fraction; SupCon may raise the minimum.
    num_views: views per image (2 for SimCLR).
    batch_level: run `distort` on whole batches (after batching) rather than
      per example; None picks batch-level at image_size <= 64 (measured
      faster there by tools/bench_input.py).
  """

  def __init__(self, image_size, color_strength=1.0, version=2, blur=None,
               crop_area=(0.08, 1.0), num_views=2, batch_level=None):
    if version not in (1, 2):
      raise ValueError(f"SimCLR version must be 1 or 2, got {version}.")
    if not 0 < crop_area[0] <= crop_area[1] <= 1:
      raise ValueError(f"crop_area={crop_area} must satisfy 0 < min <= max <= 1.")
    self.image_size = int(image_size)
    self.color_strength = float(color_strength)
    self.version = version
    self.blur = self.image_size >= 96 if blur is None else bool(blur)
    self.crop_area = tuple(crop_area)
    self.num_views = int(num_views)
    self.batch_level = (self.image_size <= 64 if batch_level is None
                        else bool(batch_level))
    # 10% of the side, made odd as the reference does.
    self.blur_kernel = 2 * (self.image_size // 10 // 2) + 1

  def crop_views(self, record, seed):
    """Per example: {"image"|"encoded"} -> float32 [V, S, S, 3] crops in [0, 1]."""
    seeds = tf.random.experimental.stateless_split(seed, self.num_views)

    def boxes(h, w):
      return tf.stack([sample_crop(seeds[v], h, w, self.crop_area)
                       for v in range(self.num_views)])
    window, bxs = _window_and_boxes(record, boxes)
    return tf.stack([
        _resize(window[b[0]:b[0] + b[2], b[1]:b[1] + b[3]], self.image_size)
        for b in tf.unstack(bxs, self.num_views)])

  def distort(self, views, seed):
    """Flip, jitter (p=0.8), grayscale (p=0.2), blur (p=0.5) on [..., S, S, 3]."""
    shape = tf.shape(views)
    x = tf.reshape(views, [-1, self.image_size, self.image_size, 3])
    n = tf.shape(x)[0]
    s = tf.random.experimental.stateless_split(seed, 6)
    coin = lambda i, p: tf.random.stateless_uniform([n], s[i]) < p
    x = tf.where(coin(0, 0.5)[:, None, None, None], tf.reverse(x, [2]), x)
    params = color.sample_jitter(s[1], n, self.color_strength, self.version)
    x = color.color_jitter(x, params, coin(2, 0.8), self.version)
    x = tf.where(coin(3, 0.2)[:, None, None, None], color.grayscale(x), x)
    if self.blur:
      chosen = tf.where(coin(4, 0.5))
      sigma = tf.random.stateless_uniform([n], s[5], 0.1, 2.0)
      blurred = color.gaussian_blur(tf.gather_nd(x, chosen),
                                    tf.gather_nd(sigma, chosen), self.blur_kernel)
      x = tf.tensor_scatter_nd_update(x, chosen, blurred)
    return tf.reshape(x, shape)

  def __call__(self, record, seed):
    """Both stages on one example: record -> float32 [V, S, S, 3]."""
    s = tf.random.experimental.stateless_split(seed, 2)
    return self.distort(self.crop_views(record, s[0]), s[1])


def eval_view(record, image_size, crop_proportion=0.875):
  """Eval: square centre crop of 0.875 of the short side (none when
  image_size <= 32, as SimCLR), bilinear resize -> float32 [S, S, 3]."""
  if image_size <= 32:
    crop_proportion = 1.0

  def box(h, w):
    side = tf.cast(tf.round(crop_proportion * tf.cast(tf.minimum(h, w),
                                                       tf.float32)), tf.int32)
    side = tf.maximum(side, 1)
    return tf.stack([[(h - side) // 2, (w - side) // 2, side, side]])
  window, boxes = _window_and_boxes(record, box)
  b = boxes[0]
  return _resize(window[b[0]:b[0] + b[2], b[1]:b[1] + b[3]], image_size)


def bit_sizes(height, width):
  """BiT-HyperRule resolution: (resize, crop) = (160, 128) below 96x96 pixels
  of area, else (512, 480) (RECIPES.md)."""
  return (160, 128) if height * width < 96 * 96 else (512, 480)


class BiTAugment:
  """BiT fine-tuning views: train = resize to resize_size, random crop
  crop_size, flip p=0.5 (not always, the reference's known bug); eval =
  resize to crop_size. Bilinear; float32 in [0, 1]."""

  def __init__(self, crop_size, resize_size):
    if crop_size > resize_size:
      raise ValueError(f"BiT crop {crop_size} is larger than resize {resize_size}.")
    self.crop_size, self.resize_size = int(crop_size), int(resize_size)

  def train(self, record, seed):
    window, _ = _window_and_boxes(record, lambda h, w: tf.zeros([1, 4], tf.int32))
    image = _resize(window, self.resize_size)
    s = tf.random.experimental.stateless_split(seed, 2)
    image = tf.image.stateless_random_crop(
        image, [self.crop_size, self.crop_size, 3], s[0])
    return tf.image.stateless_random_flip_left_right(image, s[1])

  def eval(self, record):
    window, _ = _window_and_boxes(record, lambda h, w: tf.zeros([1, 4], tf.int32))
    return _resize(window, self.crop_size)


def mixup(batch, alpha, num_classes, seed):
  """MixUp on a batch with one lambda ~ Beta(alpha, alpha) per batch, mixed
  with the reversed batch (BiT). Returns float32 one-hot soft labels [B, C]."""
  s = tf.random.experimental.stateless_split(seed, 2)
  g1 = tf.random.stateless_gamma([], s[0], alpha)
  g2 = tf.random.stateless_gamma([], s[1], alpha)
  lam = g1 / (g1 + g2)
  image = batch["image"]
  onehot = tf.one_hot(batch["label"], num_classes, dtype=tf.float32)
  return dict(batch,
              image=lam * image + (1. - lam) * tf.reverse(image, [0]),
              label=lam * onehot + (1. - lam) * tf.reverse(onehot, [0]))
