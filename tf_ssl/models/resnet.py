"""ResNet v1.5 with BatchNorm: the SimCLR v1/v2 and SupCon encoders.

v1.5 puts the stride of a bottleneck on its 3x3 convolution (not the first
1x1), as the SimCLR reference and torchvision do. As the SimCLR reference
(tf2/resnet.py; docs/recipes.md, "SimCLR models"): BN momentum 0.9, eps
1e-5, the last BN gamma of every residual branch zero-initialised (each unit
starts as the identity; Goyal et al. 2017), a projection shortcut on the
first unit of every block, truncated-normal fan-in kernel init, synchronised
BN across replicas for pretraining, and a 3x3 stride-1 stem without max-pool
for images of 32px or less.

The model is a subclassed keras.Model (not functional) so that it accepts any
square image size and returns a dict of endpoints, and so that its variable
paths nest by block and unit ("resnet/block2/unit01/batch_norm_3/gamma").
"""

import keras
from keras import ops

from tf_ssl.models import heads
from tf_ssl.models.layers import BatchNorm, symmetric_pad

# depth -> (block type, units per block); docs/recipes.md, "SimCLR models".
BLOCK_UNITS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
    200: ("bottleneck", (3, 24, 36, 3)),
}
BN_EPSILON = 1e-5


def _kernel_init():
  """The SimCLR reference's convolution initializer: truncated normal with
  variance 1 / fan_in (tf.keras.initializers.VarianceScaling() with its
  defaults in tf2/resnet.py, tf.variance_scaling_initializer() in v1's
  resnet.py). torchvision and SupCon's PyTorch ResNet use He init on fan-out
  (variance 2 / fan_out) instead; BN after every convolution makes the
  forward pass indifferent to the scale, but not the first steps of SGD.

  A new initializer per convolution: one shared unseeded instance gets one
  seed at creation, so every kernel of the same shape would start identical.
  """
  return keras.initializers.VarianceScaling(1.0, "fan_in", "truncated_normal")


def _with_channels(shape, channels):
  return tuple(shape[:-1]) + (channels,)


