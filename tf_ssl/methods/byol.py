"""BYOL (Grill et al. 2020): an online network predicts a target network's
projection of the other view; the target is an EMA of the online network
(docs/recipes.md, "BYOL")."""

import dataclasses

import tensorflow as tf

from tf_ssl import losses
from tf_ssl.methods import base


class BYOL(base.WithTarget):
  """Online backbone + projector + predictor; target backbone + projector.

  loss = byol(p1, z'2) + byol(p2, z'1): both directions summed, as the
  reference (not their mean). The target runs in training mode (batch
  statistics) and follows the cosine schedule from `momentum` to 1. Each
  view goes through the networks on its own, so BN statistics are those of
  one view's batch, as in the reference. The online network is the
  representation.
  """
  name = "byol"
  loss_name = "byol_loss"
  metric_names = ("cosine",)
  default_head = "byol"
  cosine = True

  @dataclasses.dataclass(frozen=True)
  class Config:
    momentum: float = 0.996
    pred_hidden_dim: int = 0  # 0: the projector's hidden width.
    # The predictor's learning rate over the rest's (1 in BYOL; a faster
    # predictor is what DirectPred and SimSiam found to help).
    predictor_lr_multiplier: float = 1.0

    def __post_init__(self):
      base.check_option(0 <= self.momentum < 1, "byol_momentum", self.momentum,
                        "must be in [0, 1).")
      base.check_option(self.pred_hidden_dim >= 0, "byol_pred_hidden_dim",
                        self.pred_hidden_dim, "must be >= 0.")
      base.check_option(self.predictor_lr_multiplier > 0,
                        "byol_predictor_lr_multiplier",
                        self.predictor_lr_multiplier, "must be > 0.")

  def online_layers(self, backbone):
    return {"projection_head": self.projector(),
            "predictor": self.predictor(backbone.feature_dim,
                                        self.config.pred_hidden_dim)}

  def learning_rate_multipliers(self):
    factor = self.config.predictor_lr_multiplier
    return ((r"(^|/)predictor/", factor),) if factor != 1.0 else ()

  def augment(self, data):
    # version=1: BYOL's repository adds a brightness delta (its
    # _random_brightness); MoCo v3's torchvision multiplies.
    return base.asymmetric_views(data, version=1)

  def forward(self, model, views, labels):
    del labels
    v1, v2 = views[:, 0], views[:, 1]
    f1, p1 = self.online(model, v1)
    f2, p2 = self.online(model, v2)
    z1 = self.target_projection(model, v1)
    z2 = self.target_projection(model, v2)
    loss_12, m_12 = losses.byol(p1, z2)
    loss_21, m_21 = losses.byol(p2, z1)
    metrics = {"cosine": (m_12["cosine"] + m_21["cosine"]) / 2.0}
    return base.StepOutput(loss_12 + loss_21, metrics, tf.concat([f1, f2], 0))
