"""DINO (Caron et al. 2021): self-distillation without labels. A student
matches, on every view, the centred and sharpened output of an EMA teacher
that sees the global views only (docs/recipes.md, "DINO")."""

import dataclasses
import math

import keras
import tensorflow as tf

from tf_ssl import distribute
from tf_ssl import losses
from tf_ssl.methods import base
from tf_ssl.models import ema
from tf_ssl.models import heads


class DINOHead(keras.layers.Layer):
  """MLP (GELU between layers; with `use_bn`, the reference's
  use_bn_in_head, BN before each GELU and no bias in the layer before it)
  to a bottleneck, l2-normalisation, then a
  weight-normalised linear layer without bias to `out_dim` logits whose
  weight vectors are kept unit-norm (the reference's norm_last_layer:
  effectively cosine similarities with `out_dim` prototypes).

  MLP kernels start from a truncated normal of stddev 0.02 with zero
  biases, the last layer from nn.Linear's uniform; `call` returns
  {"proj_0": input, "proj_i": layer i's output, "embedding": the
  normalised bottleneck, "projection": the logits}.
  """

  def __init__(self, out_dim, hidden_dim=None, bottleneck_dim=256, num_layers=3,
               use_bn=False, sync_bn=False, **kwargs):
    kwargs.setdefault("name", "projection_head")
    super().__init__(**kwargs)
    self.out_dim, self.hidden_dim = int(out_dim), hidden_dim
    self.bottleneck_dim, self.num_layers = int(bottleneck_dim), int(num_layers)
    self.use_bn, self.sync_bn = bool(use_bn), bool(sync_bn)
    self.output_dim = self.out_dim
    self.dense_layers, self.bn_layers = [], []

  def build(self, input_shape):
    width = input_shape[-1]
    init = keras.initializers.TruncatedNormal(stddev=0.02)
    for i in range(1, self.num_layers + 1):
      units = self.bottleneck_dim if i == self.num_layers else (self.hidden_dim or width)
      # Before a BN, no bias: BN subtracts it again (the reference's has no
      # effect there but noise).
      bn_follows = self.use_bn and i < self.num_layers
      dense = keras.layers.Dense(units, kernel_initializer=init, bias_initializer="zeros",
                                 use_bias=not bn_follows, name=f"dense_{i}",
                                 dtype=self.dtype_policy)
      dense.build((None, width))
      self.dense_layers.append(dense)
      if bn_follows:
        bn = keras.layers.BatchNormalization(
            momentum=heads.BN_MOMENTUM, epsilon=heads.BN_EPSILON,
            synchronized=self.sync_bn, name=f"batch_norm_{i}",
            dtype=self.dtype_policy)
        bn.build((None, units))
        self.bn_layers.append(bn)
      width = units
    bound = 1.0 / math.sqrt(self.bottleneck_dim)
    self.last_kernel = self.add_weight(
        shape=(self.bottleneck_dim, self.out_dim), name="last_kernel",
        initializer=keras.initializers.RandomUniform(-bound, bound),
        dtype="float32", autocast=False)

  def call(self, inputs, training=None, freeze_last=False):
    out = {"proj_0": inputs}
    x = inputs
    for i, dense in enumerate(self.dense_layers):
      x = dense(x)
      if i < self.num_layers - 1:
        if self.bn_layers:
          x = self.bn_layers[i](x, training=training)
        x = keras.ops.gelu(x, approximate=False)
      out[f"proj_{i + 1}"] = x
    x = tf.math.l2_normalize(tf.cast(x, tf.float32), axis=-1)
    kernel = tf.convert_to_tensor(self.last_kernel)
    kernel = tf.where(freeze_last, tf.stop_gradient(kernel), kernel)
    out["embedding"] = x
    # Logits in float32: they are sharpened at temperature 0.04.
    out["projection"] = tf.matmul(x, tf.math.l2_normalize(tf.cast(kernel, tf.float32),
                                                          axis=0))
    return out


class Center(keras.layers.Layer):
  """DINO's centre of the teacher's logits [dim]: not trained, starts at 0,
  identical on every replica."""

  def __init__(self, dim, **kwargs):
    kwargs.setdefault("name", "center")
    super().__init__(**kwargs)
    self.center = self.add_weight(shape=(int(dim),), initializer="zeros",
                                  trainable=False, dtype="float32", name="center",
                                  autocast=False)
    self.built = True

  def assign(self, value):
    distribute.update_replicated(lambda c, v: c.assign(v), [self.center], value)


