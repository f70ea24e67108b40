"""SimCLR's photometric ops, vectorised over a batch with per-image parameters.

Each op takes float32 images [N, H, W, 3] in [0, 1] and one parameter per
image ([N]), and clips to [0, 1] after itself, as the SimCLR reference does
after every jitter op (docs/recipes.md). tests/test_data_augment.py checks each,
for the same parameters, against the tf.image op applied to one image at a
time, to within 2/255. solarize (BYOL's) has no parameter; the caller picks
the images it applies to.

Why not tf.image directly: its adjust_* ops take one scalar for the whole
batch, and one map call per image costs more in op dispatch than the
arithmetic at small sizes. The planar variants further down are what the
augmentation runs under XLA (augment.distort); they compute the same ops.
"""

import math
import numbers

import tensorflow as tf

NUM_JITTER_OPS = 4  # brightness, contrast, saturation, hue


def _per_image(v):
  return tf.reshape(tf.cast(v, tf.float32), [-1, 1, 1, 1])


def brightness(x, factor, version=2):
  """SimCLR v2 multiplies by `factor`; v1 adds it (tf.image.adjust_brightness)."""
  f = _per_image(factor)
  return tf.clip_by_value(x * f if version == 2 else x + f, 0., 1.)


def contrast(x, factor):
  """tf.image.adjust_contrast: (x - mean) * factor + mean, mean per channel."""
  mean = tf.reduce_mean(x, axis=[1, 2], keepdims=True)
  return tf.clip_by_value((x - mean) * _per_image(factor) + mean, 0., 1.)


def saturation(x, factor):
  """tf.image.adjust_saturation without the HSV round trip.

  In HSV, scaling S by f and clipping it to 1 keeps V = max(r, g, b) and the
  hue, and moves every channel along its line to V:
  c' = V - k (V - c) with k = min(f, V / (V - min(r, g, b))).
  """
  v = tf.reduce_max(x, axis=-1, keepdims=True)
  chroma = v - tf.reduce_min(x, axis=-1, keepdims=True)
  k = tf.minimum(_per_image(factor), v / tf.maximum(chroma, 1e-12))
  return tf.clip_by_value(v - k * (v - x), 0., 1.)


def hue(x, delta):
  """tf.image.adjust_hue: rotates the hue by delta (a fraction of the circle).

  Computed in RGB without the HSV round trip (whose kernels are slow): V and
  chroma C = V - min(r, g, b) are kept, the hue sector h in [0, 6) is shifted,
  and each channel is V - C * clip(min(k, 4 - k), 0, 1) with
  k = (n + h) mod 6, n = 5, 3, 1 for r, g, b (the standard HSV-to-RGB form).
  Plain elementwise ops, so XLA fuses it into one loop.
  """
  v = tf.reduce_max(x, axis=-1, keepdims=True)
  chroma = v - tf.reduce_min(x, axis=-1, keepdims=True)
  r, g, b = x[..., 0:1], x[..., 1:2], x[..., 2:3]
  safe = tf.maximum(chroma, 1e-12)
  h = tf.where(tf.equal(v, r), (g - b) / safe,
               tf.where(tf.equal(v, g), 2. + (b - r) / safe, 4. + (r - g) / safe))
  h = h / 6. + _per_image(delta)
  h = (h - tf.floor(h)) * 6.
  k = tf.constant([5., 3., 1.]) + h
  k = tf.where(k >= 6., k - 6., k)
  out = v - chroma * tf.clip_by_value(tf.minimum(k, 4. - k), 0., 1.)
  return tf.clip_by_value(out, 0., 1.)


def grayscale(x):
  """tf.image.rgb_to_grayscale, tiled back to three channels."""
  return tf.tile(tf.image.rgb_to_grayscale(x), [1, 1, 1, 3])


def solarize(x, threshold=0.5):
  """BYOL's solarisation: x -> 1 - x where x >= threshold. At 0.5 it is
  PIL's ImageOps.solarize at 128 on 8-bit values (i / 255)."""
  return tf.where(x >= threshold, 1. - x, x)


def gaussian_kernels(sigma, kernel_size):
  """Normalised 1-D Gaussian taps [N, kernel_size], one row per sigma."""
  radius = kernel_size // 2
  t = tf.range(-radius, radius + 1, dtype=tf.float32)
  s = tf.reshape(tf.cast(sigma, tf.float32), [-1, 1])
  w = tf.exp(-tf.square(t)[None] / (2. * tf.square(s)))
  return w / tf.reduce_sum(w, axis=1, keepdims=True)


def gaussian_blur(x, sigma, kernel_size):
  """Separable Gaussian blur with one sigma per image.

  kernel_size is rounded up to odd (2 * (k // 2) + 1) and the borders are
  zero-padded, both as the SimCLR reference's gaussian_blur (tf2/data_util.py:
  a separable depthwise convolution with padding "SAME"), so a blurred view
  darkens towards its edges exactly as there. The batch is folded into the
  channels so one depthwise convolution blurs every image with its own kernel.
  """
  radius = kernel_size // 2
  if radius == 0:
    return x
  return tf.cond(tf.shape(x)[0] > 0, lambda: _blur(x, sigma, kernel_size),
                 lambda: x)


