"""MoCo v2 (Chen, Fan, Girshick, He 2020): a query encoder against its key
from a momentum encoder and a queue of earlier keys (docs/recipes.md,
"MoCo v2")."""

import dataclasses

import tensorflow as tf

from tf_ssl import distribute
from tf_ssl import losses
from tf_ssl.methods import base
from tf_ssl.models.queue import KeyQueue


class MoCoV2(base.WithTarget):
  """Query encoder + 2-layer MLP head; key encoder by EMA (constant
  `momentum`); negatives from a queue of `queue_size` keys, enqueued from
  the whole global batch after each step.

  One direction (the reference): queries from view 1, keys from view 2.
  BatchNorm: the key encoder runs in training mode with the same BN as the
  query encoder (synchronised with --sync_bn), not the reference's
  Shuffle-BN, whose result depends on the replica count; docs/recipes.md,
  "MoCo v2", says why.
  """
  name = "moco_v2"
  metric_names = ("contrast_acc", "contrast_entropy")
  default_head = "mlp"
  cosine = False

  @dataclasses.dataclass(frozen=True)
  class Config:
    temperature: float = 0.2
    momentum: float = 0.999
    queue_size: int = 65536

    def __post_init__(self):
      base.check_option(self.temperature > 0, "temperature", self.temperature,
                        "must be positive.")
      base.check_option(0 <= self.momentum < 1, "moco_momentum", self.momentum,
                        "must be in [0, 1).")
      base.check_option(self.queue_size >= 1, "moco_queue_size", self.queue_size,
                        "must be >= 1.")

  def __init__(self, config=None, **kwargs):
    super().__init__(config, **kwargs)
    base.check_whole_batches("moco_queue_size", self.config.queue_size,
                             self.global_batch_size)

  def online_layers(self, backbone):
    del backbone
    head = self.projector()
    return {"projection_head": head,
            "queue": KeyQueue(self.config.queue_size, head.output_dim)}

  def optimizer_exclusions(self):
    # The reference decays every parameter (SGD, wd 1e-4).
    return base.PROBE_ONLY

  def forward(self, model, views, labels):
    del labels
    v1, v2 = views[:, 0], views[:, 1]
    features = model.backbone(v1, training=True)["features"]
    q = model.projection_head(features, training=True)["projection"]
    k = self.target_projection(model, v2)
    loss, metrics = losses.moco(q, k, model.queue.keys, self.config.temperature)
    keys = tf.math.l2_normalize(tf.cast(k, tf.float32), axis=1)
    return base.StepOutput(loss, metrics, features, {"keys": keys})

  def after_update(self, model, state, step):
    del step
    model.queue.push(distribute.cross_replica_concat(state["keys"]))