class _ConvBN(keras.layers.Layer):
  """Conv (no bias, symmetric padding when strided) -> BN [-> ReLU]."""

  def __init__(self, filters, kernel_size, strides=1, relu=True,
               zero_gamma=False, bn=None, **kwargs):
    super().__init__(**kwargs)
    self.kernel_size = kernel_size
    self.strides = strides
    self.relu = relu
    # Stride 1 "same" is symmetric for odd kernels; strided convolutions pad
    # explicitly (see layers.symmetric_pad).
    self.conv = keras.layers.Conv2D(
        filters, kernel_size, strides=strides,
        padding="same" if strides == 1 else "valid", use_bias=False,
        kernel_initializer=_kernel_init(), name="conv2d")
    self.bn = BatchNorm(
        gamma_initializer="zeros" if zero_gamma else "ones",
        name="batch_norm", **bn)

  def build(self, input_shape):
    # Explicit builds (here and below) need only channel counts; tracing
    # `call` symbolically to build instead is several times slower.
    self.conv.build(input_shape)
    self.bn.build(_with_channels(input_shape, self.conv.filters))

  def call(self, x, training=None):
    if self.strides > 1:
      x = symmetric_pad(x, (self.kernel_size - 1) // 2)
    x = self.bn(self.conv(x), training=training)
    return ops.relu(x) if self.relu else x


class _Unit(keras.layers.Layer):
  """A residual unit: basic (3x3, 3x3) or bottleneck (1x1, 3x3, 1x1 x4)."""

  def __init__(self, kind, filters, strides, project, bn, **kwargs):
    super().__init__(**kwargs)
    if kind == "basic":
      specs = [(filters, 3, strides), (filters, 3, 1)]
      out = filters
    else:
      specs = [(filters, 1, 1), (filters, 3, strides), (4 * filters, 1, 1)]
      out = 4 * filters
    self.convs = [
        _ConvBN(f, k, s, relu=i < len(specs) - 1,
                zero_gamma=i == len(specs) - 1, bn=bn, name=f"conv_{i + 1}")
        for i, (f, k, s) in enumerate(specs)]
    self.shortcut = (_ConvBN(out, 1, strides, relu=False, bn=bn,
                             name="projection") if project else None)

  def build(self, input_shape):
    if self.shortcut is not None:
      self.shortcut.build(input_shape)
    for conv in self.convs:
      conv.build(input_shape)
      input_shape = _with_channels(input_shape, conv.conv.filters)

  def call(self, x, training=None):
    shortcut = x if self.shortcut is None else self.shortcut(x, training=training)
    for conv in self.convs:
      x = conv(x, training=training)
    return ops.relu(x + shortcut)


class _Block(keras.layers.Layer):
  """A stage of units at one resolution; only the first unit strides."""

  def __init__(self, units, **kwargs):
    super().__init__(**kwargs)
    self.units = units

  def build(self, input_shape):
    for unit in self.units:
      unit.build(input_shape)
      input_shape = _with_channels(input_shape, unit.convs[-1].conv.filters)

  def call(self, x, training=None):
    for unit in self.units:
      x = unit(x, training=training)
    return x


@keras.saving.register_keras_serializable(package="tf_ssl")
class ResNet(keras.Model):
  """BN ResNet v1.5 returning named endpoints.

  `call(images, training=None)` takes float images in [0, 1], any batch and
  square size (no normalisation: the SimCLR reference feeds [0, 1] as is),
  and returns a dict: "stem", "block1".."block4" (feature maps), "features"
  (global average pool of block4, the representation) and, when
  num_classes > 0, "logits" from a zero-initialised Dense named "head".
  """

  def __init__(self, depth=50, width_multiplier=1, num_classes=0,
               cifar_stem=False, sync_bn=False, bn_momentum=0.9, **kwargs):
    kwargs.setdefault("name", "resnet")
    super().__init__(**kwargs)
    if depth not in BLOCK_UNITS:
      raise ValueError(f"resnet: depth={depth!r} is not one of "
                       f"{sorted(BLOCK_UNITS)}.")
    # SimCLR uses 1x, 2x, 4x; fractions (0.25, 0.5) make the small CPU models.
    if width_multiplier <= 0 or not float(64 * width_multiplier).is_integer():
      raise ValueError(f"resnet: width_multiplier={width_multiplier!r}; pass "
                       "1, 2, 4 (SimCLR) or a fraction with 64 * width an "
                       "integer, e.g. 0.25 or 0.5.")
    self.depth = depth
    self.width_multiplier = (int(width_multiplier)
                             if float(width_multiplier).is_integer()
                             else float(width_multiplier))
    self.num_classes = num_classes
    self.cifar_stem = cifar_stem
    self.sync_bn = sync_bn
    self.bn_momentum = bn_momentum
    bn = dict(momentum=bn_momentum, epsilon=BN_EPSILON, synchronized=sync_bn)
    kind, units = BLOCK_UNITS[depth]
    w = int(64 * self.width_multiplier)
    self.stem = (_ConvBN(w, 3, 1, bn=bn, name="stem") if cifar_stem else
                 _ConvBN(w, 7, 2, bn=bn, name="stem"))
    self.blocks = []
    in_channels = w
    for b, n in enumerate(units):
      filters = w * 2**b
      out_channels = filters * (4 if kind == "bottleneck" else 1)
      block = []
      for u in range(n):
        strides = 2 if (u == 0 and b > 0) else 1
        # Every block's first unit has a projection shortcut, as in the
        # SimCLR reference (BlockGroup's use_projection=True in tf2/resnet.py,
        # block_group in resnet.py), even block1 of ResNet-18/34 where
        # shapes match (64 -> 64, stride 1) and torchvision and SupCon's
        # PyTorch ResNet keep the identity: 4,224 more parameters.
        project = u == 0
        block.append(_Unit(kind, filters, strides, project, bn,
                           name=f"unit{u + 1:02d}"))
        in_channels = out_channels
      self.blocks.append(_Block(block, name=f"block{b + 1}"))
    self.feature_dim = in_channels
    self.head = (heads.LinearHead(num_classes, name="head")
                 if num_classes else None)
    # Build now, at the top level, so variable paths start with the model's
    # name wherever the model is later called.
    self.build((None, None, None, 3))

  def build(self, input_shape):
    self.stem.build(input_shape)
    shape = _with_channels(input_shape, self.stem.conv.filters)
    for block in self.blocks:
      block.build(shape)
      shape = _with_channels(shape, block.units[-1].convs[-1].conv.filters)
    if self.head is not None:
      self.head.build((None, self.feature_dim))

  def call(self, images, training=None):
    out = {}
    x = self.stem(images, training=training)
    if not self.cifar_stem:
      x = ops.max_pool(x, 3, 2, padding="same")
    out["stem"] = x
    for b, block in enumerate(self.blocks):
      x = block(x, training=training)
      out[f"block{b + 1}"] = x
    out["features"] = ops.mean(x, axis=(1, 2))
    if self.head is not None:
      out["logits"] = self.head(out["features"])
    return out

  def get_config(self):
    return {"name": self.name, "depth": self.depth,
            "width_multiplier": self.width_multiplier,
            "num_classes": self.num_classes, "cifar_stem": self.cifar_stem,
            "sync_bn": self.sync_bn, "bn_momentum": self.bn_momentum}


def resnet(depth=50, width_multiplier=1, num_classes=0, cifar_stem=False,
           sync_bn=False, bn_momentum=0.9, **kwargs):
  """Builds the BN ResNet v1.5 used by SimCLR v1/v2 and SupCon.

  Args:
    depth: 18 or 34 (basic blocks), 50, 101, 152 or 200 (bottlenecks).
    width_multiplier: channel multiplier (SimCLR's 1x, 2x, 4x; or a fraction
      such as 0.25 or 0.5 for small CPU models).
    num_classes: 0 for no classifier, else the size of a zero-init "head".
    cifar_stem: 3x3 stride-1 stem without max-pool, for images <= 32px.
    sync_bn: BatchNormalization(synchronized=True): batch statistics over all
      replicas, as SimCLR pretraining uses.
    bn_momentum: moving-average momentum of every BN (0.9 in SimCLR).
    **kwargs: forwarded to keras.Model (e.g. name; default "resnet").

  Returns:
    A built ResNet (keras.Model) with `feature_dim` (2048 * width for
    bottleneck depths, 512 * width for basic ones).
  """
  return ResNet(depth=depth, width_multiplier=width_multiplier,
                num_classes=num_classes, cifar_stem=cifar_stem,
                sync_bn=sync_bn, bn_momentum=bn_momentum, **kwargs)