def _blur(x, sigma, kernel_size):
  shape = tf.shape(x)
  n, h, w = shape[0], shape[1], shape[2]
  taps = tf.repeat(tf.transpose(gaussian_kernels(sigma, kernel_size)), 3, axis=1)
  y = tf.reshape(tf.transpose(x, [1, 2, 0, 3]), [1, h, w, n * 3])
  # "SAME" pads (k - 1) / 2 zeros on each side for an odd kernel.
  y = tf.nn.depthwise_conv2d(y, taps[:, None, :, None], [1, 1, 1, 1], "SAME")
  y = tf.nn.depthwise_conv2d(y, taps[None, :, :, None], [1, 1, 1, 1], "SAME")
  return tf.transpose(tf.reshape(y, [h, w, n, 3]), [2, 0, 1, 3])


def per_op_strengths(values):
  """Four per-op jitter maxima (brightness, contrast, saturation, hue) as a
  tuple of floats; ValueError unless four finite non-negative numbers."""
  try:
    out = tuple(float(v) for v in values)
  except (TypeError, ValueError):
    out = ()
  if len(out) != NUM_JITTER_OPS or not all(0. <= v < math.inf for v in out):
    raise ValueError(f"jitter={values!r} must be 4 non-negative numbers "
                     "(brightness, contrast, saturation, hue).")
  return out


def jitter_strengths(strength):
  """The four jitter maxima (brightness, contrast, saturation, hue).

  A number s stands for SimCLR's (0.8s, 0.8s, 0.8s, 0.2s) (docs/recipes.md);
  a sequence of four non-negative numbers gives each op its own (BYOL's
  (0.4, 0.4, 0.2, 0.1), for instance).
  """
  if isinstance(strength, numbers.Real):
    s = float(strength)
    return (0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)
  return per_op_strengths(strength)


def sample_jitter(seed, n, strength, version=2):
  """Draws per-image jitter parameters (docs/recipes.md).

  strength is SimCLR's s or four per-op maxima (b, c, sa, h); see
  jitter_strengths (s means (0.8s, 0.8s, 0.8s, 0.2s)). Returns a dict of
  [N] tensors: brightness (v2: factor in [max(0, 1-b), 1+b]; v1: additive
  delta in [-b, b]), contrast and saturation factors in [max(0, 1-c), 1+c]
  and [max(0, 1-sa), 1+sa], hue delta in [-h, h], and order [N, 4], a
  random permutation of the four ops.
  """
  seeds = tf.random.experimental.stateless_split(seed, 5)
  b, c, sa, h = jitter_strengths(strength)
  factor = lambda m: (max(0., 1. - m), 1. + m)
  u = lambda i, a, z: tf.random.stateless_uniform([n], seeds[i], a, z)
  return {
      "brightness": u(0, *factor(b)) if version == 2 else u(0, -b, b),
      "contrast": u(1, *factor(c)),
      "saturation": u(2, *factor(sa)),
      "hue": u(3, -h, h),
      "order": tf.argsort(tf.random.stateless_uniform(
          [n, NUM_JITTER_OPS], seeds[4]), axis=1, stable=True),
  }


def color_jitter(x, params, apply, version=2):
  """Applies the four jitter ops in each image's own random order.

  At each of the four positions the batch is partitioned by which op each
  image runs there (images with apply=False run none), so every image pays
  for exactly the four ops it gets; the parts are stitched back in order.
  """
  ops = [lambda a, p: brightness(a, p, version), contrast, saturation, hue]
  names = ["brightness", "contrast", "saturation", "hue"]
  n = tf.shape(x)[0]
  ids = tf.range(n)
  for position in range(NUM_JITTER_OPS):
    which = tf.where(apply, params["order"][:, position], NUM_JITTER_OPS)
    which = tf.cast(which, tf.int32)
    parts = tf.dynamic_partition(x, which, NUM_JITTER_OPS + 1)
    index_parts = tf.dynamic_partition(ids, which, NUM_JITTER_OPS + 1)
    out = []
    for j, (op, name) in enumerate(zip(ops, names)):
      p = tf.dynamic_partition(params[name], which, NUM_JITTER_OPS + 1)[j]
      out.append(op(parts[j], p))
    out.append(parts[NUM_JITTER_OPS])
    x = tf.dynamic_stitch(index_parts, out)
  return x


# Planar versions of the ops, for XLA. Images are split into three planes
# r, g, b of shape [..., H, W] (not channels-last): the per-pixel arithmetic
# of hue and saturation then runs on contiguous arrays that XLA vectorises,
# about 2.5x faster than the same ops on [H, W, 3] (or tf.image's own XLA
# lowering). Parameters broadcast against [..., H, W]: scalars for one image,
# [N, 1, 1] for a batch. Each matches the channels-last op above.


def _clip3(rgb):
  return tuple(tf.clip_by_value(c, 0., 1.) for c in rgb)


def _brightness_planar(rgb, factor, version):
  return _clip3(c * factor if version == 2 else c + factor for c in rgb)


