"""Projection heads (SimCLR's and SupCon's) and the zero-initialised linear head.

Naming matters here: the LARS optimiser excludes classification heads from
weight decay and trust-ratio adaptation by matching `variable.path`, so use
sites name them "head", "linear_head" or "probe_head"; the projection head is
named "projection_head" (its BN gamma/beta and biases are excluded as
normalisation parameters and biases, its dense kernels are not).
"""

import math

import keras
from keras import ops

BN_MOMENTUM = 0.9  # docs/recipes.md, "SimCLR models".
BN_EPSILON = 1e-5
KINDS = ("simclr", "mlp", "byol", "moco_v3", "swav", "barlow_twins", "vicreg")


# (hidden layers' bias, last layer's bias) of the PyTorch heads with BN.
_TORCH_BIASES = {"swav": (True, True), "barlow_twins": (False, False),
                 "vicreg": (True, False)}


@keras.saving.register_keras_serializable(package="tf_ssl")
class ProjectionHead(keras.layers.Layer):
  """The MLP projection head g(h), returning every intermediate output.

  Two kinds, each as its reference code builds it (docs/recipes.md,
  "Projection head"):
    kind="simclr": every layer is Dense(no bias) then BN, with a ReLU
      between layers; the last BN has no centre (beta) but keeps its scale.
      Kernels start from N(0, 0.01^2). This is the head of both SimCLR
      codebases, which differ only in depth: num_layers=2 for v1
      (model_util.py projection_head), 3 for v2 (tf2/model.py
      ProjectionHead). No bias anywhere: each BN subtracts the batch mean
      right after, so a bias would be a dead parameter, and a centre on the
      last BN would shift every projection alike just before the
      l2-normalisation.
    kind="mlp": Dense with a bias, ReLU between layers, no BN at all, with
      PyTorch nn.Linear's default initialisation (kernel and bias uniform in
      +-1/sqrt(fan_in)): SupCon's reference head (SupContrast
      networks/resnet_big.py, head="mlp", Linear-ReLU-Linear at
      num_layers=2).
    kind="byol": hidden layers Dense with a bias, BN, ReLU; the last layer
      Dense without a bias and no BN; kernels truncated normal with stddev
      1/sqrt(fan_in), biases zero (Haiku's Linear): BYOL's projector and
      predictor (docs/recipes.md, "BYOL").
    kind="moco_v3": hidden layers Dense without a bias, BN, ReLU; the last
      layer Dense without a bias followed, when `last_bn`, by a BN with
      neither scale nor centre; PyTorch nn.Linear's initialisation: MoCo
      v3's projector (last_bn=True) and predictor (last_bn=False)
      (docs/recipes.md, "MoCo v3").
    kind="swav", "barlow_twins", "vicreg": hidden layers Dense, BN, ReLU;
      the last layer Dense without BN; PyTorch nn.Linear's initialisation.
      SwAV's Dense layers all have biases; Barlow Twins' none; VICReg's
      hidden ones do and its last does not (docs/recipes.md, "SwAV",
      "Barlow Twins", "VICReg").
  The paper's text (Chen et al. 2020, Sec. 2.1, W2 relu(W1 h)) omits the BN
  that both SimCLR codebases use.

  `call` returns a dict: "proj_0" is the head input, "proj_i" the output of
  layer i (after its ReLU, or after the last layer), and "projection" the
  final output (== proj_{num_layers}); fine-tuning can start from any of
  them (the SimCLR v2 reference's ft_proj_selector). Sub-layers are named
  dense_i and batch_norm_i (i from 1), which checkpoints and
  tf_ssl.checkpoints.restore_projection_layers rely on.

  Args:
    hidden_dim: width of the hidden layers; None means the input width, as in
      SimCLR (2048 for a ResNet-50).
    output_dim: width of the projection (128 in SimCLR and SupCon).
    num_layers: number of Dense layers (>= 1).
    kind: one of KINDS, as above.
    last_bn: kind="moco_v3" only: end with an affine-free BN (the projector;
      the predictor has none).
    sync_bn: synchronise BN statistics across replicas (pretraining with a
      small per-replica batch); kind="simclr" only has BN.
    bn_momentum, bn_epsilon: BatchNormalization settings (0.9 and 1e-5 as in
      the SimCLR reference).
    **kwargs: forwarded to keras.layers.Layer (name defaults to
      "projection_head").

  Example:
    >>> head = ProjectionHead(hidden_dim=512, output_dim=128, num_layers=3)
    >>> out = head(features, training=True)
    >>> out["projection"].shape, out["proj_1"].shape  # (B, 128), (B, 512)

  References: Chen et al., "A Simple Framework for Contrastive Learning of
  Visual Representations", https://arxiv.org/abs/2002.05709; Chen et al.,
  "Big Self-Supervised Models are Strong Semi-Supervised Learners",
  https://arxiv.org/abs/2006.10029; Khosla et al., "Supervised Contrastive
  Learning", https://arxiv.org/abs/2004.11362
  """

  def __init__(self, hidden_dim=None, output_dim=128, num_layers=2,
               kind="simclr", sync_bn=False, bn_momentum=BN_MOMENTUM,
               bn_epsilon=BN_EPSILON, last_bn=True, **kwargs):
    if "version" in kwargs:
      raise TypeError(
          f"ProjectionHead(version={kwargs['version']!r}) is gone: both SimCLR "
          "versions build the same head and differ only in depth. Pass "
          "kind='simclr' with num_layers=2 (v1) or 3 (v2), or kind='mlp' for "
          "SupCon's Linear-ReLU-Linear head without BN.")
    kwargs.setdefault("name", "projection_head")
    super().__init__(**kwargs)
    if kind not in KINDS:
      raise ValueError(f"ProjectionHead: kind={kind!r}; pass 'simclr' "
                       "(Dense-BN layers, SimCLR v1/v2), 'mlp' (Dense with "
                       "bias, no BN, SupCon's and MoCo v2's head), or the "
                       f"head of a method: one of {', '.join(KINDS[2:])}.")
    if num_layers < 1:
      raise ValueError(f"ProjectionHead: num_layers={num_layers}; pass >= 1.")
    self.hidden_dim = hidden_dim
    self.output_dim = output_dim
    self.num_layers = num_layers
    self.kind = kind
    self.sync_bn = sync_bn
    self.bn_momentum = bn_momentum
    self.bn_epsilon = bn_epsilon
    self.last_bn = bool(last_bn)
    self.dense_layers = []
    self.bn_layers = []

  def build(self, input_shape):
    # Layers are made here, not in __init__, because hidden_dim=None means
    # "the input width", which is only known now.
    width = input_shape[-1]
    if width is None:
      raise ValueError("ProjectionHead.build: the feature width (last axis of "
                       f"{input_shape}) must be known; build it with "
                       "(None, backbone.feature_dim).")
    for i in range(1, self.num_layers + 1):
      last = i == self.num_layers
      units = self.output_dim if last else (self.hidden_dim or width)
      dense, bn = self._layer(i, units, width, last)
      dense.build((None, width))
      width = units
      self.dense_layers.append(dense)
      self.bn_layers.append(bn)

  def _layer(self, i, units, fan_in, last):
    """(Dense, BN or None) of layer i, as `kind` builds it."""
    def bn_layer(center=True, scale=True):
      bn = keras.layers.BatchNormalization(
          momentum=self.bn_momentum, epsilon=self.bn_epsilon,
          synchronized=self.sync_bn, center=center, scale=scale,
          name=f"batch_norm_{i}", dtype=self.dtype_policy)
      bn.build((None, units))
      return bn
    torch_kernel, torch_bias = torch_initializers(fan_in)
    dense = lambda use_bias, kernel, bias="zeros": keras.layers.Dense(
        units, use_bias=use_bias, kernel_initializer=kernel,
        bias_initializer=bias, name=f"dense_{i}", dtype=self.dtype_policy)
    if self.kind == "simclr":
      # A new initializer per layer: a shared unseeded instance would give
      # layers of the same shape the same starting kernel.
      return (dense(False, keras.initializers.RandomNormal(stddev=0.01)),
              bn_layer(center=not last))
    if self.kind == "mlp":
      return dense(True, torch_kernel, torch_bias), None
    if self.kind == "byol":
      # Haiku's Linear: truncated normal, stddev 1/sqrt(fan_in), zero bias.
      kernel = keras.initializers.VarianceScaling(1.0, "fan_in", "truncated_normal")
      return dense(not last, kernel), (None if last else bn_layer())
    if self.kind in _TORCH_BIASES:
      hidden_bias, last_bias = _TORCH_BIASES[self.kind]
      return (dense(last_bias if last else hidden_bias, torch_kernel, torch_bias),
              None if last else bn_layer())
    # moco_v3
    if last:
      return dense(False, torch_kernel), (
          bn_layer(center=False, scale=False) if self.last_bn else None)
    return dense(False, torch_kernel), bn_layer()

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
                  num_layers=self.num_layers, kind=self.kind,
                  sync_bn=self.sync_bn, bn_momentum=self.bn_momentum,
                  bn_epsilon=self.bn_epsilon, last_bn=self.last_bn)
    return config


def torch_initializers(fan_in):
  """(kernel, bias) initializers of PyTorch's nn.Linear: kaiming_uniform
  with a=sqrt(5) for the kernel, i.e. U(+-1/sqrt(fan_in)), and the same
  bound for the bias."""
  bound = 1.0 / math.sqrt(fan_in)
  return (keras.initializers.VarianceScaling(1.0 / 3.0, "fan_in", "uniform"),
          keras.initializers.RandomUniform(-bound, bound))


def torch_linear(units, fan_in, use_bias=True, **kwargs):
  """A Dense layer initialised as PyTorch's nn.Linear(fan_in, units) (the
  pretext heads of RotNet, Jigsaw and PIRL in VISSL)."""
  kernel, bias = torch_initializers(fan_in)
  return keras.layers.Dense(units, use_bias=use_bias, kernel_initializer=kernel,
                            bias_initializer=bias, **kwargs)


@keras.saving.register_keras_serializable(package="tf_ssl")
class LinearHead(keras.layers.Dense):
  """A Dense classifier with zero-initialised kernel and bias.

  Zero init is BiT's choice for the new head (docs/recipes.md,
  "BiT-HyperRule"): the first steps then only move the head, and the logits
  start at zero (a uniform softmax).
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
