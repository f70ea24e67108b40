"""Projection heads (SimCLR v1/v2) and the zero-initialised linear head.

Naming matters here: the LARS optimiser excludes classification heads from
weight decay and trust-ratio adaptation by matching `variable.path`, so use
sites name them "head", "linear_head" or "probe_head"; the projection head is
named "projection_head" (its BN gamma/beta are excluded as normalisation
parameters, its dense kernels are not).
"""

import keras
from keras import ops

BN_MOMENTUM = 0.9  # RECIPES.md, "SimCLR models".
BN_EPSILON = 1e-5


@keras.saving.register_keras_serializable(package="tf_ssl")
class ProjectionHead(keras.layers.Layer):
  """SimCLR's MLP projection head g(h), returning every intermediate output.

  Structure (RECIPES.md, "Projection head v1 ... v2"):
    version 1: (num_layers - 1) x [Dense(hidden)-BN-ReLU], then Dense(output)
      with a bias and no BN (num_layers=2 is the paper's head).
    version 2: (num_layers - 1) x [Dense(hidden, no bias)-BN-ReLU], then
      Dense(output, no bias)-BN(no centering) (num_layers=3 is the paper's).
  The hidden Dense layers carry no bias in either version: the BN right after
  subtracts the batch mean, so a bias there would be a dead parameter.

  `call` returns a dict: "proj_0" is the head input, "proj_i" the output of
  layer i (after its ReLU, or after the last BN), and "projection" the final
  output (== proj_{num_layers}); fine-tuning can start from any of them
  (the reference's ft_proj_selector).

  Args:
    hidden_dim: width of the hidden layers; None means the input width, as in
      SimCLR (2048 for a ResNet-50).
    output_dim: width of the projection (128 in SimCLR).
    num_layers: number of Dense layers (>= 1).
    version: 1 or 2.
    sync_bn: synchronise BN statistics across replicas (pretraining with a
      small per-replica batch).
    bn_momentum, bn_epsilon: BatchNormalization settings.
    **kwargs: forwarded to keras.layers.Layer (name defaults to
      "projection_head").

  Example:
    >>> head = ProjectionHead(hidden_dim=512, output_dim=128, num_layers=3,
    ...                       version=2)
    >>> out = head(features, training=True)
    >>> out["projection"].shape, out["proj_1"].shape  # (B, 128), (B, 512)

  Reference: Chen et al., "Big Self-Supervised Models are Strong
  Semi-Supervised Learners", https://arxiv.org/abs/2006.10029
  """

  def __init__(self, hidden_dim=None, output_dim=128, num_layers=2, version=1,
               sync_bn=False, bn_momentum=BN_MOMENTUM, bn_epsilon=BN_EPSILON,
               **kwargs):
    kwargs.setdefault("name", "projection_head")
    super().__init__(**kwargs)
    if version not in (1, 2):
      raise ValueError(f"ProjectionHead: version={version!r}; pass 1 (SimCLR "
                       "v1 head) or 2 (SimCLR v2 head).")
    if num_layers < 1:
      raise ValueError(f"ProjectionHead: num_layers={num_layers}; pass >= 1.")
    self.hidden_dim = hidden_dim
    self.output_dim = output_dim
    self.num_layers = num_layers
    self.version = version
    self.sync_bn = sync_bn
    self.bn_momentum = bn_momentum
    self.bn_epsilon = bn_epsilon
    self.dense_layers = []
    self.bn_layers = []

  def build(self, input_shape):
    # Layers are made here, not in __init__, because hidden_dim=None means
    # "the input width", which is only known now.
    width = input_shape[-1]
    for i in range(1, self.num_layers + 1):
      last = i == self.num_layers
      has_bn = not last or self.version == 2
      dense = keras.layers.Dense(
          self.output_dim if last else (self.hidden_dim or width),
          use_bias=not has_bn, name=f"dense_{i}", dtype=self.dtype_policy)
      dense.build((None, width))
      width = dense.units
      bn = None
      if has_bn:
        bn = keras.layers.BatchNormalization(
            momentum=self.bn_momentum, epsilon=self.bn_epsilon,
            synchronized=self.sync_bn,
            # v2's last BN has no beta: a shift right before l2-normalisation
            # moves every projection the same way and carries no information.
            center=not last, name=f"batch_norm_{i}", dtype=self.dtype_policy)
        bn.build((None, width))
      self.dense_layers.append(dense)
      self.bn_layers.append(bn)

  def call(self, inputs, training=None):
    out = {"proj_0": inputs}
    x = inputs
    for i, (dense, bn) in enumerate(zip(self.dense_layers, self.bn_layers)):
      x = dense(x)
      if bn is not None:
        x = bn(x, training=training)
      if i < self.num_layers - 1:
        x = ops.relu(x)
      out[f"proj_{i + 1}"] = x
    out["projection"] = x
    return out

  def get_config(self):
    config = super().get_config()
    config.update(hidden_dim=self.hidden_dim, output_dim=self.output_dim,
                  num_layers=self.num_layers, version=self.version,
                  sync_bn=self.sync_bn, bn_momentum=self.bn_momentum,
                  bn_epsilon=self.bn_epsilon)
    return config


@keras.saving.register_keras_serializable(package="tf_ssl")
class LinearHead(keras.layers.Dense):
  """A Dense classifier with zero-initialised kernel and bias.

  Zero init is BiT's choice for the new head (RECIPES.md, BiT-HyperRule): the
  first steps then only move the head, and the logits start at log-uniform.
  Name it "head", "linear_head" or "probe_head" where it is used, so that the
  LARS exclusion pattern on `variable.path` finds it.

  Args:
    num_classes: number of logits.
    **kwargs: forwarded to keras.layers.Dense (name defaults to
      "linear_head").

  Example:
    >>> probe = LinearHead(10, name="probe_head")
    >>> logits = probe(features)  # (B, 10), all zeros before training
  """

  def __init__(self, num_classes, **kwargs):
    kwargs.setdefault("name", "linear_head")
    kwargs.setdefault("kernel_initializer", "zeros")
    kwargs.setdefault("bias_initializer", "zeros")
    super().__init__(num_classes, **kwargs)
    self.num_classes = num_classes

  def get_config(self):
    config = super().get_config()
    config["num_classes"] = config.pop("units")
    return config