def _contrast_planar(rgb, factor):
  means = [tf.reduce_mean(c, axis=[-2, -1], keepdims=True) for c in rgb]
  return _clip3((c - m) * factor + m for c, m in zip(rgb, means))


def _saturation_planar(rgb, factor):
  r, g, b = rgb
  v = tf.maximum(tf.maximum(r, g), b)
  chroma = v - tf.minimum(tf.minimum(r, g), b)
  k = tf.minimum(factor, v / tf.maximum(chroma, 1e-12))
  return _clip3(v - k * (v - c) for c in rgb)


def _hue_planar(rgb, delta):
  r, g, b = rgb
  v = tf.maximum(tf.maximum(r, g), b)
  chroma = v - tf.minimum(tf.minimum(r, g), b)
  inv = 1. / tf.maximum(chroma, 1e-12)
  h = tf.where(tf.equal(v, r), (g - b) * inv,
               tf.where(tf.equal(v, g), 2. + (b - r) * inv, 4. + (r - g) * inv))
  h = h * (1. / 6.) + delta
  h = (h - tf.floor(h)) * 6.

  def channel(n):
    k = n + h
    k = tf.where(k >= 6., k - 6., k)
    return v - chroma * tf.clip_by_value(tf.minimum(k, 4. - k), 0., 1.)
  return _clip3((channel(5.), channel(3.), channel(1.)))


def _planar_ops(params, version):
  return [lambda a: _brightness_planar(a, params["brightness"], version),
          lambda a: _contrast_planar(a, params["contrast"]),
          lambda a: _saturation_planar(a, params["saturation"]),
          lambda a: _hue_planar(a, params["hue"])]


def grayscale_planar(rgb):
  """rgb_to_grayscale's weights, on planes; returns the grey plane."""
  r, g, b = rgb
  return 0.2989 * r + 0.5870 * g + 0.1140 * b


def solarize_planar(rgb, threshold=0.5):
  """solarize on planes; returns the three planes."""
  return tuple(solarize(c, threshold) for c in rgb)


def color_jitter_dense(rgb, params, apply, version=2):
  """color_jitter on planes [N, H, W] with static shapes, for XLA.

  At each position every op runs on the whole batch and each image keeps
  the one its order picks (apply [N] False: none). 4x the arithmetic of
  color_jitter, but no partitioning, and XLA fuses each position into one
  loop over the pixels: much cheaper for small images.
  """
  shaped = {k: tf.reshape(v, [-1, 1, 1]) for k, v in params.items()
            if k != "order"}
  ops = _planar_ops(shaped, version)
  for position in range(NUM_JITTER_OPS):
    which = tf.where(apply, tf.cast(params["order"][:, position], tf.int32),
                     NUM_JITTER_OPS)[:, None, None]
    outs = [op(rgb) for op in ops]
    new = []
    for c in range(3):
      out = rgb[c]
      for j in range(NUM_JITTER_OPS):
        out = tf.where(tf.equal(which, j), outs[j][c], out)
      new.append(out)
    rgb = tuple(new)
  return rgb


def jitter_one(rgb, params, order, version=2):
  """The four jitter ops on one image's planes ([H, W] each) in `order`
  ([4]), clipping after each; scalar params; a switch_case per position
  runs only the chosen op."""
  ops = _planar_ops(params, version)
  for position in range(NUM_JITTER_OPS):
    rgb = tf.switch_case(order[position],
                         [lambda op=op, a=rgb: op(a) for op in ops])
  return tuple(rgb)


def blur_one(rgb, sigma, kernel_size):
  """gaussian_blur of one image's planes ([H, W] each), by shifted sums.

  Same taps and zero-padded borders as gaussian_blur, but taps further than
  3.5 sigma from the centre (together < 2e-4 of the kernel's weight, far
  below the 2/255 tolerance) are left out: a switch_case picks the smallest
  radius that covers 3.5 sigma, so a sigma of 0.3 costs 3 taps, not 23.
  Elementwise ops only, so under XLA both passes fuse into loops (XLA's
  depthwise convolution on CPU is very slow).
  """
  radius = kernel_size // 2
  if radius == 0:
    return rgb
  x = tf.stack(rgb)
  h, w = x.shape[1], x.shape[2]
  taps = gaussian_kernels(tf.reshape(sigma, [1]), kernel_size)[0]

  def blur(r):
    t = taps[radius - r:radius + r + 1]
    t = t / tf.reduce_sum(t)
    y = tf.pad(x, [[0, 0], [r, r], [0, 0]])
    y = tf.add_n([t[i] * y[:, i:i + h] for i in range(2 * r + 1)])
    y = tf.pad(y, [[0, 0], [0, 0], [r, r]])
    return tf.add_n([t[i] * y[:, :, i:i + w] for i in range(2 * r + 1)])
  needed = tf.cast(tf.math.ceil(3.5 * tf.cast(sigma, tf.float32)), tf.int32)
  index = tf.clip_by_value(needed, 1, radius) - 1
  y = tf.switch_case(index, [lambda r=r: blur(r) for r in range(1, radius + 1)])
  return y[0], y[1], y[2]