class DINO(base.WithTarget):
  """Student: backbone + DINO head on every view (the backbone once per
  view size); teacher: EMA copy (cosine from `momentum` to 1) on the global
  views, in training mode.

  loss = the mean over the pairs (teacher view t, student view s != t) of
  dino(student_s, teacher_t, centre, student_temperature, teacher
  temperature). The teacher temperature rises linearly by epoch from
  `warmup_teacher_temperature` to `teacher_temperature` over
  `warmup_teacher_temperature_epochs`; the centre then moves by
  `center_momentum` towards the teacher's global-batch mean (the loss uses
  the old one); the head's last layer gets no gradient for the first
  `freeze_last_layer_epochs`. The TEACHER is the representation.
  """
  name = "dino"
  loss_name = "dino_loss"
  metric_names = ("teacher_temperature", "teacher_entropy")
  default_head = "dino"
  representation = "target_backbone"
  multi_crop = True
  cosine = True

  @dataclasses.dataclass(frozen=True)
  class Config:
    out_dim: int = 65536
    momentum: float = 0.996
    student_temperature: float = 0.1
    teacher_temperature: float = 0.07
    warmup_teacher_temperature: float = 0.04
    warmup_teacher_temperature_epochs: int = 30
    center_momentum: float = 0.9
    freeze_last_layer_epochs: int = 1
    use_bn_in_head: bool = False

    def __post_init__(self):
      check = base.check_option
      check(self.out_dim >= 2, "dino_out_dim", self.out_dim, "must be >= 2.")
      check(0 <= self.momentum < 1, "dino_momentum", self.momentum, "must be in [0, 1).")
      for flag in ("student_temperature", "teacher_temperature",
                   "warmup_teacher_temperature"):
        check(getattr(self, flag) > 0, "dino_" + flag, getattr(self, flag),
              "must be positive.")
      check(self.warmup_teacher_temperature_epochs >= 0,
            "dino_warmup_teacher_temperature_epochs",
            self.warmup_teacher_temperature_epochs, "must be >= 0.")
      check(0 <= self.center_momentum < 1, "dino_center_momentum",
            self.center_momentum, "must be in [0, 1).")
      check(self.freeze_last_layer_epochs >= 0, "dino_freeze_last_layer_epochs",
            self.freeze_last_layer_epochs, "must be >= 0.")

  def projector(self, name="projection_head", **overrides):
    del overrides
    spec = self.head
    if not isinstance(spec, base.HeadSpec) or spec.kind not in (None, "dino"):
      raise ValueError("--method=dino builds its own head (--proj_hidden_dim, "
                       "--proj_dim as its bottleneck, --proj_layers, --dino_out_dim); "
                       "drop --proj_head.")
    return DINOHead(self.config.out_dim, hidden_dim=spec.hidden_dim,
                    bottleneck_dim=spec.output_dim, num_layers=spec.num_layers,
                    use_bn=self.config.use_bn_in_head, sync_bn=spec.sync_bn,
                    name=name)

  def endpoints(self, model, features, training):
    # The teacher's head, on the teacher's (the representation's) features.
    return dict(model.target_projection_head(features, training=training))

  def build_extra(self, model, images):
    # The model's call builds the teacher (the representation); this builds
    # the student.
    features = model.backbone(images, training=False)["features"]
    model.projection_head(features, training=False)
    ema.freeze([model.target_backbone, model.target_projection_head])

  def online_layers(self, backbone):
    del backbone
    return {"projection_head": self.projector(),
            "center": Center(self.config.out_dim)}

  def augment(self, data):
    # The DINO global views are BYOL's pair: blur 1.0 / 0.1, solarise 0 / 0.2.
    return self.multi_crop_augment(data, base.asymmetric_views(data))

  def teacher_temperature(self, step):
    """The teacher temperature at `step` (float32), constant within an
    epoch as the reference's per-epoch schedule."""
    cfg = self.config
    warmup = cfg.warmup_teacher_temperature_epochs
    if not warmup:
      return tf.constant(cfg.teacher_temperature, tf.float32)
    epoch = tf.cast(self.epoch(step), tf.float32)
    ramp = cfg.warmup_teacher_temperature + (
        cfg.teacher_temperature - cfg.warmup_teacher_temperature) * epoch / max(warmup - 1, 1)
    return tf.where(epoch < warmup, ramp, cfg.teacher_temperature)

  def forward(self, model, views, labels):
    del labels
    cfg = self.config
    step = model.optimizer.iterations
    b, num_global, num_crops = base.crop_counts(views)
    student = model.projection_head(
        base.group_features(model.backbone, views), training=True,
        freeze_last=self.epoch(step) < cfg.freeze_last_layer_epochs)["projection"]
    student = tf.reshape(student, [num_crops, b, cfg.out_dim])
    teacher_features = model.target_backbone(
        base.views_major(base.view_groups(views)[0][1]), training=True)["features"]
    teacher = tf.stop_gradient(model.target_projection_head(
        teacher_features, training=True)["projection"])
    center = tf.convert_to_tensor(model.center.center)
    temperature = self.teacher_temperature(step)
    teachers = tf.reshape(teacher, [num_global, b, cfg.out_dim])
    loss, pairs, entropy = 0.0, 0, 0.0
    for t in range(num_global):
      for s in range(num_crops):
        if s != t:
          pair_loss, metrics = losses.dino(student[s], teachers[t], center,
                                           cfg.student_temperature, temperature)
          loss += pair_loss
          pairs += 1
      entropy += metrics["entropy"] / num_global
    new_center = losses.dino_center(teacher, center, cfg.center_momentum)
    # Teacher entropy ln(out_dim): the uniform collapse (docs/recipes.md).
    metrics = {"teacher_temperature": temperature, "teacher_entropy": entropy}
    return base.StepOutput(loss / pairs, metrics, tf.stop_gradient(teacher_features),
                           {"center": new_center})

  def after_update(self, model, state, step):
    del step
    model.center.assign(state["center"])

  def schedules(self):
    out = super().schedules()
    out["dino_teacher_temperature"] = lambda step: float(self.teacher_temperature(step))
    return out
