"""SimCLR / SupCon (and multi-crop) views, BiT train and eval views, and MixUp
(docs/recipes.md).

A SimCLR view is made in two stages so that each runs where it is cheapest:
  1. Crops. Per example (`crop_views`): samples the V boxes, decodes only
     the union of the boxes from a JPEG (decode_and_crop), and resizes each
     crop with *bilinear* interpolation (the reference is bicubic; bilinear
     is about twice as fast: docs/recipes.md, "Departures from the
     reference code"). For same-size decoded
     images (in-memory arrays) the pipeline crops whole batches instead
     (`crop_batch`: the same bilinear taps as tf.image.resize, as gathers).
  2. `distort` (flip, colour jitter in random order with p=0.8, grayscale
     p=0.2, Gaussian blur p=0.5 with per-image sigma; optionally BYOL's
     per-view blur and solarisation rates): random parameters are drawn
     per image, and the pixel work is one XLA-compiled function on
     colour planes, run on whole batches by the pipeline (batch_level).
     Views above 64 px go one at a time, conditionals running only each
     view's chosen ops; smaller ones all at once with per-image selects.
     tests/test_data_fast_paths.py checks both paths give the same views.

Multi-crop views (SwAV, DINO: MultiCropAugment) are groups of views of
different sizes, each group made by a SimCLRAugment of its own from one
decode per image.

All randomness is stateless and comes from an explicit seed, so a pipeline
with a seed is deterministic.
"""

from collections.abc import Mapping
import math
import numbers

import tensorflow as tf

from tf_ssl.data import color
from tf_ssl.data import sources


def sample_crops(seed, n, height, width, area_range=(0.08, 1.0),
                 aspect_range=(3 / 4, 4 / 3), attempts=100):
  """Samples n random-resized-crop boxes [n, 4] (offset_y, offset_x, h, w).

  Area fraction is uniform in area_range and the aspect ratio (w / h)
  log-uniform in aspect_range, as the SimCLR paper describes it (Appendix
  A; docs/recipes.md, "SimCLR augmentation"). Of `attempts` candidates the
  first that fits is used; if none fits, the whole image. Attempts and
  fallback are those of the reference code's crop (tf2/data_util.py
  crop_and_resize: tf.image.sample_distorted_bounding_box with
  max_attempts=100, which returns the whole image when all fail); only an
  elongated image needs many, as a square one fits within a few. The
  reference op's own size distribution differs a little (docs/recipes.md,
  "Departures from the reference code"). Vectorised over the n boxes, so
  a batch of views costs a handful of ops.
  """
  s = tf.random.experimental.stateless_split(seed, 4)
  height = tf.cast(height, tf.int32)
  width = tf.cast(width, tf.int32)
  h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  area = tf.random.stateless_uniform([n, attempts], s[0], *area_range) * h * w
  log_r = tf.random.stateless_uniform(
      [n, attempts], s[1], math.log(aspect_range[0]), math.log(aspect_range[1]))
  cw = tf.round(tf.sqrt(area * tf.exp(log_r)))
  ch = tf.round(tf.sqrt(area / tf.exp(log_r)))
  fits = (cw <= w) & (ch <= h) & (cw >= 1) & (ch >= 1)
  first = tf.argmax(tf.cast(fits, tf.int32), axis=1, output_type=tf.int32)
  ok = tf.reduce_any(fits, axis=1)
  pick = lambda c: tf.gather(c, first, axis=1, batch_dims=1)
  ch = tf.cast(tf.where(ok, pick(ch), h), tf.int32)
  cw = tf.cast(tf.where(ok, pick(cw), w), tf.int32)
  u = tf.random.stateless_uniform([n, 2], s[2])
  oy = tf.cast(u[:, 0] * tf.cast(height - ch + 1, tf.float32), tf.int32)
  ox = tf.cast(u[:, 1] * tf.cast(width - cw + 1, tf.float32), tf.int32)
  return tf.stack([tf.minimum(oy, height - ch), tf.minimum(ox, width - cw),
                   ch, cw], axis=1)


def sample_crop(seed, height, width, area_range=(0.08, 1.0),
                aspect_range=(3 / 4, 4 / 3), attempts=100):
  """One random-resized-crop box (offset_y, offset_x, h, w), int32; see
  sample_crops."""
  return sample_crops(seed, 1, height, width, area_range, aspect_range,
                      attempts)[0]


