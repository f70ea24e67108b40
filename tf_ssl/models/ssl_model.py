"""The one Keras model and train step of every self-supervised method.

`SSLModel` holds the online backbone, the online probe and whatever layers
its `tf_ssl.methods` method adds; `train_step` is the whole update of every
method. It runs unchanged under every tf.distribute strategy because Keras'
optimizer sums gradients over replicas and this step divides the
per-replica loss by the replica count in exactly one place (`_scale`), so
the summed gradient equals the gradient of the global-batch loss on one
device. A step is:

    method.before_step   (e.g. the target's EMA)
    method.forward       (views and the method's batch entries -> loss,
                         under the tape) + the probe's loss
    optimizer update     (of the trainable variables; targets are frozen)
    method.after_update  (e.g. the enqueue of this step's keys)
"""

import keras
import tensorflow as tf

from tf_ssl import distribute
from tf_ssl.methods.base import view_groups, views_major

_COMMON_METRICS = ("loss", "probe_loss", "grad_norm_per_replica", "weight_norm")


class SSLModel(keras.Model):
  """An online backbone, a method's layers and an online linear probe.

  The probe is a linear classifier on `stop_gradient(features)`: it measures
  representation quality during pretraining without shaping it (SimCLR's
  "supervised head" with fine-tuning off). It trains on the labelled examples
  of each batch (label >= 0) and is skipped when `num_classes` is 0.

  Args:
    backbone: a model mapping images in [0, 1] to a dict of endpoints with a
      "features" entry; the online network.
    method: a tf_ssl.methods Method (e.g. `tf_ssl.methods.create("byol",
      ...)`); its `layers` become attributes of the model.
    num_classes: classes of the online probe; 0 for none.
    make_backbone: zero-argument function building another backbone like
      `backbone`, for methods with a target network.

  The model needs no call or build before `fit`: Keras builds it from the
  first batch (see `call`).
  """

  def __init__(self, backbone, method, num_classes=0, make_backbone=None,
               **kwargs):
    super().__init__(**kwargs)
    self.backbone = backbone
    self.method = method
    self.num_classes = num_classes
    added = method.layers(backbone, make_backbone)
    clash = sorted(set(added) & {"backbone", "probe_head", "method"})
    if clash:
      raise ValueError(f"method {method.name!r} adds layers named {clash}, "
                       "which the model already has.")
    for name, layer in added.items():
      setattr(self, name, layer)
    self.part_names = ("backbone",) + tuple(added)
    self.probe_head = None
    if num_classes:
      # Named "probe_head": the LARS defaults exclude that path from weight
      # decay and trust-ratio adaptation, as SimCLR does for its head.
      self.probe_head = keras.layers.Dense(
          num_classes, kernel_initializer="zeros", name="probe_head")
    self._extra_built = False
    self._trackers = {
        name: keras.metrics.Mean(name=name)
        for name in _COMMON_METRICS + (method.loss_name,) + tuple(method.metric_names)}
    self._probe_acc = keras.metrics.SparseCategoricalAccuracy(name="probe_acc")

  @property
  def metrics(self):
    # Listed so that Keras resets them at each epoch and evaluation.
    return list(self._trackers.values()) + [self._probe_acc]

  @property
  def representation(self):
    """The network evaluation, fine-tuning --init and export use."""
    return getattr(self, self.method.representation)

  def checkpoint_parts(self):
    """{part name: layer} as tf_ssl.checkpoints files them. "backbone" is
    always the representation (what `finetune --init` restores); when that
    is not the online backbone, the online one is "online_backbone"."""
    parts = {name: getattr(self, name) for name in self.part_names}
    if self.method.representation != "backbone":
      parts["online_backbone"] = parts.pop("backbone")
      parts["backbone"] = parts.pop(self.method.representation)
    if self.probe_head is not None:
      parts["probe_head"] = self.probe_head
    return parts

  def call(self, inputs, training=False):
    """Every named endpoint: the representation's (the backbone's), the
    method's heads' and "probe_logits".

    Args:
      inputs: images [N, H, W, C] in [0, 1], or a batch dict as the
        tf_ssl.data pipelines yield it: {"views": [B, V, H, W, C], ...}
        (pretraining; the endpoints are those of all V * B views, all first
        views, then all second views..., as train_step orders them) or
        {"image": [N, H, W, C], ...} (evaluation). Multi-crop views
        ({"global": ..., "local": ...}) give the global views' endpoints.
      training: BN in training mode.

    Accepting the batch dict is what lets an unbuilt model go straight to
    `fit`: under a distribution strategy Keras first builds the model by
    calling it symbolically on the first batch, as is. That first call also
    builds the layers only training uses (a target network).
    """
    images = self._images(inputs)
    endpoints = dict(self.representation(images, training=training))
    endpoints.update(self.method.endpoints(self, endpoints["features"], training))
    if self.probe_head is not None:
      endpoints["probe_logits"] = self.probe_head(
          tf.stop_gradient(endpoints["features"]))
    if not self._extra_built:
      self.method.build_extra(self, images)
      self._extra_built = True
    return endpoints

  @staticmethod
  def _images(inputs):
    if not isinstance(inputs, dict):
      return inputs
    if "views" in inputs:  # multi-crop: the global views build the model
      return views_major(view_groups(inputs["views"])[0][1])
    if "image" in inputs:
      return inputs["image"]
    raise ValueError(
        "SSLModel: a batch dict needs 'views' [B, V, H, W, C] (a "
        "pretraining batch) or 'image' [N, H, W, C] (an eval batch); got "
        f"keys {sorted(inputs)}. Or pass the images themselves.")

  def _probe_loss(self, features, labels):
    """Cross-entropy over the labelled rows of the global batch.

    Returns the local sum divided by the global labelled count, times the
    replica count: after the one division by the replica count in `_scale`,
    the summed gradient is that of the mean over every labelled row of the
    global batch, however the labels fall across replicas.
    """
    logits = tf.cast(self.probe_head(tf.stop_gradient(features)), tf.float32)
    labelled = tf.cast(labels >= 0, tf.float32)
    safe_labels = tf.maximum(labels, 0)
    ce = keras.losses.sparse_categorical_crossentropy(
        safe_labels, logits, from_logits=True)
    local_count = tf.reduce_sum(labelled)
    global_count = local_count
    ctx = tf.distribute.get_replica_context()
    if ctx is not None and ctx.num_replicas_in_sync > 1:
      global_count = ctx.all_reduce("sum", local_count)
    replicas = tf.cast(distribute.num_replicas(), tf.float32)
    loss = tf.reduce_sum(ce * labelled) * replicas / tf.maximum(global_count, 1.0)
    self._probe_acc.update_state(safe_labels, logits, sample_weight=labelled)
    return loss

  @staticmethod
  def _scale(loss):
    # The one place the loss is divided by the replica count: Keras' optimizer
    # sums gradients over replicas.
    return loss / tf.cast(distribute.num_replicas(), loss.dtype)

  def train_step(self, data):
    views = data["views"]
    labels = data.get("label")
    entries = {name: data[name] for name in self.method.batch_entries}
    step = self.optimizer.iterations
    self.method.before_step(self, step)
    with tf.GradientTape() as tape:
      out = self.method.forward(self, views, labels, **entries)
      loss = out.loss
      probe = tf.constant(0.0)
      if self.probe_head is not None and labels is not None:
        rows = tf.shape(out.features)[0] // tf.shape(labels)[0]
        probe = self._probe_loss(out.features, tf.tile(labels, [rows]))
        loss = loss + probe
      scaled = self._scale(loss)
    variables = self.trainable_variables
    grads = tape.gradient(scaled, variables)
    self.optimizer.apply_gradients(zip(grads, variables))
    # The step just taken: iterations has moved on by one.
    self.method.after_update(self, out.state, self.optimizer.iterations - 1)

    values = dict(out.metrics, loss=loss, probe_loss=probe,
                  grad_norm_per_replica=tf.linalg.global_norm(grads),
                  weight_norm=tf.linalg.global_norm(variables))
    values[self.method.loss_name] = out.loss
    for name, value in values.items():
      if name in self._trackers:
        self._trackers[name].update_state(value)
    # Only metric results: when the keys equal the metric names, Keras reports
    # epoch results from the metric states summed over replicas (exact global
    # values) instead of averaging per-replica results.
    return {m.name: m.result() for m in self.metrics}

  def test_step(self, data):
    """Probe accuracy on an eval batch {"image", "label", "mask"}."""
    if self.probe_head is None:
      return {}
    features = self.representation(data["image"], training=False)["features"]
    logits = tf.cast(self.probe_head(features), tf.float32)
    weight = tf.cast(data["mask"], tf.float32) * tf.cast(data["label"] >= 0, tf.float32)
    self._probe_acc.update_state(tf.maximum(data["label"], 0), logits,
                                 sample_weight=weight)
    return {self._probe_acc.name: self._probe_acc.result()}
