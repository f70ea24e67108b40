"""MoCo v3, ResNet form (Chen, Xie, He 2021): a query network with a
predictor against the keys of a momentum network, negatives from the whole
global batch, both directions (docs/recipes.md, "MoCo v3")."""

import dataclasses

import tensorflow as tf

from tf_ssl import losses
from tf_ssl.methods import base


class MoCoV3(base.WithTarget):
  """Backbone + projector (last BN without affine) + predictor; momentum
  network = backbone + projector, EMA with the cosine schedule from
  `momentum` to 1.

  loss = moco_v3(q1, k2) + moco_v3(q2, k1), each scaled by 2 * temperature
  as the reference. BYOL's asymmetric views. The online (base) network is
  the representation.
  """
  name = "moco_v3"
  metric_names = ("contrast_acc", "contrast_entropy")
  default_head = "moco_v3"
  cosine = True

  @dataclasses.dataclass(frozen=True)
  class Config:
    temperature: float = 1.0
    momentum: float = 0.99
    pred_hidden_dim: int = 0  # 0: the projector's hidden width.

    def __post_init__(self):
      base.check_option(self.temperature > 0, "temperature", self.temperature,
                        "must be positive.")
      base.check_option(0 <= self.momentum < 1, "moco_momentum", self.momentum,
                        "must be in [0, 1).")
      base.check_option(self.pred_hidden_dim >= 0, "moco_pred_hidden_dim",
                        self.pred_hidden_dim, "must be >= 0.")

  def online_layers(self, backbone):
    return {"projection_head": self.projector(),
            "predictor": self.predictor(backbone.feature_dim,
                                        self.config.pred_hidden_dim,
                                        last_bn=False)}

  def augment(self, data):
    return base.asymmetric_views(data)

  def forward(self, model, views, labels):
    del labels
    t = self.config.temperature
    v1, v2 = views[:, 0], views[:, 1]
    f1, q1 = self.online(model, v1)
    f2, q2 = self.online(model, v2)
    k1 = self.target_projection(model, v1)
    k2 = self.target_projection(model, v2)
    loss_12, m_12 = losses.moco_v3(q1, k2, t)
    loss_21, m_21 = losses.moco_v3(q2, k1, t)
    metrics = {k: (m_12[k] + m_21[k]) / 2.0 for k in self.metric_names}
    return base.StepOutput(loss_12 + loss_21, metrics, tf.concat([f1, f2], 0))
