"""Supervised Contrastive learning (Khosla et al. 2020): the views of every
image of the same class are positives (docs/recipes.md, "Supervised
Contrastive loss"). Unlabelled rows (label -1) are their own class.
"""

import dataclasses

import tensorflow as tf

from tf_ssl import losses
from tf_ssl.methods import base
from tf_ssl.methods import simclr


class SupCon(simclr.SimCLR):
  """SimCLR's network with the SupCon loss on the batch's labels."""
  name = "supcon"
  needs_labels = True

  @dataclasses.dataclass(frozen=True)
  class Config:
    temperature: float = 0.1
    base_temperature: float = 0.07
    contrast_mode: str = "all"
    summation: str = "outside"
    denominator: str = "all"

    def __post_init__(self):
      base.check_option(self.temperature > 0, "temperature", self.temperature,
                        "must be positive.")

  def contrastive_loss(self, projection, labels, num_views):
    if labels is None:
      raise ValueError("method='supcon' needs a 'label' in every batch.")
    c = self.config
    z = tf.reshape(projection, [num_views, -1, tf.shape(projection)[-1]])
    return losses.supcon(tf.transpose(z, [1, 0, 2]), labels, c.temperature,
                         base_temperature=c.base_temperature,
                         contrast_mode=c.contrast_mode, summation=c.summation,
                         denominator=c.denominator)
