"""Normalisation building blocks shared by the backbones.

BiT (Kolesnikov et al., 2020) replaces BatchNorm with Group Normalisation plus
Weight Standardisation, so that transfer does not depend on batch statistics
(docs/recipes.md, "BiT ResNet-v2"). Both layers keep their statistics in
float32 under a mixed_bfloat16 policy: a bfloat16 mean/variance over
thousands of numbers loses too many mantissa bits to be trusted.
"""

import keras
from keras import ops
import tensorflow as tf

# docs/recipes.md: GN uses 32 groups and eps 1e-5 (Keras' own default is
# 1e-3, which would silently change released BiT weights' outputs).
GN_GROUPS = 32
GN_EPSILON = 1e-5
# docs/recipes.md: the released BiT code standardises with var + 1e-10.
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


@keras.saving.register_keras_serializable(package="tf_ssl")
class BatchNorm(keras.layers.BatchNormalization):
  """keras.layers.BatchNormalization computed by TensorFlow's fused kernel.

  Same arguments, variables (gamma, beta, moving_mean, moving_variance) and
  results as the Keras layer, which it falls back to where the fused kernel
  does not apply. Keras 3 writes batch normalisation as separate moments,
  normalise and scale ops: about ten passes over each activation forward and
  backward, which made BN a large share of the CPU train step. On NHWC
  feature maps this layer runs one FusedBatchNormV3 instead (one oneDNN
  kernel forward, one backward; also lowered by XLA). Statistics stay float32
  under mixed bfloat16, as in the Keras layer.

  The fused kernel only sees the local batch, so a synchronized BN on more
  than one replica keeps the Keras path (statistics all-reduced across
  replicas); on one replica that all-reduce is the identity and the fused
  kernel computes the same statistics.

  Args: those of keras.layers.BatchNormalization.
  """

  def _fusable(self, inputs, mask):
    if (mask is not None or self.renorm or len(inputs.shape) != 4 or
        self.axis not in (-1, 3) or
        self.compute_dtype not in ("float32", "bfloat16", "float16")):
      return False
    return not self.synchronized or tf.distribute.get_strategy().num_replicas_in_sync == 1

  def call(self, inputs, training=None, mask=None):
    if not self._fusable(inputs, mask):
      return super().call(inputs, training=training, mask=mask)
    x = tf.cast(inputs, self.compute_dtype)
    channels = x.shape[-1]
    gamma = (tf.cast(self.gamma, tf.float32) if self.scale
             else tf.ones([channels], tf.float32))
    beta = (tf.cast(self.beta, tf.float32) if self.center
            else tf.zeros([channels], tf.float32))
    if training and self.trainable:
      y, mean, variance, _, _, _ = tf.raw_ops.FusedBatchNormV3(
          x=x, scale=gamma, offset=beta, mean=tf.zeros([0]),
          variance=tf.zeros([0]), epsilon=self.epsilon, data_format="NHWC",
          is_training=True)
      # The kernel returns the Bessel-corrected variance; the Keras layer
      # averages the biased one (the one it normalises with) into
      # moving_variance.
      count = tf.cast(tf.size(x, out_type=tf.int64) // channels, tf.float32)
      variance *= (count - 1.0) / tf.maximum(count, 1.0)
      momentum = self.momentum
      self.moving_mean.assign(self.moving_mean * momentum + mean * (1.0 - momentum))
      self.moving_variance.assign(
          self.moving_variance * momentum + variance * (1.0 - momentum))
    else:
      y, _, _, _, _, _ = tf.raw_ops.FusedBatchNormV3(
          x=x, scale=gamma, offset=beta,
          mean=tf.cast(self.moving_mean, tf.float32),
          variance=tf.cast(self.moving_variance, tf.float32),
          epsilon=self.epsilon, data_format="NHWC", is_training=False)
    return y
