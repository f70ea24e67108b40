"""BiT ResNet-v2: pre-activation ResNets with GroupNorm + Weight Standardisation.

Architecture exactly as docs/recipes.md, "BiT ResNet-v2" (Kolesnikov et al., Big
Transfer, https://arxiv.org/abs/1912.11370). The model is a subclassed
keras.Model whose sub-layers are named after the released checkpoint's scopes,
so that Keras 3 `variable.path` equals the .npz key, e.g.
"resnet/block1/unit01/a/group_norm/gamma"; `load_bit_npz` relies on this. It is subclassed rather than functional because a functional model
flattens layer names (no nested "block1/unit01/a" scopes) and fixes the input
size.
"""

import keras
import numpy as np
from keras import ops

from tf_ssl.models.layers import StdConv2D, group_norm, symmetric_pad

# depth -> (unit type, units per block). 50/101/152 are the released BiT
# models (docs/recipes.md); 18/34 (basic units) and 26 are small variants for CPU
# work, with the same layer names.
BLOCK_UNITS = {
    18: ("basic", (2, 2, 2, 2)),
    26: ("bottleneck", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
_CONV = "standardized_conv2d"  # the released checkpoint's scope name.


def _with_channels(shape, channels):
  return tuple(shape[:-1]) + (channels,)


class _Projection(keras.layers.Layer):
  """The 1x1 projection shortcut ("a/proj/standardized_conv2d")."""

  def __init__(self, filters, strides, **kwargs):
    super().__init__(**kwargs)
    self.conv = StdConv2D(filters, 1, strides=strides, name=_CONV)

  def build(self, input_shape):
    self.conv.build(input_shape)

  def call(self, x):
    return self.conv(x)


class _PreActConv(keras.layers.Layer):
  """GN -> ReLU -> (symmetric pad) -> StdConv, one of a unit's "a", "b", "c".

  Returns (conv output, shortcut). The shortcut is the projection of the
  pre-activated tensor when this layer owns one (BiT projects after GN-ReLU,
  not the raw input), else the raw input.
  """

  def __init__(self, filters, kernel_size, strides=1, proj_filters=0,
               proj_strides=1, **kwargs):
    super().__init__(**kwargs)
    self.pad = kernel_size // 2
    self.group_norm = group_norm()
    self.proj = (_Projection(proj_filters, proj_strides, name="proj")
                 if proj_filters else None)
    self.conv = StdConv2D(filters, kernel_size, strides=strides, name=_CONV)

  def build(self, input_shape):
    # Explicit builds (here and below) only need channel counts; letting
    # Keras trace `call` symbolically instead took ~10 s for an R26.
    self.group_norm.build(input_shape)
    if self.proj is not None:
      self.proj.build(input_shape)
    self.conv.build(input_shape)

  def call(self, x):
    y = ops.relu(self.group_norm(x))
    shortcut = x if self.proj is None else self.proj(y)
    return self.conv(symmetric_pad(y, self.pad)), shortcut


class _Unit(keras.layers.Layer):
  """A pre-activation unit (bottleneck: 1x1, 3x3/s, 1x1 x4; basic: 3x3/s, 3x3).

  The stride sits on the 3x3 convolution, as in the released code.
  """

  def __init__(self, kind, filters, strides, project, **kwargs):
    super().__init__(**kwargs)
    if kind == "bottleneck":
      out = 4 * filters
      specs = [("a", filters, 1, 1), ("b", filters, 3, strides),
               ("c", out, 1, 1)]
    else:
      out = filters
      specs = [("a", filters, 3, strides), ("b", filters, 3, 1)]
    self.convs = [
        _PreActConv(f, k, s, proj_filters=out if (i == 0 and project) else 0,
                    proj_strides=strides, name=n)
        for i, (n, f, k, s) in enumerate(specs)]

  def build(self, input_shape):
    for conv in self.convs:
      conv.build(input_shape)
      input_shape = _with_channels(input_shape, conv.conv.filters)

  def call(self, x):
    x, shortcut = self.convs[0](x)
    for conv in self.convs[1:]:
      x, _ = conv(x)
    return x + shortcut


class _Block(keras.layers.Layer):

  def __init__(self, units, **kwargs):
    super().__init__(**kwargs)
    self.units = units

  def build(self, input_shape):
    for unit in self.units:
      unit.build(input_shape)
      input_shape = _with_channels(input_shape, unit.convs[-1].conv.filters)

  def call(self, x):
    for unit in self.units:
      x = unit(x)
    return x


class _Root(keras.layers.Layer):
  """The stem ("root_block"): no normalisation, as in the released model.

  Standard: zero-pad 3, 7x7/2 StdConv VALID, zero-pad 1, 3x3/2 max-pool VALID.
  Padding before the pool with zeros (not -inf) is the released behaviour;
  after a convolution the values can be negative, so it is not a no-op.
  Small-image stem: 3x3/1 StdConv with symmetric padding 1 and no pool.
  """

  def __init__(self, filters, small_image_stem, **kwargs):
    super().__init__(**kwargs)
    self.small_image_stem = small_image_stem
    self.conv = StdConv2D(filters, 3 if small_image_stem else 7,
                          strides=1 if small_image_stem else 2, name=_CONV)

  def build(self, input_shape):
    self.conv.build(input_shape)

  def call(self, x):
    if self.small_image_stem:
      return self.conv(symmetric_pad(x, 1))
    x = self.conv(symmetric_pad(x, 3))
    return ops.max_pool(symmetric_pad(x, 1), 3, 2, padding="valid")


class _Head(keras.layers.Layer):
  """The classifier "head/conv2d": a zero-init 1x1 conv, kernel (1, 1, C, K).

  A 1x1 convolution on the pooled features rather than a Dense so that its
  kernel has the released checkpoint's HWIO shape and loads without reshape.
  """

  def __init__(self, num_classes, **kwargs):
    super().__init__(**kwargs)
    self.conv = keras.layers.Conv2D(num_classes, 1, kernel_initializer="zeros",
                                    bias_initializer="zeros", name="conv2d")

  def build(self, input_shape):
    self.conv.build((None, 1, 1, input_shape[-1]))

  def call(self, features):
    logits = self.conv(features[:, None, None, :])
    return logits[:, 0, 0, :]


@keras.saving.register_keras_serializable(package="tf_ssl")
class ResNetV2(keras.Model):
  """BiT ResNet-v2 returning named endpoints.

  `call(images, training=None)` takes float images in [0, 1] (any batch size,
  any square size; maps them to BiT's [-1, 1] inside) and returns a dict:
  "stem", "block1".."block4" (un-normalised residual streams), "features"
  (GN-ReLU-global average pool of block4; 2048 * width channels for
  bottlenecks, 512 * width for basic units) and "logits" when num_classes > 0.
  `training` is accepted for a uniform backbone interface; GN and WS behave
  the same in training and inference.
  """

  def __init__(self, depth=50, width=1, num_classes=0, small_image_stem=False,
               **kwargs):
    kwargs.setdefault("name", "resnet")
    super().__init__(**kwargs)
    if depth not in BLOCK_UNITS:
      raise ValueError(f"resnet_v2: depth={depth!r} is not one of "
                       f"{sorted(BLOCK_UNITS)}.")
    root_filters = 64 * width
    # Every channel count is a multiple of 64 * width; GN needs 32 | channels.
    if width <= 0 or root_filters != int(root_filters) or root_filters % 32:
      raise ValueError(f"resnet_v2: width={width!r} gives {root_filters} root "
                       "channels; GroupNorm's 32 groups need a multiple of 32 "
                       "(use width 0.5, 1, 2, 3 or 4).")
    self.depth = depth
    self.width = width
    self.num_classes = num_classes
    self.small_image_stem = small_image_stem
    root_filters = int(root_filters)
    kind, units = BLOCK_UNITS[depth]
    self.root = _Root(root_filters, small_image_stem, name="root_block")
    self.blocks = []
    for b, n in enumerate(units):
      filters = root_filters * 2**b
      strides = 1 if b == 0 else 2
      # Every block's first unit projects: it changes the channel count
      # (bottleneck: 64w -> 256w in block1) or the resolution.
      self.blocks.append(_Block(
          [_Unit(kind, filters, strides if u == 0 else 1, project=u == 0,
                 name=f"unit{u + 1:02d}") for u in range(n)],
          name=f"block{b + 1}"))
    self.feature_dim = filters * (4 if kind == "bottleneck" else 1)
    self.group_norm = group_norm()
    self.head = _Head(num_classes, name="head") if num_classes else None
    # Build now, at the top level, so that variable paths start with
    # "resnet/" however deeply the model is nested later (Keras 3 fixes a
    # layer's path prefix the first time it opens its name scope).
    self.build((None, None, None, 3))

  def build(self, input_shape):
    self.root.build(input_shape)
    shape = _with_channels(input_shape, self.root.conv.filters)
    for block in self.blocks:
      block.build(shape)
      shape = _with_channels(shape, block.units[-1].convs[-1].conv.filters)
    self.group_norm.build(shape)
    if self.head is not None:
      self.head.build((None, self.feature_dim))

  def call(self, images, training=None):
    del training  # GN and WS have no train/inference difference.
    out = {}
    x = self.root(images * 2.0 - 1.0)  # docs/recipes.md: BiT inputs in [-1, 1].
    out["stem"] = x
    for b, block in enumerate(self.blocks):
      x = block(x)
      out[f"block{b + 1}"] = x
    x = ops.relu(self.group_norm(x))
    out["features"] = ops.mean(x, axis=(1, 2))
    if self.head is not None:
      out["logits"] = self.head(out["features"])
    return out

  def get_config(self):
    return {"name": self.name, "depth": self.depth, "width": self.width,
            "num_classes": self.num_classes,
            "small_image_stem": self.small_image_stem}


def resnet_v2(depth, width, num_classes=0, small_image_stem=False, **kwargs):
  """Builds a BiT ResNet-v2 (GN + WS), e.g. resnet_v2(50, 1) for BiT R50x1.

  Args:
    depth: 50, 101 or 152 (released BiT models), or 18, 26, 34 (small).
    width: width factor (1-4 for released models; 0.5 allowed for tiny CPU
      models). Root width is 64 * width.
    num_classes: 0 for no head; else a zero-initialised classifier named
      "head" (21843 for BiT-M, 1000 for BiT-S checkpoints).
    small_image_stem: 3x3 stride-1 root without max-pool, for <= 32px images.
    **kwargs: forwarded to keras.Model (e.g. name; keep the default "resnet"
      so variable paths equal released checkpoint keys).

  Returns:
    A built ResNetV2 with `feature_dim`.
  """
  return ResNetV2(depth=depth, width=width, num_classes=num_classes,
                  small_image_stem=small_image_stem, **kwargs)


def checkpoint_keys(model):
  """Maps each released-checkpoint key to the model's variable.

  The key is the variable path with the model's own path replaced by
  "resnet", so a model built under another name still loads.
  """
  prefix = model.path
  return {"resnet" + v.path[len(prefix):]: v for v in model.variables}


def _is_head(key):
  return key.startswith("resnet/head/")


def load_bit_npz(model, path, head="drop"):
  """Loads a released BiT .npz (HWIO kernels) into a ResNetV2.

  Every array in the file must be consumed and every model variable filled,
  with equal shapes; otherwise nothing is assigned and one ValueError lists
  each offending key with the file's and the model's shapes.

  Args:
    model: a ResNetV2 of the checkpoint's depth and width.
    path: the .npz file (read with allow_pickle=False: a checkpoint never
      needs pickled objects, and unpickling runs code).
    head: "drop" ignores the file's "resnet/head/*" arrays and resets the
      model's head (if any) to zeros, the BiT fine-tuning start; "keep" loads
      them, so the model needs num_classes equal to the file's head size.

  Returns:
    The sorted list of file keys that were assigned.

  Raises:
    ValueError: on a bad `head`, or missing, extra or mis-shaped keys.
  """
  if head not in ("drop", "keep"):
    raise ValueError(f"load_bit_npz: head={head!r}; pass 'drop' or 'keep'.")
  with np.load(path, allow_pickle=False) as npz:
    arrays = {k: npz[k] for k in npz.files}
  variables = checkpoint_keys(model)
  skip = (lambda k: _is_head(k)) if head == "drop" else (lambda k: False)
  problems = []
  if head == "keep" and model.head is None and any(map(_is_head, arrays)):
    problems.append(
        "the file has a classification head but the model has none: build "
        "the model with num_classes=<head size> or pass head='drop'")
  assignments = []
  for key, var in variables.items():
    if skip(key):
      continue
    if key not in arrays:
      problems.append(f"{key}: missing from the file (model shape "
                      f"{tuple(var.shape)})")
    elif tuple(arrays[key].shape) != tuple(var.shape):
      problems.append(f"{key}: file shape {tuple(arrays[key].shape)} != model "
                      f"shape {tuple(var.shape)}")
    else:
      assignments.append((key, var))
  for key, array in arrays.items():
    if key not in variables and not skip(key):
      problems.append(f"{key}: in the file (shape {tuple(array.shape)}) but "
                      "not in the model; is the depth/width right?")
  if problems:
    shown = "\n  ".join(problems[:20])
    more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
    raise ValueError(f"load_bit_npz({path}): {len(problems)} problem(s), "
                     f"nothing loaded:\n  {shown}{more}")
  for key, var in assignments:
    var.assign(arrays[key].astype(var.dtype))
  if head == "drop" and model.head is not None:
    for var in model.head.variables:
      var.assign(np.zeros(var.shape, var.dtype))
  return sorted(key for key, _ in assignments)
