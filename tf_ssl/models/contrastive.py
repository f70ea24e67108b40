"""The contrastive Keras model: backbone, projection head and online probe.

`ContrastiveModel.train_step` is the whole update of SimCLR / SupCon
pretraining. It runs unchanged under every tf.distribute strategy because
Keras' optimizer sums gradients over replicas and this step divides the
per-replica loss by the replica count in exactly one place (`_scale`), so the
summed gradient equals the gradient of the global-batch loss on one device.
"""

import keras
import tensorflow as tf

from tf_ssl import distribute
from tf_ssl import losses

METHODS = ("simclr", "supcon")


def _views_major(views):
  """[B, V, H, W, C] -> [V*B, H, W, C], all first views, then all second ..."""
  shape = tf.shape(views)
  views = tf.transpose(views, [1, 0, 2, 3, 4])
  return tf.reshape(views, tf.concat([[-1], shape[2:]], axis=0))


class ContrastiveModel(keras.Model):
  """A backbone, a projection head and an online linear probe.

  The probe is a linear classifier on `stop_gradient(features)`: it measures
  representation quality during pretraining without shaping it (SimCLR's
  "supervised head" with fine-tuning off). It trains on the labelled examples
  of each batch (label >= 0) and is skipped when `num_classes` is 0.

  Args:
    backbone: a model mapping images in [0, 1] to a dict of endpoints with a
      "features" entry.
    projection_head: a layer mapping features to a dict with a "projection"
      entry (and its hidden layers).
    num_classes: classes of the online probe; 0 for none.
    method: "simclr" (NT-Xent, labels unused) or "supcon" (labels required).
    temperature: softmax temperature of the contrastive loss.
    supcon_options: extra keyword arguments of `tf_ssl.losses.supcon`
      (base_temperature, contrast_mode, summation, denominator).

  The model needs no call or build before `fit`: Keras builds it from the
  first batch (see `call`).

  Example:
    >>> model = ContrastiveModel(backbone, ProjectionHead(), num_classes=10)
    >>> model.compile(optimizer=tf_ssl.optim.LARS(0.3))
    >>> model.fit(pretrain_batches, steps_per_epoch=100)
  """

  def __init__(self, backbone, projection_head, num_classes=0, method="simclr",
               temperature=0.1, supcon_options=None, **kwargs):
    super().__init__(**kwargs)
    if method not in METHODS:
      raise ValueError(f"method={method!r} is not one of {METHODS}.")
    if method == "simclr" and supcon_options:
      raise ValueError("supcon_options are only used with method='supcon'.")
    self.backbone = backbone
    self.projection_head = projection_head
    self.num_classes = num_classes
    self.method = method
    self.temperature = temperature
    self.supcon_options = dict(supcon_options or {})
    self.probe_head = None
    if num_classes:
      # Named "probe_head": the LARS defaults exclude that path from weight
      # decay and trust-ratio adaptation, as SimCLR does for its head.
      self.probe_head = keras.layers.Dense(
          num_classes, kernel_initializer="zeros", name="probe_head")
    self._trackers = {
        name: keras.metrics.Mean(name=name)
        for name in ("loss", "contrastive_loss", "probe_loss", "contrast_acc",
                     "contrast_entropy", "grad_norm_per_replica", "weight_norm")
    }
    self._probe_acc = keras.metrics.SparseCategoricalAccuracy(name="probe_acc")

  @property
  def metrics(self):
    # Listed so that Keras resets them at each epoch and evaluation.
    return list(self._trackers.values()) + [self._probe_acc]

  def call(self, inputs, training=False):
    """Every named endpoint: the backbone's, the head's and "probe_logits".

    Args:
      inputs: images [N, H, W, C] in [0, 1], or a batch dict as the
        tf_ssl.data pipelines yield it: {"views": [B, V, H, W, C], ...}
        (pretraining; the endpoints are those of all V * B views, all first
        views, then all second views..., as train_step orders them) or
        {"image": [N, H, W, C], ...} (evaluation).
      training: BN in training mode.

    Accepting the batch dict is what lets an unbuilt model go straight to
    `fit`: under a distribution strategy Keras first builds the model by
    calling it symbolically on the first batch, as is.
    """
    endpoints = dict(self.backbone(self._images(inputs), training=training))
    endpoints.update(self.projection_head(endpoints["features"], training=training))
    if self.probe_head is not None:
      endpoints["probe_logits"] = self.probe_head(
          tf.stop_gradient(endpoints["features"]))
    return endpoints

  @staticmethod
  def _images(inputs):
    if not isinstance(inputs, dict):
      return inputs
    if "views" in inputs:
      return _views_major(inputs["views"])
    if "image" in inputs:
      return inputs["image"]
    raise ValueError(
        "ContrastiveModel: a batch dict needs 'views' [B, V, H, W, C] (a "
        "pretraining batch) or 'image' [N, H, W, C] (an eval batch); got "
        f"keys {sorted(inputs)}. Or pass the images themselves.")

  def _contrastive_loss(self, projection, labels, num_views):
    z = tf.reshape(projection, [num_views, -1, tf.shape(projection)[-1]])
    if self.method == "simclr":
      if num_views == 2:
        return losses.nt_xent(z[0], z[1], self.temperature)
      # More views: every other view of the same image is a positive, i.e.
      # SupCon with one class per image (ids unique over replicas). SupCon
      # averages over all V*B anchors; times V it is the sum over views of
      # each view's batch mean, which at two views is NT-Xent's reference
      # scale, loss_a + loss_b (docs/recipes.md, "NT-Xent").
      local = tf.shape(z)[1]
      ids = tf.range(local) + distribute.replica_id() * local
      loss, metrics = losses.supcon(tf.transpose(z, [1, 0, 2]), ids,
                                    self.temperature,
                                    base_temperature=self.temperature)
      return float(num_views) * loss, metrics
    if labels is None:
      raise ValueError("method='supcon' needs a 'label' in every batch.")
    return losses.supcon(tf.transpose(z, [1, 0, 2]), labels, self.temperature,
                         **self.supcon_options)

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
    num_views = views.shape[1]
    images = _views_major(views)
    view_labels = None if labels is None else tf.tile(labels, [num_views])
    with tf.GradientTape() as tape:
      endpoints = self.backbone(images, training=True)
      features = endpoints["features"]
      head = self.projection_head(features, training=True)
      contrastive, metrics = self._contrastive_loss(
          head["projection"], labels, num_views)
      loss = contrastive
      probe = tf.constant(0.0)
      if self.probe_head is not None and view_labels is not None:
        probe = self._probe_loss(features, view_labels)
        loss = loss + probe
      scaled = self._scale(loss)
    variables = self.trainable_variables
    grads = tape.gradient(scaled, variables)
    self.optimizer.apply_gradients(zip(grads, variables))

    values = dict(metrics, loss=loss, contrastive_loss=contrastive, probe_loss=probe,
                  grad_norm_per_replica=tf.linalg.global_norm(grads),
                  weight_norm=tf.linalg.global_norm(variables))
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
    features = self.backbone(data["image"], training=False)["features"]
    logits = tf.cast(self.probe_head(features), tf.float32)
    weight = tf.cast(data["mask"], tf.float32) * tf.cast(data["label"] >= 0, tf.float32)
    self._probe_acc.update_state(tf.maximum(data["label"], 0), logits,
                                 sample_weight=weight)
    return {self._probe_acc.name: self._probe_acc.result()}
