"""Normalisation building blocks shared by the backbones.

BiT (Kolesnikov et al., 2020) replaces BatchNorm with Group Normalisation plus
Weight Standardisation, so that transfer does not depend on batch statistics
(RECIPES.md, "BiT ResNet-v2"). Both layers keep their statistics in float32
under a mixed_bfloat16 policy: a bfloat16 mean/variance over thousands of
numbers loses too many mantissa bits to be trusted.
"""

import keras
from keras import ops

# RECIPES.md: GN uses 32 groups and eps 1e-5 (Keras' own default is 1e-3, which
# would silently change released BiT weights' outputs).
GN_GROUPS = 32
GN_EPSILON = 1e-5
# RECIPES.md: the released BiT code standardises with var + 1e-10.
WS_EPSILON = 1e-10


@keras.saving.register_keras_serializable(package="tf_ssl")
class StdConv2D(keras.layers.Conv2D):
  """Conv2D with Weight Standardisation: w' = (w - mean) / sqrt(var + eps).

  Mean and variance are taken per output channel over (H, W, in), as in the
  released BiT code, and are computed from the float32 kernel every call (the
  variable itself stays unstandardised, so released .npz kernels load as is).

  The standardisation happens in the public `convolution_op(inputs, kernel)`
  hook of Conv2D, so the layer inherits everything else (padding, strides,
  serialisation) from Keras. Its kernel variable is created with
  autocast=False (through the public `add_weight`), so under mixed precision
  `convolution_op` receives it as float32, standardises in float32 and only
  then casts the result to the compute dtype.

  Args:
    filters: number of output channels.
    kernel_size: int or (h, w).
    strides: int or (h, w).
    padding: "valid" or "same" (BiT pads explicitly and uses "valid").
    ws_epsilon: added to the variance before the square root.
    **kwargs: forwarded to keras.layers.Conv2D (no bias: BiT uses none, and a
      bias in front of a normalisation is redundant).

  Example:
    >>> conv = StdConv2D(64, 3, name="standardized_conv2d")
    >>> y = conv(np.zeros((2, 8, 8, 3), "float32"))  # (2, 6, 6, 64)

  Reference: Qiao et al., "Micro-Batch Training with Batch-Channel
  Normalization and Weight Standardization", https://arxiv.org/abs/1903.10520
  """

  def __init__(self, filters, kernel_size, strides=1, padding="valid",
               ws_epsilon=WS_EPSILON, **kwargs):
    if kwargs.pop("use_bias", False):
      raise ValueError(
          "StdConv2D has no bias: BiT convolutions have none, and every "
          "StdConv2D is followed by a normalisation. Drop use_bias=True.")
    super().__init__(filters, kernel_size, strides=strides, padding=padding,
                     use_bias=False, **kwargs)
    self.ws_epsilon = ws_epsilon

  def add_weight(self, *args, **kwargs):
    # A layer-level autocast=False does not help: Keras still opens an
    # autocast scope for a mixed-dtype layer called at the top level. A
    # non-autocasting variable reads as float32 in every scope.
    kwargs["autocast"] = False
    return super().add_weight(*args, **kwargs)

  def convolution_op(self, inputs, kernel):
    kernel = ops.cast(kernel, "float32")
    mean, var = ops.moments(kernel, axes=[0, 1, 2], keepdims=True)
    kernel = (kernel - mean) / ops.sqrt(var + self.ws_epsilon)
    return super().convolution_op(inputs, ops.cast(kernel, inputs.dtype))

  def get_config(self):
    config = super().get_config()
    config.pop("use_bias", None)
    config["ws_epsilon"] = self.ws_epsilon
    return config


def group_norm(name="group_norm", groups=GN_GROUPS, epsilon=GN_EPSILON):
  """BiT's GroupNormalization: 32 groups, eps 1e-5, per-group statistics.

  keras.layers.GroupNormalization already upcasts bfloat16 inputs to float32
  for its mean and variance and returns the compute dtype, which is what
  mixed precision needs; this only pins BiT's hyper-parameters.

  Args:
    name: layer name; "group_norm" matches the released checkpoint keys.
    groups: number of channel groups; channels must be divisible by it.
    epsilon: added to the group variance.

  Returns:
    A keras.layers.GroupNormalization.
  """
  return keras.layers.GroupNormalization(groups=groups, epsilon=epsilon,
                                         name=name)


def symmetric_pad(x, pad):
  """Zero-pads H and W by `pad` on every side (the reference's fixed padding).

  "SAME" padding of a stride-2 convolution pads more on the bottom/right than
  on the top/left, which shifts features by half a pixel relative to the
  released BiT and SimCLR weights; both pad symmetrically and convolve VALID.
  """
  if pad == 0:
    return x
  return ops.pad(x, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
