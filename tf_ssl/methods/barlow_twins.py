"""Barlow Twins (Zbontar et al. 2021): the cross-correlation of two views'
standardised projections over the global batch is pushed to the identity
(docs/recipes.md, "Barlow Twins")."""

import dataclasses

import tensorflow as tf

from tf_ssl import losses
from tf_ssl.methods import base


class BarlowTwins(base.Method):
  """Backbone -> projector (Dense without bias + BN + ReLU, then a Dense
  without bias; 8192-8192-8192 on ImageNet) -> barlow_twins(z1, z2), whose
  standardisation and cross-correlation run over the global batch with the
  gradient every replica's rows get on one device. Each view goes through
  the networks on its own, as the reference. BYOL's asymmetric views; LARS
  leaves biases and BN out of weight decay and adaptation (the defaults).
  The backbone is the representation.
  """
  name = "barlow_twins"
  loss_name = "barlow_twins_loss"
  metric_names = ("on_diag", "off_diag")
  default_head = "barlow_twins"

  @dataclasses.dataclass(frozen=True)
  class Config:
    lambd: float = 0.0051  # the off-diagonal weight (the reference's --lambd)

    def __post_init__(self):
      base.check_option(self.lambd >= 0, "barlow_lambd", self.lambd, "must be >= 0.")

  def layers(self, backbone, make_backbone):
    del backbone, make_backbone
    return {"projection_head": self.projector()}

  def learning_rate_multipliers(self):
    # The reference's rate for biases and BN parameters: 0.0048 against
    # 0.2 for the weights (both times B / 256).
    return ((r"(^|/)(gamma|beta|bias)$", 0.0048 / 0.2),)

  def augment(self, data):
    return base.asymmetric_views(data)

  def forward(self, model, views, labels):
    del labels
    f1, z1 = self.project(model, views[:, 0])
    f2, z2 = self.project(model, views[:, 1])
    loss, metrics = losses.barlow_twins(z1, z2, self.config.lambd)
    return base.StepOutput(loss, metrics, tf.concat([f1, f2], 0))