def _lerp_taps(offset, length, size):
  """Source indices and weights of tf.image.resize's bilinear (half-pixel
  centres, clamped to the crop) for crops [offset, offset + length)."""
  scale = tf.cast(length, tf.float32)[:, None] / size
  src = (tf.range(size, dtype=tf.float32)[None] + 0.5) * scale - 0.5
  floor = tf.floor(src)
  lo = tf.maximum(tf.cast(floor, tf.int32), 0)
  hi = tf.minimum(tf.cast(tf.math.ceil(src), tf.int32), length[:, None] - 1)
  return offset[:, None] + lo, offset[:, None] + hi, src - floor


def resize_boxes(images, boxes, box_indices, size):
  """Bilinear resize of many integer crops of a batch, in a few ops.

  images: uint8 [N, H, W, 3]; boxes: int32 [M, 4] (offset_y, offset_x, h,
  w); box_indices: int32 [M]. Returns float32 [M, size, size, 3] in [0, 1],
  what tf.image.resize(images[k, oy:oy+h, ox:ox+w], [size, size]) / 255
  gives for each box (same taps, same clamping at the crop's edges), but as
  two gathers and two lerps for the whole batch instead of a slice and a
  resize per crop.
  """
  images = tf.convert_to_tensor(images)
  shape = tf.shape(images)
  rows = tf.reshape(images, [-1, shape[2], 3])
  y_lo, y_hi, y_w = _lerp_taps(boxes[:, 0], boxes[:, 2], size)
  x_lo, x_hi, x_w = _lerp_taps(boxes[:, 1], boxes[:, 3], size)
  base = tf.cast(box_indices, tf.int32)[:, None] * shape[1]
  top = tf.cast(tf.gather(rows, base + y_lo), tf.float32)
  bottom = tf.cast(tf.gather(rows, base + y_hi), tf.float32)
  x = top + (bottom - top) * y_w[:, :, None, None]  # [M, size, W, 3]
  left = tf.gather(x, x_lo, axis=2, batch_dims=1)
  right = tf.gather(x, x_hi, axis=2, batch_dims=1)
  out = left + (right - left) * x_w[:, None, :, None]
  return tf.clip_by_value(out / 255., 0., 1.)


def _resize(image, size):
  """uint8/float crop -> float32 [size, size, 3] in [0, 1], bilinear."""
  out = tf.image.resize(image, [size, size], method="bilinear")
  return tf.clip_by_value(out / 255., 0., 1.)


# Pixels decoded beyond the union of the boxes on each side. libjpeg's
# (fancy) 4:2:0 chroma upsampling reads one neighbouring pixel, so a window
# cut exactly at a box edge gets wrong colours along that edge (up to 38/255
# measured); one pixel of margin already makes the boxes' pixels exact.
_JPEG_MARGIN = 2


def _window_and_boxes(record, boxes_fn):
  """Decodes the part of the record's image that `boxes_fn(h, w)` needs.

  Returns (window uint8 [h', w', 3], boxes [V, 4] relative to the window).
  For JPEG bytes only the union of the boxes (plus a small margin, which
  keeps the pixels equal to a full decode's) is decoded.
  """
  if "image" in record:
    image = sources.to_rgb(record["image"])
    shape = tf.shape(image)
    return image, boxes_fn(shape[0], shape[1])
  encoded = record["encoded"]

  def jpeg():
    shape = tf.image.extract_jpeg_shape(encoded)
    boxes = boxes_fn(shape[0], shape[1])
    top_left = tf.maximum(tf.reduce_min(boxes[:, :2], axis=0) - _JPEG_MARGIN, 0)
    bottom_right = tf.minimum(
        tf.reduce_max(boxes[:, :2] + boxes[:, 2:], axis=0) + _JPEG_MARGIN,
        shape[:2])
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


def _probabilities(name, p, num_views):
  """A probability (float) or one per view (tuple); validated."""
  scalar = isinstance(p, numbers.Real)
  try:
    values = (float(p),) if scalar else tuple(float(v) for v in p)
  except (TypeError, ValueError):
    raise ValueError(f"{name}={p!r} must be a number or one per view.") from None
  if not scalar and len(values) != num_views:
    raise ValueError(f"{name}={p!r} needs one probability per view ({num_views}).")
  if not all(0. <= v <= 1. for v in values):
    raise ValueError(f"{name}={p!r}: probabilities must be in [0, 1].")
  return values[0] if scalar else values


