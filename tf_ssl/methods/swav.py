"""SwAV (Caron et al. 2020): online clustering. The codes of each global
view, equipartitioned over the global batch by Sinkhorn-Knopp, are predicted
from every other view, local crops included (docs/recipes.md, "SwAV")."""

import dataclasses
import math

import keras
import tensorflow as tf

from tf_ssl import distribute
from tf_ssl import losses
from tf_ssl.data import augment
from tf_ssl.methods import base
from tf_ssl.models.queue import KeyQueue


class Prototypes(keras.layers.Layer):
  """`num` unit-norm prototype vectors, the columns of a kernel [dim, num]
  (a Dense layer without bias, as the reference's); `call` gives the
  cosine scores of unit rows in float32, whatever the compute dtype (the
  softmax at temperature 0.1 and Sinkhorn at epsilon 0.05 need them)."""

  def __init__(self, num, dim, **kwargs):
    kwargs.setdefault("name", "prototypes")
    super().__init__(**kwargs)
    self.num, self.dim = int(num), int(dim)
    bound = 1.0 / math.sqrt(self.dim)  # nn.Linear's, then normalised

    def unit_columns(shape, dtype=None):
      w = keras.random.uniform(shape, -bound, bound, dtype="float32")
      return tf.cast(tf.math.l2_normalize(w, axis=0), dtype or "float32")

    self.kernel = self.add_weight(shape=(self.dim, self.num), initializer=unit_columns,
                                  dtype="float32", name="kernel", autocast=False)
    self.built = True

  def call(self, z, frozen=False):
    """Scores z [N, dim] against every prototype; with `frozen` (a bool
    tensor may decide at run time) no gradient reaches the prototypes."""
    kernel = tf.convert_to_tensor(self.kernel)
    kernel = tf.where(frozen, tf.stop_gradient(kernel), kernel)
    return tf.matmul(tf.cast(z, tf.float32), kernel)

  def normalize(self):
    """Makes every prototype unit-norm again (after each update), on every
    replica's copy."""
    distribute.update_replicated(
        lambda k: k.assign(tf.math.l2_normalize(k, axis=0)), [self.kernel])


class SwAV(base.Method):
  """Backbone -> projector -> l2-normalise -> prototype scores.

  For each global view a: codes q_a = sinkhorn(scores of view a) over the
  global batch (and the queue once it is full); the loss of a is the mean
  over the other V - 1 views v (global and local) of swav(scores_v, q_a),
  and the loss is the mean over the global views, as the reference. The
  backbone runs once per view size, the projector once on all views. The
  prototypes get no gradient for the first `freeze_prototypes_steps` steps
  and are renormalised after every update. The backbone is the
  representation.
  """
  name = "swav"
  loss_name = "swav_loss"
  metric_names = ("code_entropy",)
  default_head = "swav"
  multi_crop = True

  @dataclasses.dataclass(frozen=True)
  class Config:
    temperature: float = 0.1
    prototypes: int = 3000
    epsilon: float = 0.05
    sinkhorn_iterations: int = 3
    freeze_prototypes_steps: int = 313
    queue_size: int = 0  # 0: no queue (large batches); 3840 at batch 256.
    queue_start_epoch: int = 15

    def __post_init__(self):
      check = base.check_option
      check(self.temperature > 0, "temperature", self.temperature, "must be positive.")
      check(self.prototypes >= 2, "swav_prototypes", self.prototypes, "must be >= 2.")
      check(self.epsilon > 0, "swav_epsilon", self.epsilon, "must be positive.")
      check(self.sinkhorn_iterations >= 1, "swav_sinkhorn_iterations",
            self.sinkhorn_iterations, "must be >= 1.")
      check(self.freeze_prototypes_steps >= 0, "swav_freeze_prototypes_steps",
            self.freeze_prototypes_steps, "must be >= 0.")
      check(self.queue_size >= 0, "swav_queue_size", self.queue_size, "must be >= 0.")
      check(self.queue_start_epoch >= 0, "swav_queue_start_epoch",
            self.queue_start_epoch, "must be >= 0.")

  def __init__(self, config=None, **kwargs):
    super().__init__(config, **kwargs)
    base.check_whole_batches("swav_queue_size", self.config.queue_size,
                             self.global_batch_size)

  def layers(self, backbone, make_backbone):
    del backbone, make_backbone
    head = self.projector()
    out = {"projection_head": head,
           "prototypes": Prototypes(self.config.prototypes, head.output_dim)}
    if self.config.queue_size:
      # One queue per global view, of that view's earlier projections.
      for a in range(self.num_views):
        out[f"queue_{a}"] = KeyQueue(self.config.queue_size, head.output_dim,
                                     name=f"queue_{a}")
    return out

  def augment(self, data):
    views = augment.SimCLRAugment(
        data.image_size, color_strength=data.color_strength,
        version=data.simclr_version, blur=data.blur,
        crop_area=(data.crop_min_area, 1.0), num_views=self.num_views)
    return self.multi_crop_augment(data, views)

  def forward(self, model, views, labels):
    del labels
    cfg = self.config
    step = model.optimizer.iterations
    b, num_global, num_crops = base.crop_counts(views)
    features = base.group_features(model.backbone, views)
    z = tf.math.l2_normalize(tf.cast(
        model.projection_head(features, training=True)["projection"], tf.float32),
                             axis=1)
    frozen = step < cfg.freeze_prototypes_steps
    scores = model.prototypes(z, frozen=frozen)
    scores = tf.reshape(scores, [num_crops, b, cfg.prototypes])
    crops_z = tf.reshape(z, [num_crops, b, -1])
    loss, entropy, state = 0.0, 0.0, {}
    for a in range(num_global):
      codes = self._codes(model, scores[a], a)
      view_loss = 0.0
      for v in range(num_crops):
        if v != a:
          pair_loss, metrics = losses.swav(scores[v], codes, cfg.temperature)
          view_loss += pair_loss
      # The codes' entropy; ln(prototypes) means uniform codes (collapse).
      entropy += metrics["entropy"] / num_global
      loss += view_loss / (num_crops - 1) / num_global
      state[f"z_{a}"] = tf.stop_gradient(crops_z[a])
    return base.StepOutput(loss, {"code_entropy": entropy},
                           features[:num_global * b], state)

  def _codes(self, model, scores, a):
    """Sinkhorn codes of global view a's scores, with its queue once the
    queue is full."""
    cfg = self.config
    codes = losses.sinkhorn(scores, cfg.epsilon, cfg.sinkhorn_iterations)
    if not cfg.queue_size:
      return codes
    queue = getattr(model, f"queue_{a}")
    # Earlier projections, scored by the current prototypes. Both Sinkhorns
    # run (their sums are collectives, which must run on every replica
    # alike); the full queue picks one.
    shared = tf.stop_gradient(model.prototypes(queue.keys))
    queued = losses.sinkhorn(scores, cfg.epsilon, cfg.sinkhorn_iterations,
                             shared_scores=shared)
    return tf.where(queue.full, queued, codes)

  def after_update(self, model, state, step):
    model.prototypes.normalize()
    if self.config.queue_size:
      active = self.epoch(step) >= self.config.queue_start_epoch
      for a in range(self.num_views):
        getattr(model, f"queue_{a}").push(
            distribute.cross_replica_concat(state[f"z_{a}"]), active)

  def optimizer_exclusions(self):
    # The reference wraps SGD in LARC for every parameter, with weight decay.
    return base.PROBE_ONLY
