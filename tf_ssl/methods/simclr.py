"""SimCLR v1/v2 (Chen et al. 2020): NT-Xent between two views of each image,
negatives from every replica (docs/recipes.md, "NT-Xent").

    python -m tf_ssl.train --flagfile=configs/simclr_imagenet.cfg --workdir=...
"""

import dataclasses

import tensorflow as tf

from tf_ssl import distribute
from tf_ssl import losses
from tf_ssl.methods import base


class SimCLR(base.Method):
  """Backbone -> projection head -> NT-Xent over the global batch.

  With more than two views per image, every other view of the image is a
  positive: SupCon with one class per image, scaled to equal NT-Xent at two
  views.
  """
  name = "simclr"
  metric_names = ("contrast_acc", "contrast_entropy")
  num_views = None  # Any number >= 2.

  @dataclasses.dataclass(frozen=True)
  class Config:
    temperature: float = 0.1

    def __post_init__(self):
      base.check_option(self.temperature > 0, "temperature", self.temperature,
                        "must be positive.")

  def layers(self, backbone, make_backbone):
    del backbone, make_backbone
    return {"projection_head": self.projector()}

  def contrastive_loss(self, projection, labels, num_views):
    """NT-Xent of view-major projections [V*B, D]; labels unused."""
    del labels
    t = self.config.temperature
    z = tf.reshape(projection, [num_views, -1, tf.shape(projection)[-1]])
    if num_views == 2:
      return losses.nt_xent(z[0], z[1], t)
    # SupCon averages over all V*B anchors; times V it is the sum over views
    # of each view's batch mean, which at two views is NT-Xent's reference
    # scale, loss_a + loss_b (docs/recipes.md, "NT-Xent"). Image ids are
    # unique over replicas.
    local = tf.shape(z)[1]
    ids = tf.range(local) + distribute.replica_id() * local
    loss, metrics = losses.supcon(tf.transpose(z, [1, 0, 2]), ids, t,
                                  base_temperature=t)
    return float(num_views) * loss, metrics

  def forward(self, model, views, labels):
    num_views = views.shape[1]
    features = model.backbone(base.views_major(views), training=True)["features"]
    projection = model.projection_head(features, training=True)["projection"]
    loss, metrics = self.contrastive_loss(projection, labels, num_views)
    return base.StepOutput(loss, metrics, features)
