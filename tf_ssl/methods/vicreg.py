"""VICReg (Bardes, Ponce, LeCun 2022): variance, invariance and covariance
regularisation of two views' projections; the variance and covariance over
the global batch (docs/recipes.md, "VICReg")."""

import dataclasses

import tensorflow as tf

from tf_ssl import losses
from tf_ssl.methods import base


class VICReg(base.Method):
  """Backbone -> expander (Dense + BN + ReLU, then a Dense without bias;
  8192-8192-8192 on ImageNet) -> vicreg(z1, z2): the invariance on this
  replica's rows, the variance and covariance over the global batch. Each
  view goes through the networks on its own. BYOL's asymmetric views (the
  reference's, as Barlow Twins'). The backbone is the representation.
  """
  name = "vicreg"
  loss_name = "vicreg_loss"
  metric_names = ("invariance", "variance", "covariance")
  default_head = "vicreg"

  @dataclasses.dataclass(frozen=True)
  class Config:
    sim_weight: float = 25.0
    var_weight: float = 25.0
    cov_weight: float = 1.0

    def __post_init__(self):
      for name in ("sim_weight", "var_weight", "cov_weight"):
        value = getattr(self, name)
        base.check_option(value >= 0, "vicreg_" + name, value, "must be >= 0.")

  def layers(self, backbone, make_backbone):
    del backbone, make_backbone
    return {"projection_head": self.projector()}

  def augment(self, data):
    return base.asymmetric_views(data)

  def forward(self, model, views, labels):
    del labels
    cfg = self.config
    f1, z1 = self.project(model, views[:, 0])
    f2, z2 = self.project(model, views[:, 1])
    loss, metrics = losses.vicreg(z1, z2, cfg.sim_weight, cfg.var_weight,
                                  cfg.cov_weight)
    return base.StepOutput(loss, metrics, tf.concat([f1, f2], 0))