class SimCLRAugment:
  """SimCLR v1/v2 (and SupCon) training views; BYOL's with `asymmetric`.

  Views are ordered [B, V, ...]: flattened, row r is view r % V of its
  image, which is what the per-view probabilities index.

  Args:
    image_size: output side in pixels (views are square).
    color_strength: jitter strength s (1.0 ImageNet, 0.5 CIFAR).
    version: 1 (additive brightness) or 2 (multiplicative brightness).
    blur: Gaussian blur on or off; None means on at image_size >= 96.
    crop_area: (min, max) crop area fraction; SupCon may raise the minimum.
    num_views: views per image (2 for SimCLR).
    batch_level: run `distort` on whole batches (after batching) rather than
      per example; None means True (measured faster at 32 and 224 px by
      tools/bench_input.py: one XLA call per batch instead of per example).
      At <= 64 px a batch is distorted with per-image selects, above one
      view at a time with conditionals.
    jitter: None (the maxima follow color_strength: brightness, contrast,
      saturation 0.8s, hue 0.2s) or four per-op maxima (brightness,
      contrast, saturation, hue), e.g. BYOL's (0.4, 0.4, 0.2, 0.1): factors
      in [max(0, 1 - m), 1 + m], hue delta (and v1 brightness delta) in
      [-m, m].
    blur_prob: probability of blurring a view (when `blur` is on), or a
      tuple of one per view (BYOL: (1.0, 0.1)).
    solarize_prob: probability of solarising a view (x -> 1 - x where
      x >= 0.5), or one per view (BYOL: (0.0, 0.2)). It comes last, after
      grayscale and blur, as in BYOL; 0 adds no op.
  """

  def __init__(self, image_size, color_strength=1.0, version=2, blur=None,
               crop_area=(0.08, 1.0), num_views=2, batch_level=None, *,
               jitter=None, blur_prob=0.5, solarize_prob=0.0):
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
    self.batch_level = True if batch_level is None else bool(batch_level)
    # 10% of the side, made odd as the reference does.
    self.blur_kernel = 2 * (self.image_size // 10 // 2) + 1
    self.jitter = None if jitter is None else color.per_op_strengths(jitter)
    self.blur_prob = _probabilities("blur_prob", blur_prob, self.num_views)
    self.solarize_prob = _probabilities("solarize_prob", solarize_prob,
                                        self.num_views)

  @classmethod
  def asymmetric(cls, image_size, color_strength=0.5, blur=None,
                 crop_area=(0.08, 1.0), version=2, batch_level=None):
    """BYOL's two asymmetric views (the BYOL paper's augmentation table,
    which MoCo v3 also uses).

    Both views: random resized crop, flip p=0.5, jitter p=0.8 in random
    order with maxima (0.8s, 0.8s, 0.4s, 0.2s) for brightness, contrast,
    saturation, hue (s = color_strength; 0.5 gives the published 0.4, 0.4,
    0.2, 0.1), grayscale p=0.2. Then Gaussian blur (sigma U[0.1, 2], kernel
    10% of the side) with p=1.0 on view 1 and 0.1 on view 2, and
    solarisation with p=0.0 on view 1 and 0.2 on view 2; values stay in
    [0, 1]. blur=None means on at image_size >= 96, as in the constructor
    (pass blur=True to blur small images too). version=2 is multiplicative
    brightness.
    """
    s = float(color_strength)
    return cls(image_size, color_strength=s, version=version, blur=blur,
               crop_area=crop_area, num_views=2, batch_level=batch_level,
               jitter=(0.8 * s, 0.8 * s, 0.4 * s, 0.2 * s),
               blur_prob=(1.0, 0.1), solarize_prob=(0.0, 0.2))

  def _per_view(self, p, n):
    """p as the threshold of n coins: a number, or [n] by view (r % V)."""
    if not isinstance(p, tuple):
      return p
    return tf.gather(tf.constant(p, tf.float32), tf.range(n) % self.num_views)

  def crop_views(self, record, seed):
    """Per example: {"image"|"encoded"} -> float32 [V, S, S, 3] crops in [0, 1]."""
    return tf.clip_by_value(self._crops_255(record, seed) / 255., 0., 1.)

  def _crops_255(self, record, seed):
    """crop_views before the scaling to [0, 1] (values in [0, 255])."""
    window, boxes = _window_and_boxes(
        record, lambda h, w: self._boxes(seed, h, w))
    return self._resize_crops(window, boxes)

  def _boxes(self, seed, height, width):
    """The V crop boxes [V, 4] (offset_y, offset_x, h, w) of one height x
    width image that _crops_255 cuts (MultiCropAugment samples every group's
    with it, to decode their union once)."""
    return sample_crops(seed, self.num_views, height, width, self.crop_area)

  def _resize_crops(self, window, boxes):
    """The V crops of `window` at `boxes` [V, 4] (relative to the window),
    resized: float32 [V, S, S, 3] in [0, 255]."""
    return tf.stack([
        tf.image.resize(window[b[0]:b[0] + b[2], b[1]:b[1] + b[3]],
                        [self.image_size, self.image_size], method="bilinear")
        for b in tf.unstack(boxes, self.num_views)])

  def crop_batch(self, images, seed):
    """Crops of a batch of same-size images: uint8 [B, H, W, 3] -> float32
    [B, V, S, S, 3] in [0, 1], all B * V crops resized together by
    resize_boxes (per-example slicing and resizing cost more than the pixels
    at 32 px)."""
    images = tf.convert_to_tensor(images)
    shape = tf.shape(images)
    n = shape[0] * self.num_views
    boxes = sample_crops(seed, n, shape[1], shape[2], self.crop_area)
    views = resize_boxes(images, boxes,
                                  tf.range(n) // self.num_views, self.image_size)
    return tf.reshape(views, [-1, self.num_views, self.image_size,
                              self.image_size, 3])

  def distort(self, views, seed):
    """Flip, jitter (p=0.8), grayscale (p=0.2), blur (blur_prob),
    solarisation (solarize_prob) on [..., S, S, 3].

    The random parameters are drawn here; the pixel work runs as one
    XLA-compiled function on colour planes (fused, vectorised loops instead
    of one pass over memory per op). Views above 64 px (or any size with
    batch_level=False) go one at a time, conditionals running only each
    view's chosen ops; smaller ones all at once with per-image selects.
    """
    return self._distort(views, seed, 1.)

  def _distort(self, views, seed, scale):
    shape = tf.shape(views)
    x = tf.reshape(views, [-1, self.image_size, self.image_size, 3])
    n = tf.shape(x)[0]
    s = tf.random.experimental.stateless_split(seed, 6)
    coin = lambda i, p: tf.random.stateless_uniform([n], s[i]) < p
    flip, gray = coin(0, 0.5), coin(3, 0.2)
    strength = self.color_strength if self.jitter is None else self.jitter
    params = color.sample_jitter(s[1], n, strength, self.version)
    jitter = coin(2, 0.8)
    blur = (coin(4, self._per_view(self.blur_prob, n)) if self.blur
            else tf.zeros([n], tf.bool))
    sigma = tf.random.stateless_uniform([n], s[5], 0.1, 2.0)
    sol = None
    if self.solarize_prob not in (0., (0.,) * self.num_views):
      # A seed of its own: the draws above stay those of solarize_prob=0.
      u = tf.random.stateless_uniform(
          [n], tf.random.experimental.stateless_fold_in(seed, 1))
      sol = u < self._per_view(self.solarize_prob, n)
    if self.batch_level and self.image_size <= 64:
      x = tf.clip_by_value(x * scale, 0., 1.) if scale != 1. else x
      x = _distort_batch(x, flip, params, jitter, gray, self.version)
      if self.blur:
        chosen = tf.where(blur)
        blurred = color.gaussian_blur(tf.gather_nd(x, chosen),
                                      tf.gather_nd(sigma, chosen), self.blur_kernel)
        x = tf.tensor_scatter_nd_update(x, chosen, blurred)
      if sol is not None:  # last: after grayscale and blur, as the recipe
        x = _solarize_batch(x, sol)
    else:
      x = _distort_each(x, flip, params, jitter, gray, blur, sigma,
                        self.version, self.blur_kernel, scale, sol)
    return tf.reshape(x, shape)

  def __call__(self, record, seed):
    """Both stages on one example: record -> float32 [V, S, S, 3]."""
    s = tf.random.experimental.stateless_split(seed, 2)
    # The scaling to [0, 1] happens inside the fused distortion.
    return self._distort(self._crops_255(record, s[0]), s[1], 1. / 255.)


class MultiCropAugment:
  """Multi-crop views (SwAV, DINO): groups of views of different sizes.

  Each group is a SimCLRAugment, which gives it its image_size, num_views,
  crop_area, blur, blur_prob / solarize_prob (per view of the group),
  jitter, color_strength and version. The first group is the *global* one
  (the views SwAV assigns codes from and DINO's teacher sees); the others
  are typically small local crops. E.g. DINO's (also `MultiCropAugment.dino`;
  SwAV's is `MultiCropAugment.swav`):

    MultiCropAugment({
        "global": SimCLRAugment.asymmetric(224, crop_area=(0.4, 1.0)),
        "local": SimCLRAugment(96, num_views=8, crop_area=(0.05, 0.4),
                               jitter=(0.4, 0.4, 0.2, 0.1), blur_prob=0.5)})

  It stands in for a SimCLRAugment in pipeline.build_pretrain: every method
  the pipeline calls takes and returns a dict {group name: tensor} in the
  groups' order, so a batch's "views" is {name: float32 [B, V_g, S_g, S_g,
  3]} (e.g. {"global": [B, 2, 224, 224, 3], "local": [B, 6, 96, 96, 3]}).

  Seeds: group g (0, 1, ... in order) draws everything from
  fold_in(seed, g), never from `seed` itself, so adding, removing or
  changing a later group leaves the earlier groups' views as they were
  (bit for bit, except that a JPEG decoded around more boxes may differ in
  pixels outside the boxes, which no crop reads).

  Per example (files, JPEG) every group's boxes are sampled first and the
  image is decoded once, only the union of all of them (for a JPEG); each
  group then resizes its own crops from that window. For same-size decoded
  images (in-memory arrays) `crop_batch` crops each group from the same
  batch.

  Args:
    groups: an ordered mapping {name: SimCLRAugment} (or a sequence of
      (name, SimCLRAugment) pairs); names are Python identifiers, the
      first group is the global one, and all groups must agree on
      batch_level.

  Attributes:
    groups: dict {name: SimCLRAugment}, in order.
    num_views: total views per image, over all groups.
    batch_level: the groups' (common) batch_level.
    image_size: the first (global) group's image_size.
  """

  def __init__(self, groups):
    pairs = list(groups.items() if isinstance(groups, Mapping) else groups)
    if not pairs:
      raise ValueError("MultiCropAugment needs at least one group of views.")
    names = [p[0] if isinstance(p, tuple) and len(p) == 2 else None
             for p in pairs]
    for name, pair in zip(names, pairs):
      if not (isinstance(name, str) and name.isidentifier()):
        raise ValueError(f"MultiCropAugment group {pair!r}: the name must be a "
                         "Python identifier such as 'global' or 'local'.")
      if not isinstance(pair[1], SimCLRAugment):
        raise ValueError(f"MultiCropAugment group {name!r} is a "
                         f"{type(pair[1]).__name__}, not a SimCLRAugment.")
    if len(set(names)) != len(names):
      raise ValueError(f"MultiCropAugment group names repeat: {names}.")
    levels = {name: g.batch_level for name, g in pairs}
    if len(set(levels.values())) > 1:
      raise ValueError(f"MultiCropAugment groups must agree on batch_level; "
                       f"got {levels}.")
    self.groups = dict(pairs)
    self.num_views = sum(g.num_views for g in self.groups.values())
    self.batch_level = pairs[0][1].batch_level
    self.image_size = pairs[0][1].image_size

  @classmethod
  def swav(cls, global_size=224, local_size=96, num_local=6, color_strength=1.0,
           global_area=(0.14, 1.0), local_area=(0.05, 0.14), blur=None,
           batch_level=None):
    """SwAV's multi-crop: 2 global + num_local local views, every view with
    flip, SimCLR jitter of color_strength (p 0.8), grayscale 0.2 and blur
    p 0.5 (blur=None: on at >= 96 px, per group)."""
    kw = dict(color_strength=color_strength, blur=blur, batch_level=batch_level)
    return cls({"global": SimCLRAugment(global_size, crop_area=global_area, **kw),
                "local": SimCLRAugment(local_size, crop_area=local_area,
                                       num_views=num_local, **kw)})

  @classmethod
  def dino(cls, global_size=224, local_size=96, num_local=8, color_strength=0.5,
           global_area=(0.4, 1.0), local_area=(0.05, 0.4), blur=None,
           batch_level=None):
    """DINO's multi-crop (ViT defaults): jitter maxima (0.8s, 0.8s, 0.4s,
    0.2s) (s=0.5: 0.4, 0.4, 0.2, 0.1) p 0.8, grayscale 0.2 on every view;
    global view 1 blur p 1.0, view 2 blur 0.1 + solarise 0.2 (BYOL's
    SimCLRAugment.asymmetric); local views blur 0.5 (blur=None: on at >= 96
    px, per group). DINO's ResNet-50 uses SwAV's areas (0.14, 1) and (0.05,
    0.14)."""
    s = float(color_strength)
    return cls({
        "global": SimCLRAugment.asymmetric(
            global_size, color_strength=s, blur=blur, crop_area=global_area,
            batch_level=batch_level),
        "local": SimCLRAugment(
            local_size, color_strength=s, blur=blur, crop_area=local_area,
            num_views=num_local, batch_level=batch_level,
            jitter=(0.8 * s, 0.8 * s, 0.4 * s, 0.2 * s))})

  def _keyed(self, seed):
    """(name, group, fold_in(seed, g)) for each group g, in order."""
    seed = tf.convert_to_tensor(seed)
    return [(name, group, tf.random.experimental.stateless_fold_in(
        seed, tf.constant(g, tf.int64)))
            for g, (name, group) in enumerate(self.groups.items())]

  def crop_views(self, record, seed):
    """Per example: {"image"|"encoded"} -> {name: float32 [V_g, S_g, S_g, 3]}
    crops in [0, 1]."""
    return {k: tf.clip_by_value(v / 255., 0., 1.)
            for k, v in self._crops_255(record, seed).items()}

  def _crops_255(self, record, seed):
    """crop_views before the scaling to [0, 1]: one (window) decode for all
    the groups' boxes."""
    keyed = self._keyed(seed)

    def boxes(h, w):
      return tf.concat([group._boxes(key, h, w) for _, group, key in keyed], 0)  # pylint: disable=protected-access
    window, bxs = _window_and_boxes(record, boxes)
    out, start = {}, 0
    for name, group, _ in keyed:
      out[name] = group._resize_crops(  # pylint: disable=protected-access
          window, bxs[start:start + group.num_views])
      start += group.num_views
    return out

  def crop_batch(self, images, seed):
    """uint8 [B, H, W, 3] -> {name: float32 [B, V_g, S_g, S_g, 3]} in [0, 1]:
    each group's SimCLRAugment.crop_batch of the same images."""
    images = tf.convert_to_tensor(images)
    return {name: group.crop_batch(images, key)
            for name, group, key in self._keyed(seed)}

  def distort(self, views, seed):
    """{name: [..., S_g, S_g, 3]} -> the same, each group distorted by its
    SimCLRAugment.distort (its own per-view probabilities)."""
    return self._distort(views, seed, 1.)

  def _distort(self, views, seed, scale):
    self._check_keys(views)
    return {name: group._distort(views[name], key, scale)  # pylint: disable=protected-access
            for name, group, key in self._keyed(seed)}

  def __call__(self, record, seed):
    """Both stages on one example: record -> {name: float32 [V_g, S_g, S_g,
    3]}."""
    s = tf.random.experimental.stateless_split(seed, 2)
    return self._distort(self._crops_255(record, s[0]), s[1], 1. / 255.)

  def _check_keys(self, views):
    if not isinstance(views, Mapping) or set(views) != set(self.groups):
      got = sorted(views) if isinstance(views, Mapping) else type(views).__name__
      raise ValueError(f"MultiCropAugment needs views {{group: tensor}} for the "
                       f"groups {list(self.groups)}; got {got}.")


@tf.function(jit_compile=True)
def _distort_batch(x, flip, params, jitter, gray, version):
  """Flip, jitter, grayscale on a batch [N, S, S, 3]; XLA, on planes."""
  x = tf.where(flip[:, None, None, None], tf.reverse(x, [2]), x)
  p = tf.transpose(x, [3, 0, 1, 2])
  rgb = color.color_jitter_dense((p[0], p[1], p[2]), params, jitter, version)
  grey = color.grayscale_planar(rgb)
  g = gray[:, None, None]
  return tf.stack([tf.where(g, grey, c) for c in rgb], axis=-1)


@tf.function(jit_compile=True)
def _solarize_batch(x, solarize):
  """Solarises the images of [N, S, S, 3] where solarize [N]; XLA (one fused
  pass: unfused, the selects cost more than the rest of a 32 px batch)."""
  return tf.where(solarize[:, None, None, None], color.solarize(x), x)


@tf.function(jit_compile=True)
def _distort_each(x, flip, params, jitter, gray, blur, sigma, version,
                  kernel_size, scale, solarize=None):
  """Scale to [0, 1] (x * scale, clipped), flip, jitter, grayscale, blur and
  (where `solarize` [N], if given) solarise one view at a time; XLA, on
  planes.

  Only jitter and blur sit behind conditionals (they are the costly ops;
  each conditional writes its planes out once). Flip, grayscale and
  solarisation are selects fused into the final write of the view. Flip
  and grayscale commute with blur (a symmetric kernel with symmetric zero
  padding; a per-pixel linear map that keeps 0 at 0), so doing them after
  it gives the recipe's result; solarisation, which commutes with neither
  blur nor grayscale, comes after both, as in the recipe (flip commutes
  with it).
  """
  order = tf.cast(params["order"], tf.int32)

  def one(v, f, b, c, sa, h, o, j, g, bl, sg, so=None):
    if scale != 1.:
      v = tf.clip_by_value(v * scale, 0., 1.)
    rgb = tuple(v[..., k] for k in range(3))
    one_params = {"brightness": b, "contrast": c, "saturation": sa, "hue": h}
    rgb = tf.cond(j, lambda: color.jitter_one(rgb, one_params, o, version),
                  lambda: rgb)
    rgb = tf.cond(bl, lambda: color.blur_one(rgb, sg, kernel_size),
                  lambda: rgb)
    grey = color.grayscale_planar(rgb)
    planes = [tf.where(g, grey, k) for k in rgb]
    if so is not None:
      planes = [tf.where(so, k2, k)
                for k2, k in zip(color.solarize_planar(planes), planes)]
    out = tf.stack(planes, axis=-1)
    return tf.where(f, tf.reverse(out, [1]), out)
  elems = (x, flip, params["brightness"], params["contrast"],
           params["saturation"], params["hue"], order, jitter, gray, blur,
           sigma) + (() if solarize is None else (solarize,))
  if x.shape[0] is not None and x.shape[0] <= 8:  # unrolled: no loop bookkeeping
    return tf.stack([one(*[e[i] for e in elems]) for i in range(x.shape[0])])
  return tf.map_fn(lambda e: one(*e), elems, fn_output_signature=x.dtype)


def _centre_box(h, w, image_size, crop_proportion):
  """[top, left, side, side] of eval_view's centre crop of an h x w image.

  As the reference's center_crop for a square output (tf2/data_util.py): the
  side is round-half-even(crop_proportion * short side), and an odd margin
  puts its extra pixel before the crop ((margin + 1) // 2), not after.
  """
  if image_size <= 32:
    crop_proportion = 1.0
  side = tf.cast(tf.round(crop_proportion * tf.cast(tf.minimum(h, w),
                                                     tf.float32)), tf.int32)
  side = tf.maximum(side, 1)
  return tf.stack([(h - side + 1) // 2, (w - side + 1) // 2, side, side])


def eval_view(record, image_size, crop_proportion=0.875):
  """Eval: square centre crop of 0.875 of the short side (none when
  image_size <= 32), as SimCLR's center_crop and get_preprocess_fn
  (tf2/data_util.py, tf2/data.py); bilinear resize (the reference's is
  bicubic) -> float32 [S, S, 3]."""
  window, boxes = _window_and_boxes(
      record, lambda h, w: _centre_box(h, w, image_size, crop_proportion)[None])
  b = boxes[0]
  return _resize(window[b[0]:b[0] + b[2], b[1]:b[1] + b[3]], image_size)


def eval_view_batch(images, image_size, crop_proportion=0.875):
  """eval_view on a batch of same-size decoded images (uint8 [B, H, W, C],
  C = 1 or 3): the same pixels, made with one crop and one resize."""
  if images.shape[-1] == 1:
    images = tf.tile(images, [1, 1, 1, 3])
  shape = tf.shape(images)
  b = _centre_box(shape[1], shape[2], image_size, crop_proportion)
  return _resize(images[:, b[0]:b[0] + b[2], b[1]:b[1] + b[3]], image_size)


def bit_sizes(height, width):
  """BiT-HyperRule resolution: (resize, crop) = (160, 128) below 96x96 pixels
  of area, else (512, 480) (docs/recipes.md, "BiT-HyperRule")."""
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
